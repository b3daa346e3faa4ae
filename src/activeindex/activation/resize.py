"""Differentiable resize to the extractor's input, as batched, banded matrix products.

PIL's bilinear resize (what :meth:`Preprocessing.prepare` and every query use) is separable: each
output row is a fixed weighted sum of input rows (a triangle filter widened by the scale factor when
downscaling, i.e. antialiased), and likewise for columns. Writing those weights as matrices
``A_h`` (S × H) and ``A_w`` (S × W) gives ``resize(x) = A_h · x · A_wᵀ``: exactly PIL's filter, exact
gradients back to every full-resolution pixel, and batched ``matmul`` calls for a batch of images
of *different* sizes padded into one tensor (the padded columns of each image's matrix are zero).
The centre-crop policy is the same matrices with only the kept rows.

The matrices are banded (an output row reads about ``2 × scale`` input rows), so :class:`InputResize`
multiplies band by band: each block of ``BAND_ROWS`` output rows with only the input rows that
block reads in some image of the batch, and the gradient likewise with the transposed matrix, block
by block of input rows. Same numbers as the dense product up to float summation order, and a small
share of its work: 256 → 160 px reads at most 28 of 256 rows per block, a 1024-px photo 110 of 1024.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from activeindex.extractors.base import Preprocessing, ResizePolicy


REDUCING_GAP = 3.0  # what Preprocessing.prepare passes to PIL's resize


def bilinear_matrix(in_size: int, out_size: int, span: float | None = None) -> np.ndarray:
    """(out_size, in_size) weights of PIL's BILINEAR resampling of the first ``span`` (default:
    all ``in_size``) input samples to ``out_size`` samples."""
    scale = (span or in_size) / out_size
    filterscale = max(scale, 1.0)
    support = filterscale  # the triangle filter has support 1, widened when downscaling
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        w = np.clip(1.0 - np.abs((taps - center + 0.5) / filterscale), 0.0, None)
        if w.sum() > 0:
            m[i, lo:hi] = w / w.sum()
    return m


@functools.lru_cache(maxsize=256)
def pil_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size): PIL's ``resize(..., BILINEAR, reducing_gap=3.0)`` along one axis. Above
    a 3× reduction PIL first averages blocks of ``factor`` samples (``Image.reduce``) and then
    resamples the reduced samples, which span ``in_size / factor`` of them.

    Cached (read-only): a batch holds images of similar sizes, and building a matrix is a Python
    loop over its rows (about 4 ms per axis of a 256-pixel image: 8 ms of an image's ~200)."""
    factor = int(in_size / out_size / REDUCING_GAP) or 1
    if factor == 1:
        m = bilinear_matrix(in_size, out_size)
    else:
        n_red = -(-in_size // factor)
        reduce = np.zeros((n_red, in_size), dtype=np.float64)
        for j in range(n_red):
            block = slice(j * factor, min((j + 1) * factor, in_size))
            reduce[j, block] = 1.0 / (block.stop - block.start)
        m = bilinear_matrix(n_red, out_size, span=in_size / factor) @ reduce
    m.setflags(write=False)
    return m


def input_matrices(h: int, w: int, pre: Preprocessing, padded: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(A_h, A_w) mapping an h × w image (inside a ``padded`` canvas, zero columns beyond the image)
    to the extractor input, exactly as :meth:`Preprocessing.prepare` resizes."""
    s = pre.input_size
    ph, pw = padded or (h, w)
    if pre.resize is ResizePolicy.CENTER_CROP:
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        left, top = (nw - s) // 2, (nh - s) // 2
        a_h, a_w = pil_resize_matrix(h, nh)[top : top + s], pil_resize_matrix(w, nw)[left : left + s]
    else:
        a_h, a_w = pil_resize_matrix(h, s), pil_resize_matrix(w, s)
    return np.pad(a_h, ((0, 0), (0, ph - h))), np.pad(a_w, ((0, 0), (0, pw - w)))


def batch_matrices(sizes: list[tuple[int, int]], pre: Preprocessing, padded: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked (B, S, H_pad) and (B, S, W_pad) matrices for images of ``sizes`` (h, w)."""
    mats = [input_matrices(h, w, pre, padded) for h, w in sizes]
    a_h = torch.from_numpy(np.stack([m[0] for m in mats]).astype(np.float32))
    a_w = torch.from_numpy(np.stack([m[1] for m in mats]).astype(np.float32))
    return a_h, a_w


# Output rows per block of the banded product: smaller blocks read fewer unused input rows but make
# more, smaller matmul calls; 16 was the fastest of 8/16/32 for 256- and 1024-px images.
BAND_ROWS = 16


@dataclass(frozen=True)
class Banded:
    """A (B, R, N) matrix and its blocks of output rows ``[r0, r1)`` with the input rows ``[lo, hi)``
    outside which every image's weights in those rows are zero (``lo == hi``: none)."""

    a: torch.Tensor
    blocks: tuple[tuple[int, int, int, int], ...]
    _cast: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    _out: dict[tuple, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, a: torch.Tensor, rows: int = BAND_ROWS) -> Banded:
        used = (a != 0).any(dim=0)  # (R, N)
        blocks = []
        for r0 in range(0, a.shape[1], rows):
            r1 = min(r0 + rows, a.shape[1])
            cols = torch.nonzero(used[r0:r1].any(dim=0)).flatten().tolist()
            blocks.append((r0, r1, cols[0], cols[-1] + 1) if cols else (r0, r1, 0, 0))
        return cls(a, tuple(blocks))

    def __call__(self, x: torch.Tensor, reuse: bool = False) -> torch.Tensor:
        """``a · x`` along dim -2: x (B, C, N, M) → (B, C, R, M) in ``x``'s dtype, block by block
        (each matmul reads a view of ``x``). ``reuse``: into this object's buffer for that shape,
        which the next ``reuse`` call overwrites (a gradient, used up before the next iteration:
        see :class:`.render.Render` for why a full-resolution buffer is worth keeping)."""
        b, c, _, m = x.shape
        a = self.a if x.dtype == self.a.dtype else self._cast.setdefault(x.dtype, self.a.to(x.dtype))
        if not reuse:
            parts = [x.new_zeros(b, c, r1 - r0, m) if lo == hi else
                     torch.matmul(a[:, None, r0:r1, lo:hi], x[:, :, lo:hi, :])
                     for r0, r1, lo, hi in self.blocks]
            return torch.cat(parts, dim=2)
        shape = (b, c, self.a.shape[1], m)
        out = self._out.get((shape, x.dtype, x.device))
        if out is None:
            self._out.clear()
            out = self._out[(shape, x.dtype, x.device)] = x.new_empty(shape)
        for r0, r1, lo, hi in self.blocks:
            if lo == hi:
                out[:, :, r0:r1].zero_()
            else:
                torch.matmul(a[:, None, r0:r1, lo:hi], x[:, :, lo:hi, :], out=out[:, :, r0:r1])
        return out


class _BandedRows(torch.autograd.Function):
    """``a · x`` along dim -2 for a banded ``a``; the gradient is ``aᵀ · g``, banded too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: Banded, at: Banded) -> torch.Tensor:
        ctx.at, ctx.x_dtype = at, x.dtype
        device = x.device.type
        if torch.is_autocast_enabled(device):  # autocast's dtype, x cast once (not once per block)
            x = x.to(torch.get_autocast_dtype(device))
        return a(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return ctx.at(g, reuse=True).to(ctx.x_dtype), None, None  # in the forward's dtype


class InputResize:
    """``A_h · x · A_wᵀ`` per image of a padded batch, as banded products (rows, then columns on the
    already reduced tensor). Built once per batch: the blocks are found once for every iteration."""

    def __init__(self, a_h: torch.Tensor, a_w: torch.Tensor, rows: int = BAND_ROWS) -> None:
        self._axes = [(Banded.of(a, rows), Banded.of(a.transpose(1, 2), rows)) for a in (a_h, a_w)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C, S, S)."""
        (h, ht), (w, wt) = self._axes
        rows = _BandedRows.apply(x, h, ht)  # (B, C, S, W)
        cols = _BandedRows.apply(rows.transpose(2, 3), w, wt)  # (B, C, S_w, S_h)
        return cols.transpose(2, 3)


def apply_resize(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, C, S, S): ``A_h · x · A_wᵀ`` per image (:class:`InputResize`, used once)."""
    return InputResize(a_h, a_w)(x)
