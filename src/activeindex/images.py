"""Finding and decoding image files.

Every image that enters the pipeline goes through :func:`load_image`: it applies the EXIF orientation,
converts any mode (grayscale, palette, alpha, CMYK, 16-bit) to 8-bit RGB, and refuses files that are
empty, truncated, not images, or too large, with an :class:`~activeindex.errors.ImageLoadError` that
names the file and the reason. Batch callers catch that error per file, report it and go on.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from activeindex.errors import ImageLoadError
from activeindex.names import printable_name, storable_text  # noqa: F401 (re-exported)
from activeindex.settings import MAX_ACTIVATION_PIXELS  # noqa: F401 (re-exported)

# Extensions a folder walk picks up. A file named explicitly is always tried, whatever its name.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)


@dataclass(frozen=True)
class ImageLimits:
    """Bounds that protect a process from hostile or accidental huge inputs.

    ``max_pixels`` is checked on the header *before* decoding (a 30000×30000 PNG of a few KB would
    otherwise allocate 2.7 GB), ``max_bytes`` on the file size before reading it. Pillow refuses
    images above twice ``PIL.Image.MAX_IMAGE_PIXELS`` on its own, so raising ``max_pixels`` beyond
    the default also needs that global raised.
    """

    max_pixels: int = 178_956_970  # Pillow's own decompression-bomb error threshold (2 × 89.5 MP)
    max_bytes: int = 256 * 1024 * 1024


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True)
class ImageListing:
    """The result of expanding files and folders: images to read, and what a walk left out."""

    images: list[Path]
    ignored: list[Path]  # files inside walked folders whose extension is not an image's
    # (path, reason): dangling symbolic links, unreadable folders, link loops, special files
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def list_images(inputs: Iterable[str | os.PathLike[str]]) -> ImageListing:
    """Expand files and folders (recursively, sorted) into image paths.

    A folder contributes the files whose extension is in :data:`IMAGE_EXTENSIONS`; other files are
    returned in ``ignored`` so callers can report them. Symbolic links to folders are followed
    (each folder is walked once, so a link loop ends); a dangling link, a folder that cannot be
    read and a special file (FIFO, socket, device) go to ``skipped`` with the reason. Hidden files
    and folders below a folder given are left out silently. A file given explicitly is always
    kept. A path that does not exist raises :class:`ImageLoadError`. Duplicate paths are kept once.
    """
    images: list[Path] = []
    ignored: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            files: list[Path] = []
            _walk(path, files, skipped, set())
            for sub in sorted(files):
                target = images if sub.suffix.lower() in IMAGE_EXTENSIONS else ignored
                if sub not in seen:
                    seen.add(sub)
                    target.append(sub)
        elif path.is_file():
            if path not in seen:
                seen.add(path)
                images.append(path)
        elif path.is_symlink():
            raise ImageLoadError(path, f"symbolic link to {os.readlink(path)}, which does not exist")
        else:
            raise ImageLoadError(path, "no such file or folder")
    return ImageListing(images=images, ignored=ignored, skipped=skipped)


def _walk(folder: Path, files: list[Path], skipped: list[tuple[Path, str]], walked: set[tuple[int, int]]) -> None:
    """Collect the regular files below ``folder`` (following links to folders, each folder once)."""
    stack = [folder]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
            key = (st.st_dev, st.st_ino)
            if key in walked:
                skipped.append((d, "a link to a folder walked already (a loop, or a second way in)"))
                continue
            walked.add(key)
            with os.scandir(d) as it:
                entries = list(it)
        except OSError as exc:
            skipped.append((d, f"cannot read folder ({exc.strerror or exc})"))
            continue
        for entry in entries:
            if entry.name.startswith("."):  # hidden: .git, .thumbnails, temporary files
                continue
            p = Path(entry.path)
            try:
                if entry.is_dir():  # follows a link to a folder
                    stack.append(p)
                elif entry.is_file():
                    files.append(p)
                elif entry.is_symlink():
                    target = os.readlink(p)
                    reason = "dangling symbolic link" if not p.exists() else "link to a special file"
                    skipped.append((p, f"{reason} (to {target})"))
                else:
                    skipped.append((p, "not a regular file (FIFO, socket or device)"))
            except OSError as exc:
                skipped.append((p, f"cannot read ({exc.strerror or exc})"))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited on white, 16-bit scaled down)."""
    if img.mode in ("1", "L", "RGB") and "transparency" in img.info:
        # A PNG tRNS colour key (or a GIF's transparent index on an L frame): make it alpha.
        try:
            img = img.convert("RGBA")
        except (TypeError, ValueError):
            pass  # a malformed transparency entry: ignore it rather than fail the image
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P":
        # Palette images may carry transparency in info; RGBA makes it explicit.
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(
    path: str | os.PathLike[str],
    *,
    min_side: int | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> Image.Image:
    """Decode one image file to an 8-bit RGB :class:`PIL.Image.Image`, EXIF orientation applied.

    ``min_side``: when given, JPEG files are decoded at a reduced scale (DCT scaling, 1/2 to 1/8)
    as long as both sides stay ≥ ``min_side`` — several times faster for an extractor that resizes
    to a few hundred pixels anyway. The result then is smaller than the file's full size.
    Animated files give their first frame.

    Raises :class:`ImageLoadError` naming the path for a missing, empty, oversized, truncated or
    non-image file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read file ({exc.strerror or exc})") from exc
    return _decode(path, path, size, min_side, limits)


def decode_image(
    data: bytes, label: str, *, min_side: int | None = None, limits: ImageLimits = DEFAULT_LIMITS
) -> Image.Image:
    """:func:`load_image` for an image file's bytes held in memory (an upload); errors name
    ``label``."""
    return _decode(io.BytesIO(data), label, len(data), min_side, limits)


def _decode(
    source: Path | io.BytesIO, label: object, size: int, min_side: int | None, limits: ImageLimits
) -> Image.Image:
    """Decode ``source`` (``size`` bytes); errors name ``label``."""
    if size == 0:
        raise ImageLoadError(label, "empty file (0 bytes)")
    if size > limits.max_bytes:
        raise ImageLoadError(label, f"file of {size} bytes exceeds the limit of {limits.max_bytes}")
    try:
        # Pillow itself warns above Image.MAX_IMAGE_PIXELS and refuses above twice that, whatever
        # our limit; ours below is the one callers set (catch_warnings is not thread-safe, and
        # decoding runs in threads, so the warning is left alone).
        img = Image.open(source)
        with img:
            width, height = img.size
            if width * height > limits.max_pixels:
                raise ImageLoadError(
                    label,
                    f"{width}×{height} = {width * height} pixels exceeds the limit of "
                    f"{limits.max_pixels} (possible decompression bomb)",
                )
            if width < 1 or height < 1:
                raise ImageLoadError(label, f"invalid size {width}×{height}")
            if min_side is not None and img.format == "JPEG":
                # draft() picks the largest DCT scale whose result is still >= the requested size.
                img.draft("RGB", _draft_request(width, height, min_side))
            img.seek(0)
            # Truncated files fail here (Pillow's default LOAD_TRUNCATED_IMAGES=False) instead of
            # decoding to a grey bottom half.
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
    except ImageLoadError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageLoadError(label, "not an image file (format not recognised)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(label, f"possible decompression bomb: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(label, f"corrupt or truncated image ({exc})") from exc


def _draft_request(width: int, height: int, min_side: int) -> tuple[int, int]:
    """Requested draft size keeping the aspect ratio, so the *shorter* side stays ≥ min_side."""
    short = min(width, height)
    if short <= min_side:
        return (width, height)
    scale = min_side / short
    return (max(1, int(width * scale + 0.999)), max(1, int(height * scale + 0.999)))


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes: the content hash collections deduplicate on."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
