"""Turning an optimised perturbation into the file that is released, within the quality budget.

The budget is checked on the *written file*, decoded again, against the original's pixels: the
rounding to 8 bits and, for JPEG/WebP, the codec count against it. Where the file would fall below
``--psnr``, the perturbation is scaled back and the file encoded again until it meets the budget.
A lossy codec that alone breaks the budget is an error for that image — never an unbudgeted file.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.ndimage import uniform_filter1d

from activeindex.errors import ActivationError
from activeindex.settings import OutputFormat  # re-exported (defined there: no torch/FAISS needed)

MAX_PSNR = 100.0  # reported for a file identical to its original (the PSNR is infinite)
_MAX_TRIES = 12
# zlib level of released PNGs. An activated image is noisy at the pixel level, where zlib's higher
# levels search long for little: on bench/activate.py's released 256×256 files level 3 encodes in
# 16 ms instead of 38 at PIL's default 6, for files 6 % larger (level 1: 13 ms, 9 % larger); at 5
# iterations encoding was a sixth of an activated image's time.
PNG_COMPRESS_LEVEL = 3


@dataclass
class Released:
    data: bytes  # the encoded file
    psnr: float  # dB, of the decoded file against the original (MAX_PSNR when identical)
    ssim: float | None  # None for images smaller than 3 pixels on a side
    linf: float  # largest absolute change of a channel value, in 0..255 steps
    scale: float  # how much of the optimised perturbation was kept (1.0 = all)
    pixels: np.ndarray  # uint8 (h, w, 3): what the file decodes to

    def quality(self) -> dict[str, float | None]:
        return {"psnr": self.psnr, "ssim": self.ssim, "linf": self.linf}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean(np.square(a.astype(np.float64) - b.astype(np.float64))))
    return MAX_PSNR if mse == 0 else min(MAX_PSNR, 10.0 * math.log10(255.0**2 / mse))


# Output rows per band of the SSIM computation: small enough that a band's filtered planes stay in
# cache through the formula's steps (1024×768: 64 rows 1.1× faster than 32, 2.5× faster than
# scikit-image's whole-image pass).
SSIM_ROWS = 64


def ssim(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean SSIM of two uint8 (h, w, 3) images, as scikit-image's ``structural_similarity(a, b,
    channel_axis=2, data_range=255, win_size=7)`` (uniform 7×7 windows, sample covariance, the
    mean over every window inside the image and over the channels; windows shrink to the image
    for sides under 7; None under 3), computed in bands of ``SSIM_ROWS`` output rows.

    Four window means per band, not five: the formula needs the variances only as their sum, so
    x² + y² is filtered as one plane (a quarter fewer filter passes); the formula runs in place."""
    h, w = a.shape[:2]
    side = min(h, w)
    if side < 3:
        return None
    win = min(7, side if side % 2 else side - 1)
    r, n = win // 2, win * win
    cov = n / (n - 1.0)
    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    total = 0.0
    for r0 in range(r, h - r, SSIM_ROWS):
        r1 = min(r0 + SSIM_ROWS, h - r)
        x, y = a[r0 - r : r1 + r].astype(np.float32), b[r0 - r : r1 + r].astype(np.float32)
        m = np.empty((4, *x.shape), np.float32)  # x, y, x² + y², x·y; then their window means
        m[0], m[1] = x, y
        np.multiply(x, x, out=m[2])
        m[2] += y * y
        np.multiply(x, y, out=m[3])
        uniform_filter1d(m, win, axis=1, output=m)
        uniform_filter1d(m, win, axis=2, output=m)
        ux, uy, usq, uxy = m[:, r:-r, r:-r]
        uxuy = ux * uy
        means_sq = ux * ux
        means_sq += uy * uy
        num = uxy - uxuy  # (2·σxy + c2)(2·ux·uy + c1)
        num *= 2.0 * cov
        num += c2
        uxuy *= 2.0
        uxuy += c1
        num *= uxuy
        den = usq - means_sq  # (σx² + σy² + c2)(ux² + uy² + c1)
        den *= cov
        den += c2
        means_sq += c1
        den *= means_sq
        total += float(np.divide(num, den, out=num).sum(dtype=np.float64))
    return total / ((h - 2 * r) * (w - 2 * r) * a.shape[2])


def encode(pixels: np.ndarray, fmt: OutputFormat, quality: int) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(pixels, "RGB")
    if fmt is OutputFormat.PNG:
        img.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif fmt is OutputFormat.JPEG:
        img.save(buf, "JPEG", quality=int(quality), subsampling=0 if quality >= 90 else 2)
    elif quality >= 100:  # WebP has a lossless mode; quality 100 asks for it
        img.save(buf, "WEBP", lossless=True, quality=100, method=4)
    else:  # lossy WebP always subsamples chroma (4:2:0): strong colour edges may break the budget
        img.save(buf, "WEBP", quality=int(quality), method=4)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def finalize(
    original: np.ndarray, perturbation: np.ndarray, min_psnr: float, fmt: OutputFormat, quality: int = 95
) -> Released:
    """Encode ``original`` (uint8 (h, w, 3)) + ``perturbation`` (float, [0, 1] units) so that the
    decoded file has PSNR ≥ ``min_psnr`` against ``original``."""
    fmt = OutputFormat(fmt)
    base = original.astype(np.float32) / 255.0
    scale, got = 1.0, 0.0
    lossy = fmt.lossy(quality)
    for attempt in range(_MAX_TRIES):
        pixels = np.rint(np.clip(base + scale * perturbation, 0.0, 1.0) * 255.0).astype(np.uint8)
        data = encode(pixels, fmt, quality) if lossy else b""  # a lossless file is encoded once, below
        decoded = decode(data) if lossy else pixels
        got = psnr(original, decoded)
        if got >= min_psnr:
            data = data or encode(pixels, fmt, quality)
            linf = float(np.abs(original.astype(np.int16) - decoded.astype(np.int16)).max())
            return Released(data, got, ssim(original, decoded), linf, scale, decoded)
        if scale == 0.0:
            break
        # PSNR grows by 20·log10(1/s) when the perturbation shrinks by s; aim a little inside.
        scale = 0.0 if attempt >= _MAX_TRIES - 2 else scale * 10.0 ** ((got - min_psnr - 0.1) / 20.0)
    raise ActivationError(
        f"{fmt.value.upper()} at quality {quality} alone gives {got:.1f} dB, below the {min_psnr:g} dB "
        "budget; raise the output quality, lower --psnr, or write PNG"
    )
