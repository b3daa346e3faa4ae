"""Built-in descriptor architectures, in plain PyTorch, registered by name.

A copy-detection descriptor in the SSCD mould: a ResNet trunk, generalised-mean (GeM) pooling, a
linear projection, L2 normalisation (done by :class:`~activeindex.extractors.base.Extractor`).
Weights ship in ``activeindex/weights/<name>.pt`` when the project has trained them; without that
file the architecture is built with a fixed seed (deterministic, so its digest is stable) and the
extractor is marked *untrained*: the CLI warns every time such a model is used.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from activeindex.errors import ModelError
from activeindex.extractors.base import Preprocessing

DEFAULT_BUILTIN = "resnet-s"


class GeM(nn.Module):
    """Generalised-mean pooling: (mean x^p)^(1/p) over space; p=1 is average, p→∞ max pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pow in fp32: bf16 x^p loses too much for p≈3 over large spatial means.
        x = x.float().clamp(min=self.eps).pow(self.p)
        return x.mean(dim=(-2, -1)).pow(1.0 / self.p)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class CopyDescriptorNet(nn.Module):
    """ResNet trunk (BasicBlocks) → GeM → linear projection. Output (B, dim), not normalised."""

    def __init__(self, widths: tuple[int, ...], depths: tuple[int, ...], dim: int, stem: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 3, 2, 1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem, widths[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, cin = [], widths[0]
        for i, (w, d) in enumerate(zip(widths, depths)):
            for j in range(d):
                stages.append(BasicBlock(cin, w, stride=2 if (j == 0 and i > 0) else 1))
                cin = w
        self.trunk = nn.Sequential(*stages)
        self.pool = GeM()
        self.proj = nn.Linear(cin, dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.trunk(self.stem(x))))


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An inference copy of ``module`` with each BatchNorm2d folded into the Conv2d before it.

    In :class:`CopyDescriptorNet` every BatchNorm2d is registered right after the convolution that
    feeds it (the stem's Sequential, each block's ``conv1, bn1, conv2, bn2`` and its shortcut), so
    each adjacent (Conv2d, BatchNorm2d) pair of a parent's children is one conv → BN edge: the conv
    takes the BN's affine map (``w·γ/σ``, ``β − μ·γ/σ``) and the BN becomes an identity. Eval-mode
    BN is exactly that affine map, so the function is the same up to float rounding (max relative
    difference ~1e-6 in fp32), and the forward and backward passes of extraction and activation
    skip one full pass over every activation per layer. Training keeps the unfolded module (BN
    needs its statistics); the digest is taken before folding."""
    out = copy.deepcopy(module).eval()
    for parent in out.modules():
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                parent._modules[a] = fuse_conv_bn_eval(conv, bn)
                parent._modules[b] = nn.Identity()
    return out


@dataclass(frozen=True)
class BuiltinModel:
    """A registered architecture: how to build it and how to feed it."""

    name: str
    build: Callable[[], nn.Module]
    preprocessing: Preprocessing
    description: str
    # Activation knobs tuned for this model (activeindex.knobs; docs/activation-study.md), applied
    # where the user sets nothing.
    activation_defaults: Mapping[str, Any] = field(default_factory=dict)


BUILTIN_MODELS: dict[str, BuiltinModel] = {}


def register(model: BuiltinModel) -> BuiltinModel:
    BUILTIN_MODELS[model.name] = model
    return model


register(
    BuiltinModel(
        name="resnet-s",
        build=lambda: CopyDescriptorNet(widths=(48, 96, 192, 384), depths=(2, 2, 2, 2), dim=256, stem=24),
        preprocessing=Preprocessing(input_size=160),
        description="ResNet-18-shaped trunk at 3/4 width, GeM, 256-d; 160 px (the default)",
        # docs/activation-study.md: lr 1 makes every Adam step a full-budget sign step; 5 steps of
        # 0.2 gain as much as 10 of 0.1 (+0.116 both, 100 tuning images) at half the model work.
        # The centroid target (`auto`) gains more R@1 on IVF indexes but lowers copy-detection µAP
        # (0.190 vs 0.214 at 5k references) and needs many more second activations: not the default.
        activation_defaults={"iterations": 5, "lr": 0.2},
    )
)
register(
    BuiltinModel(
        name="tiny",
        build=lambda: CopyDescriptorNet(widths=(8, 16), depths=(1, 1), dim=32, stem=8),
        preprocessing=Preprocessing(input_size=32),
        description="a few thousand parameters, 32 px, 32-d: for tests",
    )
)


def weights_resource(name: str, suffix: str = ".pt"):
    """The packaged weights file (or, with ``suffix=".json"``, its card) of a built-in model."""
    return resources.files("activeindex").joinpath("weights", f"{name}{suffix}")


def packaged_digest(name: str) -> str | None:
    """The digest recorded next to the packaged weights when they were exported, if any."""
    card = weights_resource(name, ".json")
    return json.loads(card.read_text())["digest"] if card.is_file() else None


def build_builtin(name: str, *, load_weights: bool = True) -> tuple[nn.Module, BuiltinModel, bool]:
    """Instantiate a registered model; returns (module, registry entry, trained?).

    ``load_weights=False`` gives the seeded initial weights even when trained ones ship."""
    try:
        entry = BUILTIN_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise ModelError(f"unknown builtin model {name!r}; choose one of: {known}") from None
    # A fixed seed makes the untrained architecture (and so its digest) reproducible, without
    # touching the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = entry.build()
    weights = weights_resource(name)
    if not load_weights or not weights.is_file():
        return module, entry, False
    with resources.as_file(weights) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # Weights may ship in fp16 to halve the package size; the model computes in fp32/bf16.
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"packaged weights for builtin:{name} do not fit the architecture: {exc}") from exc
    return module, entry, True
