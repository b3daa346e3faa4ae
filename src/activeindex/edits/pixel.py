"""Pixel-level edits: Gaussian blur, blur, JPEG, palette, edge enhancement, pixelization, shuffle.

:func:`gaussian_blur` (the paper's table edit, kernel 11, σ 2.0) follows torchvision's
``gaussian_blur``, which the paper used; AugLy's ``blur`` is a radius-based Pillow filter and is
kept for the "auto" primitive. :func:`shuffle_pixels` is ours because AugLy's reseeds NumPy's
*global* generator on every call.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from activeindex.edits.assets import augly_functional
from activeindex.edits.base import EditResult, check, edit_function, run_edit


def default_blur_sigma(kernel_size: int) -> float:
    """torchvision's default σ for a kernel size: ``0.3 * ((k - 1) / 2 - 1) + 0.8`` (2.0 for 11)."""
    return round(0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8, 10)


def _gaussian_kernel(kernel_size: int, sigma: float) -> np.ndarray:
    half = (kernel_size - 1) * 0.5
    x = np.linspace(-half, half, kernel_size)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur_separable(arr: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    # Reflect padding without repeating the edge pixel, as torchvision (torch ``reflect``) does.
    r = len(kernel) // 2
    h, w = arr.shape[:2]
    x = np.pad(arr.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
    rows = sum(kernel[i] * x[:, i : i + w] for i in range(len(kernel)))
    out = sum(kernel[i] * rows[i : i + h] for i in range(len(kernel)))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@edit_function
def gaussian_blur(
    img: Image.Image,
    *,
    kernel_size: int = 11,
    sigma: float | None = None,
    rng: np.random.Generator | None = None,
) -> EditResult:
    """Blur with a separable Gaussian of odd ``kernel_size`` taps (torchvision semantics).

    ``sigma=None`` uses torchvision's default for the kernel size (recorded as applied). Borders
    are reflected; the result is rounded to 8 bits.
    """
    applied = default_blur_sigma(kernel_size) if sigma is None else float(sigma)
    params = {"kernel_size": int(kernel_size), "sigma": applied}
    check(kernel_size >= 1 and kernel_size % 2 == 1, "gaussian_blur", params,
          "kernel_size must be a positive odd integer")
    check(applied > 0, "gaussian_blur", params, "sigma must be positive")
    kernel = _gaussian_kernel(int(kernel_size), applied)
    return run_edit(
        "gaussian_blur",
        params,
        img,
        lambda im: Image.fromarray(_blur_separable(np.asarray(im), kernel), "RGB"),
    )


@edit_function
def blur(img: Image.Image, *, radius: float, rng: np.random.Generator | None = None) -> EditResult:
    """Pillow's Gaussian blur of standard deviation ``radius`` (AugLy ``blur``)."""
    params = {"radius": float(radius)}
    check(radius > 0, "blur", params, "radius must be positive")
    return run_edit("blur", params, img, lambda im: augly_functional().blur(im, radius=float(radius)))


@edit_function
def jpeg(img: Image.Image, *, quality: int, rng: np.random.Generator | None = None) -> EditResult:
    """Encode to JPEG at ``quality`` (0–100) with Pillow and decode (AugLy ``encoding_quality``)."""
    params = {"quality": int(quality)}
    check(0 <= quality <= 100, "jpeg", params, "quality must be in [0, 100]")
    return run_edit(
        "jpeg", params, img, lambda im: augly_functional().encoding_quality(im, quality=int(quality))
    )


@edit_function
def palette(img: Image.Image, *, colors: int, rng: np.random.Generator | None = None) -> EditResult:
    """Quantise to an adaptive palette of ``colors`` colours (AugLy ``convert_color``, mode "P").

    Note: the paper's code called ``convert_color(mode="P", colors=k)`` without choosing the
    palette, and Pillow then uses its fixed 216-colour web palette and ignores ``colors``. This
    edit does what the parameter says (at most ``colors`` colours); see METHOD.md §2.
    """
    params = {"colors": int(colors)}
    check(2 <= colors <= 256, "palette", params, "colors must be in [2, 256]")
    return run_edit(
        "palette",
        params,
        img,
        lambda im: augly_functional().convert_color(
            im, mode="P", palette=Image.Palette.ADAPTIVE, colors=int(colors)
        ),
    )


@edit_function
def edge_enhance(img: Image.Image, *, rng: np.random.Generator | None = None) -> EditResult:
    """Pillow's ``EDGE_ENHANCE_MORE`` filter (AugLy ``apply_pil_filter`` with its default)."""
    return run_edit(
        "edge_enhance",
        {},
        img,
        lambda im: augly_functional().apply_pil_filter(
            im, filter_type=ImageFilter.EDGE_ENHANCE_MORE
        ),
    )


@edit_function
def pixelization(
    img: Image.Image, *, ratio: float, rng: np.random.Generator | None = None
) -> EditResult:
    """Downscale by ``ratio`` and back up to the input size (AugLy ``pixelization``)."""
    params = {"ratio": float(ratio)}
    check(0 < ratio <= 1, "pixelization", params, "ratio must be in (0, 1]")
    return run_edit(
        "pixelization", params, img, lambda im: augly_functional().pixelization(im, ratio=float(ratio))
    )


def _shuffle(im: Image.Image, factor: float, seed: int) -> Image.Image:
    # AugLy's algorithm and draw order (choose ``int(factor * n)`` pixels without replacement,
    # permute them among themselves), on a local RandomState: same pixels for the same seed,
    # without reseeding NumPy's global generator as AugLy does.
    rs = np.random.RandomState(seed)
    arr = np.asarray(im).reshape(-1, 3).copy()
    chosen = rs.choice(len(arr), size=int(factor * len(arr)), replace=False)
    moved = arr[chosen]
    rs.shuffle(moved)
    arr[chosen] = moved
    return Image.fromarray(arr.reshape(im.height, im.width, 3), "RGB")


@edit_function
def shuffle_pixels(
    img: Image.Image, *, factor: float, seed: int = 10, rng: np.random.Generator | None = None
) -> EditResult:
    """Permute a random ``factor`` share of the pixels among themselves (AugLy's algorithm).

    ``seed`` picks the pixels and the permutation (AugLy's default is 10); the same seed gives
    AugLy's ``shuffle_pixels`` output.
    """
    params = {"factor": float(factor), "seed": int(seed)}
    check(0 <= factor <= 1, "shuffle_pixels", params, "factor must be in [0, 1]")
    check(0 <= seed < 2**32, "shuffle_pixels", params, "seed must be in [0, 2**32)")
    return run_edit("shuffle_pixels", params, img, lambda im: _shuffle(im, float(factor), int(seed)))
