"""The activation knobs: the one table of what a user may set about activation, and how it is checked.

Each :class:`Knob` names a field of :class:`activeindex.activation.ActivationConfig`, its type,
its admissible range and its help text. From this table, and nowhere else:

- the command line builds its options (``--lr``, ``--scaling``, ... on ``add`` and ``evaluate``:
  :func:`activeindex.cli_knobs.with_activation_knobs`);
- the HTTP service builds the query parameters of its activate route (``lr=``, ``scaling=``, ...);
- :class:`ActivationConfig` checks its values (:func:`check_value`), so that the Python API, the
  CLI and the service refuse the same values with the same sentence, naming the knob.

Where a value comes from (:func:`resolve_knobs`): the user's value if given, else the model's own
default (``activation_defaults`` of a packaged or builtin model entry, tuned per model, see
docs/activation-study.md), else :class:`ActivationConfig`'s default.

Torch-free on purpose: the command line imports it to build its options, and ``--help`` must not
wait for torch (see :mod:`activeindex.settings`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from activeindex.errors import ActivationError
from activeindex.settings import FeatureLoss, TargetKind, ViewEdits


class KnobError(ActivationError):
    """A knob's value is refused; ``knob`` is its name (the ``ActivationConfig`` field)."""

    def __init__(self, knob: str, reason: str) -> None:
        super().__init__(f"{knob}: {reason}")
        self.knob = knob
        self.reason = reason


@dataclass(frozen=True)
class Knob:
    """One user-settable activation parameter."""

    name: str  # the ActivationConfig field, also the service's query parameter
    kind: type  # float, int, bool or an Enum
    default: Any  # ActivationConfig's default (where neither the user nor the model sets one)
    help: str
    low: float | None = None  # admissible range; ``low_open``: the bound itself is refused
    high: float | None = None
    low_open: bool = False
    nullable: bool = False  # None ("none" on the command line) is a value: e.g. never stop early

    @property
    def option(self) -> str:
        """The command-line option: ``lambda_i`` → ``--lambda-i``."""
        return "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        if self.low is None and self.high is None:
            return ""
        lo = "" if self.low is None else f"{self.low:g} {'<' if self.low_open else '<='} "
        hi = "" if self.high is None else f" <= {self.high:g}"
        return f"{lo}{self.name}{hi}"

    def check(self, value: Any) -> Any:
        """``value`` converted to the knob's type and checked; :class:`KnobError` naming the knob."""
        if value is None or (self.nullable and isinstance(value, str) and value.strip().lower() == NONE):
            if self.nullable:
                return None
            raise KnobError(self.name, "a value is needed (None is not one)")
        if issubclass(self.kind, enum.Enum):
            try:
                return self.kind(value)
            except ValueError:
                choices = ", ".join(m.value for m in self.kind)  # type: ignore[attr-defined]
                raise KnobError(self.name, f"must be one of {choices}, got {value!r}") from None
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
                return value.strip().lower() in ("true", "1")
            raise KnobError(self.name, f"must be true or false, got {value!r}")
        try:
            if isinstance(value, bool):
                raise ValueError
            if self.kind is int:
                number: float = int(value) if not isinstance(value, float) or value.is_integer() else math.nan
                if isinstance(number, float):
                    raise ValueError
            else:
                number = float(value)
        except (TypeError, ValueError):
            hint = " (none: never)" if self.nullable else ""
            raise KnobError(self.name, f"must be {'an integer' if self.kind is int else 'a number'}{hint}, "
                                       f"got {value!r}") from None
        if not math.isfinite(number):
            raise KnobError(self.name, f"must be a finite number, got {value!r}")
        too_low = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        too_high = self.high is not None and number > self.high
        if too_low or too_high:
            raise KnobError(self.name, f"must satisfy {self.range_text()}, got {value!r}")
        return number


