from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from activeindex.datasets.synthetic import synthetic_image
from activeindex.training.augment import colour_family, copy_edit_augmentation, edit_families
from activeindex.training.losses import info_nce, koleo
from activeindex.training.trainer import TrainConfig, export_weights, train_descriptor


def test_info_nce_prefers_aligned_pairs():
    z = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    aligned = info_nce(z, z + 0.01 * torch.randn(8, 16))
    shuffled = info_nce(z, z[torch.randperm(8)])
    assert aligned < shuffled


def test_koleo_penalises_collapse():
    g = torch.Generator().manual_seed(0)
    spread = F.normalize(torch.randn(16, 8, generator=g), dim=1)
    collapsed = F.normalize(torch.ones(16, 8) + 0.01 * torch.randn(16, 8, generator=g), dim=1)
    assert koleo(collapsed) > koleo(spread)


def test_augmentation_shapes_and_range():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 48, 40)
    y = copy_edit_augmentation(32)(x).clamp(0, 1)
    assert y.shape == (4, 3, 32, 32) and torch.isfinite(y).all()
    assert not torch.allclose(y, torch.nn.functional.interpolate(x, size=(32, 32)))


def _pattern(n: int = 2, size: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    return (0.5 + 0.4 * torch.sin(xx)[None, None] * torch.cos(yy)).expand(n, 3, size, size).contiguous()


def _check_geometric_view(kind: str, view: torch.Tensor, x: torch.Tensor) -> None:
    if kind == "crop":  # an enlarged part of a fast-varying pattern varies less per pixel
        assert (view.diff(dim=-1).abs().mean() < x.diff(dim=-1).abs().mean()).item()
    elif kind == "rotation":  # rotations up to 90 degrees leave a black corner in at least one image
        assert (view[..., :2, :2].amax(dim=(1, 2, 3)) < 0.05).any().item()
    else:  # the caption band: most of its top row is one flat colour (glyphs aside)
        row = view[:, 0, 0, :].detach()
        flat = (row - row.median(dim=1, keepdim=True).values).abs() < 1e-6
        assert (flat.float().mean(dim=1) > 0.5).any().item()


def test_edit_families_with_colour_give_each_view_its_family():
    """View-major views, in turn a crop (scaled up: smoother), a colour edit (the same layout,
    other values), a rotation (corners filled black), a caption band; all differentiable."""
    torch.manual_seed(0)
    x = _pattern().requires_grad_(True)
    views = edit_families(32, 8, colour=True)(x.repeat(8, 1, 1, 1)).view(8, 2, 3, 32, 32)
    for v, kind in enumerate(("crop", "colour", "rotation", "caption") * 2):
        if kind == "colour":  # the pattern changed in value (its layout: the next test)
            assert ((views[v] - x).abs().mean() > 0.02).item()
        else:
            _check_geometric_view(kind, views[v], x)
    views.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="views"):
        edit_families(32, 3)(torch.rand(4, 3, 32, 32))


def test_the_colour_family_keeps_the_layout_and_changes_the_values():
    """A smooth coloured pattern through 16 colour edits: still in place (correlated with the
    original, up to sign: a hue shift can swap light and dark in the channels' mean), its mean and
    contrast changed, and a hue or saturation shift moves the channels apart."""
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    grey = 0.5 + 0.3 * torch.sin(xx / 5) * torch.cos(yy / 5)
    x = torch.stack([grey, grey * 0.8 + 0.1, grey * 0.6 + 0.3]).expand(16, 3, 32, 32).contiguous()
    y = colour_family()(x)
    a, b = y.mean(1).flatten(1), x.mean(1).flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-12)
    assert (corr.abs() > 0.5).all().item(), corr
    assert (y.mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3))).abs().max() > 0.1  # brightness
    assert (y.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))).log().abs().max() > 0.3  # contrast
    assert ((y[:, 0] - y[:, 1]) - (x[:, 0] - x[:, 1])).abs().mean() > 0.01  # hue / saturation


def test_the_default_families_leave_the_colour_edit_out():
    torch.manual_seed(0)
    x = _pattern()
    views = edit_families(32, 6)(x.repeat(6, 1, 1, 1)).view(6, 2, 3, 32, 32)
    for v, kind in enumerate(("crop", "rotation", "caption") * 2):
        _check_geometric_view(kind, views[v], x)


@pytest.fixture(scope="module")
def pool():
    imgs = np.stack([np.asarray(synthetic_image(i, seed=3, size=(48, 48))) for i in range(32)])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()


def test_a_few_steps_lower_the_loss_and_resume(pool, tmp_path):
    cfg = TrainConfig(arch="tiny", steps=30, batch_size=16, load_size=48, lr=3e-3, warmup_steps=3,
                      checkpoint_every=10, koleo_weight=0.5, strength=0.3)
    model = train_descriptor(pool, tmp_path, cfg, device="cpu")
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    first = np.mean([r["infonce"] for r in log[:5]])
    last = np.mean([r["infonce"] for r in log[-5:]])
    assert last < first  # the contrastive loss goes down on tiny data
    digest = export_weights(model, tmp_path / "tiny.pt", {"arch": "tiny"})
    assert json.loads((tmp_path / "tiny.json").read_text()) == {"arch": "tiny", "digest": digest}
    state = torch.load(tmp_path / "tiny.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    # Resuming a finished run does no more steps and leaves the log as it was.
    train_descriptor(pool, tmp_path, cfg, device="cpu")
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 30
    with pytest.raises(ValueError, match="another config"):
        train_descriptor(pool, tmp_path, TrainConfig(arch="tiny", steps=31), device="cpu")


class _Payload:
    """Unpickling this runs code: what a planted checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_unpickles_a_planted_checkpoint(pool, tmp_path):
    from activeindex.training.trainer import CHECKPOINT

    marker = tmp_path / "pwned"
    torch.save({"config": _Payload(str(marker))}, tmp_path / CHECKPOINT)
    cfg = TrainConfig(arch="tiny", steps=2, batch_size=4, load_size=48, warmup_steps=1)
    with pytest.raises(ValueError, match="cannot resume"):
        train_descriptor(pool, tmp_path, cfg, device="cpu")
    assert not marker.exists()
