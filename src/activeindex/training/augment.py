"""Strong random copy edits on tensor batches, for descriptor training (kornia).

Training needs two independently edited views of every image per step, thousands of times: the
PIL edit suite (``activeindex.edits``) is exact but per-image; these are the same families of
edits — crop/resize, flip, rotation, perspective, colour, grayscale, blur, noise, JPEG, overlays of
foreign content — as batched tensor operations, so one call edits the whole batch.
"""

from __future__ import annotations

import math

import kornia.augmentation as K
import torch
import torch.nn.functional as F
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


class _RandomGain(nn.Module):
    """Multiply pixel values by a factor drawn log-uniformly in [lo, hi] (then clipped): the
    brightness edit copiers apply (PIL's ``ImageEnhance.Brightness``), including strong ones."""

    def __init__(self, lo: float = 0.4, hi: float = 2.2, p: float = 0.4) -> None:
        super().__init__()
        self.lo, self.hi, self.p = lo, hi, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        log_gain = torch.empty(b, 1, 1, 1, device=x.device).uniform_(math.log(self.lo), math.log(self.hi))
        apply = (torch.rand(b, 1, 1, 1, device=x.device) < self.p).float()
        return (x * torch.exp(log_gain * apply)).clamp(0, 1)


class _RandomCaptionBand(nn.Module):
    """Shrink the image vertically under a flat band with dark marks: the layout of a meme caption."""

    def __init__(self, p: float = 0.2, band: tuple[float, float] = (0.15, 0.35)) -> None:
        super().__init__()
        self.p, self.band = p, band

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        out = x.clone()
        for i in torch.nonzero(torch.rand(b) < self.p).flatten().tolist():
            bh = max(1, int(h * float(torch.empty(1).uniform_(*self.band))))
            out[i, :, bh:] = F.interpolate(x[i : i + 1], size=(h - bh, w), mode="bilinear", align_corners=False)[0]
            light = bool(torch.rand(1) < 0.7)  # drawn first, as before: the same draws on the CPU
            colour = torch.rand(3, 1, 1, device=x.device)  # on the batch's device: no host copy
            out[i, :, :bh] = colour * 0.2 + 0.8 if light else colour
            for _ in range(int(torch.randint(3, 12, (1,)))):  # glyph-like dark blocks
                gh, gw = max(1, bh // 3), max(1, w // 20)
                top = int(torch.randint(0, max(1, bh - gh), (1,)))
                left = int(torch.randint(0, max(1, w - gw), (1,)))
                out[i, :, top : top + gh, left : left + gw] = 0.05
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
        _RandomGain(lo=0.4, hi=2.2, p=0.4),
        K.RandomGrayscale(p=0.2 * s),
        K.RandomGaussianBlur((11, 11), (0.1, 3.0 * s + 0.1), p=0.3 * s),
        K.RandomGaussianNoise(std=0.04 * s, p=0.2 * s),
        _RandomPatchOverlay(p=0.3 * s),
        _RandomCaptionBand(p=0.2),
        K.RandomJPEG(jpeg_quality=(max(10.0, 100 - 90 * s), 95.0), p=0.2 * s),
    )


class _RandomContrast(nn.Module):
    """Blend each image with its mean grey by a factor drawn log-uniformly in [lo, hi] (then
    clipped): PIL's ``ImageEnhance.Contrast``, the contrast edit copiers apply."""

    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        k = torch.empty(b, 1, 1, 1, device=x.device).uniform_(math.log(self.lo), math.log(self.hi)).exp()
        grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        mean = grey.mean(dim=(2, 3), keepdim=True)
        return (mean + k * (x - mean)).clamp(0, 1)


def colour_family(strength: float = 1.0) -> nn.Module:
    """One photometric copy edit per image: a contrast and a brightness factor, a hue and
    saturation shift, sometimes a blur — the edits the descriptor survives but whose shifted
    descriptors the coarse quantiser sends to another cell. (As robust views, ``view_edits
    families-colour``, they measured no gain over the default families: docs/activation-study.md.)"""
    s = float(strength)
    return nn.Sequential(
        _RandomContrast(lo=1.0 - 0.6 * s, hi=1.0 + 1.5 * s),
        _RandomGain(lo=1.0 - 0.6 * s, hi=1.0 + 1.2 * s, p=1.0),
        K.ColorJitter(saturation=0.5 * s, hue=0.25 * s, p=1.0),
        K.RandomGaussianBlur((11, 11), (0.1, 3.0 * s + 0.1), p=0.4),
    )


class _EditFamilies(nn.Module):
    """``views`` edited views of a batch stacked view-major ((views·B, 3, H, W), as
    ``x.repeat(views, 1, 1, 1)`` gives): view i gets an edit of family i mod the number of families,
    so every step sees each family the descriptor or the index tends to lose, instead of leaving
    them to chance. The families, in turn: a crop, a colour edit (with ``colour``), a rotation, a
    caption band."""

    def __init__(self, size: int, views: int, strength: float = 1.0, colour: bool = False) -> None:
        super().__init__()
        s = float(strength)
        self.views = views
        families = [K.RandomResizedCrop((size, size), scale=(0.25, 1.0 - 0.3 * s), ratio=(0.5, 2.0), p=1.0)]
        if colour:
            families.append(colour_family(s))
        families += [
            nn.Sequential(K.RandomHorizontalFlip(p=0.5), K.RandomRotation(degrees=90.0 * s, p=1.0)),
            nn.Sequential(_RandomCaptionBand(p=1.0), _RandomPatchOverlay(p=0.5)),
        ]
        self.families = nn.ModuleList(families)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % self.views:
            raise ValueError(f"{x.shape[0]} images are not {self.views} views of one batch")
        chunks = x.chunk(self.views)
        return torch.cat([self.families[i % len(self.families)](c) for i, c in enumerate(chunks)])


def edit_families(size: int, views: int, strength: float = 1.0, colour: bool = False) -> nn.Module:
    """Robust activation's views by family (:class:`_EditFamilies`), for float images in [0, 1]."""
    return _EditFamilies(size, views, strength, colour)
