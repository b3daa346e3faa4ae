"""Edits by name, the paper's table of 14 edits, its parameter sweeps, and replaying records.

- :data:`EDITS` maps each edit's name (the name in its records) to the function, its default
  parameters, the family "auto" draws it from, and whose code performs it (:class:`Source`).
- :class:`PaperEdit` lists the 14 edits of the paper's DISC21 table by display name;
  :func:`paper_edits` gives them as ready-to-call :class:`NamedEdit` objects,
  :func:`paper_extra_edits` the one reported apart (overlay onto screenshot), and :func:`sweeps`
  the parameter sweeps of the paper's full evaluation.
- :func:`replay` re-applies a record (or its steps) to an image: records are complete.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from activeindex.edits import auto_edit
from activeindex.edits import colour, overlay, pixel, spatial
from activeindex.edits.base import (
    Category,
    EditError,
    EditFn,
    EditRecord,
    EditResult,
    Source,
    UnknownEditError,
    as_rgb,
    identity,
    pixels_equal,
)


@dataclass(frozen=True)
class EditInfo:
    """A registered edit: its function, parameters, "auto" family and implementation source."""

    name: str
    fn: EditFn = field(repr=False)
    source: Source
    category: Category | None  # the family "auto" draws it from; None if "auto" never does
    defaults: Mapping[str, Any]  # keyword parameters with a default
    required: tuple[str, ...]  # keyword parameters without one

    @property
    def parameters(self) -> tuple[str, ...]:
        """Every parameter the edit accepts (besides the image and ``rng``)."""
        return self.required + tuple(self.defaults)


def _info(fn: EditFn, source: Source) -> EditInfo:
    defaults: dict[str, Any] = {}
    required: list[str] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name == "rng":
            continue
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
        else:
            defaults[p.name] = p.default
    primitive = next((p for p in auto_edit.PRIMITIVES if p.fn is fn), None)
    return EditInfo(
        name=fn.__name__,
        fn=fn,
        source=source,
        category=primitive.category if primitive else None,
        defaults=MappingProxyType(defaults),
        required=tuple(required),
    )


_A, _C, _O = Source.AUGLY, Source.COMPAT, Source.OWN
EDITS: Mapping[str, EditInfo] = MappingProxyType({
    info.name: info
    for info in (
        _info(identity, _O),
        _info(colour.contrast, _A),
        _info(colour.brightness, _A),
        _info(colour.hue, _O),
        _info(colour.saturation, _A),
        _info(colour.grayscale, _A),
        _info(pixel.gaussian_blur, _O),
        _info(pixel.blur, _A),
        _info(pixel.jpeg, _A),
        _info(pixel.palette, _A),
        _info(pixel.edge_enhance, _A),
        _info(pixel.pixelization, _A),
        _info(pixel.shuffle_pixels, _O),
        _info(spatial.rotate, _O),
        _info(spatial.rotate_crop, _A),
        _info(spatial.center_crop, _O),
        _info(spatial.resize, _A),
        _info(spatial.crop, _A),
        _info(spatial.hflip, _A),
        _info(spatial.change_aspect_ratio, _A),
        _info(spatial.pad_square, _A),
        _info(spatial.perspective_transform, _C),
        _info(overlay.meme_format, _C),
        _info(overlay.overlay_onto_screenshot, _A),
        _info(overlay.overlay_emoji, _A),
        _info(overlay.overlay_text, _C),
        _info(auto_edit.auto, _O),  # composes the primitives above
    )
})


def get_edit(name: str) -> EditInfo:
    """The registered edit called ``name``; :class:`UnknownEditError` lists the known names."""
    try:
        return EDITS[name]
    except KeyError:
        raise UnknownEditError(name, {}, f"no such edit; known edits: {', '.join(EDITS)}") from None


def apply_edit(
    name: str, img: Image.Image, *, rng: np.random.Generator | None = None, **params: Any
) -> EditResult:
    """Apply the edit called ``name`` with ``params`` (defaults fill the rest).

    Unknown or missing parameters raise :class:`EditError` naming the accepted ones.
    """
    info = get_edit(name)
    unknown = sorted(set(params) - set(info.parameters))
    missing = [p for p in info.required if p not in params]
    if unknown or missing:
        raise EditError(
            name, params,
            f"unknown parameters {unknown}, missing {missing}; accepted: {list(info.parameters)}",
        )
    return info.fn(img, rng=rng, **params)


def replay(img: Image.Image, record: EditRecord) -> EditResult:
    """Re-apply exactly what ``record`` says was applied (its steps, in order, for composites).

    Deterministic: random edits recorded every draw. The new record equals ``record`` when
    ``img`` is the image the record was made from.
    """
    if not record.steps:
        return apply_edit(record.name, img, **record.params)
    src = as_rgb(record.name, record.params, img)
    current, steps = src, []
    for step in record.steps:
        result = replay(current, step)
        current = result.image
        steps.append(result.record)
    new = EditRecord(record.name, record.params, src.size, current.size,
                     not pixels_equal(src, current), tuple(steps))
    return EditResult(current, new)


@dataclass(frozen=True)
class NamedEdit:
    """A registered edit with fixed parameters and a display label; call it as ``e(img, rng)``."""

    label: str
    edit: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> EditResult:
        return apply_edit(self.edit, img, rng=rng, **self.params)


class PaperEdit(str, enum.Enum):
    """The 14 edits of the paper's DISC21 table (R@1 per edit, mean over these 14)."""

    IDENTITY = "identity"
    CONTRAST_0_5 = "contrast 0.5"
    CONTRAST_2_0 = "contrast 2.0"
    BRIGHTNESS_0_5 = "brightness 0.5"
    BRIGHTNESS_2_0 = "brightness 2.0"
    HUE_0_2 = "hue 0.2"
    BLUR_11 = "blur 11"
    JPEG_50 = "JPEG 50"
    ROTATION_25 = "rotation 25"
    ROTATION_90 = "rotation 90"
    CENTER_CROP_0_5 = "center crop 0.5"
    RESIZE_0_5 = "resize 0.5"
    MEME_FORMAT = "meme format"
    AUTO = "auto"

    @property
    def spec(self) -> NamedEdit:
        """The registered edit and parameters behind this table column."""
        edit, params = _PAPER_TABLE[self]
        return NamedEdit(self.value, edit, params)


