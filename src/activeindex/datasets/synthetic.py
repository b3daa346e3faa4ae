"""Deterministic, diverse synthetic images: the offline image source for training and evaluating a
copy-detection descriptor (no image data set can be downloaded on the machines this runs on).

Image ``index`` of source ``seed`` is a pure function of ``(seed, index)`` (and the requested size):
everything is drawn from ``numpy.random.default_rng([seed, index])``, so any subset can be
regenerated in any order, in parallel, on any machine with the same package versions.

Each image has one *family*, drawn by the generator with :data:`FAMILY_WEIGHTS`, and 0–2 *overlays*
from other generators laid on top (the mix makes layouts, colour statistics and textures differ):

=================  ================================================================================
family             content
=================  ================================================================================
``photo_tile``     a crop inside one non-overlapping cell of a real photo bundled with scikit-image,
                   randomly scaled, flipped and colour-jittered (see "photo cells" below)
``photo_leaves``   dead leaves whose shapes are textured with fragments of real photos
``dead_leaves``    the occlusion model: 60–300 discs, rotated rectangles and polygons with power-law
                   sizes, each flat, a linear gradient, a sine/square grating or 1/f noise
``spectral_noise`` 1/f^α coloured noise (α 1–3.2, sometimes anisotropic): mixed colour fields,
                   palette ramps (sometimes posterised), or ridged noise
``strokes``        lines, cubic Bézier curves, outlined ellipses/rectangles on a backdrop
``text``           lines of random letters (Pillow's built-in font) or of an invented glyph script,
                   some rotated, on a backdrop
``gradient``       smooth fields (bicubic colour grid + linear/radial ramps); always gets shapes,
                   strokes or text on top
=================  ================================================================================

Overlays (:class:`Overlay`): a few dead-leaves shapes, strokes, text marks, or shading (a smooth
illumination field). :func:`synthetic_image_info` tells, without rendering, which family, overlays
and photo cell an image uses.

Photo cells — why two photo tiles are never near-duplicates: the bundled photos are cut into a grid
of square cells (:func:`activeindex.datasets.photos.photo_cells`: M = 766 with scikit-image 0.26),
and a ``photo_tile`` image takes its crop strictly inside one cell. Image ``index`` of ``seed`` uses cell
``(index + offset(seed)) mod M``, so within one seed distinct indices below ``M`` use distinct
cells. For ``index ≥ M`` the pool is exhausted and the image becomes ``photo_leaves`` instead (photo
fragments at random places, scales and shapes: a random composition, not a copy of a region).
Seeds start at golden-ratio offsets ``offset(seed) = ⌊frac(seed·φ)·M⌋``, which keeps the ranges of
the first few seeds apart: e.g. seeds 0 and 1 share no cell while seed 0 stays below 0.618·M and seed
1 below 0.382·M. For sets that must share nothing (train / references / distractors), use one seed
and disjoint index ranges (``start=``), or keep those limits.

Optional photos: scikit-learn's and matplotlib's sample photos, when those packages are installed,
only feed ``photo_leaves`` fragments; they are silently skipped otherwise. If scikit-image itself
is missing, both photo families fall back to ``dead_leaves`` (with a warning): all other images stay
identical whatever is installed, because the family and overlays are drawn before any of this.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
from PIL import Image

from activeindex.atomic import atomic_path
from activeindex.datasets import procedural as P
from activeindex.datasets.photos import core_photos, optional_photos, photo_cells, photo_tile

logger = logging.getLogger(__name__)

MIN_SIDE = 8  # below this the shapes, fonts and 1/f spectra stop making sense


class Family(str, Enum):
    """The generator that draws an image's base layer (see the module docstring)."""

    PHOTO_TILE = "photo_tile"
    PHOTO_LEAVES = "photo_leaves"
    DEAD_LEAVES = "dead_leaves"
    SPECTRAL_NOISE = "spectral_noise"
    STROKES = "strokes"
    TEXT = "text"
    GRADIENT = "gradient"


