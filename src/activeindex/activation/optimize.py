"""The activation optimisation (METHOD.md §1) over one batch of full-resolution images.

For originals ``x0`` (pixels in [0, 1]) and targets ``t`` (unit vectors), find a perturbation

    p = α · JND(x0) ⊙ c ⊙ tanh(δ)          (c: per-channel factor, α: ``scaling``)
    x = clamp(x0 + s · p, 0, 1)              (s ≤ 1: the per-image PSNR budget, see below)

minimising ``λ_f · feature_loss(f(resize(x)), t) + λ_i · MSE(x, x0)`` with Adam on δ.

Conventions and choices, all in the [0, 1] pixel space (not the ImageNet-normalised one):

- *Hard budget inside the forward.* ``s = min(1, sqrt(mse_max / mse(p)))`` per image, with gradients
  through ``s``: every iterate is within the PSNR budget, so the optimiser learns to spend the budget
  where the descriptor needs it rather than being scaled back blindly at the end.
- *Variable sizes in one batch.* Images are padded (edge-replicated) to the batch's largest height and
  width; a mask keeps padded pixels out of the perturbation and the image loss, and the resize to the
  extractor input is a batched, banded matrix product per axis with exact PIL-bilinear weights
  (:mod:`activeindex.activation.resize`).
- *Robust activation* (expectation over transformations): each iteration also passes ``views``
  randomly edited copies of the resized image (the kornia copy edits the descriptor was trained on:
  crop, flip, rotation, perspective, colour, blur, noise, overlays, JPEG) towards the same target.
- *Codec-aware*: for lossy output, the image goes through kornia's differentiable JPEG at the output
  quality before the resize, so the optimiser sees what the written file will look like.
- *Competitor term* (optional, ``margin_weight``): the own stored code and IVF cell must outscore
  the nearest other codes and cells by a margin (:mod:`.competitors`): what retrieval needs, which
  the pull towards the target alone does not guarantee.
- *Early stop*: an image whose descriptor reached ``stop_cos`` to its target stops moving (on device,
  no host sync); the loop ends once the whole batch has (checked every ``CHECK_EVERY`` iterations).
- *Speed*: one tensor per batch (no per-image lists in the loop); the budgeted perturbation and its
  gradient in cache-sized tiles (:mod:`.render`), a banded resize, torch's fused Adam on that tensor;
  bf16 autocast for the extractor where its input gradients stay faithful to fp32
  (:func:`gradient_precision`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from activeindex.activation.competitors import Competitors
from activeindex.activation.jnd import CHANNEL_FACTOR, jnd_heatmap
from activeindex.activation.render import Render, render
from activeindex.activation.resize import InputResize, batch_matrices
from activeindex.activation.targets import TargetKind
from activeindex.errors import ActivationError
from activeindex.extractors import Extractor
from activeindex.extractors.base import calibration_batch
from activeindex.hardware import cpu_model, native_bf16
from activeindex.knobs import DEFAULTS, KNOBS, check_value, resolve_knobs
from activeindex.settings import FeatureLoss, ViewEdits  # re-exported (defined there: no torch/FAISS needed)

CHECK_EVERY = 5  # iterations between the (only) host syncs of the early-stop test
# bf16 is used for the backward pass when input gradients keep this cosine to fp32 on every image.
BF16_MIN_GRAD_COSINE = 0.9
# Aim this far inside the PSNR budget while optimising; the written file is checked exactly.
BUDGET_MARGIN_DB = 0.1
# Softness τ of the competitor term's hinge, in score units: τ·softplus(z/τ) ≈ max(0, z) beyond ±3τ.
MARGIN_SOFTNESS = 0.005


@dataclass(frozen=True)
class ActivationConfig:
    """How to activate. Defaults: the paper's final code, with the budget as a hard constraint.

    The fields a user may set are the knobs of :mod:`activeindex.knobs` (the CLI's options and the
    service's parameters are built from that table, and every value is checked by it here); a
    model may carry its own defaults (:func:`configure`)."""

    psnr: float = DEFAULTS["psnr"]  # dB, a hard floor for every written file
    iterations: int = DEFAULTS["iterations"]
    lr: float = DEFAULTS["lr"]
    scaling: float = DEFAULTS["scaling"]  # α: the perturbation bound is α · JND
    lambda_f: float = DEFAULTS["lambda_f"]
    lambda_i: float = DEFAULTS["lambda_i"]
    loss: FeatureLoss = DEFAULTS["loss"]
    target: TargetKind = DEFAULTS["target"]
    # Competitor term (:mod:`.competitors`): weight, score margin, competitors of each kind.
    margin_weight: float = DEFAULTS["margin_weight"]
    margin: float = DEFAULTS["margin"]
    competitors: int = DEFAULTS["competitors"]
    stop_cos: float | None = DEFAULTS["stop_cos"]  # early stop once cos(f(x), t) reaches this; None = never
    robust: bool = DEFAULTS["robust"]  # expectation over random differentiable edits
    views: int = DEFAULTS["views"]  # edited views per image and iteration when robust
    robust_strength: float = DEFAULTS["robust_strength"]  # strength of the kornia copy edits
    view_edits: ViewEdits = DEFAULTS["view_edits"]  # what the edited views are
    view_weight: float = DEFAULTS["view_weight"]  # the edited views' mean term against the clean view's 1
    jpeg_quality: int | None = None  # optimise through differentiable JPEG at this quality
    precision: str = "auto"  # "auto" | "fp32" | "bf16" for the extractor's forward/backward
    seed: int = 0
    # Where each knob's value came from ("user", "model", "default"), when built by configure().
    sources: Mapping[str, str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in KNOBS:  # converted and checked: a KnobError names the knob
            object.__setattr__(self, name, check_value(name, getattr(self, name)))
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ActivationError(f"precision must be auto, fp32 or bf16, not {self.precision!r}")

    def record(self) -> dict[str, Any]:
        """JSON-ready: every field as run (enums as values), and where the knobs came from."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sources"}
        out = {k: v.value if isinstance(v, enum.Enum) else v for k, v in out.items()}
        out["sources"] = dict(self.sources or {})
        return out


