"""Descriptor extractors, built from a spec string by :func:`create_extractor`.

Specs:

- ``builtin`` / ``builtin:NAME`` — a plain-PyTorch architecture whose weights ship in the package;
- ``torchscript:PATH`` — a TorchScript file (e.g. SSCD's released ``sscd_disc_mixup.torchscript.pt``);
- ``onnx:PATH`` — an ONNX file, converted to a PyTorch module so gradients flow to the input.

A spec may also be the dict a collection stored (:meth:`Extractor.describe`), which rebuilds the same
extractor with the same preprocessing.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from activeindex.errors import ModelError
from activeindex.extractors.base import (
    Extractor,
    Precision,
    Preprocessing,
    ResizePolicy,
    state_dict_digest,
)
from activeindex.extractors.builtin import BUILTIN_MODELS, DEFAULT_BUILTIN, build_builtin, packaged_digest
from activeindex.images import file_sha256

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_BUILTIN",
    "Extractor",
    "Precision",
    "Preprocessing",
    "ResizePolicy",
    "create_extractor",
    "parse_spec",
]

KINDS = ("builtin", "torchscript", "onnx")


def parse_spec(spec: str) -> dict[str, str]:
    """``"kind:location"`` → ``{"kind": ..., "name"|"path": ...}``; raises ModelError with the fix."""
    kind, sep, rest = spec.partition(":")
    if kind == "builtin":
        return {"kind": "builtin", "name": rest or DEFAULT_BUILTIN}
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
        "'torchscript:PATH' or 'onnx:PATH'"
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


def _onnx_input_size(path: Path) -> int | None:
    from activeindex.extractors.onnx_graph import onnx_input_shape

    shape = onnx_input_shape(path)
    if len(shape) == 4 and isinstance(shape[2], int) and shape[2] == shape[3]:
        return int(shape[2])
    return None


def create_extractor(
    spec: str | dict[str, Any] = "builtin",
    *,
    input_size: int | None = None,
    resize: ResizePolicy | str | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    precision: Precision | str = Precision.AUTO,
    device: str | torch.device = "cpu",
) -> Extractor:
    """Build an extractor from a spec string or a stored description.

    The preprocessing options apply to file models (TorchScript/ONNX), whose files do not say how
    they were trained; built-in models carry their own and refuse overrides. Defaults for file
    models: the ONNX file's static input size if it has one, else 224; square resize; ImageNet
    mean/std.
    """
    stored_pre: dict[str, Any] = {}
    if isinstance(spec, dict):
        parsed = {k: spec[k] for k in ("kind", "name", "path") if k in spec}
        stored_pre = dict(spec.get("preprocessing") or {})
    else:
        parsed = parse_spec(spec)
    overrides = {
        k: v
        for k, v in {"input_size": input_size, "resize": resize, "mean": mean, "std": std}.items()
        if v is not None
    }
    kind = parsed.get("kind")
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
            model=module,
            preprocessing=entry.preprocessing,
            spec={"kind": "builtin", "name": entry.name},
            digest=digest,
            trained=trained,
            precision=Precision(precision),
            device=torch.device(device),
        )
    if kind not in KINDS:
        raise ModelError(f"stored model spec has unknown kind {kind!r}")
    path = Path(os.path.expanduser(str(parsed["path"])))
    module = _load_file_model(kind, path)
    pre_args: dict[str, Any] = {**stored_pre, **overrides}
    if "input_size" not in pre_args and kind == "onnx":
        size = _onnx_input_size(path)
        if size is not None:
            pre_args["input_size"] = size
    try:
        preprocessing = Preprocessing(**pre_args)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"invalid preprocessing for {path}: {exc}") from exc
    try:
        return Extractor(
            model=module,
            preprocessing=preprocessing,
            spec={"kind": kind, "path": str(path.resolve())},
            digest=file_sha256(path),
            precision=Precision(precision),
            device=torch.device(device),
        )
    except ModelError:
        raise
    except Exception as exc:  # the model's own forward failed on a well-formed batch
        raise ModelError(
            f"{kind} model {path} failed on a (4, 3, {preprocessing.input_size}, "
            f"{preprocessing.input_size}) batch: {exc}"
        ) from exc
