"""What every edit returns, the error it raises, and the one wrapper that applies an edit.

An edit is a plain function ``edit(img, *, <params>, rng=None) -> EditResult``. The parameters are
keyword-only and always explicit; random edits draw from the ``numpy.random.Generator`` passed in and
write what they drew into the record, so a record is enough to replay the edit
(:func:`activeindex.edits.registry.replay`).

Every edit goes through :func:`run_edit`, which is where the two rules of this package live:

- a failing edit raises :class:`EditError` (edit name, parameters, reason); it is never replaced by
  the unedited image — the reference research code did that, and every metric computed over such
  "edited" queries is silently inflated;
- the output is always 8-bit RGB, and the record says whether any pixel changed
  (:attr:`EditRecord.changed`), so an edit that should change the image but did not is visible.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ParamSpec

import numpy as np
from PIL import Image

from activeindex.errors import ActiveIndexError

# The signature every edit has: ``fn(img, *, rng=None, **params) -> EditResult``.
EditFn = Callable[..., "EditResult"]


class EditError(ActiveIndexError):
    """An edit could not be applied: bad parameters, an input it cannot handle, a library failure.

    Carries the edit's name, the parameters it was called with and the reason, so a benchmark can
    report the failing query instead of scoring an unedited image as an edited one.
    """

    def __init__(self, edit: str, params: Mapping[str, Any], reason: str) -> None:
        self.edit = edit
        self.params = dict(params)
        self.reason = reason
        super().__init__(f"edit {edit!r} with {self.params} failed: {reason}")


class UnknownEditError(EditError, KeyError):
    """No edit is registered under that name (a ``KeyError`` too, for mapping-style callers)."""

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return self.args[0] if self.args else ""


class Category(str, enum.Enum):
    """The four families the paper's "auto" edit draws from (one primitive per family)."""

    COLOUR = "colour"
    OVERLAY = "overlay"
    PIXEL = "pixel"
    SPATIAL = "spatial"


class Source(str, enum.Enum):
    """Whose code performs an edit: AugLy as installed, our AugLy compatibility layer, or ours."""

    AUGLY = "augly"
    COMPAT = "augly_compat"
    OWN = "own"


def _freeze(value: Any) -> Any:
    """Parameters as immutable plain Python values: tuples for sequences, no numpy scalars."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return {str(k): _freeze(v) for k, v in value.items()}
    return value


def _thaw(value: Any) -> Any:
    """The JSON form of a frozen value: tuples become lists."""
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class EditRecord:
    """Exactly what one edit did.

    ``params`` holds every parameter applied, including the ones drawn at random, as plain Python
    values (sequences as tuples). Sizes are ``(width, height)`` as PIL gives them. A composite edit
    ("auto") lists its applied sub-edits, in order, in ``steps``; applying the steps one after the
    other reproduces its output. Not hashable (``params`` is a dict).
    """

    name: str
    params: Mapping[str, Any]
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    changed: bool  # False when the output equals the input pixel for pixel
    steps: tuple[EditRecord, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (sequences as lists); :meth:`from_dict` inverts it."""
        out: dict[str, Any] = {
            "name": self.name,
            "params": _thaw(dict(self.params)),
            "input_size": list(self.input_size),
            "output_size": list(self.output_size),
            "changed": self.changed,
        }
        if self.steps:
            out["steps"] = [s.to_dict() for s in self.steps]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditRecord:
        """Rebuild a record written by :meth:`to_dict`."""
        return cls(
            name=str(data["name"]),
            params=_freeze(dict(data["params"])),
            input_size=tuple(data["input_size"]),  # type: ignore[arg-type]
            output_size=tuple(data["output_size"]),  # type: ignore[arg-type]
            changed=bool(data["changed"]),
            steps=tuple(cls.from_dict(s) for s in data.get("steps", ())),
        )


@dataclass(frozen=True)
class EditResult:
    """The edited image (mode ``"RGB"``, a new object, never the caller's input) and its record.

    Equality compares the records only; compare images by their pixels (``tobytes()``).
    """

    image: Image.Image = field(compare=False)
    record: EditRecord


