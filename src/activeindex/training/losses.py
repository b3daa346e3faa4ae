"""SSCD-style training losses: contrastive InfoNCE over the batch plus the KoLeo entropy term."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Symmetric InfoNCE: view i of one side must pick view i of the other among the batch.

    z1, z2: (B, d) L2-normalised descriptors of two edits of the same B images.
    """
    z = torch.cat([z1, z2])  # (2B, d): every other view of the batch is a negative
    sim = z @ z.T / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))  # an embedding is not its own positive
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def koleo(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko–Leonenko entropy estimator (negated): -mean log distance to the nearest neighbour.

    Minimising it spreads descriptors over the sphere, which an approximate index needs: a
    collapsed cloud gives every IVF cell the same few neighbours.
    """
    with torch.no_grad():
        dots = z @ z.T
        dots.fill_diagonal_(-2.0)
        nn_idx = dots.argmax(dim=1)
    dist = (z - z[nn_idx]).norm(dim=1)
    return -torch.log(dist + eps).mean()


def positive_rank_accuracy(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """Fraction of z1 rows whose nearest z2 row is their own pair: a cheap training-time R@1."""
    with torch.no_grad():
        return float(((z1 @ z2.T).argmax(dim=1) == torch.arange(len(z1), device=z1.device)).float().mean())
