"""Real photographs that ship offline with Python packages, cut into non-overlapping cells.

No image data set can be downloaded on the machines this project runs on, but a few real photos come
inside installed packages. They give the synthetic source what procedural generators lack: the
statistics of real scenes (objects, faces, sensor noise, JPEG history, natural colour).

Core sources (used by the ``PHOTO_TILE`` family, so they define the images of a ``(seed, index)``):
    scikit-image's bundled files: astronaut, chelsea, coffee, rocket, hubble_deep_field,
    immunohistochemistry, retina, stereo_motorcycle (left view only: the right view is a near
    duplicate), camera, moon, page, text, brick, grass, gravel, coins, clock, cell.
    ``cat`` is left out: it is the same photo as ``chelsea``. Images that need a ``pooch`` download
    (skin, lily, kidney, eagle, …) are not listed, so nothing ever tries the network.

Optional sources (only used for the photo fragments of the ``PHOTO_LEAVES`` family, never for the
unique tiles, so that installing or removing them changes as few images as possible):
    scikit-learn's ``load_sample_images`` (china, flower) and matplotlib's ``grace_hopper.jpg``.
    They are skipped silently when the package is not installed.

Non-overlapping cells: each core photo is partitioned into a grid of square cells (the grid is
centred, leftover border pixels are dropped). Cells with almost no content (the black border of
``retina``, the empty sky of ``moon``) are dropped. The remaining cells are put in one fixed,
shuffled order; :mod:`activeindex.datasets.synthetic` maps an image to *one* cell, and takes its
crop strictly inside that cell, so two tiles drawn from different cells never share a source pixel.

Everything is loaded lazily on first use and cached per process (loading takes ~0.3 s).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

logger = logging.getLogger(__name__)

# (name, cell side in source pixels, a multiple of 8). 64 px keeps ~770 informative cells; the 4×
# upscale to 256 px is soft but still a real photo. Retina is large and smooth, so its cells are
# bigger, to hold some vessels.
CORE_PHOTOS: tuple[tuple[str, int], ...] = (
    ("astronaut", 64),
    ("chelsea", 64),
    ("coffee", 64),
    ("rocket", 64),
    ("hubble_deep_field", 64),
    ("immunohistochemistry", 64),
    ("retina", 128),
    ("stereo_motorcycle", 64),
    ("camera", 64),
    ("moon", 64),
    ("page", 64),
    ("text", 64),
    ("brick", 64),
    ("grass", 64),
    ("gravel", 64),
    ("coins", 64),
    ("clock", 64),
    ("cell", 64),
)

# A cell is kept when it has structure a thumbnail can see: the grey levels of its 8×8 block means vary
# (std ≥ MIN_CELL_STRUCTURE on 0..255), its pixels vary (std ≥ MIN_CELL_STD) and it is not mostly black.
# This drops the empty sky of hubble_deep_field (specks on black), retina's black border, plain
# walls and skies: tiles of such cells would all look alike, so a descriptor could not tell them apart.
MIN_CELL_STRUCTURE = 8.0
MIN_CELL_STD = 10.0
MAX_DARK_FRACTION = 0.5
# The fixed shuffle of the cell list: a constant, so cell k means the same region on every machine.
_CELL_ORDER_SEED = 20240611


@dataclass(frozen=True)
class Photo:
    """One bundled photograph.

    ``pixels`` is ``uint8 [H, W, 3]`` (grey photos are replicated to three channels, ``grey`` tells);
    ``source`` is the package it came from (``"skimage"``, ``"sklearn"``, ``"matplotlib"``).
    """

    name: str
    source: str
    pixels: np.ndarray
    grey: bool
    cell_side: int = 64


@dataclass(frozen=True)
class Cell:
    """A square region ``pixels[top:top+side, left:left+side]`` of ``core_photos()[photo]``."""

    photo: int
    top: int
    left: int
    side: int


def _as_rgb(img: np.ndarray) -> tuple[np.ndarray, bool]:
    """``uint8 [H, W, 3]`` from a grey, RGB or RGBA array, and whether it was grey."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2)), True
    return np.ascontiguousarray(img[:, :, :3]), False


@functools.lru_cache(maxsize=1)
def core_photos() -> tuple[Photo, ...]:
    """The scikit-image photos that load from the installed package (empty if it is not installed)."""
    try:
        import skimage.data as data
    except ImportError:
        logger.warning("scikit-image is not installed: synthetic images fall back to procedural families")
        return ()
    photos = []
    for name, side in CORE_PHOTOS:
        try:
            img = getattr(data, name)()
        except Exception as exc:  # a build without the file (or needing pooch): use the others
            logger.debug("skimage.data.%s not available offline: %s", name, exc)
            continue
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
        pixels, grey = _as_rgb(img)
        photos.append(Photo(name, "skimage", pixels, grey, side))
    return tuple(photos)


