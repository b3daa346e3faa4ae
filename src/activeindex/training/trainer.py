"""Train a copy-detection descriptor (SSCD recipe, scaled down to a CPU).

Each step draws B images, makes two strong random edits of each (``augment.copy_edit_augmentation``),
and trains the network so that the two views of an image are nearest neighbours among all 2B views
(InfoNCE) while the descriptors spread over the sphere (KoLeo). bf16 autocast where the device runs
bf16 natively (fp32 elsewhere: an AVX2-only CPU emulates bf16 far slower), CUDA when present. Checkpoints are written atomically every ``checkpoint_every`` steps and a rerun with the
same output folder resumes from the last one; the loss log is ``train_log.jsonl``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from activeindex.atomic import atomic_path, write_text_atomic
from activeindex.errors import ImageLoadError
from activeindex.extractors.base import Preprocessing
from activeindex.extractors.builtin import BUILTIN_MODELS, build_builtin
from activeindex.hardware import native_bf16, resolve_device
from activeindex.images import load_image
from activeindex.training.augment import copy_edit_augmentation
from activeindex.training.losses import info_nce, koleo, positive_rank_accuracy

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "resnet-s"
    steps: int = 2000
    batch_size: int = 64
    train_size: int | None = None  # crop size of the views; default: the model's input size
    load_size: int = 256  # images are kept in memory at this square size
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    temperature: float = 0.1
    koleo_weight: float = 1.0
    strength: float = 0.5
    checkpoint_every: int = 100
    seed: int = 0
    init: str | None = None  # start from these weights (a file written by export_weights)


def load_pool(paths: Sequence[Path], size: int, workers: int = 4) -> torch.Tensor:
    """Decode images to a uint8 tensor (n, 3, size, size); unreadable files are skipped, logged."""
    pre = Preprocessing(input_size=size)

    def one(p: Path) -> np.ndarray | None:
        try:
            return pre.prepare(load_image(p, min_side=size))
        except ImageLoadError as exc:
            logger.warning("skipped %s: %s", exc.path, exc.reason)
            return None

    with ThreadPoolExecutor(workers) as pool:
        arrays = [a for a in pool.map(one, paths) if a is not None]
    if len(arrays) < 2:
        raise ValueError(f"need at least 2 readable training images, got {len(arrays)}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _save_atomic(obj: object, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def train_descriptor(
    pool: torch.Tensor,
    out: str | os.PathLike[str],
    cfg: TrainConfig = TrainConfig(),
    *,
    device: str | torch.device | None = None,
    progress: Callable[[int, dict], None] | None = None,
) -> torch.nn.Module:
    """Train ``cfg.arch`` on a uint8 image pool (n, 3, S, S); returns the trained module (eval mode).

    Resumes from ``out/checkpoint.pt`` when it exists and was made with the same config.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)  # None: auto, the GPU when there is one
    entry = BUILTIN_MODELS[cfg.arch]
    size = cfg.train_size or entry.preprocessing.input_size
    model, _, _ = build_builtin(cfg.arch, load_weights=False)
    if cfg.init is not None:
        state = torch.load(cfg.init, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model = model.to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists():
        try:
            # weights_only: tensors and plain containers only, never arbitrary pickled objects (a
            # file planted in the output folder must not run code); the generator states are tensors.
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError
            raise ValueError(f"cannot resume from {ckpt_path}: {exc}; delete it or use a new output folder") from exc
        if ckpt["config"] != asdict(cfg):
            raise ValueError(f"{ckpt_path} was made with another config; use a new output folder")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])  # moves the state to the parameters' device
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in ckpt:  # the edits' draws on the GPU
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        start = ckpt["step"]
        logger.info("resuming from step %d", start)
    else:
        torch.manual_seed(cfg.seed)  # kornia draws its edit parameters from the global generator
    aug = copy_edit_augmentation(size, cfg.strength).to(device)
    mean = torch.tensor(entry.preprocessing.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(entry.preprocessing.std, device=device).view(1, 3, 1, 1)
    amp_dtype = torch.bfloat16 if native_bf16(device) else torch.float32
    with open(out / LOG, "a") as log:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            idx = torch.randint(0, len(pool), (cfg.batch_size,), generator=gen)
            x = pool[idx].to(device).float().div_(255.0)
            with torch.no_grad():
                views = torch.cat([aug(x), aug(x)]).clamp_(0, 1)
            views = ((views - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_dtype == torch.bfloat16):
                z = model(views)
            z = F.normalize(z.float(), dim=-1)
            z1, z2 = z.chunk(2)
            l_nce = info_nce(z1, z2, cfg.temperature)
            l_koleo = koleo(z)
            loss = l_nce + cfg.koleo_weight * l_koleo
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            record = {
                "step": step + 1,
                "loss": float(loss.detach()),
                "infonce": float(l_nce.detach()),
                "koleo": float(l_koleo.detach()),
                "acc": positive_rank_accuracy(z1.detach(), z2.detach()),
                "lr": _lr_at(step, cfg),
                "seconds": time.perf_counter() - t0,
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            if progress is not None:
                progress(step + 1, record)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                log.flush()
                _save_atomic(
                    {
                        "config": asdict(cfg),
                        "step": step + 1,
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "generator": gen.get_state(),
                        "torch_rng": torch.get_rng_state(),
                        **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                    },
                    ckpt_path,
                )
    return model.eval()


def export_weights(model: torch.nn.Module, path: str | os.PathLike[str], meta: dict | None = None) -> str:
    """Write the state dict in fp16 (half the bytes; the extractor computes in fp32/bf16) and a
    JSON sidecar with ``meta`` and the digest the extractor will report for these weights.

    Returns that digest: the SHA-256 of the weights as loaded back (fp16 values in fp32 tensors).
    """
    from activeindex.extractors.base import state_dict_digest

    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(state, path)
    reloaded = copy.deepcopy(model).float()
    reloaded.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    digest = state_dict_digest(reloaded)
    sidecar = path.with_suffix(".json")
    write_text_atomic(sidecar, json.dumps({**(meta or {}), "digest": digest}, indent=2) + "\n")
    return digest
