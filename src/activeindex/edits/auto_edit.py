"""The paper's "auto" edit: 1 to 4 random AugLy-style edits from distinct families (module not
named ``auto`` so that it is not shadowed by the re-exported function ``activeindex.edits.auto``).

As in the paper's query generation (METHOD.md §2):

1. draw how many edits, ``n`` in {1, 2, 3, 4}, with probabilities 0.1 / 0.2 / 0.3 / 0.4;
2. draw ``n`` distinct families among colour, overlay, pixel, spatial (uniformly, in random order);
3. draw one primitive per family, uniformly;
4. put ``crop`` first and ``palette`` last when they are drawn (others keep their random order);
5. draw each primitive's parameters from the ranges below, then apply the edits in order.

The plan (steps 1–5) does not depend on the image, so it can be sampled and inspected on its own
(:func:`sample_auto_plan`). The record of an "auto" edit lists every applied step with its exact
parameters, random seeds included; replaying the steps reproduces the output. A step that fails
raises :class:`EditError` naming the step — the query is never replaced by the unedited image.

Two deliberate differences from the paper's code, both recorded in the parameters: the pixel
shuffle and the perspective transform draw their seed from ``rng`` (the paper's code used AugLy's
fixed defaults, 10 and 42), and the palette has the drawn number of colours (see
:func:`activeindex.edits.pixel.palette`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from activeindex.edits import assets, colour, overlay, pixel, spatial
from activeindex.edits.base import (
    Category,
    EditError,
    EditFn,
    EditRecord,
    EditResult,
    as_rgb,
    edit_function,
    pixels_equal,
)

# P(n = 1), ..., P(n = 4): more edits are more likely, as in the paper's code.
N_EDITS_PROBS = (0.1, 0.2, 0.3, 0.4)

Sampler = Callable[[np.random.Generator], dict[str, Any]]


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _integer(rng: np.random.Generator, low: int, high: int) -> int:
    """An integer in [low, high], both included."""
    return int(rng.integers(low, high, endpoint=True))


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    return (_integer(rng, 0, 255), _integer(rng, 0, 255), _integer(rng, 0, 255))


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31))


def _window(rng: np.random.Generator, low: float, high: float) -> tuple[float, float]:
    """A random interval of [0, 1] whose length is uniform in [low, high]."""
    length = _uniform(rng, low, high)
    start = _uniform(rng, 0.0, 1.0 - length)
    return start, start + length


def _choice(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _text(rng: np.random.Generator) -> tuple[int, ...]:
    # 5 to 15 characters, each an index into the font's glyph list (taken modulo its length).
    return tuple(_integer(rng, 0, 10000) for _ in range(_integer(rng, 5, 15)))


def _crop(rng: np.random.Generator) -> dict[str, Any]:
    x1, x2 = _window(rng, 0.3, 0.6)
    y1, y2 = _window(rng, 0.3, 0.6)
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2}


@dataclass(frozen=True)
class Primitive:
    """One edit "auto" can draw: the registered edit, its family, how to draw its parameters."""

    name: str
    category: Category
    fn: EditFn
    sample: Sampler


PRIMITIVES: tuple[Primitive, ...] = (
    Primitive("brightness", Category.COLOUR, colour.brightness,
              lambda r: {"factor": _uniform(r, 0.1, 1.9)}),
    Primitive("grayscale", Category.COLOUR, colour.grayscale, lambda r: {}),
    Primitive("saturation", Category.COLOUR, colour.saturation,
              lambda r: {"factor": _uniform(r, 2.0, 5.0)}),
    Primitive("overlay_emoji", Category.OVERLAY, overlay.overlay_emoji, lambda r: {
        "emoji": _choice(r, assets.emoji_names()),
        "opacity": _uniform(r, 0.5, 1.0),
        "emoji_size": _uniform(r, 0.4, 0.8),
        "x_pos": _uniform(r, 0.0, 0.8),
        "y_pos": _uniform(r, 0.0, 0.8),
    }),
    Primitive("overlay_text", Category.OVERLAY, overlay.overlay_text, lambda r: {
        "text": _text(r),
        "font": _choice(r, assets.font_names()),
        "font_size": _uniform(r, 0.1, 0.3),
        "color": _color(r),
        "x_pos": _uniform(r, 0.0, 0.6),
        "y_pos": _uniform(r, 0.0, 0.6),
    }),
    Primitive("blur", Category.PIXEL, pixel.blur, lambda r: {"radius": _uniform(r, 5.0, 10.0)}),
    Primitive("palette", Category.PIXEL, pixel.palette, lambda r: {"colors": _integer(r, 2, 16)}),
    Primitive("jpeg", Category.PIXEL, pixel.jpeg, lambda r: {"quality": _integer(r, 5, 25)}),
    Primitive("edge_enhance", Category.PIXEL, pixel.edge_enhance, lambda r: {}),
    Primitive("pixelization", Category.PIXEL, pixel.pixelization,
              lambda r: {"ratio": _uniform(r, 0.2, 0.5)}),
    Primitive("shuffle_pixels", Category.PIXEL, pixel.shuffle_pixels,
              lambda r: {"factor": _uniform(r, 0.1, 0.3), "seed": _seed(r)}),
    Primitive("crop", Category.SPATIAL, spatial.crop, _crop),
    Primitive("hflip", Category.SPATIAL, spatial.hflip, lambda r: {}),
    Primitive("change_aspect_ratio", Category.SPATIAL, spatial.change_aspect_ratio,
              lambda r: {"ratio": _uniform(r, 0.5, 2.0)}),
    Primitive("overlay_onto_screenshot", Category.SPATIAL, overlay.overlay_onto_screenshot,
              lambda r: {"template": _choice(r, assets.template_names()), "crop_src_to_fit": True}),
    Primitive("pad_square", Category.SPATIAL, spatial.pad_square, lambda r: {"color": _color(r)}),
    Primitive("perspective_transform", Category.SPATIAL, spatial.perspective_transform,
              lambda r: {"sigma": _uniform(r, 30.0, 60.0), "seed": _seed(r),
                         "crop_out_black_border": True}),
    Primitive("rotate_crop", Category.SPATIAL, spatial.rotate_crop,
              lambda r: {"degrees": _uniform(r, -90.0, 90.0)}),
)

_CATEGORIES = tuple(Category)
_BY_CATEGORY: Mapping[Category, tuple[Primitive, ...]] = {
    c: tuple(p for p in PRIMITIVES if p.category is c) for c in _CATEGORIES
}
_BY_NAME: Mapping[str, Primitive] = {p.name: p for p in PRIMITIVES}


@dataclass(frozen=True)
class PlannedEdit:
    """One step of an "auto" plan: a primitive's name, its family and its drawn parameters."""

    name: str
    category: Category
    params: Mapping[str, Any]