@functools.lru_cache(maxsize=1)
def optional_photos() -> tuple[Photo, ...]:
    """scikit-learn's and matplotlib's sample photos, for those of the packages that are installed."""
    photos = []
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        pass
    else:
        try:
            bunch = load_sample_images()
            for fname, img in zip(bunch.filenames, bunch.images):
                pixels, grey = _as_rgb(img)
                photos.append(Photo(fname.rsplit("/", 1)[-1].split(".")[0], "sklearn", pixels, grey))
        except Exception as exc:
            logger.debug("sklearn sample images not available: %s", exc)
    try:
        from matplotlib import cbook
    except ImportError:
        pass
    else:
        try:
            with cbook.get_sample_data("grace_hopper.jpg") as f:
                pixels, grey = _as_rgb(np.asarray(Image.open(f).convert("RGB")))
            photos.append(Photo("grace_hopper", "matplotlib", pixels, grey))
        except Exception as exc:
            logger.debug("matplotlib grace_hopper.jpg not available: %s", exc)
    return tuple(photos)


@functools.lru_cache(maxsize=1)
def photo_cells() -> tuple[Cell, ...]:
    """The informative cells of every core photo, in a fixed shuffled order (see the module doc)."""
    cells = []
    for p, photo in enumerate(core_photos()):
        s = photo.cell_side
        grey = photo.pixels.mean(axis=2)
        h, w = grey.shape
        ny, nx = h // s, w // s
        oy, ox = (h - ny * s) // 2, (w - nx * s) // 2
        for i in range(ny):
            for j in range(nx):
                top, left = oy + i * s, ox + j * s
                c = grey[top : top + s, left : left + s]
                blocks = c.reshape(8, s // 8, 8, s // 8).mean(axis=(1, 3))
                if (
                    blocks.std() >= MIN_CELL_STRUCTURE
                    and c.std() >= MIN_CELL_STD
                    and (c < 12).mean() < MAX_DARK_FRACTION
                ):
                    cells.append(Cell(p, top, left, s))
    order = np.random.default_rng(_CELL_ORDER_SEED).permutation(len(cells))
    return tuple(cells[k] for k in order)


def jitter_colours(x: np.ndarray, rng: np.random.Generator, grey: bool) -> np.ndarray:
    """Random exposure, contrast, saturation, gamma and (for grey photos) a duotone.

    ``x`` is ``float32 [H, W, 3]`` in 0..1; returns a new array of the same shape. Strong enough that
    the same photo region looks different, mild enough that it still looks like a photo.
    """
    luma = x @ np.array([0.299, 0.587, 0.114], np.float32)
    if grey and rng.random() < 0.6:
        # Duotone: map grey levels between a dark and a light random colour (sepia, cyanotype, …).
        dark = rng.uniform(0.0, 0.35, 3).astype(np.float32)
        light = rng.uniform(0.65, 1.0, 3).astype(np.float32)
        x = dark + luma[..., None] * (light - dark)
    elif not grey:
        sat = rng.uniform(0.4, 1.5)
        x = luma[..., None] + sat * (x - luma[..., None])
        if rng.random() < 0.3:  # a colour cast: per-channel gains
            x = x * rng.uniform(0.8, 1.2, 3).astype(np.float32)
    mean = float(luma.mean())
    x = (x - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.75, 1.25)
    np.clip(x, 0.0, 1.0, out=x)
    return x ** np.float32(rng.uniform(0.75, 1.35))


def photo_tile(cell: Cell, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A random crop *inside* ``cell`` (75–100 % of the largest fit of the output's aspect), randomly
    flipped, resized to ``size`` (width, height), sharpened, colour-jittered and given a little grain:
    ``float32 [H, W, 3]`` in 0..1."""
    w, h = size
    photo = core_photos()[cell.photo]
    aspect = w / h
    cw, ch = (cell.side, cell.side / aspect) if aspect >= 1 else (cell.side * aspect, cell.side)
    scale = rng.uniform(0.75, 1.0)
    cw, ch = max(2, round(cw * scale)), max(2, round(ch * scale))
    top = cell.top + int(rng.integers(0, cell.side - ch + 1))
    left = cell.left + int(rng.integers(0, cell.side - cw + 1))
    crop = photo.pixels[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.15:
        crop = crop[::-1]
    img = Image.fromarray(np.ascontiguousarray(crop)).resize((w, h), Image.BICUBIC)
    upscale = w / cw
    if upscale > 1.5:
        # A 64-px cell blown up 3–6× is soft: sharpen at the scale of the upsampling and add sensor-like
        # grain, so tiles have the fine texture of a photo taken at that size rather than a blur.
        radius = float(upscale * rng.uniform(0.3, 0.6))
        img = img.filter(ImageFilter.UnsharpMask(radius, int(rng.integers(60, 160)), 2))
    x = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
    x = jitter_colours(x, rng, photo.grey)
    x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(rng.uniform(0.003, 0.015))
    return np.clip(x, 0.0, 1.0, out=x)


def photo_fragment(
    photos: tuple[Photo, ...], rng: np.random.Generator, size: tuple[int, int]
) -> np.ndarray:
    """A random crop of a random photo, any place and scale (0.5–3 source px per output px), resized
    to ``size`` (width, height) and jittered: ``float32 [H, W, 3]`` in 0..1. Used to texture shapes,
    where reuse of a region is harmless because the shape and layout around it are random."""
    w, h = size
    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.pixels.shape[:2]
    zoom = float(np.exp(rng.uniform(np.log(0.5), np.log(3.0))))
    cw, ch = min(pw, max(2, round(w * zoom))), min(ph, max(2, round(h * zoom)))
    top, left = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    crop = photo.pixels[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    img = Image.fromarray(np.ascontiguousarray(crop)).resize((w, h), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
    return jitter_colours(x, rng, photo.grey)
