"""Strong random copy edits on tensor batches, for descriptor training (kornia).

Training needs two independently edited views of every image per step, thousands of times: the
PIL edit suite (``activeindex.edits``) is exact but per-image; these are the same families of
edits — crop/resize, flip, rotation, perspective, colour, grayscale, blur, noise, JPEG, overlays of
foreign content — as batched tensor operations, so one call edits the whole batch.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn


class _RandomPatchOverlay(nn.Module):
    """Paste a random rectangle of *another* image of the batch (or flat colour) onto each image:
    a stand-in for emoji/text/meme overlays, which hide part of the content."""

    def __init__(self, p: float = 0.3, max_area: float = 0.25) -> None:
        super().__init__()
        self.p, self.max_area = p, max_area

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        apply = torch.rand(b, device=x.device) < self.p
        if not apply.any():
            return x
        out = x.clone()
        donors = torch.roll(x, shifts=1, dims=0)
        for i in torch.nonzero(apply).flatten().tolist():  # b is small; per-image boxes differ
            area = float(torch.empty(1).uniform_(0.03, self.max_area))
            aspect = float(torch.empty(1).uniform_(0.5, 2.0))
            ph = max(1, min(h, int((area * h * w / aspect) ** 0.5)))
            pw = max(1, min(w, int((area * h * w * aspect) ** 0.5)))
            top = int(torch.randint(0, h - ph + 1, (1,)))
            left = int(torch.randint(0, w - pw + 1, (1,)))
            if torch.rand(1) < 0.5:
                out[i, :, top : top + ph, left : left + pw] = donors[i, :, :ph, :pw]
            else:
                out[i, :, top : top + ph, left : left + pw] = torch.rand(3, 1, 1, device=x.device)
        return out


def copy_edit_augmentation(size: int, strength: float = 1.0) -> nn.Module:
    """A random strong edit for float images in [0, 1], (B, 3, H, W) → (B, 3, size, size).

    ``strength`` in (0, 1] scales probabilities and ranges (a curriculum can start gentle).
    """
    s = float(strength)
    return nn.Sequential(
        K.RandomResizedCrop((size, size), scale=(1.0 - 0.8 * s, 1.0), ratio=(0.5, 2.0)),
        K.RandomHorizontalFlip(p=0.5),
        K.RandomRotation(degrees=90.0 * s, p=0.3 * s),
        K.RandomPerspective(distortion_scale=0.4 * s, p=0.2 * s),
        K.ColorJitter(brightness=0.6 * s, contrast=0.6 * s, saturation=0.6 * s, hue=0.3 * s, p=0.8),
        K.RandomGrayscale(p=0.2 * s),
        K.RandomGaussianBlur((11, 11), (0.1, 3.0 * s + 0.1), p=0.3 * s),
        K.RandomGaussianNoise(std=0.04 * s, p=0.2 * s),
        _RandomPatchOverlay(p=0.3 * s),
        K.RandomJPEG(jpeg_quality=(max(10.0, 100 - 90 * s), 95.0), p=0.2 * s),
    )