def _position(name: str) -> int:
    # Crop first: later edits (overlays, screenshots) then act on the cropped view, as a copier
    # would. Palette last: a quantised image stays quantised.
    return 0 if name == "crop" else 2 if name == "palette" else 1


def sample_auto_plan(rng: np.random.Generator) -> tuple[PlannedEdit, ...]:
    """Draw the edits, their order and their parameters (image-independent, see module doc)."""
    n = int(rng.choice(np.arange(1, 5), p=N_EDITS_PROBS))
    families = [_CATEGORIES[i] for i in rng.choice(len(_CATEGORIES), size=n, replace=False)]
    drawn = [_BY_CATEGORY[c][int(rng.integers(len(_BY_CATEGORY[c])))] for c in families]
    drawn.sort(key=lambda p: _position(p.name))  # stable: the random order is kept otherwise
    return tuple(PlannedEdit(p.name, p.category, p.sample(rng)) for p in drawn)


def apply_auto_plan(img: Image.Image, plan: tuple[PlannedEdit, ...]) -> EditResult:
    """Apply a plan's steps in order; the record lists each applied step.

    Raises :class:`EditError` for the "auto" edit, naming the failing step and its parameters.
    """
    params = {"n": len(plan), "categories": tuple(p.category.value for p in plan)}
    if not plan:
        raise EditError("auto", params, "an auto plan needs at least one step")
    src = as_rgb("auto", params, img)
    current, steps = src, []
    for i, step in enumerate(plan):
        try:
            result = _BY_NAME[step.name].fn(current, **step.params)
        except EditError as exc:
            raise EditError(
                "auto",
                {**params, "steps": [(s.name, dict(s.params)) for s in plan]},
                f"step {i + 1} of {len(plan)}, {exc.edit} with {exc.params}: {exc.reason}",
            ) from exc
        current = result.image
        steps.append(result.record)
    record = EditRecord(
        name="auto",
        params=params,
        input_size=src.size,
        output_size=current.size,
        changed=not pixels_equal(src, current),
        steps=tuple(steps),
    )
    return EditResult(current, record)  # n >= 1, so a new image made by the last step


@edit_function
def auto(img: Image.Image, *, rng: np.random.Generator | None = None) -> EditResult:
    """Draw an "auto" plan from ``rng`` and apply it (see the module doc).

    ``rng`` is required: pass ``numpy.random.default_rng(seed)``, one seed per query, so the edited
    queries can be regenerated; the record alone also replays the edit.
    """
    if rng is None:
        raise EditError("auto", {}, "auto draws its edits at random: pass rng=np.random.default_rng(seed)")
    # A drawn plan can be impossible for this image (a strong perspective on a small image leaves no
    # border-free crop). Such a plan is *redrawn* from the same generator — the query is still an
    # edited image and its record is exactly what was applied; it is never the unedited input.
    errors: list[str] = []
    for _ in range(MAX_PLAN_DRAWS):
        try:
            return apply_auto_plan(img, sample_auto_plan(rng))
        except EditError as exc:
            errors.append(str(exc))
    raise EditError("auto", {}, f"{MAX_PLAN_DRAWS} drawn plans all failed; last: {errors[-1]}")


MAX_PLAN_DRAWS = 10
