"""Descriptors of an ONNX file computed by onnxruntime (``Runtime.ONNXRUNTIME``).

Extraction and queries of an ONNX model are forward passes only; onnxruntime runs a quantised
graph with its int8 kernels (SSCD int8 on 2 cores: about 6× the converted module's forward, see
``bench/extract.py``). Activation needs input gradients, which onnxruntime does not give: it
differentiates through the converted PyTorch module (:mod:`activeindex.extractors.onnx_graph`), and
the file it writes is then described here like any other image. So every descriptor a collection
stores or compares comes from one path, whichever optimised the pixels.

The input is fed as the graph declares it: a uint8 graph gets the decoded pixels unchanged (it
normalises them itself); a float graph gets ``x * a + b`` of the extractor's
:class:`~activeindex.extractors.base.Preprocessing`, in its layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from activeindex.errors import ModelError
from activeindex.extractors.base import InputLayout, Preprocessing

_DTYPES = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32, "tensor(float16)": np.float16}


class OrtDescriber:
    """uint8 (B, S, S, 3) images → (B, dim) unit float32 descriptors, by an onnxruntime session."""

    def __init__(self, path: Path, preprocessing: Preprocessing, threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # a core dependency; only a broken install lacks it
            raise ModelError(f"runtime onnxruntime needs the onnxruntime package: {exc}") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # its warnings about unused initialisers are not the user's
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own unrelated exception types
            raise ModelError(f"onnxruntime cannot load {path}: {exc}") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"{path} has {len(inputs)} inputs; a descriptor model takes one image batch")
        self.input_name = inputs[0].name
        if inputs[0].type not in _DTYPES:
            raise ModelError(f"{path}: input type {inputs[0].type} is not uint8, float or float16")
        self.dtype = _DTYPES[inputs[0].type]
        self.nhwc = preprocessing.layout is InputLayout.NHWC
        a, b = preprocessing.affine()
        self.a = np.asarray(a, np.float32) / 255.0  # per uint8 pixel value
        self.b = np.asarray(b, np.float32)
        if self.dtype == np.uint8 and not (np.allclose(self.a, 1.0) and np.allclose(self.b, 0.0)):
            raise ModelError(
                f"{path} takes uint8 pixels, but its preprocessing scales them (mean {preprocessing.mean}, "
                f"std {preprocessing.std}, values {preprocessing.value_range.value}): a uint8 graph must "
                "normalise its input itself; drop --mean/--std or use --runtime torch"
            )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.dtype == np.uint8:
            x = batch
        else:
            x = (batch.astype(np.float32) * self.a + self.b).astype(self.dtype, copy=False)
        if not self.nhwc:
            x = x.transpose(0, 3, 1, 2)
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0]
        out = np.asarray(out, np.float32)
        if out.ndim != 2 or out.shape[0] != batch.shape[0]:
            raise ModelError(
                f"onnxruntime returned shape {out.shape} for {batch.shape[0]} images; expected (batch, dim)"
            )
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)
