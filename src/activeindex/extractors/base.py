"""The extractor: a descriptor network plus the preprocessing and precision it runs with.

An :class:`Extractor` maps images to L2-normalised float32 descriptors. It owns

- its :class:`Preprocessing` (square input size, resize policy, mean/std), so that a collection can
  store it and every later query is prepared exactly like the references were;
- a ``digest`` of its weights, so that a collection refuses descriptors from another model;
- its compute precision: bf16 autocast where the device runs bf16 natively
  (:func:`activeindex.hardware.native_bf16`) *and* the descriptors stay within cosine 0.99 of fp32
  on a calibration batch; fp32 otherwise (an AVX2-only CPU only emulates bf16, far slower), and
  for models that say ``prefers_fp32`` (int8-quantised ONNX graphs).

Two entry points: :meth:`Extractor.embed` is differentiable and takes float images in [0, 1] already at
the input size (activation optimises pixels through it); :meth:`Extractor.features` takes a uint8
batch and returns numpy descriptors without building a graph. For an ONNX file, ``features`` runs in the
extractor's :class:`Runtime` (onnxruntime by default, :mod:`activeindex.extractors.ort`) while
``embed`` always runs the converted module.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from activeindex.errors import ModelError
from activeindex.hardware import cpu_model, native_bf16
from activeindex.settings import Precision, ResizePolicy, Runtime  # re-exported (defined there: no torch/FAISS needed)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Minimum cosine between bf16 and fp32 descriptors for bf16 autocast to be used.
BF16_MIN_COSINE = 0.99


class InputLayout(str, enum.Enum):
    """The order of the network input's axes."""

    NCHW = "nchw"  # (B, 3, H, W): PyTorch's convention, TorchScript files, most ONNX exports
    NHWC = "nhwc"  # (B, H, W, 3): channels last, e.g. graphs that take decoded uint8 pixels


class ValueRange(str, enum.Enum):
    """The pixel scale the network input is expressed in, before mean/std."""

    UNIT = "0-1"  # float pixels in [0, 1]
    BYTE = "0-255"  # pixel values in [0, 255] (uint8 graphs, fed as float so gradients reach them)

    @property
    def scale(self) -> float:
        return 255.0 if self is ValueRange.BYTE else 1.0


