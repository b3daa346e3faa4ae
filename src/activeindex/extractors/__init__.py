"""Descriptor extractors, built from a spec string by :func:`create_extractor`.

Specs:

- ``builtin`` / ``builtin:NAME`` — a plain-PyTorch architecture whose weights ship in the package;
- ``torchscript:PATH`` — a TorchScript file (e.g. SSCD's released ``sscd_disc_mixup.torchscript.pt``);
- ``onnx:PATH`` — an ONNX file, converted to a PyTorch module so gradients flow to the input;
- ``sscd`` / ``sscd-distilled`` (also ``packaged:NAME``) — ONNX files of an optional package
  (:mod:`activeindex.extractors.packaged`), with the input size and resize they were evaluated at.

The input layout (NCHW/NHWC), value range (0..1 or 0..255) and normalisation of an ONNX model are
read from its graph (:func:`~activeindex.extractors.onnx_graph.graph_input`): a graph that takes
uint8 NHWC pixels and normalises them itself is fed pixel values as float, so gradients reach them.

An ONNX model has two runtimes (:class:`Runtime`): activation always differentiates through the
converted module, while extraction and queries run either that module or onnxruntime on the same
file (:mod:`activeindex.extractors.ort`; the default on the CPU: its int8 kernels are several times
faster). The runtime is part of the stored spec: a collection's descriptors all come from one path.

A spec may also be the dict a collection stored (:meth:`Extractor.describe`), which rebuilds the same
extractor with the same preprocessing.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from activeindex.errors import ModelError
from activeindex.extractors.base import (
    IDENTITY_MEAN,
    IDENTITY_STD,
    Extractor,
    InputLayout,
    Precision,
    Preprocessing,
    ResizePolicy,
    Runtime,
    ValueRange,
    state_dict_digest,
)
from activeindex.extractors.builtin import BUILTIN_MODELS, DEFAULT_BUILTIN, build_builtin, fold_batchnorm, packaged_digest
from activeindex.extractors.packaged import PACKAGED_MODELS, packaged_model
from activeindex.hardware import resolve_device
from activeindex.images import file_sha256

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_BUILTIN",
    "Extractor",
    "InputLayout",
    "PACKAGED_MODELS",
    "Precision",
    "Preprocessing",
    "ResizePolicy",
    "Runtime",
    "ValueRange",
    "create_extractor",
    "parse_spec",
]

KINDS = ("builtin", "packaged", "torchscript", "onnx")
DEFAULT_FILE_INPUT_SIZE = 224  # for file models whose input size the file leaves open


def parse_spec(spec: str) -> dict[str, str]:
    """``"kind:location"`` → ``{"kind": ..., "name"|"path": ...}``; raises ModelError with the fix."""
    kind, sep, rest = spec.partition(":")
    if kind == "builtin":
        return {"kind": "builtin", "name": rest or DEFAULT_BUILTIN}
    if not sep and spec in PACKAGED_MODELS:
        return {"kind": "packaged", "name": spec}
    if kind == "packaged":
        return {"kind": "packaged", "name": packaged_model(rest).name}
    if kind in ("torchscript", "onnx"):
        if not rest:
            raise ModelError(f"model spec {spec!r} needs a file: '{kind}:PATH'")
        return {"kind": kind, "path": rest}
    hint = ""
    if not sep and Path(spec).suffix.lower() in (".pt", ".pth", ".onnx"):
        guess = "onnx" if spec.lower().endswith(".onnx") else "torchscript"
        hint = f" (did you mean '{guess}:{spec}'?)"
    raise ModelError(
        f"unknown model spec {spec!r}{hint}; use 'builtin', 'builtin:NAME', "
        f"{', '.join(repr(n) for n in PACKAGED_MODELS)}, 'torchscript:PATH' or 'onnx:PATH'"
    )


def _load_file_model(kind: str, path: Path) -> torch.nn.Module:
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    if kind == "torchscript":
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated upstream but is how SSCD and others ship models.
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # torch raises RuntimeError/ValueError/zipfile errors alike
            raise ModelError(f"{path} is not a loadable TorchScript file: {exc}") from exc
    from activeindex.extractors.onnx_graph import load_onnx_module

    return load_onnx_module(path)


def _graph_preprocessing(module: torch.nn.Module) -> dict[str, Any]:
    """Preprocessing an ONNX graph states about itself: layout, value range, in-graph
    normalisation (then mean 0 / std 1 outside), static input size."""
    info = getattr(module, "graph_input", None)
    if info is None:
        return {}
    out: dict[str, Any] = {}
    if info.nhwc:
        out["layout"] = InputLayout.NHWC
    if info.pixels_0_255:
        out["value_range"] = ValueRange.BYTE
    if info.scale is not None:
        out["mean"], out["std"] = IDENTITY_MEAN, IDENTITY_STD
    if info.size is not None:
        out["input_size"] = info.size
    return out


def create_extractor(
    spec: str | dict[str, Any] = "builtin",
    *,
    input_size: int | None = None,
    resize: ResizePolicy | str | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    precision: Precision | str = Precision.AUTO,
    device: str | torch.device = "cpu",
    runtime: Runtime | str | None = None,
) -> Extractor:
    """Build an extractor from a spec string or a stored description.

    The preprocessing options apply to file models (TorchScript/ONNX and packaged ones); built-in
    models carry their own and refuse overrides. Defaults for file models, each overridden by the
    next: NCHW, values 0..1, ImageNet mean/std, square resize, 224 px; what an ONNX graph says
    about itself (layout, uint8 pixels, in-graph normalisation, a static size); a packaged model's
    size and resize; a stored description; the arguments. When nothing fixes the input size, 224
    is used and a warning says so.

    ``runtime`` (ONNX files only) chooses what computes :meth:`Extractor.features`: ``auto`` is
    onnxruntime on the CPU, torch on other devices. A stored description keeps the runtime that
    fed the collection (``torch`` for descriptions written before runtimes existed); onnxruntime
    runs on the CPU whatever ``device`` is, the converted module (activation) on ``device``.

    ``device`` is where the model runs: a :class:`torch.device` or ``auto``, ``cpu``, ``cuda``,
    ``cuda:N``, resolved and checked by :func:`activeindex.hardware.resolve_device` (a
    :class:`~activeindex.errors.DeviceError` names a device this machine does not have). It is not part of :meth:`Extractor.describe`: a collection does not
    depend on the device that fed it.
    """
    device = resolve_device(device)
    stored_pre: dict[str, Any] = {}
    if isinstance(spec, dict):
        parsed = {k: spec[k] for k in ("kind", "name", "path") if k in spec}
        stored_pre = dict(spec.get("preprocessing") or {})
        stored_runtime = Runtime(spec.get("runtime", Runtime.TORCH))
        if runtime not in (None, Runtime.AUTO, stored_runtime):
            raise ModelError(
                f"this collection's descriptors were computed by {stored_runtime.value}; "
                f"runtime {Runtime(runtime).value} would make descriptors it cannot be compared with"
            )
        runtime = stored_runtime
    else:
        parsed = parse_spec(spec)
    runtime = Runtime(runtime or Runtime.AUTO)
    overrides = {
        k: v
        for k, v in {"input_size": input_size, "resize": resize, "mean": mean, "std": std}.items()
        if v is not None
    }
    kind = parsed.get("kind")
    if runtime is Runtime.ONNXRUNTIME and kind not in ("onnx", "packaged"):
        raise ModelError(f"runtime onnxruntime runs ONNX files; {kind} models run on torch")
    if kind == "builtin":
        if overrides:
            raise ModelError(
                f"builtin models carry their own preprocessing; remove {', '.join(overrides)}"
            )
        module, entry, trained = build_builtin(parsed["name"])
        digest = state_dict_digest(module)
        expected = packaged_digest(entry.name) if trained else None
        if expected is not None and expected != digest:
            raise ModelError(
                f"the packaged weights of builtin:{entry.name} have digest {digest[:12]}…, their card "
                f"says {expected[:12]}…: the installation is damaged; reinstall activeindex"
            )
        return Extractor(
            model=fold_batchnorm(module),  # the same function, one pass fewer per layer
            preprocessing=entry.preprocessing,
            spec={"kind": "builtin", "name": entry.name},
            digest=digest,
            trained=trained,
            precision=Precision(precision),
            device=device,
            activation_defaults=dict(entry.activation_defaults),
        )
    if kind not in KINDS:
        raise ModelError(f"stored model spec has unknown kind {kind!r}")
    defaults: dict[str, Any] = {}
    activation_defaults: dict[str, Any] = {}
    if kind == "packaged":
        entry = packaged_model(str(parsed.get("name")))
        path, file_kind = entry.path(), "onnx"
        defaults = {"input_size": entry.input_size, "resize": entry.resize}
        activation_defaults = dict(entry.activation_defaults)
        spec_out = {"kind": "packaged", "name": entry.name, "path": str(path)}
    else:
        path, file_kind = Path(os.path.expanduser(str(parsed["path"]))), kind
        spec_out = {"kind": kind, "path": str(path.resolve())}
    module = _load_file_model(file_kind, path)
    pre_args: dict[str, Any] = {**_graph_preprocessing(module), **defaults, **stored_pre, **overrides}
    if "input_size" not in pre_args:
        logger.warning(
            "%s does not fix its input size; using %d px (pass --input-size N to choose)",
            path, DEFAULT_FILE_INPUT_SIZE,
        )
        pre_args["input_size"] = DEFAULT_FILE_INPUT_SIZE
    try:
        preprocessing = Preprocessing(**pre_args)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"invalid preprocessing for {path}: {exc}") from exc
    describer = None
    if file_kind == "onnx":
        if runtime is Runtime.AUTO:
            runtime = Runtime.ONNXRUNTIME if device.type == "cpu" else Runtime.TORCH
        if runtime is Runtime.ONNXRUNTIME:
            # onnxruntime's CPU provider describes whatever ``device`` is: a collection made on a
            # CPU keeps its descriptors' path on a GPU machine, where activation (the converted
            # module) runs on the GPU.
            from activeindex.extractors.ort import OrtDescriber

            describer = OrtDescriber(path, preprocessing, threads=torch.get_num_threads())
        spec_out["runtime"] = runtime.value
    else:
        runtime = Runtime.TORCH
    try:
        return Extractor(
            model=module,
            preprocessing=preprocessing,
            spec=spec_out,
            digest=file_sha256(path),
            precision=Precision(precision),
            device=device,
            runtime=runtime,
            describer=describer,
            activation_defaults=activation_defaults,
        )
    except ModelError:
        raise
    except Exception as exc:  # the model's own forward failed on a well-formed batch
        s = preprocessing.input_size
        shape = (4, s, s, 3) if preprocessing.layout is InputLayout.NHWC else (4, 3, s, s)
        raise ModelError(
            f"{kind} model {path} failed on a {shape} batch ({preprocessing.layout.value}, values "
            f"{preprocessing.value_range.value}): {exc}"
        ) from exc