class Overlay(str, Enum):
    """A second generator laid over the base layer."""

    SHAPES = "shapes"
    STROKES = "strokes"
    TEXT = "text"
    SHADING = "shading"


# Real photos weigh most (their statistics are what a descriptor meets in use); smooth gradients least
# (on their own they carry few features, so they always get an overlay).
FAMILY_WEIGHTS: dict[Family, float] = {
    Family.PHOTO_TILE: 0.26,
    Family.PHOTO_LEAVES: 0.10,
    Family.DEAD_LEAVES: 0.20,
    Family.SPECTRAL_NOISE: 0.12,
    Family.STROKES: 0.12,
    Family.TEXT: 0.10,
    Family.GRADIENT: 0.10,
}
OVERLAY_WEIGHTS: dict[Overlay, float] = {
    Overlay.SHAPES: 0.3,
    Overlay.STROKES: 0.25,
    Overlay.TEXT: 0.25,
    Overlay.SHADING: 0.2,
}
N_OVERLAYS_P = (0.45, 0.40, 0.15)  # probability of 0, 1, 2 overlays

_FAMILIES = tuple(FAMILY_WEIGHTS)
_FAMILY_P = np.array(list(FAMILY_WEIGHTS.values())) / sum(FAMILY_WEIGHTS.values())
_OVERLAYS = tuple(OVERLAY_WEIGHTS)
_OVERLAY_P = np.array(list(OVERLAY_WEIGHTS.values())) / sum(OVERLAY_WEIGHTS.values())
_CONTENT_OVERLAYS = (Overlay.SHAPES, Overlay.STROKES, Overlay.TEXT)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class SyntheticRecord:
    """What image ``index`` of source ``seed`` is made of.

    ``photo`` and ``cell`` are set for ``PHOTO_TILE`` only: the source photo's name and the position
    of its cell in :func:`~activeindex.datasets.photos.photo_cells` (unique within a seed for
    ``index < len(photo_cells())``).
    """

    seed: int
    index: int
    family: Family
    overlays: tuple[Overlay, ...]
    photo: str | None = None
    cell: int | None = None


# -- validation ----------------------------------------------------------------------------------------
def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_size(size: object) -> tuple[int, int]:
    ok = isinstance(size, (tuple, list)) and len(size) == 2
    ok = ok and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= MIN_SIDE for v in size)
    if not ok:
        raise ValueError(f"size must be (width, height) integers ≥ {MIN_SIDE}, got {size!r}")
    return int(size[0]), int(size[1])


# -- plan and render -----------------------------------------------------------------------------------
def _seed_offset(seed: int, m: int) -> int:
    """Where seed ``seed`` starts in the cell order: golden-ratio steps keep early seeds far apart."""
    return int((seed * _GOLDEN) % 1.0 * m) % m


def _plan(index: int, seed: int) -> tuple[SyntheticRecord, np.random.Generator]:
    """The image's record and the generator, positioned after the planning draws, to render it with.

    The planning draws (family, overlays) come first and never depend on which photos are installed,
    so only the photo images change when the photo sources do.
    """
    rng = np.random.default_rng([seed, index])
    family = _FAMILIES[int(rng.choice(len(_FAMILIES), p=_FAMILY_P))]
    n_overlays = int(rng.choice(len(N_OVERLAYS_P), p=N_OVERLAYS_P))
    picks = rng.choice(len(_OVERLAYS), size=n_overlays, replace=False, p=_OVERLAY_P)
    overlays = tuple(_OVERLAYS[int(i)] for i in picks)
    if family is Family.GRADIENT and not set(overlays) & set(_CONTENT_OVERLAYS):
        # A smooth field (even shaded) has nothing to recognise it by: give it shapes, strokes or text.
        overlays += (_CONTENT_OVERLAYS[int(rng.integers(len(_CONTENT_OVERLAYS)))],)
    photo = cell = None
    if family is Family.PHOTO_TILE:
        cells = photo_cells()
        if not cells:
            family = Family.DEAD_LEAVES
        elif index >= len(cells):
            family = Family.PHOTO_LEAVES  # the pool of unique cells is used up for this seed
        else:
            cell = (index + _seed_offset(seed, len(cells))) % len(cells)
            photo = core_photos()[cells[cell].photo].name
    if family is Family.PHOTO_LEAVES and not (core_photos() or optional_photos()):
        family = Family.DEAD_LEAVES
    return SyntheticRecord(seed, index, family, overlays, photo, cell), rng


