"""Spatial edits: rotation, crops, resize, flip, aspect ratio, padding, perspective.

The paper's table edits follow the torchvision calls the paper made on PIL images:
:func:`rotate` (bilinear, canvas expanded, black corners), :func:`center_crop` and :func:`resize`
by a share of the *area* (each side scaled by its square root, truncated). The "auto" primitives are
AugLy's: :func:`rotate_crop` (rotate, then crop to the largest inner box), :func:`crop`,
:func:`hflip`, :func:`change_aspect_ratio`, :func:`pad_square`, and :func:`perspective_transform`
through the compatibility layer (AugLy's own needs ``np.float``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from activeindex.edits import augly_compat
from activeindex.edits.assets import augly_functional
from activeindex.edits.base import EditResult, check, check_rgb_color, edit_function, run_edit


@edit_function
def rotate(img: Image.Image, *, degrees: float, rng: np.random.Generator | None = None) -> EditResult:
    """Rotate counter-clockwise by ``degrees``, bilinear, expanding the canvas (black fill).

    At ±90° the sides swap exactly (Pillow transposes); other angles give a canvas of about
    ``w|cos| + h|sin|`` by ``w|sin| + h|cos|``, rounded outwards.
    """
    params = {"degrees": float(degrees)}
    return run_edit(
        "rotate",
        params,
        img,
        lambda im: im.rotate(
            float(degrees), resample=Image.Resampling.BILINEAR, expand=True, fillcolor=(0, 0, 0)
        ),
    )


def area_scaled_size(size: tuple[int, int], area: float) -> tuple[int, int]:
    """``(width, height)`` scaled so the area is ``area`` times the original: each side times √area,
    truncated, as the paper's code did."""
    scale = math.sqrt(area)
    return int(size[0] * scale), int(size[1] * scale)


@edit_function
def center_crop(img: Image.Image, *, area: float, rng: np.random.Generator | None = None) -> EditResult:
    """Keep the centred box whose area is ``area`` (in (0, 1]) of the image's (torchvision offsets)."""
    params = {"area": float(area)}
    check(0 < area <= 1, "center_crop", params, "area must be in (0, 1]")

    def crop(im: Image.Image) -> Image.Image:
        w, h = im.size
        tw, th = area_scaled_size(im.size, float(area))
        if tw < 1 or th < 1:
            raise ValueError(f"crop of {area} of the area of a {w}x{h} image is empty")
        left, top = int(round((w - tw) / 2.0)), int(round((h - th) / 2.0))
        return im.crop((left, top, left + tw, top + th))

    return run_edit("center_crop", params, img, crop)


@edit_function
def resize(img: Image.Image, *, area: float, rng: np.random.Generator | None = None) -> EditResult:
    """Resize (bilinear, antialiased) so the area is ``area`` times the input's (AugLy ``resize``)."""
    params = {"area": float(area)}
    check(area > 0, "resize", params, "area must be positive")

    def scale(im: Image.Image) -> Image.Image:
        tw, th = area_scaled_size(im.size, float(area))
        if tw < 1 or th < 1:
            raise ValueError(f"resize to {area} of the area of a {im.size} image is empty")
        return augly_functional().resize(im, width=tw, height=th, resample=Image.Resampling.BILINEAR)

    return run_edit("resize", params, img, scale)


@edit_function
def rotate_crop(
    img: Image.Image, *, degrees: float, rng: np.random.Generator | None = None
) -> EditResult:
    """Rotate counter-clockwise (nearest neighbour) and crop to the largest box free of black
    corners, so the output is smaller than the input (AugLy ``rotate``)."""
    params = {"degrees": float(degrees)}
    return run_edit(
        "rotate_crop", params, img, lambda im: augly_functional().rotate(im, degrees=float(degrees))
    )


@edit_function
def crop(
    img: Image.Image,
    *,
    x1: float,
    y1: float,
    x2: float,
    y2: float,
    rng: np.random.Generator | None = None,
) -> EditResult:
    """Keep the box from ``(x1, y1)`` to ``(x2, y2)``, given as shares of width and height
    (AugLy ``crop``; pixel edges truncated)."""
    params = {"x1": float(x1), "y1": float(y1), "x2": float(x2), "y2": float(y2)}
    check(0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1, "crop", params,
          "need 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1")
    return run_edit(
        "crop",
        params,
        img,
        lambda im: augly_functional().crop(im, x1=float(x1), y1=float(y1), x2=float(x2), y2=float(y2)),
    )


@edit_function
def hflip(img: Image.Image, *, rng: np.random.Generator | None = None) -> EditResult:
    """Mirror left to right (AugLy ``hflip``)."""
    return run_edit("hflip", {}, img, lambda im: augly_functional().hflip(im))


@edit_function
def change_aspect_ratio(
    img: Image.Image, *, ratio: float, rng: np.random.Generator | None = None
) -> EditResult:
    """Resize to width/height ``ratio`` keeping about the same area (AugLy ``change_aspect_ratio``)."""
    params = {"ratio": float(ratio)}
    check(ratio > 0, "change_aspect_ratio", params, "ratio must be positive")
    return run_edit(
        "change_aspect_ratio",
        params,
        img,
        lambda im: augly_functional().change_aspect_ratio(im, ratio=float(ratio)),
    )


@edit_function
def pad_square(
    img: Image.Image,
    *,
    color: Sequence[int] = (0, 0, 0),
    rng: np.random.Generator | None = None,
) -> EditResult:
    """Pad the shorter side (both ends) with ``color`` to make the image square (AugLy ``pad_square``)."""
    params = {"color": tuple(color)}
    rgb = check_rgb_color("pad_square", params, color)
    return run_edit("pad_square", params, img, lambda im: augly_functional().pad_square(im, color=rgb))


@edit_function
def perspective_transform(
    img: Image.Image,
    *,
    sigma: float,
    seed: int = 42,
    dx: float = 0.0,
    dy: float = 0.0,
    crop_out_black_border: bool = False,
    rng: np.random.Generator | None = None,
) -> EditResult:
    """Random homography moving each corner by ``N(0, sigma)`` pixels (AugLy
    ``perspective_transform`` through :mod:`~activeindex.edits.augly_compat`).

    ``seed`` fixes the corner draws (AugLy's default is 42). With ``crop_out_black_border`` a
    transform too strong to leave a border-free box raises :class:`EditError` — on small images
    with large ``sigma`` this happens often; it is never replaced by the unedited image.
    """
    params = {
        "sigma": float(sigma),
        "seed": int(seed),
        "dx": float(dx),
        "dy": float(dy),
        "crop_out_black_border": bool(crop_out_black_border),
    }
    check(sigma >= 0, "perspective_transform", params, "sigma must be non-negative")
    check(0 <= seed < 2**32, "perspective_transform", params, "seed must be in [0, 2**32)")
    return run_edit(
        "perspective_transform",
        params,
        img,
        lambda im: augly_compat.perspective_transform(
            im,
            sigma=float(sigma),
            seed=int(seed),
            dx=float(dx),
            dy=float(dy),
            crop_out_black_border=bool(crop_out_black_border),
        ),
    )
