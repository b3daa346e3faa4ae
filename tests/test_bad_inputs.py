"""The bad-input set: every odd or broken input gives the right result or a clear error that names
the file (or value) and the reason. Every file is generated here, under tmp_path."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from activeindex.collection import Collection
from activeindex.datasets.synthetic import synthetic_image
from activeindex.errors import DimensionError, ImageLoadError, ModelError
from activeindex.extractors import BUILTIN_MODELS, create_extractor
from activeindex.features import extract_paths
from activeindex.images import list_images, load_image
from helpers import run_main

# -- makers of the bad (and merely odd) files ------------------------------------------------


def make_empty(d: Path) -> Path:
    p = d / "empty.jpg"
    p.write_bytes(b"")
    return p


def make_text_as_jpg(d: Path) -> Path:
    p = d / "notes.jpg"
    p.write_text("this is a shopping list, not a JPEG\n" * 20)
    return p


def _cut_in_half(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def make_truncated_jpeg(d: Path) -> Path:
    full = d / "full_for_cut.jpeg.src"
    synthetic_image(4, size=(96, 64)).save(full, format="JPEG", quality=90)
    out = _cut_in_half(full, d / "truncated.jpg")
    full.unlink()
    return out


def make_truncated_png(d: Path) -> Path:
    full = d / "full_for_cut.png.src"
    synthetic_image(5, size=(96, 64)).save(full, format="PNG")
    out = _cut_in_half(full, d / "truncated.png")
    full.unlink()
    return out


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def make_png_bomb(d: Path, side: int = 30000) -> Path:
    """A valid PNG header claiming side×side RGB pixels, with one row of data: a few hundred bytes."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(b"\x00" * (1 + 3 * side), 9)  # filter byte + one black row
    p = d / "bomb.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    return p


def make_one_pixel(d: Path) -> Path:
    p = d / "one_pixel.png"
    Image.new("RGB", (1, 1), (10, 200, 30)).save(p)
    return p


CMYK_PATCHES = {  # CMYK ink → the RGB colour it means
    (0, 255, 255, 0): (255, 0, 0),
    (255, 0, 255, 0): (0, 255, 0),
    (255, 255, 0, 0): (0, 0, 255),
    (0, 0, 0, 0): (255, 255, 255),
}


def make_cmyk_jpeg(d: Path) -> Path:
    img = Image.new("CMYK", (32, 32))
    for i, ink in enumerate(CMYK_PATCHES):
        x, y = (i % 2) * 16, (i // 2) * 16
        img.paste(ink, (x, y, x + 16, y + 16))
    p = d / "cmyk.jpg"
    img.save(p, format="JPEG", quality=95)
    return p


def make_png16(d: Path) -> Path:
    ramp = np.round(np.linspace(0, 65535, 256)).astype(np.uint16)
    img = Image.fromarray(np.tile(ramp, (8, 1)))
    assert img.mode == "I;16"
    p = d / "gray16.png"
    img.save(p)
    return p


def make_palette_png_with_transparency(d: Path) -> Path:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))  # 0: black (transparent), 1: red
    img.paste(1, (4, 0, 8, 8))  # right half red, left half transparent
    p = d / "palette_trns.png"
    img.save(p, transparency=0)
    return p


FRAME_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def make_animated(d: Path, fmt: str = "GIF", ext: str = "gif") -> Path:
    frames = [Image.new("RGB", (12, 10), c) for c in FRAME_COLOURS]
    p = d / f"animated.{ext}"
    options = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(p, format=fmt, save_all=True, append_images=frames[1:], duration=40, loop=0, **options)
    return p


MARK = (255, 0, 0)
BACKGROUND = (0, 0, 255)


def make_exif_rotated(d: Path, orientation: int) -> Path:
    """A 40×20 stored image, blue with a red 8×8 mark at its stored top-left corner."""
    img = Image.new("RGB", (40, 20), BACKGROUND)
    img.paste(MARK, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = d / f"exif_{orientation}.jpg"
    img.save(p, format="JPEG", quality=95, exif=exif.tobytes())
    return p


def make_good(d: Path, i: int, fmt: str = "PNG", ext: str = "png") -> Path:
    p = d / f"good_{i}.{ext}"
    synthetic_image(i, seed=11, size=(48, 40)).save(p, format=fmt)
    return p


def assert_clear_error(exc: BaseException, path: Path, *reason_words: str) -> None:
    msg = str(exc)
    assert path.name in msg, msg
    assert any(w.lower() in msg.lower() for w in reason_words), msg
    if isinstance(exc, ImageLoadError):
        assert Path(exc.path) == path and exc.reason


def close(a, b, tol) -> bool:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) <= tol


# -- files that must fail, clearly -----------------------------------------------------------