_PAPER_TABLE: Mapping[PaperEdit, tuple[str, Mapping[str, Any]]] = {
    PaperEdit.IDENTITY: ("identity", {}),
    PaperEdit.CONTRAST_0_5: ("contrast", {"factor": 0.5}),
    PaperEdit.CONTRAST_2_0: ("contrast", {"factor": 2.0}),
    PaperEdit.BRIGHTNESS_0_5: ("brightness", {"factor": 0.5}),
    PaperEdit.BRIGHTNESS_2_0: ("brightness", {"factor": 2.0}),
    PaperEdit.HUE_0_2: ("hue", {"factor": 0.2}),
    PaperEdit.BLUR_11: ("gaussian_blur", {"kernel_size": 11, "sigma": 2.0}),
    PaperEdit.JPEG_50: ("jpeg", {"quality": 50}),
    PaperEdit.ROTATION_25: ("rotate", {"degrees": 25.0}),
    PaperEdit.ROTATION_90: ("rotate", {"degrees": 90.0}),
    PaperEdit.CENTER_CROP_0_5: ("center_crop", {"area": 0.5}),
    PaperEdit.RESIZE_0_5: ("resize", {"area": 0.5}),
    PaperEdit.MEME_FORMAT: ("meme_format", {}),
    PaperEdit.AUTO: ("auto", {}),
}

OVERLAY_ONTO_SCREENSHOT = NamedEdit("overlay onto screenshot", "overlay_onto_screenshot", {})


def paper_edits() -> dict[str, NamedEdit]:
    """The 14 table edits by display name, in the table's order; each is ``e(img, rng)``."""
    return {e.value: e.spec for e in PaperEdit}


def paper_extra_edits() -> dict[str, NamedEdit]:
    """Edits the paper reports apart from the 14 (not in the mean): overlay onto screenshot."""
    return {OVERLAY_ONTO_SCREENSHOT.label: OVERLAY_ONTO_SCREENSHOT}


def _steps(start: float, stop: float, step: float) -> list[float]:
    # Exact decimal grid (0.1 * 3 is 0.30000000000000004); ``+ 0.0`` turns -0.0 into 0.0.
    n = int(round((stop - start) / step)) + 1
    return [round(start + i * step, 6) + 0.0 for i in range(n)]


def sweeps() -> dict[str, tuple[NamedEdit, ...]]:
    """The parameter sweeps of the paper's full evaluation, one tuple of edits per family.

    rotation −90…90° step 10; center crop and resize area 0.1…1.0 step 0.1; blur kernel 3…29
    step 2 (σ by torchvision's default for the kernel); JPEG quality 10…100 step 10; contrast and
    brightness 0.5…1.9 step 0.1; hue −0.5…0.5 step 0.1. Neutral points are included, as in the
    paper: rotation 0, area 1.0 and factor 1.0 leave the image unchanged; hue 0.0 nearly does
    (8-bit HSV round trip).
    """
    return {
        "rotation": tuple(
            NamedEdit(f"rotation {d}", "rotate", {"degrees": float(d)}) for d in range(-90, 91, 10)
        ),
        "center crop": tuple(
            NamedEdit(f"center crop {a:.1f}", "center_crop", {"area": a}) for a in _steps(0.1, 1.0, 0.1)
        ),
        "resize": tuple(
            NamedEdit(f"resize {a:.1f}", "resize", {"area": a}) for a in _steps(0.1, 1.0, 0.1)
        ),
        "blur": tuple(
            NamedEdit(f"blur {k}", "gaussian_blur",
                      {"kernel_size": k, "sigma": pixel.default_blur_sigma(k)})
            for k in range(3, 30, 2)
        ),
        "JPEG": tuple(NamedEdit(f"JPEG {q}", "jpeg", {"quality": q}) for q in range(10, 101, 10)),
        "contrast": tuple(
            NamedEdit(f"contrast {f:.1f}", "contrast", {"factor": f}) for f in _steps(0.5, 1.9, 0.1)
        ),
        "brightness": tuple(
            NamedEdit(f"brightness {f:.1f}", "brightness", {"factor": f})
            for f in _steps(0.5, 1.9, 0.1)
        ),
        "hue": tuple(
            NamedEdit(f"hue {f:.1f}", "hue", {"factor": f}) for f in _steps(-0.5, 0.5, 0.1)
        ),
    }
