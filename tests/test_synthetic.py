"""Tests of activeindex.datasets.synthetic: determinism, diversity (no near-duplicates), the family mix,
the non-overlapping photo cells, and the parallel, resumable writer."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from activeindex.datasets import photos as photos_mod
from activeindex.datasets import synthetic as syn
from activeindex.datasets.synthetic import (
    Family,
    Overlay,
    make_images,
    synthetic_image,
    synthetic_image_info,
    synthetic_image_with_info,
    write_synthetic_images,
)

HAVE_PHOTOS = bool(photos_mod.core_photos())
EXPECTED_FAMILIES = set(Family) if HAVE_PHOTOS else set(Family) - {Family.PHOTO_TILE, Family.PHOTO_LEAVES}


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def first_of_each_family(seed: int = 0, limit: int = 500) -> dict[Family, int]:
    """The first index of each family among ``limit`` images of ``seed`` (planning only: cheap)."""
    found: dict[Family, int] = {}
    for i in range(limit):
        found.setdefault(synthetic_image_info(i, seed=seed).family, i)
    return found


# -- near-duplicate measures ---------------------------------------------------------------------------
# Two images are near-duplicates when their 32×32 grey thumbnails correlate at NCC ≥ 0.95, or when
# their 64-bit difference hashes (dHash: is each pixel of a 9×8 grey thumbnail brighter than its right
# neighbour?) differ in ≤ 2 bits. Over 3000 images of seeds 0 and 1 (4.5 M pairs) the worst pair had
# NCC 0.90 and, separately, a Hamming distance of 4 (with NCC 0.33: dHash alone collides by chance).
NCC_MAX = 0.95
DHASH_MIN_BITS = 3


def thumbnails(images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """``(z [N, 1024], bits [N, 64])``: standardised 32×32 grey thumbnails and dHash bits."""
    z, bits = [], []
    for im in images:
        g = im.convert("L")
        t = np.asarray(g.resize((32, 32), Image.BOX), np.float64).ravel()
        z.append((t - t.mean()) / (t.std() + 1e-6))
        d = np.asarray(g.resize((9, 8), Image.BOX), np.float64)
        bits.append((d[:, 1:] > d[:, :-1]).ravel())
    return np.array(z), np.array(bits)


def assert_no_near_duplicates(images: list[Image.Image], labels: list[str]) -> None:
    z, bits = thumbnails(images)
    ncc = z @ z.T / z.shape[1]
    ham = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    iu = np.triu_indices(len(images), 1)
    worst = int(np.argmax(ncc[iu]))
    a, b = iu[0][worst], iu[1][worst]
    assert ncc[a, b] < NCC_MAX, f"{labels[a]} and {labels[b]}: NCC {ncc[a, b]:.3f}"
    closest = int(np.argmin(ham[iu]))
    a, b = iu[0][closest], iu[1][closest]
    assert ham[a, b] >= DHASH_MIN_BITS, f"{labels[a]} and {labels[b]}: dHash distance {ham[a, b]}"


def test_near_duplicate_measures_flag_an_edited_copy():
    """The measures are not vacuous: a re-compressed, brightened copy is flagged by both."""
    img = synthetic_image(3)
    copy = Image.eval(img, lambda v: min(255, int(v * 1.1)))
    z, bits = thumbnails([img, copy])
    assert z[0] @ z[1] / z.shape[1] >= NCC_MAX
    assert (bits[0] != bits[1]).sum() < DHASH_MIN_BITS


def test_no_near_duplicates_among_300_images_and_across_seeds():
    images, labels = [], []
    for seed, n in ((0, 300), (1, 100)):
        for i in range(n):
            img, rec = synthetic_image_with_info(i, seed=seed, size=(128, 128))
            images.append(img)
            labels.append(f"seed {seed} #{i} ({rec.family.value}, {[o.value for o in rec.overlays]})")
    assert_no_near_duplicates(images, labels)


# -- determinism ---------------------------------------------------------------------------------------
def test_image_is_a_pure_function_of_seed_and_index_in_any_order():
    indices = list(first_of_each_family().values())
    forward = {i: pixels(synthetic_image(i, seed=4, size=(96, 80))) for i in indices}
    backward = {i: pixels(synthetic_image(i, seed=4, size=(96, 80))) for i in reversed(indices)}
    for i in indices:
        np.testing.assert_array_equal(forward[i], backward[i])
    # A different history of calls (other seeds, sizes, indices in between) changes nothing either.
    synthetic_image(123, seed=9, size=(40, 300))
    np.testing.assert_array_equal(pixels(synthetic_image(indices[0], seed=4, size=(96, 80))), forward[indices[0]])


def test_different_seeds_give_different_images():
    for i in range(20):
        a, b = pixels(synthetic_image(i, seed=0, size=(64, 64))), pixels(synthetic_image(i, seed=1, size=(64, 64)))
        assert np.abs(a.astype(int) - b.astype(int)).mean() > 5, i


def test_info_matches_the_rendered_image_and_ignores_size():
    for i in range(30):
        img, rec = synthetic_image_with_info(i, seed=2, size=(48, 40))
        assert synthetic_image_info(i, seed=2) == rec
        assert (rec.seed, rec.index) == (2, i)


# -- output format -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(256, 256), (64, 48), (300, 90), (90, 300), (8, 8)])
def test_every_family_gives_rgb_of_the_requested_size(size):
    for family, i in first_of_each_family().items():
        img = synthetic_image(i, seed=0, size=size)
        assert img.mode == "RGB", family
        assert img.size == size, family


@pytest.mark.parametrize(
    "kwargs",
    [{"index": -1}, {"index": 1.5}, {"index": 0, "seed": -3}, {"index": 0, "size": (7, 64)},
     {"index": 0, "size": (64,)}, {"index": 0, "size": (64.0, 64)}],
)  # fmt: skip
def test_bad_arguments_raise_value_error_naming_the_value(kwargs):
    with pytest.raises(ValueError, match="got"):
        synthetic_image(**kwargs)


# -- the generator mix ---------------------------------------------------------------------------------
def test_mix_covers_every_family_and_overlay():
    records = [synthetic_image_info(i, seed=0) for i in range(300)]
    assert {r.family for r in records} == EXPECTED_FAMILIES
    assert {o for r in records for o in r.overlays} == set(Overlay)
    assert any(len(r.overlays) == 0 for r in records) and any(len(r.overlays) == 2 for r in records)
    for r in records:
        if r.family is Family.GRADIENT:  # a bare smooth field is never emitted
            assert set(r.overlays) & {Overlay.SHAPES, Overlay.STROKES, Overlay.TEXT}, r


def test_without_scikit_image_photo_families_fall_back_and_others_are_unchanged(monkeypatch):
    before = {i: synthetic_image_with_info(i, seed=0, size=(48, 48)) for i in range(40)}
    monkeypatch.setattr(syn, "core_photos", lambda: ())
    monkeypatch.setattr(syn, "optional_photos", lambda: ())
    monkeypatch.setattr(syn, "photo_cells", lambda: ())
    for i, (img, rec) in before.items():
        img2, rec2 = synthetic_image_with_info(i, seed=0, size=(48, 48))
        assert rec2.family not in (Family.PHOTO_TILE, Family.PHOTO_LEAVES)
        if rec.family in (Family.PHOTO_TILE, Family.PHOTO_LEAVES):
            assert rec2.family is Family.DEAD_LEAVES
        else:
            assert rec2 == rec
            np.testing.assert_array_equal(pixels(img2), pixels(img))


# -- photos --------------------------------------------------------------------------------------------
def test_bundled_photos_load_offline(monkeypatch):
    pytest.importorskip("skimage")

    def no_network(*args, **kwargs):
        raise AssertionError("tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    photos_mod.core_photos.cache_clear()
    photos_mod.photo_cells.cache_clear()
    try:
        photos = photos_mod.core_photos()
        names = {p.name for p in photos}
        colour = {"astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "stereo_motorcycle"}  # fmt: skip
        assert colour <= names
        assert {"camera", "moon", "page", "text", "brick", "grass", "gravel"} <= names
        for p in photos:
            assert p.pixels.dtype == np.uint8 and p.pixels.ndim == 3 and p.pixels.shape[2] == 3, p.name
        assert len(photos_mod.photo_cells()) > 500
    finally:
        photos_mod.core_photos.cache_clear()
        photos_mod.photo_cells.cache_clear()


@pytest.mark.skipif(not HAVE_PHOTOS, reason="scikit-image is not installed")
def test_photo_cells_do_not_overlap_and_lie_inside_their_photo():
    photos, cells = photos_mod.core_photos(), photos_mod.photo_cells()
    by_photo: dict[int, list[photos_mod.Cell]] = {}
    for c in cells:
        h, w = photos[c.photo].pixels.shape[:2]
        assert 0 <= c.top and c.top + c.side <= h and 0 <= c.left and c.left + c.side <= w, c
        by_photo.setdefault(c.photo, []).append(c)
    for group in by_photo.values():
        cover = np.zeros(photos[group[0].photo].pixels.shape[:2], np.int32)
        for c in group:
            cover[c.top : c.top + c.side, c.left : c.left + c.side] += 1
        assert cover.max() == 1  # no source pixel belongs to two cells


@pytest.mark.skipif(not HAVE_PHOTOS, reason="scikit-image is not installed")
def test_photo_tiles_use_distinct_cells_within_a_seed_and_across_seeds_0_and_1():
    m = len(photos_mod.photo_cells())
    seen: dict[int, tuple[int, int]] = {}
    # Seed 0 below 0.6·M and seed 1 below 0.38·M share no cell (golden-ratio offsets), and within a
    # seed every index below M has its own cell.
    for seed, limit in ((0, int(0.6 * m)), (1, int(0.38 * m))):
        for i in range(limit):
            rec = synthetic_image_info(i, seed=seed)
            if rec.family is Family.PHOTO_TILE:
                assert rec.cell not in seen, f"seed {seed} #{i} reuses the cell of {seen[rec.cell]}"
                seen[rec.cell] = (seed, i)
    assert len(seen) > 0.15 * m
    # Past M the unique cells are used up: the family turns into photo fragments.
    later = [synthetic_image_info(i, seed=0).family for i in range(m, m + 200)]
    assert Family.PHOTO_TILE not in later and Family.PHOTO_LEAVES in later


# -- writing -------------------------------------------------------------------------------------------
def test_make_images_in_parallel_is_atomic_resumable_and_equals_the_images(tmp_path):
    out = tmp_path / "imgs"
    counts: list[int] = []
    paths = make_images(out, 40, seed=6, size=(48, 40), workers=2, progress=counts.append, start=10)
    assert [p.name for p in paths] == [f"img_{i:06d}.png" for i in range(10, 50)]
    assert sorted(out.iterdir()) == paths  # no temporary files left behind
    assert counts[0] == 0 and counts[-1] == 40 and counts == sorted(counts)
    for k in (0, 17, 39):
        expected = synthetic_image(10 + k, seed=6, size=(48, 40))
        np.testing.assert_array_equal(pixels(Image.open(paths[k])), pixels(expected))

    # Resume: only the missing files are written again.
    paths[3].unlink()
    paths[30].unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in paths if p.exists()}
    counts.clear()
    again = make_images(out, 40, seed=6, size=(48, 40), workers=1, progress=counts.append, start=10)
    assert again == paths and all(p.exists() for p in paths)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert counts == [38, 39, 40]
    np.testing.assert_array_equal(pixels(Image.open(paths[30])), pixels(synthetic_image(40, seed=6, size=(48, 40))))


def test_write_synthetic_images_keeps_its_names_and_start(tmp_path: Path):
    paths = write_synthetic_images(tmp_path, 3, seed=1, size=(32, 24), start=5)
    assert [p.name for p in paths] == ["img_000005.png", "img_000006.png", "img_000007.png"]
    assert Image.open(paths[0]).size == (32, 24)


def test_make_images_rejects_bad_workers(tmp_path):
    with pytest.raises(ValueError, match="workers"):
        make_images(tmp_path, 2, workers=0)