BROKEN = [
    (make_empty, ("empty", "0 bytes")),
    (make_text_as_jpg, ("not an image",)),
    (make_truncated_jpeg, ("truncated",)),
    (make_truncated_png, ("truncated",)),
    (make_png_bomb, ("pixels",)),
]


@pytest.mark.parametrize(("maker", "words"), BROKEN, ids=[m.__name__[5:] for m, _ in BROKEN])
@pytest.mark.parametrize("min_side", [None, 32], ids=["full", "reduced"])
def test_broken_file_raises_clear_error(tmp_path, maker, words, min_side):
    path = maker(tmp_path)
    with pytest.raises(ImageLoadError) as info:
        load_image(path, min_side=min_side)
    assert_clear_error(info.value, path, *words)


def test_truncated_files_are_really_truncated_valid_files(tmp_path):
    """Guard on the fixtures: the full files decode, so the failures above are the cut's."""
    for make in (make_truncated_jpeg, make_truncated_png):
        cut = make(tmp_path)
        assert cut.stat().st_size > 100
        with Image.open(cut) as im:  # the header still parses: only the pixel data is missing
            assert im.size == (96, 64)


def test_png_bomb_refused_from_header_without_decoding(tmp_path, monkeypatch):
    path = make_png_bomb(tmp_path)
    assert path.stat().st_size < 1000

    def no_decode(self):  # pragma: no cover - must not run
        raise AssertionError("the 30000×30000 image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert_clear_error(info.value, path, "decompression bomb")
    assert "pixels" in str(info.value)


def test_png_bomb_refused_by_own_limit_when_pillow_guard_is_off(tmp_path, monkeypatch):
    """A program that disabled Pillow's guard globally is still protected by ImageLimits."""
    path = make_png_bomb(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    msg = str(info.value)
    assert_clear_error(info.value, path, "decompression bomb")
    assert "30000×30000" in msg and "900000000 pixels" in msg and "178956970" in msg


def test_text_file_found_by_folder_walk_is_listed_then_refused(tmp_path):
    fake = make_text_as_jpg(tmp_path)
    assert list_images([tmp_path]).images == [fake]  # the extension says image …
    with pytest.raises(ImageLoadError) as info:  # … the content does not
        load_image(fake)
    assert_clear_error(info.value, fake, "not an image")


# -- odd files that must load correctly ------------------------------------------------------


def test_one_pixel_image_loads_and_gets_a_descriptor(tmp_path, tiny_extractor):
    path = make_one_pixel(tmp_path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (1, 1)
    assert img.getpixel((0, 0)) == (10, 200, 30)
    assert load_image(path, min_side=tiny_extractor.preprocessing.decode_min_side).size == (1, 1)
    result = extract_paths([path], tiny_extractor)
    assert result.failures == [] and result.paths == [path]
    assert result.features.shape == (1, tiny_extractor.dim)
    assert np.isfinite(result.features).all()
    assert abs(float(np.linalg.norm(result.features[0])) - 1.0) < 1e-4


def test_cmyk_jpeg_loads_as_rgb_with_intended_colours(tmp_path):
    path = make_cmyk_jpeg(tmp_path)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (32, 32)
    for i, rgb in enumerate(CMYK_PATCHES.values()):
        x, y = (i % 2) * 16 + 8, (i // 2) * 16 + 8
        assert close(img.getpixel((x, y)), rgb, 24), (i, img.getpixel((x, y)), rgb)
    # The reduced-size decode path (DCT scaling) gives the same colours.
    small = load_image(path, min_side=8)
    assert small.mode == "RGB" and min(small.size) >= 8
    sx, sy = small.size[0] // 4, small.size[1] // 4
    assert close(small.getpixel((sx, sy)), (255, 0, 0), 24)


def test_png16_is_scaled_not_clipped(tmp_path):
    path = make_png16(tmp_path)
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (256, 8)
    arr = np.asarray(img)
    row = arr[0, :, 0].astype(int)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()  # grey
    assert row[0] == 0 and row.max() == 255 and row[-1] == 255
    assert abs(row[128] - 128) <= 1  # 65535·128/255 → ~128, not clipped to 255
    assert abs(row[64] - 64) <= 1
    assert (np.diff(row) >= 0).all()  # a monotonic ramp
    assert (row == 255).sum() <= 2  # clipping would saturate almost the whole ramp


def test_dark_png16_stays_dark(tmp_path):
    """A 16-bit image whose values are all small is dark: scaling is by the bit depth, not the max."""
    path = tmp_path / "dark16.png"
    Image.fromarray(np.full((4, 4), 2570, np.uint16)).save(path)  # 2570/65535 → 10/255
    assert abs(load_image(path).getpixel((0, 0))[0] - 10) <= 1


def test_palette_png_transparency_composited_on_white(tmp_path):
    path = make_palette_png_with_transparency(tmp_path)
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    arr = np.asarray(load_image(path))
    assert arr.shape == (8, 8, 3)
    assert (arr[:, :4] == 255).all()  # transparent → white, not black
    assert (arr[:, 4:] == (255, 0, 0)).all()


def test_rgba_and_la_alpha_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[..., 3] = 128  # half-transparent blue over white → (127, 127, 255)
    p = tmp_path / "half.png"
    Image.fromarray(rgba, "RGBA").save(p)
    assert close(load_image(p).getpixel((1, 1)), (127, 127, 255), 1)
    la = Image.new("LA", (4, 4), (0, 0))
    p2 = tmp_path / "la.png"
    la.save(p2)
    assert load_image(p2).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(("fmt", "ext"), [("GIF", "gif"), ("PNG", "png"), ("WEBP", "webp")])
def test_animated_file_gives_first_frame(tmp_path, fmt, ext):
    path = make_animated(tmp_path, fmt, ext)
    with Image.open(path) as raw:
        assert getattr(raw, "n_frames", 1) == 3
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (12, 10)
    assert close(img.getpixel((6, 5)), FRAME_COLOURS[0], 2), img.getpixel((6, 5))


@pytest.mark.parametrize(
    ("orientation", "mark_at", "far_corner"),
    [
        (6, (20 - 3, 3), (3, 40 - 3)),  # 90° clockwise: stored top-left → shown top-right
        (8, (3, 40 - 3), (20 - 3, 3)),  # 90° counter-clockwise: stored top-left → shown bottom-left
    ],
)
@pytest.mark.parametrize("min_side", [None, 8])
def test_exif_orientation_applied(tmp_path, orientation, mark_at, far_corner, min_side):
    path = make_exif_rotated(tmp_path, orientation)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    img = load_image(path, min_side=min_side)
    assert img.mode == "RGB"
    if min_side is None:
        assert img.size == (20, 40)
    else:  # reduced decode: scaled, but still portrait
        w, h = img.size
        assert h == 2 * w and w >= 8
        f = 20 / w
        mark_at = (int(mark_at[0] / f), int(mark_at[1] / f))
        far_corner = (int(far_corner[0] / f), int(far_corner[1] / f))
    assert close(img.getpixel(mark_at), MARK, 40), img.getpixel(mark_at)
    assert close(img.getpixel(far_corner), BACKGROUND, 40), img.getpixel(far_corner)
    # The exact other corners are background too: the rotation direction is right, not just the shape.
    w, h = img.size
    for corner in [(1, 1), (w - 2, 1), (1, h - 2), (w - 2, h - 2)]:
        if abs(corner[0] - mark_at[0]) > w // 2 or abs(corner[1] - mark_at[1]) > h // 4:
            assert close(img.getpixel(corner), BACKGROUND, 40), (corner, img.getpixel(corner))


# -- a batch with everything: nothing silently dropped ---------------------------------------


def test_batch_extraction_reports_every_broken_file(tmp_path, tiny_extractor):
    d = tmp_path / "mixed"
    d.mkdir()
    good = [
        make_good(d, 0),
        make_good(d, 1, "JPEG", "jpg"),
        make_one_pixel(d),
        make_cmyk_jpeg(d),
        make_png16(d),
        make_palette_png_with_transparency(d),
        make_animated(d),
        make_exif_rotated(d, 6),
        make_good(d, 2, "WEBP", "webp"),
        make_good(d, 3, "BMP", "bmp"),
    ]
    broken = {
        make_empty(d): "empty",
        make_text_as_jpg(d): "not an image",
        make_truncated_jpeg(d): "truncated",
        make_truncated_png(d): "truncated",
        make_png_bomb(d): "pixels",
    }
    inputs = list_images([d]).images
    assert sorted(inputs) == sorted(good + list(broken))  # every file has an image extension

    result = extract_paths(inputs, tiny_extractor, batch_size=4, workers=2)
    assert len(result.paths) + len(result.failures) == len(inputs)
    assert result.paths == [p for p in inputs if p in good]  # input order kept
    assert result.features.shape == (len(good), tiny_extractor.dim)
    assert result.features.dtype == np.float32 and np.isfinite(result.features).all()
    np.testing.assert_allclose(np.linalg.norm(result.features, axis=1), 1.0, atol=1e-4)

    failed = {f.path: f.reason for f in result.failures}
    assert set(failed) == set(broken)
    for path, word in broken.items():
        assert word in failed[path], (path.name, failed[path])

    # Row i really is the descriptor of paths[i]: compare with one-file extractions.
    for i in (0, 2, len(good) - 1):
        alone = extract_paths([result.paths[i]], tiny_extractor).features[0]
        assert float(alone @ result.features[i]) > 0.999


# -- the command line ------------------------------------------------------------------------


def run_subprocess(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "activeindex.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=120,
    )


def test_cli_folder_without_images_subprocess(tmp_path):
    d = tmp_path / "nothing_here"
    d.mkdir()
    (d / "readme.txt").write_text("no pictures")
    proc = run_subprocess("extract", d, "-o", tmp_path / "out", "--model", "builtin:tiny", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "error: no image files found" in proc.stderr and str(d) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "readme.txt" in proc.stderr  # the ignored file is reported
    assert not (tmp_path / "out").exists()


def test_cli_missing_torchscript_file_subprocess(tmp_path):
    d = tmp_path / "imgs"
    make_good(d.mkdir() or d, 0)
    proc = run_subprocess("extract", d, "-o", tmp_path / "out", "--model", "torchscript:/nonexistent.pt", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "error: model file not found: /nonexistent.pt" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_empty_folder(tmp_path, monkeypatch, capsys):
    d = tmp_path / "empty_dir"
    d.mkdir()
    code, _, err = run_main(monkeypatch, capsys, "extract", d, "-o", tmp_path / "out", "--model", "builtin:tiny")
    assert code == 2
    assert "error: no image files found" in err and str(d) in err


def test_cli_random_bytes_as_torchscript(tmp_path, monkeypatch, capsys):
    model = tmp_path / "garbage.pt"
    model.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    d = tmp_path / "imgs"
    make_good(d.mkdir() or d, 0)
    code, _, err = run_main(monkeypatch, capsys, "extract", d, "-o", tmp_path / "out", "--model", f"torchscript:{model}")
    assert code == 2
    assert "error:" in err and str(model) in err and "not a loadable TorchScript file" in err
    assert "Traceback" not in err
    with pytest.raises(ModelError, match="not a loadable TorchScript file"):
        create_extractor(f"torchscript:{model}")


def test_cli_unknown_builtin_lists_known_names(tmp_path, monkeypatch, capsys):
    d = tmp_path / "imgs"
    make_good(d.mkdir() or d, 0)
    code, _, err = run_main(monkeypatch, capsys, "extract", d, "-o", tmp_path / "out", "--model", "builtin:nope")
    assert code == 2
    assert "'nope'" in err
    for name in BUILTIN_MODELS:
        assert name in err
    with pytest.raises(ModelError, match="choose one of"):
        create_extractor("builtin:nope")


def test_cli_extract_reports_each_broken_file_and_keeps_going(tmp_path, monkeypatch, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    good = [make_good(d, 0), make_one_pixel(d), make_cmyk_jpeg(d)]
    broken = [make_empty(d), make_text_as_jpg(d), make_truncated_png(d), make_png_bomb(d)]
    out = tmp_path / "out"
    code, _, err = run_main(monkeypatch, capsys, "extract", d, "-o", out, "--model", "builtin:tiny", "--batch-size", "2")
    assert code == 0, err
    for p in broken:
        assert f"skipped {p}: " in err, err
    assert f"{len(good)} images described" in err and f"{len(broken)} skipped" in err
    feats = np.load(out / "features.npy")
    names = (out / "names.txt").read_text().splitlines()
    assert feats.shape == (len(good), 32) and names == sorted(p.name for p in good)


def test_cli_create_with_wrong_dimension_npy(tmp_path, monkeypatch, capsys):
    xt = tmp_path / "train16.npy"
    np.save(xt, np.random.default_rng(0).normal(size=(100, 16)).astype(np.float32))
    coll = tmp_path / "coll"
    code, _, err = run_main(monkeypatch, capsys, "create", coll, "--index", "Flat", "--train", xt, "--model", "builtin:tiny")
    assert code == 2
    assert "error:" in err and "(100, 16)" in err and "(n, 32)" in err
    assert not (coll / "collection.json").exists()


def test_collection_add_vectors_wrong_dimension(tmp_path, tiny_extractor, train_vectors):
    with Collection.create(tmp_path / "coll", tiny_extractor, "Flat", train_vectors) as coll:
        with pytest.raises(DimensionError) as info:
            coll.add_vectors(np.zeros((3, 16), np.float32), ["a", "b", "c"], ["0" * 64, "1" * 64, "2" * 64])
        assert "(3, 16)" in str(info.value) and "32" in str(info.value)
        with pytest.raises(DimensionError):
            coll.add_vectors(np.zeros(32, np.float32), ["a"], ["0" * 64])  # 1-D, not (n, d)
        assert coll.count() == 0
        ids = coll.add_vectors(train_vectors[:2], ["a", "b"], ["0" * 64, "1" * 64])  # still usable
        assert len(ids) == 2 and coll.count() == 2
