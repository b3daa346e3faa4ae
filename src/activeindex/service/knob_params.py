"""The activation knobs as query parameters of the service's activate route, built from the one
table (:mod:`activeindex.knobs`), as the command line builds its options from it.

:func:`activation_knobs` is a FastAPI dependency with one optional query parameter per knob
(``lr``, ``scaling``, ``lambda_i``, ``stop_cos`` — ``none`` for never —, ...), documented in the
OpenAPI schema; it returns the values the client set, checked, or answers 422 with a sentence
naming the parameter (``lr: must satisfy 0 < lr <= 100, got -1.0``). Unset knobs take the model's
own defaults (:func:`activeindex.activation.optimize.configure`).
"""

# No `from __future__ import annotations`: FastAPI reads the signature below at run time.
import inspect
from typing import Annotated, Any, Optional

from fastapi import HTTPException, Query

from activeindex.knobs import KNOBS, Knob, KnobError, user_values


def _parameter(knob: Knob) -> inspect.Parameter:
    # Typed so that the schema says number/integer/enum; ranges are checked by the table, whose
    # sentence names the knob (FastAPI's own range errors would not say the same as the CLI).
    kind: Any = str if knob.nullable else knob.kind
    default = "none" if knob.default is None else getattr(knob.default, "value", knob.default)
    description = f"{knob.help}" + (f" ({knob.range_text()})" if knob.range_text() else "") + \
        f"; default: the model's own, else {default}"
    return inspect.Parameter(knob.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], Query(description=description)])


def _activation_knobs(**values: Any) -> dict[str, Any]:
    try:
        return user_values(values)
    except KnobError as exc:
        raise HTTPException(422, str(exc)) from None


def activation_knobs() -> Any:
    """The FastAPI dependency (a fresh function whose signature lists the knobs)."""
    def dependency(**values: Any) -> dict[str, Any]:
        return _activation_knobs(**values)

    dependency.__signature__ = inspect.Signature([_parameter(k) for k in KNOBS.values()])  # type: ignore[attr-defined]
    return dependency
