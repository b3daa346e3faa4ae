"""Unit tests of activeindex.images: listing, decoding, reduced-size decode, limits, hashing.

Every file is generated in the test (Pillow + numpy under tmp_path)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from activeindex.datasets.synthetic import synthetic_image
from activeindex.errors import ActiveIndexError, ImageLoadError
from activeindex.images import (
    IMAGE_EXTENSIONS,
    ImageLimits,
    ImageListing,
    decode_image,
    file_sha256,
    list_images,
    load_image,
)


def touch_image(path: Path, size: tuple[int, int] = (8, 6), colour=(200, 30, 40), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt or "PNG")
    return path


# -- list_images -------------------------------------------------------------------------------


def test_list_images_walks_folders_recursively_sorted(tmp_path):
    root = tmp_path / "root"
    made = [
        touch_image(root / "b.png"),
        touch_image(root / "a" / "c.JPG", fmt="JPEG"),  # extension match is case-insensitive
        touch_image(root / "a" / "sub" / "d.webp", fmt="WEBP"),
        touch_image(root / "a" / "sub" / "deeper" / "e.tiff", fmt="TIFF"),
        touch_image(root / "0.gif", fmt="GIF"),
    ]
    listing = list_images([root])
    assert isinstance(listing, ImageListing)
    assert listing.images == sorted(made)
    assert listing.images == [
        root / "0.gif",
        root / "a" / "c.JPG",
        root / "a" / "sub" / "d.webp",
        root / "a" / "sub" / "deeper" / "e.tiff",
        root / "b.png",
    ]
    assert listing.ignored == []


def test_list_images_skips_hidden_files_and_folders(tmp_path):
    root = tmp_path / "root"
    keep = touch_image(root / "keep.png")
    touch_image(root / ".hidden.png")
    touch_image(root / ".img_000001.png.tmp")  # an atomic-write temp file
    touch_image(root / "sub" / ".also_hidden.jpg", fmt="JPEG")
    touch_image(root / ".thumbnails" / "thumb.png")  # inside a hidden folder
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    listing = list_images([root])
    assert listing.images == [keep]
    assert listing.ignored == []


def test_list_images_hidden_root_folder_is_still_walked(tmp_path):
    """Only components *below* the folder given count: a folder named explicitly is walked."""
    root = tmp_path / ".cache" / "imgs"
    keep = touch_image(root / "x.png")
    assert list_images([root]).images == [keep]


def test_list_images_reports_non_image_files_as_ignored(tmp_path):
    root = tmp_path / "root"
    img = touch_image(root / "photo.png")
    notes = root / "notes.txt"
    notes.write_text("not an image")
    raw = root / "sub" / "data.npy"
    raw.parent.mkdir()
    np.save(raw, np.zeros(3))
    listing = list_images([root])
    assert listing.images == [img]
    assert listing.ignored == [notes, raw]


def test_list_images_keeps_explicit_files_whatever_the_extension(tmp_path):
    odd = tmp_path / "picture.dat"
    Image.new("RGB", (4, 4)).save(odd, format="PNG")
    text = tmp_path / "readme.txt"
    text.write_text("hello")
    listing = list_images([odd, text])
    assert listing.images == [odd, text]  # input order, both kept: the loader decides
    assert listing.ignored == []
    assert load_image(odd).size == (4, 4)


def test_list_images_mixes_files_and_folders_without_duplicates(tmp_path):
    root = tmp_path / "root"
    a = touch_image(root / "a.png")
    b = touch_image(root / "b.png")
    c = touch_image(tmp_path / "c.png")
    listing = list_images([c, root, a, str(b)])
    assert listing.images == [c, a, b]


def test_list_images_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    listing = list_images([tmp_path / "empty"])
    assert listing.images == [] and listing.ignored == []


def test_list_images_missing_path_raises(tmp_path):
    missing = tmp_path / "nope" / "gone.png"
    with pytest.raises(ImageLoadError) as info:
        list_images([touch_image(tmp_path / "ok.png"), missing])
    assert str(missing) in str(info.value)
    assert "no such file" in str(info.value)
    assert info.value.path == missing
    assert isinstance(info.value, ActiveIndexError)


def test_image_extensions_are_lowercase_with_dot():
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)


# -- load_image: formats ---------------------------------------------------------------------


def _quadrants(size=(48, 32)) -> Image.Image:
    """Four flat colour quadrants: survives lossy codecs and GIF's palette."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2] = (255, 0, 0)
    arr[: h // 2, w // 2 :] = (0, 255, 0)
    arr[h // 2 :, : w // 2] = (0, 0, 255)
    arr[h // 2 :, w // 2 :] = (255, 255, 0)
    return Image.fromarray(arr)


FORMATS = [
    ("JPEG", "jpg", {"quality": 95}, 24),
    ("PNG", "png", {}, 0),
    ("WEBP", "webp", {"lossless": True}, 0),
    ("WEBP", "webp", {"quality": 90}, 30),
    ("BMP", "bmp", {}, 0),
    ("TIFF", "tif", {}, 0),
    ("GIF", "gif", {}, 0),
]


@pytest.mark.parametrize(("fmt", "ext", "options", "tol"), FORMATS, ids=[f"{f[0]}-{i}" for i, f in enumerate(FORMATS)])
def test_load_image_formats_give_rgb(tmp_path, fmt, ext, options, tol):
    src = _quadrants()
    path = tmp_path / f"q.{ext}"
    src.save(path, format=fmt, **options)
    img = load_image(path)
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB" and img.size == (48, 32)
    got = np.asarray(img, dtype=np.int16)
    want = np.asarray(src, dtype=np.int16)
    # Compare the centre of each quadrant (edges blur in lossy codecs).
    for y, x in [(8, 12), (8, 36), (24, 12), (24, 36)]:
        assert np.abs(got[y, x] - want[y, x]).max() <= tol, (fmt, (y, x), got[y, x], want[y, x])


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "1", "I", "F", "P"])
def test_load_image_converts_every_mode_to_rgb(tmp_path, mode):
    src = _quadrants((16, 16))
    img = src.convert("P") if mode == "P" else src.convert(mode)
    path = tmp_path / f"m_{mode}.tif"
    img.save(path, format="TIFF")
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (16, 16)


def test_load_image_rgba_composited_on_white(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 255  # red
    arr[:2, :, 3] = 0  # top half fully transparent
    arr[2:, :, 3] = 255
    path = tmp_path / "a.png"
    Image.fromarray(arr, "RGBA").save(path)
    out = np.asarray(load_image(path))
    assert (out[:2] == 255).all()
    assert (out[2:] == (255, 0, 0)).all()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_load_image_trns_colour_key_composited_on_white(tmp_path, mode):
    """PNG's tRNS colour key (L and RGB images): the keyed colour is transparent → white."""
    img = Image.new(mode, (4, 4), 0)
    img.putpixel((3, 3), 100 if mode == "L" else (100, 50, 20))
    path = tmp_path / f"key_{mode}.png"
    img.save(path, transparency=0 if mode == "L" else (0, 0, 0))
    out = np.asarray(load_image(path))
    assert (out[0, 0] == 255).all()
    assert tuple(out[3, 3]) == ((100, 100, 100) if mode == "L" else (100, 50, 20))


def test_load_image_returns_an_independent_loaded_image(tmp_path):
    path = touch_image(tmp_path / "x.png", size=(5, 3))
    img = load_image(path)
    path.unlink()  # the file handle is closed and the pixels are in memory
    assert np.asarray(img).shape == (3, 5, 3)


def test_load_image_accepts_str_path(tmp_path):
    path = touch_image(tmp_path / "x.bmp", fmt="BMP")
    assert load_image(str(path)).size == (8, 6)


# -- reduced-size JPEG decode ----------------------------------------------------------------


@pytest.fixture
def big_jpeg(tmp_path) -> Path:
    path = tmp_path / "big.jpg"
    synthetic_image(3, seed=5, size=(640, 480)).save(path, quality=92)
    return path


@pytest.mark.parametrize("min_side", [32, 64, 100, 200])
def test_reduced_jpeg_decode_is_smaller_and_close(big_jpeg, min_side):
    full = load_image(big_jpeg)
    small = load_image(big_jpeg, min_side=min_side)
    assert full.size == (640, 480)
    assert small.mode == "RGB"
    assert small.size[0] < 640 and small.size[1] < 480
    assert min(small.size) >= min_side
    # Aspect ratio kept (up to DCT-scale rounding).
    assert abs(small.size[0] / small.size[1] - 640 / 480) < 0.02
    # The largest possible DCT scale was used: half again would go below min_side.
    scale = 480 / small.size[1]
    assert scale == 8 or 480 / (scale * 2) < min_side
    a = np.asarray(full.resize((32, 24), Image.BILINEAR, reducing_gap=3.0), dtype=np.float32)
    b = np.asarray(small.resize((32, 24), Image.BILINEAR, reducing_gap=3.0), dtype=np.float32)
    assert np.abs(a - b).mean() < 6.0, np.abs(a - b).mean()


@pytest.mark.parametrize("min_side", [None, 100])
def test_decoding_bytes_equals_loading_the_file(big_jpeg, min_side):
    from_file = load_image(big_jpeg, min_side=min_side)
    from_bytes = decode_image(big_jpeg.read_bytes(), "upload.jpg", min_side=min_side)
    assert from_bytes.size == from_file.size
    np.testing.assert_array_equal(np.asarray(from_bytes), np.asarray(from_file))


def test_decoding_bad_bytes_names_the_label(big_jpeg):
    data = big_jpeg.read_bytes()
    for bad, reason in [(b"", "empty"), (data[: len(data) // 2], "truncated"), (b"hello", "not an image")]:
        with pytest.raises(ImageLoadError, match=reason) as err:
            decode_image(bad, "upload.jpg")
        assert err.value.path == "upload.jpg"
    with pytest.raises(ImageLoadError, match="exceeds the limit"):
        decode_image(data, "upload.jpg", limits=ImageLimits(max_pixels=1000))


def test_reduced_decode_portrait_keeps_short_side(tmp_path):
    path = tmp_path / "tall.jpg"
    synthetic_image(1, size=(300, 900)).save(path, quality=90)
    small = load_image(path, min_side=64)
    assert min(small.size) >= 64 and small.size[1] > small.size[0]
    assert small.size == (75, 225)  # 1/4 scale: 1/8 would make the short side 38 < 64


def test_reduced_decode_not_below_full_size_when_image_small(tmp_path):
    path = tmp_path / "small.jpg"
    synthetic_image(1, size=(60, 40)).save(path, quality=90)
    assert load_image(path, min_side=64).size == (60, 40)
    assert load_image(path, min_side=40).size == (60, 40)


def test_min_side_ignored_for_non_jpeg(tmp_path):
    path = tmp_path / "big.png"
    synthetic_image(2, size=(256, 192)).save(path)
    assert load_image(path, min_side=32).size == (256, 192)


# -- limits ----------------------------------------------------------------------------------


def test_max_bytes_enforced_with_numbers(tmp_path):
    path = tmp_path / "noisy.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    size = path.stat().st_size
    with pytest.raises(ImageLoadError) as info:
        load_image(path, limits=ImageLimits(max_bytes=size - 1))
    msg = str(info.value)
    assert str(path) in msg and str(size) in msg and str(size - 1) in msg
    assert info.value.path == path
    assert load_image(path, limits=ImageLimits(max_bytes=size)).size == (64, 64)  # bound inclusive


def test_max_pixels_enforced_with_numbers(tmp_path):
    path = touch_image(tmp_path / "wide.png", size=(64, 48))
    with pytest.raises(ImageLoadError) as info:
        load_image(path, limits=ImageLimits(max_pixels=3000))
    msg = str(info.value)
    assert str(path) in msg
    assert "64×48" in msg and "3072" in msg and "3000" in msg and "pixels" in msg
    assert load_image(path, limits=ImageLimits(max_pixels=3072)).size == (64, 48)  # bound inclusive


def test_max_pixels_checked_before_decoding(tmp_path, monkeypatch):
    path = touch_image(tmp_path / "x.png", size=(64, 48))
    from PIL import ImageFile

    def no_decode(self):  # pragma: no cover - must not run
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageLoadError, match="pixels"):
        load_image(path, limits=ImageLimits(max_pixels=100))


def test_default_limits():
    limits = ImageLimits()
    assert limits.max_pixels >= 100_000_000 and limits.max_bytes >= 100 * 1024 * 1024


# -- file_sha256 -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 1000, (1 << 20) + 3])
def test_file_sha256_matches_hashlib(tmp_path, n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert file_sha256(path) == want
    assert file_sha256(str(path), chunk=7) == want


def test_file_sha256_of_image_differs_by_content(tmp_path):
    a = touch_image(tmp_path / "a.png", colour=(1, 2, 3))
    b = touch_image(tmp_path / "b.png", colour=(1, 2, 4))
    c = tmp_path / "c.png"
    c.write_bytes(a.read_bytes())
    assert file_sha256(a) == file_sha256(c) != file_sha256(b)