# The table. Ranges are what the optimisation can run with, not what is sensible: the study
# (docs/activation-study.md) says what is sensible.
KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("psnr", float, 42.0, "quality floor of every released file, dB", 10.0, 80.0),
    Knob("iterations", int, 10, "optimisation steps", 0, 1000),
    Knob("lr", float, 1.0, "Adam step size on the tanh-parametrised perturbation", 0.0, 100.0, low_open=True),
    Knob("scaling", float, 3.0, "alpha: the perturbation bound is alpha x JND before the PSNR budget", 0.0, 100.0,
         low_open=True),
    Knob("lambda_f", float, 1.0, "weight of the feature term (towards the target)", 0.0, 1e6),
    Knob("lambda_i", float, 0.01, "weight of the image term MSE(x, x0)", 0.0, 1e6),
    Knob("loss", FeatureLoss, FeatureLoss.COSINE, "feature term: cosine or mse towards the target"),
    Knob("target", TargetKind, TargetKind.RECONSTRUCTION, "reconstruction of the stored code, its IVF centroid, or auto: the centroid on IVF indexes, the "
         "reconstruction elsewhere"),
    Knob("margin_weight", float, 0.0, "weight of the competitor term: the own stored code (and IVF cell) must "
         "outscore the nearest other codes (and cells) by --margin; 0: the paper's loss only", 0.0, 1e6),
    Knob("margin", float, 0.02, "score margin the own code must keep over each competitor", 0.0, 2.0),
    Knob("competitors", int, 8, "nearest other stored codes, and nearest other IVF cells, the competitor term "
         "looks at", 1, 256),
    Knob("stop_cos", float, 0.995, "stop an image once its cosine to the target reaches this (none: never)", -1.0, 1.0,
         nullable=True),
    Knob("robust", bool, False, "optimise through random differentiable edits (slower)"),
    Knob("views", int, 3, "edited views per image and step of robust activation", 1, 64),
    Knob("robust_strength", float, 0.7, "strength of the random edits of robust activation", 0.0, 1.0, low_open=True),
    Knob("view_edits", ViewEdits, ViewEdits.FAMILIES, "edited views of robust activation: families (view i a crop, "
         "a rotation or a caption band, in turn), families-colour (the same with a colour edit after the crop) "
         "or random (one random strong copy edit each)"),
    Knob("view_weight", float, 1.0, "weight of the edited views' mean feature term in robust activation; the unedited "
         "view keeps weight 1", 0.0, 1e6),
)}


DEFAULTS: dict[str, Any] = {k.name: k.default for k in KNOBS.values()}


def check_value(name: str, value: Any) -> Any:
    """``value`` for the knob ``name``, converted and checked (:class:`KnobError` if refused)."""
    try:
        knob = KNOBS[name]
    except KeyError:
        raise KnobError(name, f"is not an activation knob; known: {', '.join(KNOBS)}") from None
    return knob.check(value)


NONE = "none"  # how a user sets a nullable knob to None (a None value means "not set")


def user_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs a user set (None = not set), each checked (:class:`KnobError`) and converted; a
    nullable knob set to none stays ``"none"``, so that it is not taken for unset later."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if value is not None:
            checked = check_value(name, value)
            out[name] = NONE if checked is None else checked
    return out


@dataclass(frozen=True)
class ResolvedKnobs:
    """The values activation runs with, and where each came from: ``user``, ``model`` or ``default``."""

    values: dict[str, Any]
    sources: dict[str, str]

    def record(self) -> dict[str, Any]:
        """JSON-ready: ``{"values": {...}, "sources": {...}}`` (enums as their values)."""
        plain = {k: v.value if isinstance(v, enum.Enum) else v for k, v in self.values.items()}
        return {"values": plain, "sources": dict(self.sources)}


def resolve_knobs(user: Mapping[str, Any], model_defaults: Mapping[str, Any] | None = None,
                  base: Mapping[str, Any] | None = None) -> ResolvedKnobs:
    """The values of every knob: a ``user`` value wins over the model's ``model_defaults``, which
    win over ``base`` (ActivationConfig's defaults). A user value of ``None`` means *not set*; to
    set a nullable knob (``stop_cos``) to None, the user passes :data:`NONE`."""
    base = dict(base or {})
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    model_defaults = dict(model_defaults or {})
    unknown = set(model_defaults) - set(KNOBS)
    if unknown:
        raise KnobError(sorted(unknown)[0], "a model's activation_defaults names an unknown knob")
    for name, knob in KNOBS.items():
        if user.get(name) is not None:
            values[name], sources[name] = knob.check(user[name]), "user"
        elif name in model_defaults:
            values[name], sources[name] = knob.check(model_defaults[name]), "model"
        elif name in base:
            values[name], sources[name] = base[name], "default"
    extra = set(user) - set(KNOBS)
    if extra:
        check_value(sorted(extra)[0], None)  # raises: not a knob
    return ResolvedKnobs(values, sources)
