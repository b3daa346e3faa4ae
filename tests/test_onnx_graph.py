"""The ONNX → torch converter: outputs match torch and onnxruntime, and gradients reach the input."""

from __future__ import annotations

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
from activeindex.extractors.onnx_graph import OnnxGraphModule, load_onnx_module, onnx_input_shape

ort = pytest.importorskip("onnxruntime")

ATOL = 1e-4


class GeM(nn.Module):
    def __init__(self, p: float = 3.0) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=1e-6).pow(self.p).mean((-2, -1)).pow(1.0 / self.p)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
            nn.AvgPool2d(3, stride=1, padding=1), nn.Conv2d(8, 16, 1, stride=2), nn.Hardswish(),
        )
        self.gem = GeM()
        self.fc = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        pooled = torch.cat([self.gem(f), torch.flatten(F.adaptive_avg_pool2d(f, 1), 1)], dim=1)
        return F.normalize(self.fc(pooled), dim=-1)


class TinyViT(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, patch: int = 4, img: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.1)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, d = x.shape  # traced as Shape/Gather: the integer path of the graph
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos
        qkv = self.qkv(self.norm1(x)).reshape(b, n + 1, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n + 1, d))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return F.normalize(self.norm(x)[:, 0], dim=-1)


class MiscOps(nn.Module):
    """Resize, Pad, Slice, Split, Clip, Where and friends, concatenated into one output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [
            F.interpolate(x, scale_factor=2, mode="nearest"),
            F.interpolate(x, size=(11, 13), mode="bilinear", align_corners=False),
            F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True),
            F.pad(x, (1, 2, 0, 1), mode="reflect"),
            F.pad(x, (2, 1, 1, 0), value=0.5),
            torch.sigmoid(x) * torch.tanh(x) + F.hardsigmoid(x),
            x.clamp(-0.5, 0.5),
            torch.where(x > 0, x, 0.1 * x),
            torch.maximum(x, -x.flip(-1)),
            x[:, :, 1:-1, ::2],
            torch.sqrt(x.abs() + 1) - torch.exp(-x.abs()) + torch.log(x.abs() + 1),
            x.amax(dim=1, keepdim=True) - x.sum(dim=-1, keepdim=True),
            F.max_pool2d(x, 3, stride=2, ceil_mode=True),
            F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False),
        ]
        a, b = x.chunk(2, dim=-1)
        parts.append(a - b)
        return torch.cat([p.flatten(1) for p in parts], dim=1)


def _export(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter is deprecated but fast and simple
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return path


def _init_bn(model: nn.Module) -> None:
    # Non-trivial running statistics so BatchNormalization is actually exercised.
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)


MODELS = {"cnn": (SmallCNN, (3, 32, 32)), "vit": (TinyViT, (3, 16, 16)), "misc": (MiscOps, (3, 10, 12))}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path, tuple[int, ...]]]:
    torch.manual_seed(0)
    out = {}
    for name, (cls, shape) in MODELS.items():
        model = cls().eval()
        _init_bn(model)
        path = _export(model, torch.randn(2, *shape), tmp_path_factory.mktemp(name) / f"{name}.onnx")
        out[name] = (model, path, shape)
    return out


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_match_torch_and_onnxruntime(exported, name: str) -> None:
    model, path, shape = exported[name]
    module = load_onnx_module(path)
    assert isinstance(module, OnnxGraphModule)
    for batch in (2, 5):  # 5: a batch size other than the exported one
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            got, want = module(x), model(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
        np.testing.assert_allclose(got.numpy(), _ort(path, x), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_gradients_reach_the_input(exported, name: str) -> None:
    model, path, shape = exported[name]
    module = load_onnx_module(path)
    x = torch.rand(3, *shape)
    weights = torch.randn(model(x).shape)

    xs = x.clone().requires_grad_(True)
    (module(xs) * weights).sum().backward()
    xt = x.clone().requires_grad_(True)
    (model(xt) * weights).sum().backward()

    assert xs.grad is not None and torch.isfinite(xs.grad).all() and xs.grad.abs().sum() > 0
    torch.testing.assert_close(xs.grad, xt.grad, atol=1e-4, rtol=1e-3)
    assert not list(module.parameters()), "weights are frozen buffers"


@pytest.mark.parametrize("name", list(MODELS))
def test_dynamo_export_matches(exported, tmp_path: Path, name: str) -> None:
    # The torch.export-based exporter (the default since torch 2.9) emits opset-18 forms:
    # axes as inputs, Split with num_outputs, no Constant nodes.
    model, _, shape = exported[name]
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, *shape),), str(path), dynamo=True, opset_version=18,
                          input_names=["x"], verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    module = load_onnx_module(path)
    x = torch.randn(3, *shape, requires_grad=True)
    got = module(x)
    torch.testing.assert_close(got, model(x), atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(got.detach().numpy(), _ort(path, x.detach()), atol=ATOL, rtol=1e-4)
    got.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_buffers_follow_to_and_state_dict(exported) -> None:
    model, path, shape = exported["cnn"]
    module = load_onnx_module(path)
    state = module.state_dict()
    assert state and all("." not in k for k in state)
    module = module.to(torch.float64)
    x = torch.randn(2, *shape, dtype=torch.float64)
    with torch.no_grad():
        got = module(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, model.double()(x), atol=1e-8, rtol=1e-8)
    model.float()


def test_input_shape(exported) -> None:
    assert onnx_input_shape(exported["cnn"][1]) == (None, 3, 32, 32)


# --- single-node graphs built by hand, for op variants torch.onnx.export rarely emits ---------------

def _single_node(path: Path, op: str, x_shape: list[int], consts: dict[str, np.ndarray],
                 opset: int = 17, n_outputs: int = 1, **attrs) -> Path:
    """Graph ``Y = op(X, *consts)``; several outputs are concatenated (reversed) along axis 0."""
    inits = [numpy_helper.from_array(v, name) for name, v in consts.items()]
    outs = [f"o{k}" for k in range(n_outputs)]
    nodes = [helper.make_node(op, ["X", *consts], outs if n_outputs > 1 else ["Y"], **attrs)]
    if n_outputs > 1:
        nodes.append(helper.make_node("Concat", outs[::-1], ["Y"], axis=0))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(model, str(path))
    return path


def _i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def _f32(*v: float) -> np.ndarray:
    return np.array(v, dtype=np.float32)


_W = np.random.default_rng(0).standard_normal((4, 2, 3, 3)).astype(np.float32)
CASES = {
    "conv_same_upper": ("Conv", [1, 4, 9, 8], {"W": _W, "B": _f32(1, 2, 3, 4)},
                        dict(auto_pad="SAME_UPPER", strides=[2, 2], group=2)),
    "conv_asym_dilated": ("Conv", [1, 4, 9, 8], {"W": _W},
                          dict(pads=[0, 1, 2, 0], dilations=[2, 1], group=2)),
    "maxpool_asym": ("MaxPool", [1, 2, 7, 8], {}, dict(kernel_shape=[3, 2], pads=[0, 1, 2, 1])),
    "maxpool_same_lower": ("MaxPool", [1, 2, 7, 8], {},
                           dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER")),
    "avgpool_asym_exclude": ("AveragePool", [1, 2, 7, 8], {},
                             dict(kernel_shape=[3, 3], pads=[1, 0, 2, 1], count_include_pad=0)),
    "avgpool_asym_include": ("AveragePool", [1, 2, 7, 8], {},
                             dict(kernel_shape=[3, 3], pads=[1, 0, 2, 1], count_include_pad=1)),
    "resize_nearest_half_pixel": ("Resize", [1, 2, 5, 6], {"roi": _f32(), "scales": _f32(1, 1, 1.5, 0.7)},
                                  dict(mode="nearest")),
    "resize_linear_asymmetric": ("Resize", [1, 2, 5, 6], {"roi": _f32(), "scales": _f32(1, 1, 2.5, 1.5)},
                                 dict(mode="linear", coordinate_transformation_mode="asymmetric")),
    "resize_linear_sizes": ("Resize", [1, 2, 5, 6],
                            {"roi": _f32(), "scales": _f32(), "sizes": _i64(1, 2, 3, 11)},
                            dict(mode="linear")),
    "slice_negative_step": ("Slice", [2, 3, 7],
                            {"s": _i64(-1, 5), "e": _i64(-100, 0), "a": _i64(2, 0), "t": _i64(-2, -1)}, {}),
    "gemm_trans": ("Gemm", [5, 3], {"B": np.ones((4, 5), np.float32), "C": _f32(1, 2, 3, 4)},
                   dict(transA=1, transB=1, alpha=0.5, beta=2.0)),
    "reduce_mean_axes_input": ("ReduceMean", [2, 3, 4], {"axes": _i64(-1, 0)}, dict(keepdims=0), 18),
    "reduce_l2": ("ReduceL2", [2, 3, 4], {}, dict(axes=[1])),
    "pad_edge_negative": ("Pad", [1, 2, 4, 5], {"p": _i64(0, 0, 2, -1, 0, 0, 1, 2)}, dict(mode="edge")),
    "softmax_opset11": ("Softmax", [2, 3, 4], {}, dict(axis=1), 11),
    "unsqueeze_negative": ("Unsqueeze", [2, 3], {"axes": _i64(-1, 0)}, {}),
    "gather_negative": ("Gather", [4, 3], {"i": np.array([[-1, 0], [2, 1]], np.int64)}, dict(axis=0)),
    "expand_bidirectional": ("Expand", [3, 1], {"s": _i64(2, 1, 4)}, {}),
}
SPLIT_CASES = {  # several outputs
    "split_uneven_opset18": ("Split", [7, 2], {}, dict(axis=0, num_outputs=3), 18, 3),
    "split_sizes_input": ("Split", [6, 2], {"s": _i64(1, 5)}, dict(axis=0), 13, 2),
}


@pytest.mark.parametrize("case", list(CASES) + list(SPLIT_CASES))
def test_single_ops_match_onnxruntime(tmp_path: Path, case: str) -> None:
    op, shape, consts, attrs, *rest = {**CASES, **SPLIT_CASES}[case]
    opset = rest[0] if rest else 17
    n_out = rest[1] if len(rest) > 1 else 1
    path = _single_node(tmp_path / "m.onnx", op, shape, consts, opset, n_out, **attrs)
    x = torch.randn(shape)
    module = load_onnx_module(path)
    got = module(x.requires_grad_(True))
    np.testing.assert_allclose(got.detach().numpy(), _ort(path, x.detach()), atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# --- errors -----------------------------------------------------------------------------------------

def _save(path: Path, nodes: list, inputs: list[str]) -> Path:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in inputs],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_unsupported_ops_listed_at_load(tmp_path: Path) -> None:
    path = _save(tmp_path / "bad.onnx", [
        helper.make_node("Relu", ["X"], ["a"]),
        helper.make_node("NonZero", ["a"], ["b"]),
        helper.make_node("Det", ["b"], ["Y"]),
    ], ["X"])
    with pytest.raises(ModelError) as err:
        load_onnx_module(path)
    message = str(err.value)
    assert "NonZero" in message and "Det" in message and str(path) in message
    assert "Relu" not in message


def test_several_inputs_rejected(tmp_path: Path) -> None:
    path = _save(tmp_path / "two.onnx", [helper.make_node("Add", ["X", "Z"], ["Y"])], ["X", "Z"])
    with pytest.raises(ModelError, match="exactly one graph input"):
        load_onnx_module(path)
    with pytest.raises(ModelError, match="exactly one graph input"):
        onnx_input_shape(path)


@pytest.mark.parametrize("content", [b"this is not an ONNX model\n", bytes(range(256)) * 4, b""])
def test_non_onnx_file_rejected(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="junk.onnx"):
        load_onnx_module(path)


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_onnx_module(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="not found"):
        onnx_input_shape(tmp_path / "nope.onnx")


CONV_GEOMETRIES = {  # name: (in, out, kernel, stride, pads, dilation, group)
    "1x1": (8, 16, 1, 1, 0, 1, 1),
    "3x3": (8, 16, 3, 1, 1, 1, 1),
    "3x3-stride-2": (8, 16, 3, 2, 1, 1, 1),
    "7x7-stride-2": (3, 8, 7, 2, 3, 1, 1),
    "3x3-grouped": (8, 12, 3, 1, 1, 1, 4),
    "3x3-dilated": (8, 8, 3, 1, 2, 2, 1),
    "5x5-narrow-pad": (4, 6, 5, 1, 1, 1, 1),
    "1x1-stride-2": (8, 16, 1, 2, 0, 1, 1),
}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("case", list(CONV_GEOMETRIES))
def test_prepacked_conv_equals_torch_conv_and_its_input_gradient(case: str, layout: torch.memory_format) -> None:
    """float32 CPU convolutions run on weights reordered once for oneDNN, their input gradient as a
    convolution with the flipped weight (unit strides) or aten's (strided): both equal F.conv2d's."""
    from activeindex.extractors import onnx_graph

    cin, cout, k, stride, pad, dil, group = CONV_GEOMETRIES[case]
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(cout, cin // group, k, k, generator=g), torch.randn(cout, generator=g)
    x = torch.randn(2, cin, 11, 13, generator=g).contiguous(memory_format=layout)
    attrs = {"strides": [stride] * 2, "pads": [pad] * 4, "dilations": [dil] * 2, "group": group}
    grad_out = None
    results = []
    for run in (lambda t: onnx_graph._conv(None, [t, w, b], attrs),  # type: ignore[arg-type]
                lambda t: F.conv2d(t, w, b, stride, pad, dil, group)):
        for _ in range(2):  # the second call reuses the packed weights
            t = x.clone().requires_grad_(True)
            y = run(t)
            grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)) if grad_out is None else grad_out
            y.backward(grad_out)
        results.append((y.detach(), t.grad))
    assert "forward" in attrs["_packed"]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)


def _fusion_model(path: Path) -> Path:
    """Conv → Relu twice, Conv → Add (the residual: into the first Relu's output), Conv → uint8 Q/DQ
    pair, on 3×9×9."""
    rng = np.random.default_rng(0)
    w = {f"w{k}": rng.normal(size=(8, 3 if k == 1 else 8, 3, 3)).astype(np.float32) * 0.3 for k in (1, 2, 3, 4)}
    b = {f"b{k}": rng.normal(size=8).astype(np.float32) for k in (1, 2, 3)}
    conv = {"pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], **conv),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], **conv),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], **conv),
             helper.make_node("Add", ["r1", "c3"], ["s3"]),
             helper.make_node("Conv", ["s3", "w4"], ["c4"], strides=[2, 2], **conv),
             helper.make_node("QuantizeLinear", ["c4", "s", "z"], ["q4"]),
             helper.make_node("DequantizeLinear", ["q4", "s", "z"], ["y"])]
    inits = [numpy_helper.from_array(v, k) for k, v in {**w, **b}.items()]
    inits += [numpy_helper.from_array(np.float32(0.07), "s"), numpy_helper.from_array(np.uint8(100), "z")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_convolutions_fused_with_the_node_after_them(tmp_path: Path, layout: torch.memory_format) -> None:
    """Each Conv merges with the Relu, residual Add or Q/DQ pair that alone reads it; without
    autograd the pair runs as one oneDNN convolution with a post-op, and the numbers are exactly
    those of autograd mode, which runs the two ops; the Add's operand is overwritten, not the input."""
    path = _fusion_model(tmp_path / "fused.onnx")
    module = load_onnx_module(path)
    assert [n.op for n in module._nodes] == ["_ConvRelu", "_ConvRelu", "_ConvAdd", "_ConvFakeQuantize"]
    assert module._nodes[2].attrs.get("overwrite")
    x = torch.randn(3, 3, 9, 9, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=layout) * 3
    before = x.clone()
    with torch.no_grad():
        got = module(x)
    assert torch.equal(x, before)
    xr = x.clone().requires_grad_(True)
    want = module(xr)
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    # Some values saturate at each end of uint8 (the clamp the convolution now applies).
    assert (got == -100 * 0.07).any() and (got == 155 * 0.07).any()
    want.sum().backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x.contiguous().numpy()})[0]
    assert np.mean(np.abs(got.numpy() - ref) > 1e-4) < 0.02  # a value at a rounding tie moves one step