def _render(rec: SyntheticRecord, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Draw the image ``rec`` describes, continuing ``rng`` from where :func:`_plan` left it."""
    palette = P.random_palette(rng, int(rng.integers(3, 9)))
    fam = rec.family
    img: np.ndarray | Image.Image
    if fam is Family.PHOTO_TILE:
        assert rec.cell is not None
        img = photo_tile(photo_cells()[rec.cell], rng, size)
    elif fam is Family.PHOTO_LEAVES:
        img = P.dead_leaves(
            rng, size, palette, n=int(rng.integers(10, 50)),
            radius=(rng.uniform(0.04, 0.1), rng.uniform(0.4, 0.8)), exponent=rng.uniform(2.3, 3.2),
            texture_p=(0.05, 0.04, 0.04, 0.07, 0.8), photos=core_photos() + optional_photos(),
        )  # fmt: skip
    elif fam is Family.DEAD_LEAVES:
        img = P.dead_leaves(
            rng, size, palette, n=int(rng.integers(60, 300)),
            radius=(rng.uniform(0.01, 0.03), rng.uniform(0.25, 0.7)), exponent=rng.uniform(2.5, 3.5),
            texture_p=(0.4, 0.15, 0.15, 0.3, 0.0),
        )  # fmt: skip
    elif fam is Family.SPECTRAL_NOISE:
        img = P.noise_image(rng, size, palette)
    elif fam is Family.GRADIENT:
        img = P.gradient_image(rng, size, palette)
    elif fam is Family.STROKES:
        img = Image.fromarray(P.to_uint8(P.background(rng, size, palette)))
        P.draw_strokes(img, rng, P.random_palette(rng, 6), int(rng.integers(8, 60)))
    elif fam is Family.TEXT:
        img = Image.fromarray(P.to_uint8(P.background(rng, size, palette)))
        P.draw_text(img, rng, P.random_palette(rng, 4), int(rng.integers(3, 25)))
    else:  # pragma: no cover - Family is closed
        raise AssertionError(fam)
    img = P.ensure_contrast(_array(img))

    for overlay in rec.overlays:
        # Overlays get their own palette: a caption or a sticker rarely matches the picture's colours.
        over = P.random_palette(rng, 5)
        if overlay is Overlay.SHAPES:
            img = P.dead_leaves(
                rng, size, over, n=int(rng.integers(2, 12)), radius=(0.03, 0.35), exponent=2.0,
                texture_p=(0.4, 0.2, 0.2, 0.2, 0.0), base=_array(img),
            )  # fmt: skip
        elif overlay is Overlay.SHADING:
            img = P.shade(_array(img), rng)
        else:
            img = _image(img)
            if overlay is Overlay.STROKES:
                P.draw_strokes(img, rng, over, int(rng.integers(2, 12)))
            else:
                P.draw_text(img, rng, over, int(rng.integers(1, 5)))
    return _image(img)


def _array(img: np.ndarray | Image.Image) -> np.ndarray:
    return np.asarray(img, np.float32) * np.float32(1 / 255) if isinstance(img, Image.Image) else img


def _image(img: np.ndarray | Image.Image) -> Image.Image:
    return img if isinstance(img, Image.Image) else Image.fromarray(P.to_uint8(img))


# -- public API ----------------------------------------------------------------------------------------
def synthetic_image(index: int, *, seed: int = 0, size: tuple[int, int] = (256, 256)) -> Image.Image:
    """The ``index``-th image of source ``seed``: an RGB image of ``size`` (width, height).

    Pure function of ``(seed, index, size)``. Raises ``ValueError`` for a negative index or seed or a
    side below 8 px.
    """
    return synthetic_image_with_info(index, seed=seed, size=size)[0]


def synthetic_image_with_info(
    index: int, *, seed: int = 0, size: tuple[int, int] = (256, 256)
) -> tuple[Image.Image, SyntheticRecord]:
    """:func:`synthetic_image` and its :class:`SyntheticRecord`, in one call."""
    index, seed, size = _check_int("index", index), _check_int("seed", seed), _check_size(size)
    rec, rng = _plan(index, seed)
    return _render(rec, rng, size), rec


def synthetic_image_info(index: int, *, seed: int = 0) -> SyntheticRecord:
    """What image ``index`` of source ``seed`` is made of (family, overlays, photo cell), without
    rendering it (microseconds, after the photos' one-off loading). Independent of the size."""
    rec, _ = _plan(_check_int("index", index), _check_int("seed", seed))
    return rec


def image_name(index: int) -> str:
    """The file name of image ``index`` in a folder written by :func:`make_images`."""
    return f"img_{index:06d}.png"


def _write_one(out: Path, index: int, seed: int, size: tuple[int, int]) -> None:
    """Render and write one PNG atomically: a crash or a concurrent writer never leaves half a file."""
    path = out / image_name(index)
    with atomic_path(path) as tmp:  # unique per writer: two writers never share a tmp file
        # Level 1: 3× faster than the default 6 and files only ~8 % larger (synthetic textures barely
        # compress); encoding at level 6 would cost more than rendering the image.
        synthetic_image(index, seed=seed, size=size).save(tmp, format="PNG", compress_level=1)


def _write_chunk(out: str, indices: Sequence[int], seed: int, size: tuple[int, int]) -> int:
    """Worker entry point: write ``indices``; returns how many were written."""
    for i in indices:
        _write_one(Path(out), i, seed, size)
    return len(indices)


_CHUNK = 16  # images per worker task: ~0.3 s of work, so scheduling overhead is negligible


def make_images(
    out: str | os.PathLike[str],
    n: int,
    *,
    seed: int = 0,
    size: tuple[int, int] = (256, 256),
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    start: int = 0,
) -> list[Path]:
    """Write images ``start .. start+n-1`` of source ``seed`` as ``out/img_NNNNNN.png``; returns the
    ``n`` paths in index order.

    Files already present are kept (resume: writes are atomic, so a present file is complete).
    ``workers`` processes render in parallel (default: ``os.cpu_count()``; 1 renders in this process).
    Workers are processes (rendering holds the GIL: threads do not scale), started with
    ``forkserver``, not ``fork``: forking a process that runs PyTorch or OpenMP threads can deadlock.
    As with any such pool, a script calling this with ``workers != 1`` needs the
    ``if __name__ == "__main__":`` guard. ``progress(count)`` is called with the number of images present so
    far (first with the number already there), from this process.
    """
    n, seed, start, size = _check_int("n", n), _check_int("seed", seed), _check_int("start", start), _check_size(size)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / image_name(i) for i in range(start, start + n)]
    todo = [i for i, p in zip(range(start, start + n), paths) if not p.exists()]
    done = n - len(todo)
    if progress is not None:
        progress(done)
    chunks = [todo[k : k + _CHUNK] for k in range(0, len(todo), _CHUNK)]
    workers = min(workers or os.cpu_count() or 1, len(chunks))
    if workers <= 1:
        for i in todo:
            _write_one(out, i, seed, size)
            done += 1
            if progress is not None:
                progress(done)
        return paths
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(_write_chunk, str(out), chunk, seed, size) for chunk in chunks]
        for fut in as_completed(futures):
            done += fut.result()  # a failed image raises here: never a silently missing file
            if progress is not None:
                progress(done)
    return paths


def write_synthetic_images(
    out: str | os.PathLike[str], n: int, *, seed: int = 0, size: tuple[int, int] = (256, 256), start: int = 0
) -> list[Path]:
    """Write images ``start .. start+n-1`` of source ``seed`` as PNG files, in this process; returns
    their paths. The sequential form of :func:`make_images` (no worker start-up for small sets)."""
    return make_images(out, n, seed=seed, size=size, workers=1, start=start)