def as_rgb(name: str, params: Mapping[str, Any], img: object) -> Image.Image:
    """Check that ``img`` is a non-empty PIL image and return it in RGB mode.

    Alpha is dropped, not composited: queries come from :func:`activeindex.images.load_image`,
    which already gives RGB, so this only guards direct library callers.
    """
    if not isinstance(img, Image.Image):
        raise EditError(name, params, f"expected a PIL.Image.Image, got {type(img).__name__}")
    if img.width < 1 or img.height < 1:
        raise EditError(name, params, f"empty input image of size {img.size}")
    return img if img.mode == "RGB" else img.convert("RGB")


def pixels_equal(a: Image.Image, b: Image.Image) -> bool:
    """True when two images have the same size, mode and pixel values."""
    return a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()


def run_edit(
    name: str,
    params: Mapping[str, Any],
    img: object,
    fn: Callable[[Image.Image], Image.Image],
) -> EditResult:
    """Apply ``fn`` to the RGB version of ``img`` and record it under ``name`` with ``params``.

    ``params`` must be exactly the parameters ``fn`` applies (random draws included). Any exception
    from ``fn`` — an AugLy assertion, a Pillow error, a failed font layout — becomes an
    :class:`EditError` chained to the original, never a fallback to the input image. The output
    is converted to RGB (AugLy returns palette or RGBA images for some edits) and must not be empty.
    """
    frozen = _freeze(dict(params))
    src = as_rgb(name, frozen, img)
    try:
        out = fn(src)
    except EditError:
        raise
    except Exception as exc:  # noqa: BLE001 — re-raised with context, never swallowed
        raise EditError(name, frozen, f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(out, Image.Image):
        raise EditError(name, frozen, f"edit returned {type(out).__name__}, not an image")
    if out.width < 1 or out.height < 1:
        raise EditError(name, frozen, f"edit produced an empty image of size {out.size}")
    if out.mode != "RGB":
        out = out.convert("RGB")
    if out is src:  # the result must be a new object: callers may mutate it
        out = out.copy()
    record = EditRecord(
        name=name,
        params=frozen,
        input_size=src.size,
        output_size=out.size,
        changed=not pixels_equal(src, out),
    )
    return EditResult(out, record)


def check(condition: bool, name: str, params: Mapping[str, Any], reason: str) -> None:
    """Raise :class:`EditError` with ``reason`` unless ``condition`` holds (parameter validation)."""
    if not condition:
        raise EditError(name, _freeze(dict(params)), reason)


def check_rgb_color(name: str, params: Mapping[str, Any], color: object) -> tuple[int, int, int]:
    """Validate an RGB triple of integers in [0, 255] and return it as a tuple."""
    ok = (
        isinstance(color, (tuple, list))
        and len(color) == 3
        and all(isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in color)
    )
    check(ok, name, params, f"colour must be three integers in [0, 255], got {color!r}")
    return tuple(int(c) for c in color)  # type: ignore[return-value, union-attr]


P = ParamSpec("P")


def edit_function(fn: Callable[P, EditResult]) -> Callable[P, EditResult]:
    """Mark a public edit: a ``TypeError`` or ``ValueError`` raised while it reads its parameters
    (``factor="strong"``, an unknown keyword) becomes an :class:`EditError` naming the edit.

    Errors while *applying* the edit are already turned into :class:`EditError` by
    :func:`run_edit`; this covers what happens before it, so callers catch one exception type.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> EditResult:
        try:
            return fn(*args, **kwargs)
        except EditError:
            raise
        except (TypeError, ValueError) as exc:
            params = {k: v for k, v in kwargs.items() if k != "rng"}
            raise EditError(fn.__name__, params, f"{type(exc).__name__}: {exc}") from exc

    return wrapper


@edit_function
def identity(img: Image.Image, *, rng: np.random.Generator | None = None) -> EditResult:
    """The unedited image (a copy), recorded as ``identity``: the table's reference column."""
    return run_edit("identity", {}, img, lambda im: im.copy())
