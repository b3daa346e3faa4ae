"""The closed sets of settings (enums) and the defaults that the command line names, importable
without torch or FAISS.

The modules that use them (:mod:`.extractors.base`, :mod:`.index`, :mod:`.activation`,
:mod:`.scoring`) re-export them, and that is where they are documented in use; they live here so
that ``activeindex --help`` and a mistyped option answer in a fraction of a second instead of
after torch and FAISS have loaded (seconds).
"""

from __future__ import annotations

import enum
import re

from activeindex.errors import DeviceError

DEFAULT_FPR = 0.01  # share of non-matching queries the copy threshold may flag: about 1 in 100

# Largest image activated by default (16 MP, a 4896×3264 photo). Activation keeps about 180 bytes
# per pixel alive at once (the image, its perturbation, their gradients and the optimiser's moments
# in float32, the JND heatmap): 16 MP is about 3 GB; larger images are refused with the reason,
# not left to exhaust memory. Describing an image (no activation) is bounded by the model's input.
MAX_ACTIVATION_PIXELS = 16 * 1024 * 1024


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


def parse_device(text: str, *, name: str = "device") -> str:
    """The device a user wrote, checked and normalised (``auto``, ``cpu``, ``cuda``, ``cuda:N``),
    without asking torch whether the machine has it (that is
    :func:`activeindex.hardware.resolve_device`, the one place ``auto`` is decided). ``name`` is
    how the error message calls the setting (``--device`` on the command line)."""
    value = str(text).strip().lower()
    if not _DEVICE_RE.fullmatch(value):
        raise DeviceError(f"{name} {text!r} is not a device; use {DEVICE_CHOICES}")
    return value


class ResizePolicy(str, enum.Enum):
    """How an image of any shape becomes the square network input."""

    SQUARE = "square"  # resize both sides to the input size (aspect not kept, nothing cut off)
    CENTER_CROP = "center-crop"  # resize the shorter side to the input size, cut the centre square


class Precision(str, enum.Enum):
    AUTO = "auto"  # bf16 where supported and faithful (cosine >= 0.99 to fp32), else fp32
    FP32 = "fp32"
    BF16 = "bf16"


class Runtime(str, enum.Enum):
    """What computes an ONNX model's descriptors for extraction and queries. Activation always
    differentiates through the converted PyTorch module; only the stored and query descriptors
    come from the runtime, so a collection's descriptors all come from one path."""

    AUTO = "auto"  # onnxruntime for ONNX files on the CPU, torch otherwise
    TORCH = "torch"  # the converted PyTorch module (TorchScript and built-in models: always)
    ONNXRUNTIME = "onnxruntime"  # onnxruntime's CPU provider on the original file (int8 kernels)


class Metric(str, enum.Enum):
    L2 = "l2"
    IP = "ip"

    @property
    def faiss_metric(self) -> int:
        import faiss  # here, not at import: see the module's docstring

        return faiss.METRIC_L2 if self is Metric.L2 else faiss.METRIC_INNER_PRODUCT


class OutputFormat(str, enum.Enum):
    PNG = "png"  # lossless (default)
    JPEG = "jpeg"
    WEBP = "webp"

    @property
    def extension(self) -> str:
        return {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}[self.value]

    def lossy(self, quality: int) -> bool:
        return self is OutputFormat.JPEG or (self is OutputFormat.WEBP and quality < 100)


class TargetKind(str, enum.Enum):
    RECONSTRUCTION = "reconstruction"  # the decoded stored code (default, the paper's)
    CENTROID = "centroid"  # the centre of the original's IVF cell
    AUTO = "auto"  # the centroid on IVF indexes, the reconstruction elsewhere (docs/activation-study.md)


class FeatureLoss(str, enum.Enum):
    COSINE = "cosine"  # 1 - cos(f, t): the paper's default
    MSE = "mse"  # ||f - t||²


class ViewEdits(str, enum.Enum):
    """What the edited views of robust activation are (:mod:`activeindex.training.augment`)."""

    RANDOM = "random"  # each view one random strong copy edit (the descriptor's training edits)
    FAMILIES = "families"  # view i an edit of family i mod 3: a crop, a rotation, a caption band
    COLOUR = "families-colour"  # view i of family i mod 4: a crop, a colour edit, a rotation, a caption band


class QueryMode(str, enum.Enum):
    """How a query image is searched (see :mod:`activeindex.dihedral`). Each mode has its own copy
    threshold: searching more views per query flags more unrelated images at a given score."""

    SINGLE = "single"  # one descriptor per query image
    DIHEDRAL = "dihedral"  # its 8 rotations/flips (the group D4), each reference's best score kept