def configure(user: Mapping[str, Any] | None = None, extractor: Extractor | None = None,
              **fixed: Any) -> ActivationConfig:
    """The configuration a user asked for: each knob from ``user`` (None = not set), else the
    model's ``activation_defaults`` (see :mod:`activeindex.knobs`), else ActivationConfig's
    default; ``fixed`` sets the other fields (precision, jpeg_quality, seed)."""
    base = {f.name: f.default for f in fields(ActivationConfig) if f.name in KNOBS}
    model = getattr(extractor, "activation_defaults", None) or {}
    resolved = resolve_knobs(user or {}, model, base)
    return ActivationConfig(**resolved.values, **fixed, sources=resolved.sources)


@dataclass
class ActivatedBatch:
    """Per image: the perturbation to add to the original (float32 (h, w, 3), [0, 1] units, already
    within the budget before rounding), and the cosine of its descriptor to the target before and
    after (as the optimiser saw it: differentiable resize, no rounding; NaN when not measured)."""

    perturbations: list[np.ndarray]
    cos_before: np.ndarray
    cos_after: np.ndarray
    iterations_run: int


def gradient_precision(extractor: Extractor, requested: str = "auto") -> torch.dtype:
    """The autocast dtype for activation's forward+backward: bf16 when the extractor runs in bf16
    (which needs native bf16) *and* input gradients under bf16 stay within cosine
    ``BF16_MIN_GRAD_COSINE`` of fp32; fp32 otherwise. ``requested="bf16"`` on a device without
    native bf16 is an :class:`ActivationError` (emulated bf16 is hundreds of times slower)."""
    if requested == "fp32":
        return torch.float32
    if requested == "bf16":
        if not native_bf16(extractor.device):
            raise ActivationError(
                f"bf16 activation was requested but this {extractor.device.type} has no native bf16 "
                f"({cpu_model() if extractor.device.type == 'cpu' else extractor.device}): it would be "
                "emulated, far slower than fp32; use precision fp32 or auto"
            )
        return torch.bfloat16
    if extractor.autocast_dtype == torch.float32:  # fp32 extractor: no native bf16, or it drifts
        return torch.float32
    cached = getattr(extractor, "_activation_dtype", None)
    if cached is not None:
        return cached
    x = calibration_batch(extractor.preprocessing.input_size).to(extractor.device)
    noise = torch.randn(x.shape[0], extractor.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t = F.normalize(extractor.embed(x, torch.float32) + 0.3 * noise.to(x.device), dim=1)
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        xi = x.clone().requires_grad_(True)
        f = extractor.embed(xi, dtype)
        if not f.requires_grad:  # no gradient at all: activate_batch says so clearly
            return torch.float32
        (grad,) = torch.autograd.grad(-(f * t).sum(), xi)
        grads.append(grad.flatten(1))
    cos = F.cosine_similarity(grads[0], grads[1], dim=1).min().item()
    dtype = torch.bfloat16 if cos >= BF16_MIN_GRAD_COSINE else torch.float32
    extractor._activation_dtype = dtype  # type: ignore[attr-defined]
    return dtype


def _pad_batch(images: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """uint8 (h, w, 3) arrays → (B, 3, H, W) float [0, 1] edge-padded batch, (B, 1, H, W) mask."""
    sizes = [(int(a.shape[0]), int(a.shape[1])) for a in images]
    hmax, wmax = max(h for h, _ in sizes), max(w for _, w in sizes)
    x0 = torch.empty(len(images), 3, hmax, wmax, device=device)
    mask = torch.zeros(len(images), 1, hmax, wmax, device=device)
    for i, (a, (h, w)) in enumerate(zip(images, sizes)):
        t = torch.from_numpy(np.array(a, dtype=np.uint8, copy=True)).to(device).permute(2, 0, 1).float().div_(255.0)
        if (h, w) != (hmax, wmax):
            t = F.pad(t[None], (0, wmax - w, 0, hmax - h), mode="replicate")[0]
        x0[i] = t
        mask[i, :, :h, :w] = 1.0
    return x0, mask, sizes


def activate_batch(
    extractor: Extractor, images: list[np.ndarray], targets: np.ndarray, config: ActivationConfig,
    competitors: Competitors | None = None, features: np.ndarray | None = None, measure_after: bool = True,
) -> ActivatedBatch:
    """Activate ``images`` (uint8 (h, w, 3), any sizes) towards ``targets`` (B, d) unit vectors.

    ``features``: the originals' descriptors as the collection describes them (B, d), when the
    caller has them (it computed the targets from them): the cosine before is then taken from them
    instead of one more forward pass of the batch. ``measure_after=False`` skips the forward pass
    that measures the cosine after (NaN then), for a caller that describes the written files
    instead (:func:`activeindex.activation.add.release_batch`).

    With ``config.margin_weight > 0`` and ``competitors`` (:func:`.competitors.find_competitors`
    of the originals), the loss adds ``margin_weight · Σ_j τ·softplus((gap_j + margin) / τ)`` per
    image, ``gap_j`` the score of competitor j minus the own code's (or cell's): the own code is
    pushed to win by ``margin``. An image then stops early only once it also wins every pair."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    if targets.ndim != 2 or targets.shape[1] != extractor.dim:
        raise ActivationError(f"targets have shape {targets.shape}; the extractor gives {extractor.dim}-d")
    device = extractor.device
    dtype = gradient_precision(extractor, config.precision)
    x0, mask, sizes = _pad_batch(images, device)
    resize = InputResize(*(m.to(device) for m in batch_matrices(sizes, extractor.preprocessing, tuple(x0.shape[-2:]))))
    t = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32)).to(device)
    b = len(images)

    factor = torch.tensor(CHANNEL_FACTOR, device=device).view(1, 3, 1, 1)
    bound = jnd_heatmap(x0).mul_(mask) * (config.scaling * factor)  # (B, 3, H, W): one full-size product
    n_valid = 3.0 * mask.sum(dim=(1, 2, 3))  # pixel values per image
    mse_max = 10.0 ** (-(config.psnr + BUDGET_MARGIN_DB) / 10.0)

    augment = None
    if config.robust and config.views > 0:
        from activeindex.training.augment import copy_edit_augmentation, edit_families

        size = extractor.preprocessing.input_size
        if config.view_edits is not ViewEdits.RANDOM:
            colour = config.view_edits is ViewEdits.COLOUR
            augment = edit_families(size, config.views, config.robust_strength, colour)
        else:
            augment = copy_edit_augmentation(size, config.robust_strength)
    quality = None if config.jpeg_quality is None else torch.tensor([float(config.jpeg_quality)], device=device)

    tiles = Render(x0, bound, n_valid, mse_max)  # δ → the budgeted x, and the image loss

    def to_input(x: torch.Tensor) -> torch.Tensor:
        if quality is not None:
            from kornia.enhance import jpeg_codec_differentiable

            x = jpeg_codec_differentiable(x, quality)
        # The model's first layer sees bf16 under bf16 autocast anyway: the resize may run in it too.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            small = resize(x)
        return small.float()  # the edits of robust activation expect float32

    def no_gradient() -> ActivationError:
        return ActivationError(
            f"the model {extractor.spec_string} gives no usable gradient with respect to its input "
            "(a traced or non-differentiable model?); activation needs gradients"
        )

    comp = None
    if config.margin_weight > 0 and competitors is not None and competitors.valid.any():
        if competitors.w.shape[0] != b or competitors.w.shape[2] != extractor.dim:
            raise ActivationError(f"competitors have shape {competitors.w.shape} for {b} images of {extractor.dim}-d")
        comp = (torch.from_numpy(competitors.w).to(device), torch.from_numpy(competitors.b).to(device),
                torch.from_numpy(competitors.valid).to(device).float())

    def margin_loss(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f (V·B, d) → per image the competitor term (B,), and whether the clean view wins every pair."""
        w, bias, valid = comp
        views_n = f.shape[0] // b
        gap = torch.einsum("vbd,bkd->vbk", f.view(views_n, b, -1).float(), w) + bias  # competitor - own
        hinge = MARGIN_SOFTNESS * F.softplus((gap + config.margin) / MARGIN_SOFTNESS) * valid
        wins = ((gap[0] + config.margin) * valid <= 0).all(dim=1)
        return hinge.sum(dim=2).mean(dim=0), wins

    # The seed fixes robust activation's random edits; the caller's generators are left as they were
    # (torch.manual_seed seeds the CPU's and every GPU's: the GPU's state is put back too).
    gen_state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    torch.manual_seed(config.seed)
    try:
        delta = torch.zeros_like(x0, requires_grad=True)
        # torch's fused Adam: one kernel, one pass over δ, its gradient and both moments.
        adam = torch.optim.Adam([delta], lr=config.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
        if features is not None:
            if features.shape != targets.shape:
                raise ActivationError(f"features have shape {features.shape}, the targets {targets.shape}")
            cos_before = (torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device) * t).sum(dim=1)
        else:
            with torch.no_grad():
                cos_before = (extractor.embed(resize(x0), dtype) * t).sum(dim=1)
        moving = torch.ones(b, 1, 1, 1, device=device)
        if config.stop_cos is not None:
            moving = (cos_before < config.stop_cos).float().view(b, 1, 1, 1)
            if comp is not None:  # an image already at its target may still lose to a competitor
                moving = torch.ones_like(moving)
        steps = 0
        for it in range(config.iterations):
            if config.stop_cos is not None and it % CHECK_EVERY == 0 and it > 0 and not bool(moving.any()):
                break
            x, loss_i = render(delta, tiles)
            inp = to_input(x)
            if augment is not None:
                views = augment(inp.repeat(config.views, 1, 1, 1))
                inp = torch.cat([inp, views])
            f = extractor.embed(inp, dtype)
            if not f.requires_grad:
                raise no_gradient()
            tt = t.repeat(f.shape[0] // b, 1)
            if config.loss is FeatureLoss.COSINE:
                per_view = (1.0 - (f * tt).sum(dim=1)).view(-1, b)
            else:
                per_view = (f - tt).pow(2).sum(dim=1).view(-1, b)
            # The unedited view keeps its full weight: the edited views add to it, not dilute it.
            loss_f = per_view[0]
            if per_view.shape[0] > 1:
                loss_f = loss_f + config.view_weight * per_view[1:].mean(dim=0)
            loss = (config.lambda_f * loss_f + config.lambda_i * loss_i).sum()
            wins = None
            if comp is not None:
                loss_m, wins = margin_loss(f)
                loss = loss + config.margin_weight * loss_m.sum()
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                steps = it + 1
                # A converged image keeps no momentum: it stops moving. (On a CPU, whose host sync
                # is free, the two passes are skipped while every image still moves.)
                if config.stop_cos is not None and (device.type != "cpu" or not bool(moving.all())):
                    grad.mul_(moving)
                    if delta in adam.state:
                        adam.state[delta]["exp_avg"].mul_(moving)
                delta.grad = grad
                adam.step()
                if config.stop_cos is not None:
                    clean_cos = (f[:b].detach() * t).sum(dim=1)
                    done = clean_cos >= config.stop_cos
                    if wins is not None:
                        done = done & wins
                    moving = moving * (~done).float().view(b, 1, 1, 1)
        with torch.no_grad():
            p = tiles.perturbation(delta)
            if measure_after:
                cos_after = (extractor.embed(to_input((x0 + p).clamp(0.0, 1.0)), dtype) * t).sum(dim=1)
            else:
                cos_after = torch.full((b,), float("nan"), device=device)
    finally:
        torch.random.set_rng_state(gen_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
    # One check at the end instead of a host sync per iteration; on the sum, which a NaN or an
    # infinity reaches (|p| ≤ 1 elsewhere), not a full-resolution mask (18 ms per photo).
    if not bool(torch.isfinite(p.sum())):
        raise no_gradient()

    p_np = p.permute(0, 2, 3, 1).float().cpu().numpy()
    perturbations = [np.ascontiguousarray(p_np[i, :h, :w]) for i, (h, w) in enumerate(sizes)]
    return ActivatedBatch(perturbations, cos_before.cpu().numpy(), cos_after.cpu().numpy(), steps)