IDENTITY_MEAN = (0.0, 0.0, 0.0)  # for graphs that normalise their input themselves
IDENTITY_STD = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn a decoded RGB image into the network input.

    Geometry: ``input_size`` and ``resize`` make the square image. Values: with ``x`` the image as
    float in [0, 1], the network gets ``((x - mean) / std) * value_range.scale`` laid out as
    ``layout``. ImageNet-normalised NCHW models use the defaults; a graph that takes uint8 NHWC
    pixels and normalises them itself has mean 0, std 1, ``ValueRange.BYTE``, ``InputLayout.NHWC``.
    The layout and range are stored with a collection, so every query is fed like its references.
    """

    input_size: int = 224
    resize: ResizePolicy = ResizePolicy.SQUARE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    layout: InputLayout = InputLayout.NCHW
    value_range: ValueRange = ValueRange.UNIT

    def __post_init__(self) -> None:
        if self.input_size < 8:
            raise ModelError(f"input size {self.input_size} is too small (minimum 8 pixels)")
        object.__setattr__(self, "resize", ResizePolicy(self.resize))
        object.__setattr__(self, "layout", InputLayout(self.layout))
        object.__setattr__(self, "value_range", ValueRange(self.value_range))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or not all(v > 0 for v in self.std):
            raise ModelError(f"mean and std need 3 values each, std > 0; got {self.mean}, {self.std}")

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("resize", "layout", "value_range"):
            out[key] = getattr(self, key).value
        return out

    def affine(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel ``(a, b)`` with network input ``= x * a + b`` for ``x`` in [0, 1]."""
        k = self.value_range.scale
        return (tuple(k / s for s in self.std), tuple(-k * m / s for m, s in zip(self.mean, self.std)))

    @property
    def decode_min_side(self) -> int:
        """Smallest image side a reduced-size decode may produce without losing input detail."""
        return self.input_size

    def prepare(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image → HWC uint8 array of shape (input_size, input_size, 3)."""
        s = self.input_size
        if self.resize is ResizePolicy.CENTER_CROP:
            w, h = img.size
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
            left, top = (nw - s) // 2, (nh - s) // 2
            img = img.crop((left, top, left + s, top + s))
        elif img.size != (s, s):
            img = img.resize((s, s), Image.BILINEAR, reducing_gap=3.0)
        return np.asarray(img, dtype=np.uint8)


def state_dict_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (names, dtypes, shapes and bytes, sorted)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def calibration_batch(size: int, n: int = 4, seed: int = 0) -> torch.Tensor:
    """Deterministic natural-ish float images in [0, 1], (n, 3, size, size): smooth noise + edges."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    img = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    img = img + 0.15 * torch.rand(n, 3, size, size, generator=g)
    ramp = torch.linspace(0, 1, size)
    img[:, :, : size // 2] += 0.3 * (ramp[None, None, None, :] > 0.5)
    return img.clamp(0, 1)


@dataclass
class Extractor:
    """A descriptor network with its preprocessing. Build one with ``create_extractor(spec)``."""

    model: torch.nn.Module
    preprocessing: Preprocessing
    spec: dict  # how to rebuild it: {"kind", "name"/"path", ...}; stored in collections
    digest: str
    dim: int = field(init=False)
    trained: bool = True
    precision: Precision = Precision.AUTO
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Runtime.ONNXRUNTIME: ``features`` (extraction, queries) runs ``describer``, an onnxruntime
    # session on the same file; ``embed`` (activation) stays on the converted module.
    runtime: Runtime = Runtime.TORCH
    describer: Callable[[np.ndarray], np.ndarray] | None = None
    # The model's own activation defaults (knob name → value, see activeindex.knobs): tuned for it,
    # applied where the user sets nothing. From its builtin or packaged entry; none for files.
    activation_defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.runtime = Runtime(self.runtime)
        if (self.runtime is Runtime.ONNXRUNTIME) != (self.describer is not None):
            raise ModelError("runtime onnxruntime needs a describer, and only it takes one")
        self._traces: dict[torch.dtype, torch.nn.Module] = {}
        self._trace_lock = threading.Lock()
        self.model.eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        a, b = self.preprocessing.affine()
        self._a = torch.tensor(a, device=self.device).view(1, 3, 1, 1)
        self._b = torch.tensor(b, device=self.device).view(1, 3, 1, 1)
        # uint8 pixels → network input in one multiply-add: exact integers for 0..255 graphs.
        self._a_byte = self._a / 255.0
        self._nhwc = self.preprocessing.layout is InputLayout.NHWC
        probe = calibration_batch(self.preprocessing.input_size).to(self.device)
        with torch.no_grad():
            ref = self._forward(probe, torch.float32)
        if ref.ndim != 2 or ref.shape[0] != probe.shape[0]:
            raise ModelError(
                f"model {self.spec_string} returned shape {tuple(ref.shape)} for a batch of "
                f"{probe.shape[0]} images; a descriptor model must return (batch, dim)"
            )
        if not torch.isfinite(ref).all():
            raise ModelError(f"model {self.spec_string} returned non-finite descriptors")
        self.dim = int(ref.shape[1])
        self.precision = self._resolve_precision(probe, ref)

    # -- precision -----------------------------------------------------------------------------
    def _resolve_precision(self, probe: torch.Tensor, ref: torch.Tensor) -> Precision:
        requested = Precision(self.precision)
        if requested is Precision.FP32:
            return Precision.FP32
        if requested is Precision.AUTO and getattr(self.model, "prefers_fp32", False):
            logger.debug("fp32 for %s: the model asks for it (a quantised graph)", self.spec_string)
            return Precision.FP32
        if not native_bf16(self.device):
            if requested is Precision.BF16:
                raise ModelError(
                    f"bf16 was requested but {self.device.type} has no native bf16 support "
                    f"({cpu_model() if self.device.type == 'cpu' else self.device}): bf16 would be "
                    "emulated, far slower than fp32; use precision fp32 or auto"
                )
            return Precision.FP32
        with torch.no_grad():
            low = self._forward(probe, torch.bfloat16)
        cos = float((low * ref).sum(dim=1).min())
        if requested is Precision.BF16 or cos >= BF16_MIN_COSINE:
            logger.debug("bf16 autocast for %s (min cosine to fp32 %.4f)", self.spec_string, cos)
            return Precision.BF16
        logger.info(
            "fp32 for %s: bf16 descriptors drift (min cosine %.4f < %.2f)",
            self.spec_string, cos, BF16_MIN_COSINE,
        )
        return Precision.FP32

    @property
    def autocast_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision is Precision.BF16 else torch.float32

    @property
    def spec_string(self) -> str:
        kind = self.spec.get("kind", "?")
        if kind == "packaged":  # spelt as the user spells it: `--model sscd`
            return str(self.spec.get("name"))
        return f"{kind}:{self.spec.get('name') or self.spec.get('path')}"

    # -- forward -------------------------------------------------------------------------------
    def _forward(self, x01: torch.Tensor, dtype: torch.dtype, byte_scale: bool = False) -> torch.Tensor:
        """x01: (B, 3, S, S) float in [0, 1] (in [0, 255] with ``byte_scale``) → unit descriptors."""
        x = torch.addcmul(self._b, x01, self._a_byte if byte_scale else self._a)
        x = x.contiguous(memory_format=torch.channels_last)
        if self._nhwc:  # a channels-last NCHW tensor permuted to NHWC is contiguous: no copy
            x = x.permute(0, 2, 3, 1)
        enabled = dtype != torch.float32
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled):
            out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return F.normalize(out.float(), dim=-1)

    def embed(self, x01: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Differentiable descriptors. x01: float (B, 3, S, S) in [0, 1] → (B, dim) float32, unit norm.
        ``dtype`` overrides the compute precision (``torch.float32`` or ``torch.bfloat16`` autocast)."""
        return self._forward(x01, dtype or self.autocast_dtype)

    def _describe_uint8(self, batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 (B, S, S, 3) on the device → (B, dim) unit descriptors, eagerly."""
        return self._forward(batch.permute(0, 3, 1, 2).float(), dtype, byte_scale=True)

    def _traced(self, example: torch.Tensor, dtype: torch.dtype) -> torch.nn.Module:
        """:meth:`_describe_uint8` of a built-in model as a TorchScript trace, made on first use
        for each compute dtype (under the same autocast: the same kernels and the same numbers, for
        any batch size). The trace runs the whole call without taking Python's GIL back; eager
        PyTorch takes it back after every op, and beside a busy Python thread (a service's event
        loop, decoding threads) each time can be a wait: ``bench/extract.py`` prints both rates.
        Other models run eagerly (TorchScript files are scripted already).

        ``torch.jit.trace`` is deprecated from torch 2.13 on; torch.compile would need a C++
        toolchain at run time and torch.export runs its graph node by node in Python. The pinned
        torch has it, and ``tests/test_extractors.py`` checks the trace against the eager model.
        """
        with self._trace_lock:
            if dtype not in self._traces:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._traces[dtype] = torch.jit.trace(_Describe(self, dtype), example, check_trace=False)
            return self._traces[dtype]

    @torch.no_grad()
    def features(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 images (B, S, S, 3) (as ``Preprocessing.prepare`` gives) → (B, dim) float32, by the
        extractor's runtime."""
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected uint8 (B, S, S, 3) images, got {batch.dtype} {tuple(batch.shape)}")
        if self.describer is not None:
            try:
                return self.describer(batch.cpu().numpy())
            except ModelError:
                raise
            except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
                raise ModelError(
                    f"{self.spec_string} (onnxruntime) failed on a batch of {tuple(batch.shape)} images: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        return self._torch_features(batch)

    def _torch_features(self, batch: torch.Tensor) -> np.ndarray:
        batch = batch.to(self.device)
        dtype = self.autocast_dtype
        try:
            if self.spec.get("kind") == "builtin":
                return self._traced(batch, dtype)(batch).cpu().numpy()
            return self._describe_uint8(batch, dtype).cpu().numpy()
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class with torch's
            # A model file that loads but fails on real input (wrong input layout, an operator the
            # runtime lacks, a shape it cannot take) is the user's model's error, not a crash here.
            raise ModelError(
                f"{self.spec_string} failed on a batch of {tuple(batch.shape)} images: {type(exc).__name__}: {exc}"
            ) from exc

    @torch.no_grad()
    def runtime_agreement(self) -> float:
        """Min cosine, on a calibration batch, between the runtime's descriptors and the converted
        module's (1.0 for the torch runtime): how faithfully activation, which differentiates the
        module, optimises what the collection stores. Computed once."""
        if self.describer is None:
            return 1.0
        if getattr(self, "_agreement", None) is None:
            x = calibration_batch(self.preprocessing.input_size)
            pixels = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
            ours = self._torch_features(pixels)
            theirs = self.describer(pixels.numpy())
            self._agreement = float((ours * theirs).sum(axis=1).min())
        return self._agreement

    def describe(self) -> dict:
        """What a collection stores about this extractor."""
        return {
            **self.spec,
            "digest": self.digest,
            "dim": self.dim,
            "trained": self.trained,
            "preprocessing": self.preprocessing.to_dict(),
        }


class _Describe(torch.nn.Module):
    """An extractor's uint8 → descriptor computation as a module, for ``torch.jit.trace`` (the
    model is a submodule, so the trace shares its parameters)."""

    def __init__(self, extractor: Extractor, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = extractor.model
        self.describe = partial(extractor._describe_uint8, dtype=dtype)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.describe(batch)
