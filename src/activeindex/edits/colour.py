"""Colour edits: contrast, brightness, hue, saturation, grayscale.

Contrast and brightness are the paper's table edits and "auto" primitives; AugLy's versions are
Pillow's ``ImageEnhance`` — exactly what the paper's torchvision calls did on PIL images — so
AugLy is used as is. AugLy has no hue edit; :func:`hue` follows torchvision's ``adjust_hue`` on PIL
images, which the paper used.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from activeindex.edits.assets import augly_functional
from activeindex.edits.base import EditResult, check, edit_function, run_edit


@edit_function
def contrast(
    img: Image.Image, *, factor: float, rng: np.random.Generator | None = None
) -> EditResult:
    """Scale deviations from the mean grey level by ``factor`` (AugLy ``contrast``).

    ``ImageEnhance.Contrast``: the output is ``mean + factor * (pixel - mean)``, where ``mean`` is
    the rounded mean of the image's luminance, clipped to [0, 255]. 0 gives flat grey, 1 the input.
    """
    params = {"factor": float(factor)}
    check(factor >= 0, "contrast", params, "factor must be non-negative")
    return run_edit(
        "contrast", params, img, lambda im: augly_functional().contrast(im, factor=float(factor))
    )


@edit_function
def brightness(
    img: Image.Image, *, factor: float, rng: np.random.Generator | None = None
) -> EditResult:
    """Multiply every channel by ``factor``, clipped to [0, 255] (AugLy ``brightness``)."""
    params = {"factor": float(factor)}
    check(factor >= 0, "brightness", params, "factor must be non-negative")
    return run_edit(
        "brightness",
        params,
        img,
        lambda im: augly_functional().brightness(im, factor=float(factor)),
    )


def _shift_hue(im: Image.Image, factor: float) -> Image.Image:
    h, s, v = im.convert("HSV").split()
    # torchvision's adjust_hue on PIL adds ``factor * 255`` truncated to an integer to Pillow's
    # 8-bit hue channel, wrapping around modulo 256 (hue is circular).
    shift = int(factor * 255) % 256
    shifted = ((np.asarray(h, dtype=np.uint16) + shift) % 256).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(shifted, "L"), s, v)).convert("RGB")


@edit_function
def hue(img: Image.Image, *, factor: float, rng: np.random.Generator | None = None) -> EditResult:
    """Rotate hues by ``factor`` of a full turn, ``factor`` in [-0.5, 0.5] (torchvision semantics).

    Works in Pillow's 8-bit HSV: pure red (hue 0) with ``factor=0.2`` becomes hue 51/255 ≈ 0.2,
    i.e. (204, 255, 0). Greys are unchanged. Even ``factor=0`` slightly changes colours, because
    the 8-bit RGB → HSV → RGB round trip is lossy; torchvision (the paper's sweep) does the same.
    """
    params = {"factor": float(factor)}
    check(-0.5 <= factor <= 0.5, "hue", params, "factor must be in [-0.5, 0.5]")
    return run_edit("hue", params, img, lambda im: _shift_hue(im, float(factor)))


@edit_function
def saturation(
    img: Image.Image, *, factor: float, rng: np.random.Generator | None = None
) -> EditResult:
    """Scale colour saturation by ``factor`` (AugLy ``saturation``, ``ImageEnhance.Color``)."""
    params = {"factor": float(factor)}
    check(factor >= 0, "saturation", params, "factor must be non-negative")
    return run_edit(
        "saturation",
        params,
        img,
        lambda im: augly_functional().saturation(im, factor=float(factor)),
    )


@edit_function
def grayscale(img: Image.Image, *, rng: np.random.Generator | None = None) -> EditResult:
    """Luminance (ITU-R 601-2) replicated on three channels (AugLy ``grayscale``)."""
    return run_edit("grayscale", {}, img, lambda im: augly_functional().grayscale(im))
