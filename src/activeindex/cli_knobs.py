"""The activation knobs as command-line options, built from the one table (:mod:`activeindex.knobs`).

:func:`with_activation_knobs` gives a typer command one option per knob (``--lr``, ``--scaling``,
``--lambda-i``, ``--stop-cos``, ...), all unset by default, and hands the command a ``knobs`` dict of
the values the user *did* set, already checked: a refused value is an error naming the option
(``--lr: must satisfy 0 < lr <= 100, got -1.0``), raised before the command does any work. What the
user leaves unset is resolved later, from the model's own defaults, by
:func:`activeindex.activation.optimize.configure`.

Torch-free: built when the command line is imported, and ``--help`` must stay fast.
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer

from activeindex.errors import ActiveIndexError
from activeindex.knobs import KNOBS, Knob, KnobError, user_values

PANEL = "Activation"


def _default_text(knob: Knob) -> str:
    value = knob.default
    shown = value.value if isinstance(value, enum.Enum) else ("none" if value is None else value)
    return f" [default: the model's own, else {shown}]"


def _parameter(knob: Knob) -> inspect.Parameter:
    help_text = knob.help + (f" ({knob.range_text()})" if knob.range_text() else "") + _default_text(knob)
    if knob.kind is bool:
        kind: Any = Optional[bool]
        option = typer.Option(f"{knob.option}/--no-{knob.option[2:]}", help=help_text, show_default=False,
                              rich_help_panel=PANEL)
    elif knob.nullable:
        kind = Optional[str]
        option = typer.Option(knob.option, help=help_text, show_default=False, metavar="FLOAT|none",
                              rich_help_panel=PANEL)
    else:
        kind = Optional[knob.kind]
        option = typer.Option(knob.option, help=help_text, show_default=False, rich_help_panel=PANEL)
    return inspect.Parameter(f"knob_{knob.name}", inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind, option])


def checked_knobs(values: dict[str, Any]) -> dict[str, Any]:
    """The values the user set (not None), each checked; an error names the command-line option."""
    try:
        return user_values(values)
    except KnobError as exc:
        raise ActiveIndexError(f"{KNOBS[exc.knob].option}: {exc.reason}") from None


def with_activation_knobs(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give the typer command ``func`` (which takes ``knobs: dict``) one option per activation knob."""
    sig = inspect.signature(func, eval_str=True)
    params = [p for p in sig.parameters.values() if p.name != "knobs"]
    knob_params = [_parameter(k) for k in KNOBS.values()]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(f"knob_{name}", None) for name in KNOBS}
        return func(*args, knobs=checked_knobs(values), **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params + knob_params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params + knob_params}
    del wrapper.__wrapped__  # typer must read the signature above, not the wrapped function's
    return wrapper
