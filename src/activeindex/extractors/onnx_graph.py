"""Run an ONNX graph as a differentiable ``torch.nn.Module``.

Active indexing optimises image pixels through the descriptor network, so the network must be a
PyTorch module that autograd can see through: onnxruntime gives outputs but no input gradients.
``onnx2torch`` does this conversion but imports torchvision, which does not load with the CPU torch
this package pins, so here is a small interpreter instead: initializers become buffers of the
module and :meth:`OnnxGraphModule.forward` executes the graph's nodes in order, each with
``torch`` / ``torch.nn.functional`` code written from the ONNX operator specification.

Speed (bench/onnx_speed.py measures it against onnxruntime): constants are folded at load,
per-tensor fake quantisation reads its scalars once, inference overwrites tensors nothing else
reads, and float32 CPU convolutions run on weights reordered once for oneDNN, not at every call.

Every op type of a graph is checked when it is loaded, so an unsupported model fails at once with
one :class:`~activeindex.errors.ModelError` naming all missing ops, not halfway through a run.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import Tensor

from activeindex.errors import ModelError

__all__ = ["GraphInput", "OnnxGraphModule", "dequantized_model", "graph_input", "load_onnx_module",
           "onnx_input_shape", "supported_ops"]

Value = Tensor | None
OpFn = Callable[["OnnxGraphModule", list[Value], dict[str, Any]], "Tensor | tuple[Tensor, ...]"]

_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.BOOL: torch.bool,
}


# ------------------------------------------------------------------------------------------------
# Loading


def _to_tensor(proto: onnx.TensorProto) -> Tensor:
    if proto.data_type not in _DTYPES:
        name = onnx.TensorProto.DataType.Name(proto.data_type)
        raise ModelError(f"tensor {proto.name!r} has unsupported element type {name}")
    array = numpy_helper.to_array(proto)
    dtype = _DTYPES[proto.data_type]
    if dtype == torch.bfloat16:  # numpy has no bfloat16: go through float32, which is exact
        return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(dtype)
    return torch.from_numpy(np.array(array, copy=True))  # copy: the proto's buffer is read-only


def _attr_value(attr: onnx.AttributeProto) -> Any:
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return _to_tensor(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value


def _constant_value(attrs: dict[str, Any]) -> Tensor:
    """The tensor a ``Constant`` node holds, whichever of its ``value*`` attributes is set."""
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise ModelError(f"Constant node with unsupported attributes {sorted(attrs)}")


def _read_model(path: str | os.PathLike, *, external_data: bool = True) -> onnx.ModelProto:
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: ONNX file not found")
    try:
        model = onnx.load(str(p), load_external_data=external_data)
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise ModelError(f"{p} is not a readable ONNX model: {exc}") from exc
    # Protobuf decodes many non-ONNX byte strings without complaint; an empty graph betrays them.
    if model.ir_version <= 0 or not model.graph.node or not model.graph.output:
        raise ModelError(f"{p} is not an ONNX model (no graph nodes or outputs)")
    return model


def _image_input(model: onnx.ModelProto, path: object) -> onnx.ValueInfoProto:
    """The one graph input that is fed at run time (older exporters also list initializers)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise ModelError(f"{path}: expected exactly one graph input (the image), found {names}")
    return inputs[0]


def onnx_input_shape(path: str | os.PathLike) -> tuple[int | None, ...]:
    """Declared shape of the model's input, e.g. ``(None, 3, 224, 224)``; ``None`` = symbolic dim."""
    model = _read_model(path, external_data=False)  # the weights are not needed for the shape
    dims = _image_input(model, path).type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


@dataclass(frozen=True)
class GraphInput:
    """What a graph expects as its image input, read from its declaration and its first nodes.

    - ``nhwc``: channels last, ``(B, H, W, 3)`` (else ``(B, 3, H, W)``);
    - ``integer``: declared as an integer type (uint8 pixels); the converter is fed the same values
      as float so that gradients reach them;
    - ``size``: the static square input size, ``None`` when symbolic (any size) or not square;
    - ``scale``: per-channel ``a`` of the affine map ``x * a + b`` the graph applies to its input
      before anything else (Cast/Transpose/Sub/Add/Mul/Div by constants), ``None`` when it starts
      with something else: then the graph expects input normalised outside.
    """

    nhwc: bool
    integer: bool
    size: int | None
    scale: tuple[float, ...] | None

    @property
    def pixels_0_255(self) -> bool:
        """Whether the graph wants pixel values 0..255 (uint8 input, or a float graph whose own
        normalisation divides by about 255: |a| ≈ 1/(0.23·255) rather than 1/0.23)."""
        if self.integer:
            return True
        return self.scale is not None and float(np.mean(np.abs(self.scale))) < 0.5


_NORMALISE_OPS = ("Sub", "Add", "Mul", "Div")


def graph_input(model: onnx.ModelProto, path: object = "<onnx>") -> GraphInput:
    """Layout, type, size and in-graph normalisation of a graph's image input (see GraphInput)."""
    value = _image_input(model, path)
    elem = value.type.tensor_type.elem_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}

    def constant(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return _constant_value({a.name: _attr_value(a) for a in consts[name].attribute}).numpy()
        return None

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    # Follow the single chain of elementwise/layout nodes the input goes through first.
    a, b, affine, transposed = np.ones(1), np.zeros(1), False, False
    current = value.name
    while len(readers := consumers.get(current, [])) == 1:
        n = readers[0]
        if n.op_type in ("Cast", "Identity"):
            pass
        elif n.op_type == "Transpose":
            perm = [int(v) for v in next((onnx.helper.get_attribute_value(t) for t in n.attribute
                                           if t.name == "perm"), [])]
            if perm != [0, 3, 1, 2]:
                break
            transposed = True
        elif n.op_type in _NORMALISE_OPS and len(n.input) == 2 and n.input[0] == current:
            c = constant(n.input[1])
            if c is None or c.size not in (1, 3):
                break
            c = c.astype(np.float64).reshape(-1)
            if n.op_type == "Sub":
                b = b - c
            elif n.op_type == "Add":
                b = b + c
            elif n.op_type == "Mul":
                a, b = a * c, b * c
            else:
                a, b = a / c, b / c
            affine = True
        else:
            break
        current = n.output[0]
    nhwc = len(dims) == 4 and (dims[3] == 3 and dims[1] != 3 or dims[1] is None and dims[3] is None
                              and transposed)
    h, w = (dims[1], dims[2]) if nhwc else (dims[2:4] if len(dims) == 4 else (None, None))
    return GraphInput(
        nhwc=bool(nhwc),
        integer=elem in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.UINT16,
                         onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64),
        size=int(h) if isinstance(h, int) and h == w and h > 0 else None,
        scale=tuple(float(v) for v in np.broadcast_to(a, (3,))) if affine else None,
    )


def load_onnx_module(path: str | os.PathLike, *, fake_quant: bool = True) -> OnnxGraphModule:
    """Load an ONNX file as a differentiable module.

    The graph must have a single non-initializer input, typically an image batch of shape
    ``(B, C, H, W)``; ``module(x)`` returns the graph's first output, e.g. descriptors of shape
    ``(B, D)``. Gradients flow from the output back to ``x``. The weights are buffers (not
    parameters), so ``.to(device)`` and ``.state_dict()`` work and nothing is trainable.

    Quantised graphs: weight ``DequantizeLinear`` and ``Cast`` nodes are folded into float buffers
    at load; each activation ``QuantizeLinear → DequantizeLinear`` pair runs as fake quantisation
    (round + clamp, straight-through gradient). ``fake_quant=False`` clamps without rounding; it
    exists for ``bench/onnx_agreement.py``, which measures both against onnxruntime.

    Raises :class:`ModelError` if the file is missing, is not ONNX, has several inputs, or uses op
    types this converter lacks (all of them are listed).
    """
    return OnnxGraphModule(_read_model(path), source=str(path), fake_quant=fake_quant)


def dequantized_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float graph of a QDQ-quantised model: what onnxruntime runs as its fp32 reference.

    Each weight ``DequantizeLinear`` (and ``Cast`` of a constant: fp16 weights) becomes the float
    initializer it computes, and each activation
    ``QuantizeLinear → DequantizeLinear`` pair becomes the clamp to the range it can represent,
    ``Clip(x, (qmin - z)·s, (qmax - z)·s)`` (per axis: ``Max``/``Min`` with per-channel bounds;
    differing Q and DQ parameters: then ``Mul``/``Add`` to the DQ side's units). This is the
    converter's ``fake_quant=False`` graph, the quantised network less its rounding: the same
    convolutions on the same weights, and — unlike dropping the pairs — the same nonlinearity, since
    a quantised graph has no Relu nodes (the uint8 saturation is its ReLU) and would otherwise compute
    another function. Graphs without Q/DQ or constant Casts come back unchanged.

    Raises :class:`ModelError` for a Q/DQ that is neither (a Q not read only by DQs, a DQ of a
    non-constant that no Q feeds).
    """
    g = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*inferred.value_info, *inferred.input]
             if v.type.tensor_type.HasField("shape")}
    consts: dict[str, Tensor] = {t.name: _to_tensor(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = _constant_value({a.name: _attr_value(a) for a in n.attribute})
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def param(n: onnx.NodeProto, k: int) -> Tensor | None:
        if len(n.input) <= k or not n.input[k]:
            return None
        if n.input[k] not in consts:
            raise ModelError(f"{n.op_type} {n.name or n.output[0]!r}: scale/zero point {n.input[k]!r} "
                             "is computed in the graph; no float graph to compare with")
        return consts[n.input[k]]

    new_inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def constant(name: str, value: Tensor | np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    for n in g.node:
        if n.op_type in ("DequantizeLinear", "Cast") and n.input[0] in consts:
            attrs = {a.name: _attr_value(a) for a in n.attribute}
            fn = _dequantize_linear if n.op_type == "DequantizeLinear" else _cast
            w = fn(None, [consts[i] if i else None for i in n.input], attrs)  # type: ignore[arg-type]
            consts[n.output[0]] = w
            constant(n.output[0], w.numpy())
        elif n.op_type == "QuantizeLinear":
            if not all(r.op_type == "DequantizeLinear" for r in readers.get(n.output[0], [])):
                raise ModelError(f"QuantizeLinear {n.name or n.output[0]!r} is read by other ops than "
                                 "DequantizeLinear: no float graph to compare with")
        elif n.op_type == "DequantizeLinear":
            q = producer.get(n.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                raise ModelError(f"DequantizeLinear {n.name or n.output[0]!r} of a non-constant that no "
                                 "QuantizeLinear feeds: no float graph to compare with")
            qa = {a.name: _attr_value(a) for a in q.attribute}
            da = {a.name: _attr_value(a) for a in n.attribute}
            s, zq = param(q, 1), param(q, 2)
            s2, zd = param(n, 1), param(n, 2)
            assert s is not None and s2 is not None
            lo, hi = _quant_range(_quant_dtype(zq, qa.get("output_dtype", 0)))
            zq_f = torch.zeros(()) if zq is None else zq.double()
            zd_f = torch.zeros(()) if zd is None else zd.double()
            lo_t, hi_t = ((lo - zq_f) * s.double()).float(), ((hi - zq_f) * s.double()).float()
            base, x = n.output[0], q.input[0]
            gain, offset = s2.double() / s.double(), (zq_f - zd_f) * s2.double()
            same = bool((gain == 1).all() and (offset == 0).all())
            out = base if same else base + "/clamped"
            if lo_t.dim() == 0:
                nodes.append(onnx.helper.make_node("Clip", [x, constant(base + "/lo", lo_t.numpy()),
                                                            constant(base + "/hi", hi_t.numpy())], [out]))
            else:  # per axis: bounds shaped to broadcast along the axis (Clip takes scalars only)
                axis = qa.get("axis", 1)
                if axis >= 0:  # numpy broadcasting aligns on the right: it needs the rank
                    if x not in ranks:
                        raise ModelError(f"per-axis QuantizeLinear {q.name or x!r}: rank of {x!r} unknown")
                    axis -= ranks[x]
                shape = [-1] + [1] * (-axis - 1)
                nodes.append(onnx.helper.make_node("Max", [x, constant(base + "/lo", lo_t.reshape(shape).numpy())],
                                                   [base + "/max"]))
                nodes.append(onnx.helper.make_node("Min", [base + "/max", constant(base + "/hi", hi_t.reshape(shape).numpy())],
                                                   [out]))
            if not same:
                nodes.append(onnx.helper.make_node("Mul", [out, constant(base + "/gain", gain.float().numpy())],
                                                   [base + "/scaled"]))
                nodes.append(onnx.helper.make_node("Add", [base + "/scaled", constant(base + "/offset", offset.float().numpy())],
                                                   [base]))
        else:
            nodes.append(n)
    used = {i for n in nodes for i in n.input}
    inits = [t for t in g.initializer if t.name in used] + [t for t in new_inits if t.name in used]
    graph = onnx.helper.make_graph(nodes, g.name, list(g.input), list(g.output), inits,
                                   value_info=list(g.value_info))
    out_model = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    out_model.ir_version = model.ir_version
    return out_model


def supported_ops() -> frozenset[str]:
    """ONNX op types (default domain) that :class:`OnnxGraphModule` can execute."""
    return frozenset(_OPS) | {"Constant"}


class _Node:
    __slots__ = ("op", "fn", "inputs", "outputs", "attrs", "drop")

    def __init__(self, op: str, fn: OpFn, inputs: list[str], outputs: list[str],
                 attrs: dict[str, Any]) -> None:
        self.op, self.fn, self.inputs, self.outputs, self.attrs = op, fn, inputs, outputs, attrs
        self.drop: list[str] = []  # values last used by this node, freed after it to save memory


class OnnxGraphModule(torch.nn.Module):
    """An ONNX graph executed node by node with differentiable torch ops.

    ``forward(x)`` maps the graph's input (e.g. ``(B, 3, H, W)`` float) to its first output.
    """

    def __init__(self, model: onnx.ModelProto, source: str = "<onnx>", *, fake_quant: bool = True) -> None:
        super().__init__()
        graph = model.graph
        self.source = source
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.input_name = _image_input(model, source).name
        self.graph_input = graph_input(model, source)
        self.output_names = [o.name for o in graph.output]

        unsupported = sorted({_op_key(n) for n in graph.node if _op_key(n) not in supported_ops()}
                             | {f"{n.op_type}({why})" for n in graph.node if (why := _variant(n))})
        if unsupported:
            raise ModelError(f"{source}: unsupported ONNX op types: {', '.join(unsupported)}")

        constants: dict[str, Tensor] = {init.name: _to_tensor(init) for init in graph.initializer}
        nodes: list[_Node] = []
        known = {self.input_name, ""} | set(constants)
        for n in graph.node:
            attrs = {a.name: _attr_value(a) for a in n.attribute}
            if n.op_type == "Constant":
                constants[n.output[0]] = _constant_value(attrs)
                known.add(n.output[0])
                continue
            missing = [i for i in n.input if i not in known]
            if missing:
                raise ModelError(f"{source}: node {n.name or n.op_type} reads undefined values "
                                 f"{missing} (graph not topologically sorted?)")
            if n.op_type == "Split" and "split" not in attrs and (len(n.input) < 2 or not n.input[1]):
                attrs.setdefault("num_outputs", len(n.output))  # even split into all outputs
            nodes.append(_Node(n.op_type, _OPS[n.op_type], list(n.input), list(n.output), attrs))
            known.update(n.output)
        if missing := [o for o in self.output_names if o not in known]:
            raise ModelError(f"{source}: graph outputs {missing} are never computed")

        self.fake_quant = fake_quant
        nodes = _fuse_quantize_pairs(nodes, constants, set(self.output_names), fake_quant)
        self._nodes = _fold_constants(self, nodes, constants)
        # An int8 graph has fixed its own precision: bf16 rounding ahead of each 8-bit rounding
        # flips quantisation levels (SSCD int8 on real photos: min cosine to onnxruntime 0.987 in
        # bf16 against 0.999 in fp32, bench/onnx_agreement.py). Precision.AUTO reads this.
        self.prefers_fp32 = any(n.op == "_FakeQuantize" for n in self._nodes)
        self._nodes = _fuse_conv_epilogues(self._nodes, set(self.output_names))

        # ONNX value name -> buffer attribute name, for the constants the remaining nodes read.
        # Buffers (not a dict of tensors) so that .to(), .half() and .state_dict() see the weights;
        # the int8 weights and fp16 originals of folded values are not kept.
        self._buffer_of: dict[str, str] = {}
        used = {name for node in self._nodes for name in node.inputs} | set(self.output_names)
        for name, value in constants.items():
            if name in used:
                self._add_constant(name, value)

        last_use: dict[str, int] = {}
        for i, node in enumerate(self._nodes):
            for name in node.inputs:
                last_use[name] = i
        for name, i in last_use.items():
            if name not in self._buffer_of and name not in self.output_names:
                self._nodes[i].drop.append(name)
        # Without autograd, a node may overwrite its first input when no later node reads it and
        # it is a tensor of its own (made by an op that always allocates, not a view of a value
        # still in use, not the caller's input): see _fake_quantize_scalar and _add.
        # _ConvAdd overwrites its last input (the other operand of the sum) instead.
        producer = {out: node.op for node in self._nodes for out in node.outputs}
        for i, node in enumerate(self._nodes):
            target = node.inputs[-1 if node.op == "_ConvAdd" else 0] if node.inputs else ""
            if (node.op in ("_FakeQuantize", "Add", "_ConvAdd") and target in producer and last_use[target] == i
                    and target not in self.output_names and node.inputs.count(target) == 1
                    and producer[target] in _FRESH_OUTPUT):
                node.attrs["overwrite"] = True

    def _add_constant(self, onnx_name: str, value: Tensor) -> None:
        base = re.sub(r"\W", "_", onnx_name).strip("_") or "const"
        if base[0].isdigit():
            base = "t_" + base
        name, k = base, 1
        while hasattr(self, name):  # clashes with other buffers or nn.Module attributes
            name, k = f"{base}_{k}", k + 1
        self.register_buffer(name, value)
        self._buffer_of[onnx_name] = name

    def forward(self, x: Tensor) -> Tensor:
        env: dict[str, Value] = {name: getattr(self, buf) for name, buf in self._buffer_of.items()}
        env[self.input_name] = x
        env[""] = None  # an omitted optional input
        for node in self._nodes:
            result = node.fn(self, [env[i] for i in node.inputs], node.attrs)
            if isinstance(result, Tensor):
                env[node.outputs[0]] = result
            else:
                env.update(zip(node.outputs, result))
            for name in node.drop:
                env.pop(name, None)
        return env[self.output_names[0]]  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"source={self.source!r}, opset={self.opset}, nodes={len(self._nodes)}"


def _fuse_quantize_pairs(nodes: list[_Node], constants: dict[str, Tensor], outputs: set[str],
                        fake_quant: bool) -> list[_Node]:
    """Replace each activation QuantizeLinear whose integer output only feeds DequantizeLinear
    nodes by one float ``_FakeQuantize`` node per consumer.

    Quantisation tools (onnxruntime's ``quantize_static``, PyTorch's QAT export) write every
    quantised activation as such a pair. Executed literally the pair passes through an integer
    tensor, which autograd cannot differentiate; fused, it is ``(clamp(round(x / s) + z) - z') * s'``
    in float with a straight-through gradient (see :func:`_fake_quantize`). A QuantizeLinear on a
    constant (a weight) is left alone: constant folding computes it once at load.
    """
    consumers: dict[str, list[_Node]] = {}
    for node in nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
    fused: dict[int, _Node] = {}  # id(DequantizeLinear node) -> its replacement
    dropped: set[int] = set()
    for q in nodes:
        if q.op != "QuantizeLinear" or q.inputs[0] in constants or q.outputs[0] in outputs:
            continue
        readers = consumers.get(q.outputs[0], [])
        if not readers or any(r.op != "DequantizeLinear" or r.inputs[0] != q.outputs[0] for r in readers):
            continue
        q_in = (q.inputs + ["", ""])[:3]
        for dq in readers:
            dq_in = (dq.inputs + ["", ""])[:3]
            attrs = {"q_axis": q.attrs.get("axis", 1), "dq_axis": dq.attrs.get("axis", 1),
                     "output_dtype": q.attrs.get("output_dtype", 0), "round": fake_quant}
            params = [*q_in[1:], *dq_in[1:]]
            if all(not name or name in constants and constants[name].numel() == 1 for name in params):
                # Per-tensor constants (every activation pair quantize_static writes): the numbers
                # are read once here, so forward runs four scalar passes and no per-call tensor
                # arithmetic (see _FakeQuantScalarFn).
                attrs["scalars"] = _fake_quant_scalars(*(constants[n] if n else None for n in params),
                                                       a=attrs)
                fused[id(dq)] = _Node("_FakeQuantize", _fake_quantize_scalar, [q_in[0]],
                                      list(dq.outputs), attrs)
            else:
                fused[id(dq)] = _Node("_FakeQuantize", _fake_quantize, [*q_in, dq_in[1], dq_in[2]],
                                      list(dq.outputs), attrs)
        dropped.add(id(q))
    return [fused.get(id(n), n) for n in nodes if id(n) not in dropped]


def _fold_constants(m: OnnxGraphModule, nodes: list[_Node], constants: dict[str, Tensor]) -> list[_Node]:
    """Evaluate once, at load, every node whose inputs are all constants; return the others.

    This is what turns weight ``DequantizeLinear`` (int8 → float) and ``Cast`` (fp16 → fp32) into
    plain float weights, so that ``forward`` does not repeat them for every batch. The results go
    into ``constants`` (computed without autograd: constants need no gradient).
    """
    kept = []
    with torch.no_grad():
        for node in nodes:
            if not all(name in constants for name in node.inputs if name):
                kept.append(node)
                continue
            result = node.fn(m, [constants[i] if i else None for i in node.inputs], node.attrs)
            results = (result,) if isinstance(result, Tensor) else result
            constants.update(zip(node.outputs, results))
    return kept


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _variant(node: onnx.NodeProto) -> str | None:
    """Why a supported op type is used in a way this converter does not implement, else None."""
    attrs = {a.name: _attr_value(a) for a in node.attribute if a.type != onnx.AttributeProto.TENSOR}
    op = node.op_type
    if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        return "Indices output"
    if op == "AveragePool" and any(d != 1 for d in attrs.get("dilations", [])):
        return "dilations"
    if op == "BatchNormalization" and attrs.get("training_mode", 0):
        return "training_mode"
    if op == "Resize":
        if attrs.get("mode", "nearest") not in ("nearest", "linear"):
            return f"mode={attrs['mode']}"
        if attrs.get("antialias", 0) or attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            return "antialias/keep_aspect_ratio_policy"
        if attrs.get("coordinate_transformation_mode", "half_pixel") not in _RESIZE_COORDS:
            return f"coordinate_transformation_mode={attrs['coordinate_transformation_mode']}"
    if op in ("QuantizeLinear", "DequantizeLinear") and attrs.get("block_size", 0):
        return "block_size"
    if op in ("Conv", "MaxPool", "AveragePool") and attrs.get("auto_pad", "NOTSET") not in _AUTO_PADS:
        return f"auto_pad={attrs['auto_pad']}"
    return None


# ------------------------------------------------------------------------------------------------
# Operators. Each takes (module, inputs, attrs) and returns a tensor or a tuple of tensors (one
# per node output). Integer "shape" values stay tensors and become Python ints only where torch
# needs them (.tolist()); they never touch the float path, so autograd is unaffected.

_OPS: dict[str, OpFn] = {}

# Ops whose output is always a new tensor (never a view or one of their inputs).
_FRESH_OUTPUT = frozenset({"Conv", "Add", "Gemm", "MatMul", "MaxPool", "AveragePool", "_FakeQuantize",
                           "_ConvFakeQuantize", "_ConvRelu", "_ConvAdd"})


def _op(*names: str) -> Callable[[OpFn], OpFn]:
    def register(fn: OpFn) -> OpFn:
        for name in names:
            _OPS[name] = fn
        return fn
    return register


def _ints(t: Value) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axes(x: Tensor, inputs: list[Value], attrs: dict[str, Any], pos: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or the input at ``pos`` (newer); None if absent."""
    if "axes" in attrs:
        axes = list(attrs["axes"])
    elif len(inputs) > pos and inputs[pos] is not None:
        axes = _ints(inputs[pos])
    else:
        return None
    return [a % max(x.dim(), 1) for a in axes]


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda m, i, a: fn(i[0])  # type: ignore[arg-type]


for _name, _fn in {
    "Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf,
    "HardSwish": F.hardswish, "Sqrt": torch.sqrt, "Neg": torch.neg, "Exp": torch.exp,
    "Log": torch.log, "Abs": torch.abs, "Reciprocal": torch.reciprocal, "Floor": torch.floor,
    "Ceil": torch.ceil, "Sin": torch.sin, "Cos": torch.cos, "Not": torch.logical_not,
    "Softplus": F.softplus, "Sign": torch.sign, "Identity": lambda x: x, "Dropout": lambda x: x,
}.items():
    _OPS[_name] = _unary(_fn)

@_op("Add")
def _add(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x, y = i[0], i[1]
    assert x is not None and y is not None
    # In place (no autograd, x read by nothing else, set at load) when x already has the result's
    # shape and type: a residual sum then allocates nothing.
    if (a.get("overwrite") and not torch.is_grad_enabled() and x.dtype == torch.result_type(x, y)
            and x.shape == torch.broadcast_shapes(x.shape, y.shape)):
        return x.add_(y)
    return torch.add(x, y)


for _name, _fn in {
    "Sub": torch.sub, "Mul": torch.mul, "Equal": torch.eq, "Less": torch.lt,
    "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge,
    "And": torch.logical_and, "Or": torch.logical_or, "MatMul": torch.matmul,
}.items():
    _OPS[_name] = (lambda f: lambda m, i, a: f(i[0], i[1]))(_fn)

for _name, _fn in {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add}.items():
    _OPS[_name] = (lambda f: lambda m, i, a: reduce(f, i))(_fn)  # variadic, broadcasting


@_op("Div")
def _div(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x, y = i[0], i[1]
    assert x is not None and y is not None
    if not x.is_floating_point() and not y.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")  # ONNX integer division truncates
    return x / y


@_op("Pow")
def _pow(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    return torch.pow(i[0], i[1]).to(i[0].dtype)  # type: ignore[union-attr]  # base's type


@_op("Mean")
def _mean(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    return reduce(torch.add, i) / len(i)  # type: ignore[arg-type]


@_op("LeakyRelu")
def _leaky_relu(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    return F.leaky_relu(i[0], a.get("alpha", 0.01))  # type: ignore[arg-type]


@_op("Elu")
def _elu(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    return F.elu(i[0], a.get("alpha", 1.0))  # type: ignore[arg-type]


@_op("PRelu")
def _prelu(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x, slope = i[0], i[1]
    return torch.where(x >= 0, x, x * slope)  # type: ignore[operator]  # slope broadcasts


@_op("HardSigmoid")
def _hard_sigmoid(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    # ONNX's default alpha (0.2) differs from torch's hardsigmoid (1/6): compute it directly.
    return (a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5)).clamp(0, 1)  # type: ignore[operator]


@_op("Gelu")
def _gelu(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    return F.gelu(i[0], approximate=a.get("approximate", "none"))  # type: ignore[arg-type]


@_op("Clip")
def _clip(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    lo = i[1] if len(i) > 1 else a.get("min")  # inputs since opset 11, attributes before
    hi = i[2] if len(i) > 2 else a.get("max")
    return i[0] if lo is None and hi is None else torch.clamp(i[0], lo, hi)  # type: ignore[arg-type]


@_op("Where")
def _where(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    return torch.where(i[0], i[1], i[2])  # type: ignore[arg-type]


@_op("Cast")
def _cast(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    return i[0].to(_DTYPES[a["to"]])  # type: ignore[union-attr]


@_op("CastLike")
def _cast_like(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    return i[0].to(i[1].dtype)  # type: ignore[union-attr]


@_op("Gemm")
def _gemm(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x, w = i[0], i[1]
    assert x is not None and w is not None
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (x @ w)
    if len(i) > 2 and i[2] is not None:
        y = y + a.get("beta", 1.0) * i[2]
    return y


# --- quantisation ---------------------------------------------------------------------------------
# Per tensor (scalar scale / zero point) and per axis (1-D scale / zero point along ``axis``),
# int8 / uint8 (and the wider integer types) with or without a zero point. Blocked quantisation
# (opset 21 ``block_size``) is refused at load by _variant.

def _along(v: Tensor, x: Tensor, axis: int) -> Tensor:
    """A scalar or per-axis (1-D) quantisation parameter, shaped to broadcast against ``x``."""
    if v.dim() == 0:
        return v
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return v.reshape(shape)


def _quant_dtype(zero_point: Value, output_dtype: int) -> torch.dtype:
    if zero_point is not None:
        return zero_point.dtype
    return _DTYPES.get(output_dtype, torch.uint8) if output_dtype else torch.uint8  # ONNX default


def _quant_range(dtype: torch.dtype) -> tuple[int, int]:
    if dtype.is_floating_point or dtype == torch.bool:
        raise ModelError(f"QuantizeLinear to {dtype} is not supported (integer types only)")
    info = torch.iinfo(dtype)
    return info.min, info.max


@_op("QuantizeLinear")
def _quantize_linear(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    """An integer tensor, as ONNX: saturate(round_half_even(x / scale) + zero_point). Not
    differentiable; activation pairs are fused into _fake_quantize instead."""
    x, scale, zp = (i + [None, None])[:3]
    assert x is not None and scale is not None
    axis = a.get("axis", 1)
    dtype = _quant_dtype(zp, a.get("output_dtype", 0))
    lo, hi = _quant_range(dtype)
    q = torch.round(x.float() / _along(scale.float(), x, axis))
    if zp is not None:
        q = q + _along(zp, x, axis).float()
    return q.clamp(lo, hi).to(dtype)


@_op("DequantizeLinear")
def _dequantize_linear(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    """(x - zero_point) * scale in the scale's float type; the subtraction in int32 (exact, as
    onnxruntime does it, also for the int32 biases of quantised convolutions)."""
    x, scale, zp = (i + [None, None])[:3]
    assert x is not None and scale is not None
    axis = a.get("axis", 1)
    if not x.is_floating_point():
        x = x.to(torch.int32)
        if zp is not None:
            x = x - _along(zp.to(torch.int32), x, axis)
    elif zp is not None:
        x = x - _along(zp, x, axis).to(x.dtype)
    return x.to(scale.dtype) * _along(scale, x, axis)


class _FakeQuantFn(torch.autograd.Function):
    """y = (clamp(round(x / s), lo - z, hi - z) + (z - z')) * s' in a few in-place passes.

    Adding the zero point after rounding is ONNX's order (round half to even, then + z); clamping
    ``round(x / s)`` to ``[lo - z, hi - z]`` is the same as clamping ``round(x / s) + z`` to
    ``[lo, hi]`` and saves a pass. A custom Function rather than a chain of differentiable ops:
    autograd would keep every intermediate (``torch.fake_quantize_per_tensor_affine`` measured
    slower still, and multiplies by 1/s where ONNX divides).

    The general form: tensor parameters, per axis or computed in the graph. Pairs with per-tensor
    constants (all of SSCD's) take :class:`_FakeQuantScalarFn`, the same numbers with scalar
    operands and a gradient that needs no mask.

    Backward: straight-through for the rounding, times s'/s, zero where the value saturated.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, s: Tensor, lo: Tensor, hi: Tensor, shift: Tensor | None,
                s_out: Tensor, rounding: bool) -> Tensor:
        q = torch.div(x, s)
        if rounding:
            q.round_()
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward((q >= lo) & (q <= hi), s_out / s)
        q.clamp_(lo, hi)  # tensor bounds: per tensor (0-d) or per channel, in one pass
        if shift is not None:
            q.add_(shift)
        return q.mul_(s_out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        inside, gain = ctx.saved_tensors
        return grad * inside * gain, None, None, None, None, None, None


def _fake_quantize(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    """A fused QuantizeLinear → DequantizeLinear pair on float activations (see
    :func:`_fuse_quantize_pairs`): the numbers of the integer round trip, computed in float32
    (float64 for a float64 input).

    Gradient: straight-through for the rounding, zero where the value saturates — the derivative of
    the clamp. The saturation matters: quantised graphs (SSCD's int8 export among them) drop their
    Relu nodes because uint8's lower bound at the zero point *is* the ReLU. With ``round=False``
    (measurement only) the rounding is skipped and only the clamp remains.
    """
    x, q_scale, q_zp, dq_scale, dq_zp = i
    assert x is not None and q_scale is not None and dq_scale is not None
    lo, hi = _quant_range(_quant_dtype(q_zp, a["output_dtype"]))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64: gradcheck
    xf = x.to(dtype)
    s = _along(q_scale.to(dtype), xf, a["q_axis"])
    zero = torch.zeros((), dtype=dtype, device=xf.device)
    zq = zero if q_zp is None else _along(q_zp, xf, a["q_axis"]).to(dtype)
    zd = zero if dq_zp is None else _along(dq_zp, xf, a["dq_axis"]).to(dtype)
    shift = None if dq_zp is q_zp or torch.equal(zq, zd) else zq - zd
    # The clamp bounds broadcast like the zero point: scalars per tensor, a channel axis per axis.
    return _FakeQuantFn.apply(xf, s, lo - zq, hi - zq, shift,
                              _along(dq_scale.to(dtype), xf, a["dq_axis"]), bool(a["round"]))


@dataclass(frozen=True)
class _FakeQuantScalars:
    """A per-tensor Q→DQ pair as Python numbers (read once at load from the graph's constants)."""

    scale: float  # s of QuantizeLinear (its float32 value)
    lo: float  # qmin - z: the lowest level of round(x / s), zero point taken out
    hi: float  # qmax - z
    shift: float  # z - z' (0 when both zero points are equal, as quantisation tools write them)
    out_scale: float  # s' of DequantizeLinear
    rounding: bool  # False: clamp only (bench/onnx_agreement.py's comparison)


def _fake_quant_scalars(q_scale: Tensor, q_zp: Value, dq_scale: Tensor, dq_zp: Value, *,
                        a: dict[str, Any]) -> _FakeQuantScalars:
    lo, hi = _quant_range(_quant_dtype(q_zp, a["output_dtype"]))
    zq = 0 if q_zp is None else int(q_zp.reshape(()).item())
    zd = 0 if dq_zp is None else int(dq_zp.reshape(()).item())
    return _FakeQuantScalars(scale=float(q_scale.reshape(()).float()), lo=float(lo - zq),
                             hi=float(hi - zq), shift=float(zq - zd),
                             out_scale=float(dq_scale.reshape(()).float()), rounding=bool(a["round"]))


def _fake_quant_passes_(q: Tensor, p: _FakeQuantScalars, clamp: bool = True) -> Tensor:
    """``q`` holds ``x / s``; finish the round trip in place: round half to even (``torch.round``,
    ONNX's rule), clamp to the integer range (``clamp=False``: ``x`` was clamped to it already, see
    :func:`_conv_fake_quantize`), shift, scale. Scalar operands: no broadcasting."""
    if p.rounding:
        q.round_()
    if clamp:
        q.clamp_(p.lo, p.hi)  # clamp(round(v)) == round(clamp(v)): the bounds are integers
    if p.shift:
        q.add_(p.shift)
    return q.mul_(p.out_scale)


class _FakeQuantScalarFn(torch.autograd.Function):
    """Per-tensor fake quantisation, ``(clamp(round(x / s), qmin - z, qmax - z) + z - z') * s'``.

    Forward: one new tensor and four scalar passes. It divides by ``s`` as ONNX does (and
    onnxruntime's QuantizeLinear); ``torch.fake_quantize_per_tensor_affine`` multiplies by
    ``1 / s`` instead, which moves a value near a rounding tie to the other level, and its CPU
    kernel is a scalar loop, about 4× slower here than these passes (SSCD's activation shapes).

    Backward: straight-through for the rounding, zero where ``round(x / s)`` saturates, times
    ``s' / s``: ``hardtanh_backward`` on the saved input with the bounds ``(qmin - z ∓ ½) · s`` in
    input units — one pass, nothing computed for it in forward (the old mask cost three). It keeps
    the pre-quantisation input alive until backward (4 bytes per value instead of a 1-byte mask);
    the two agree except for an input within an ulp of a half-level bound.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, p: _FakeQuantScalars) -> Tensor:
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x)
            ctx.p = p
        return _fake_quant_passes_(torch.div(x, p.scale), p)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        p = ctx.p
        half = 0.5 if p.rounding else 0.0
        g = torch.ops.aten.hardtanh_backward(grad, x, (p.lo - half) * p.scale, (p.hi + half) * p.scale)
        gain = p.out_scale / p.scale
        return (g if gain == 1.0 else g.mul_(gain)), None


def _fake_quantize_scalar(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    """A fused Q/DQ pair with per-tensor constant parameters (``a["scalars"]``); same numbers and
    gradient as :func:`_fake_quantize`. Without autograd, an input nothing else reads (``a``'s
    ``overwrite``, set at load) is quantised in place: no new tensor, whose first touch (page
    faults) costs about one more pass over it."""
    x = i[0]
    assert x is not None
    p: _FakeQuantScalars = a["scalars"]
    if x.dtype not in (torch.float32, torch.float64):  # bf16/fp16 activations: float32 as ONNX
        x = x.float()
    elif a.get("overwrite") and not torch.is_grad_enabled():
        return _fake_quant_passes_(x.div_(p.scale), p)
    return _FakeQuantScalarFn.apply(x, p)

# --- convolution and pooling --------------------------------------------------------------------

_AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")


def _pads(x: Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
          a: dict[str, Any]) -> list[tuple[int, int]]:
    """(begin, end) padding of each spatial dim, from ``pads`` or ``auto_pad``."""
    n = len(kernel)
    mode = a.get("auto_pad", "NOTSET")
    if mode == "NOTSET":
        pads = list(a.get("pads", [0] * 2 * n))
        return list(zip(pads[:n], pads[n:]))
    if mode == "VALID":
        return [(0, 0)] * n
    out = []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
        # SAME: output size ceil(in / stride); the odd pixel goes at the end (UPPER) or start.
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        out.append((small, total - small) if mode == "SAME_UPPER" else (total - small, small))
    return out


def _torch_pad(pads: Sequence[tuple[int, int]]) -> list[int]:
    """Per-dim (begin, end) pairs, first dim first → F.pad's flat list, last dim first."""
    return [p for pair in reversed(pads) for p in pair]


def _symmetric(pads: Sequence[tuple[int, int]]) -> bool:
    return all(b == e for b, e in pads)


def _conv_args(x: Tensor, w: Tensor, a: dict[str, Any]) -> tuple[Tensor, list[int], list[int], list[int], int]:
    """(input, padded beforehand where ONNX pads asymmetrically; strides; padding; dilations; groups)."""
    n = w.dim() - 2
    strides = a.get("strides", [1] * n)
    dilations = a.get("dilations", [1] * n)
    pads = _pads(x, w.shape[2:], strides, dilations, a)
    if not _symmetric(pads):  # torch convs only pad symmetrically
        x, pads = F.pad(x, _torch_pad(pads)), [(0, 0)] * n
    return x, list(strides), [b for b, _ in pads], list(dilations), a.get("group", 1)


def _weight_cache(a: dict[str, Any]) -> _WeightCache:
    cache = a.get("_packed")
    if cache is None:
        cache = a["_packed"] = _WeightCache()
    return cache


@_op("Conv")
def _conv(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x, w = i[0], i[1]
    assert x is not None and w is not None
    bias = i[2] if len(i) > 2 else None
    x, strides, padding, dilations, groups = _conv_args(x, w, a)
    if _prepacked_conv_applies(x, w, bias):
        geometry = (tuple(strides), tuple(padding), tuple(dilations), groups)
        return _PrepackedConvFn.apply(x, w, bias, geometry, _weight_cache(a))
    conv = (F.conv1d, F.conv2d, F.conv3d)[w.dim() - 3]
    return conv(x, w, bias, strides, padding, dilations, groups)


# --- a convolution and the one node that reads its output, as one oneDNN call -----------------------
# Without autograd, the elementwise node after a convolution runs inside it as a oneDNN post-op, on
# the output while it is still in registers: a ReLU (MobileNet's), the residual sum (written into
# the other operand, which nothing reads afterwards), or the clamp of a fake quantisation (SSCD's
# int8 graph: every convolution is followed by one), whose division, rounding and scaling then
# remain as passes. Each saves a pass over the output (and the sum an allocation). With autograd,
# or where the prepacked convolution does not apply, the pair runs as the two nodes did.


def _conv_inference(i: list[Value], a: dict[str, Any], post: str = "none", scalars: Sequence[float] = (),
                    other: Value = None) -> Tensor | None:
    """A float32 CPU convolution on prepacked weights, without autograd, with the oneDNN post-op
    ``post`` (``"relu"``, ``"hardtanh"`` with ``scalars`` = (min, max)) or, given ``other``, with
    ``other`` added into ``other`` itself (a binary post-op: ``other += conv(x)``, returned).
    None where that does not apply (autograd, another device or dtype, ``other`` not of the
    output's shape and layout): the caller then runs the unfused ops."""
    x, w = i[0], i[1]
    assert x is not None and w is not None
    bias = i[2] if len(i) > 2 else None
    if torch.is_grad_enabled():
        return None
    x, strides, padding, dilations, groups = _conv_args(x, w, a)
    if not _prepacked_conv_applies(x, w, bias):
        return None
    geometry = (tuple(strides), tuple(padding), tuple(dilations), groups)
    packed = _packed_weight(_weight_cache(a), "forward", w, x.shape, geometry)
    if other is None:
        return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, padding, strides, dilations, groups,
                                                       post, list(scalars), "")
    out_shape = [x.shape[0], w.shape[0]] + [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(x.shape[2:], w.shape[2:], strides, padding, dilations)]
    # oneDNN writes the output in the input's layout (channels-last in, channels-last out).
    layout = torch.channels_last if not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format
    if (list(other.shape) != out_shape or other.dtype != torch.float32 or other.device != x.device
            or not other.is_contiguous(memory_format=layout)):
        return None
    return torch.ops.mkldnn._convolution_pointwise_.binary(other, x, packed, bias, padding, strides, dilations,
                                                           groups, "add", None, None, [], None)


def _conv_clamp_bounds(p: _FakeQuantScalars) -> tuple[float, float] | None:
    """Bounds ``(a, b)`` in the convolution's output units such that fake quantisation of
    ``clamp(x, a, b)`` without its own clamp equals fake quantisation of ``x``: float32 ``qmin · s``
    and ``qmax · s``, where they come back to ``qmin`` and ``qmax`` through the division (and
    rounding); else None (the pair is not fused). Division is monotonic, so every ``x`` between
    them lands between the integer bounds, and every ``x`` beyond them on the bound."""
    s = torch.tensor(p.scale, dtype=torch.float32)
    a, b = torch.tensor(p.lo * p.scale, dtype=torch.float32), torch.tensor(p.hi * p.scale, dtype=torch.float32)
    back = (lambda v: torch.round(v / s)) if p.rounding else (lambda v: v / s)
    if back(a).item() != p.lo or back(b).item() != p.hi:
        return None
    return float(a), float(b)


def _conv_fake_quantize(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    """Conv → per-tensor fake quantisation (``a["fq"]``: the quantisation node's attributes)."""
    p: _FakeQuantScalars = a["fq"]["scalars"]
    y = _conv_inference(i, a, "hardtanh", a["clamp"])
    if y is not None:
        return _fake_quant_passes_(y.div_(p.scale), p, clamp=False)
    return _fake_quantize_scalar(m, [_conv(m, i, a)], a["fq"])  # a["fq"] may overwrite: fresh output


def _conv_relu(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    y = _conv_inference(i, a, "relu")
    if y is not None:
        return y
    y = _conv(m, i, a)
    return F.relu(y) if torch.is_grad_enabled() else y.relu_()


def _conv_add(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    """Conv → Add; ``i`` is the convolution's inputs, then the Add's other operand."""
    n = a["conv_inputs"]
    other = i[n]
    if a.get("overwrite") and (y := _conv_inference(i[:n], a, other=other)) is not None:
        return y
    y = _conv(m, i[:n], a)
    return torch.add(y, other) if a["conv_first"] else torch.add(other, y)  # type: ignore[arg-type]


def _fuse_conv_epilogues(nodes: list[_Node], outputs: set[str]) -> list[_Node]:
    """Merge each Conv with the node that alone reads its output, when that node is a per-tensor
    fake quantisation (with exact clamp bounds, :func:`_conv_clamp_bounds`), a Relu or a two-input
    Add, into one node at the reader's place (see :func:`_conv_inference`)."""
    readers: dict[str, list[_Node]] = {}
    for node in nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    merged: dict[int, _Node] = {}  # id(reader) -> the fused node
    dropped: set[int] = set()
    for conv in nodes:
        out = conv.outputs[0]
        if conv.op != "Conv" or out in outputs or len(readers.get(out, [])) != 1:
            continue
        r = readers[out][0]
        if r.inputs.count(out) != 1:
            continue
        if r.op == "_FakeQuantize" and "scalars" in r.attrs and r.inputs[0] == out:
            if (bounds := _conv_clamp_bounds(r.attrs["scalars"])) is None:
                continue
            fused = _Node("_ConvFakeQuantize", _conv_fake_quantize, conv.inputs, r.outputs,
                          {**conv.attrs, "fq": {**r.attrs, "overwrite": True}, "clamp": bounds})
        elif r.op == "Relu":
            fused = _Node("_ConvRelu", _conv_relu, conv.inputs, r.outputs, dict(conv.attrs))
        elif r.op == "Add" and len(r.inputs) == 2:
            other = r.inputs[1 - r.inputs.index(out)]
            fused = _Node("_ConvAdd", _conv_add, [*conv.inputs, other], r.outputs,
                          {**conv.attrs, "conv_inputs": len(conv.inputs), "conv_first": r.inputs[0] == out})
        else:
            continue
        merged[id(r)] = fused
        dropped.add(id(conv))
    return [merged.get(id(n), n) for n in nodes if id(n) not in dropped]


# --- 2-D float32 convolutions on a CPU with prepacked weights ---------------------------------------
# F.conv2d hands oneDNN plain (OIHW) weights, which it reorders into its blocked layout at every call:
# per SSCD forward, 53 reorders of 100 MB of weights, 19 % of the convolution time measured on this
# project's shared 2-core CPU (ONEDNN_VERBOSE). Here each weight is reordered once per input shape and
# kept (the graph's weights are constant buffers); the input gradient is a convolution too, with the
# flipped, transposed weight, likewise prepacked, for unit strides (every 3×3 and 1×1 of a ResNet
# block); strided ones use aten's convolution_backward.


class _WeightCache(dict):
    """One node's prepacked weights: derived from its buffers, so a copy of the module starts empty
    (oneDNN's opaque tensors cannot be copied)."""

    def __deepcopy__(self, memo: dict) -> _WeightCache:
        return _WeightCache()

    def __reduce__(self) -> tuple:
        return (_WeightCache, ())


def _prepacked_conv_applies(x: Tensor, w: Tensor, bias: Value) -> bool:
    return (x.device.type == "cpu" and w.dim() == 4 and x.dtype == w.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and not torch.is_autocast_enabled("cpu")
            and not w.requires_grad and (bias is None or bias.dtype == torch.float32 and not bias.requires_grad))


def _packed_weight(cache: dict[str, Any], slot: str, w: Tensor, x_shape: Sequence[int],
                   geometry: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]) -> Tensor:
    """``w`` in oneDNN's layout for inputs of ``x_shape``, reordered once and kept in ``cache``
    (the node's attributes) until the weight or the input's channels/size change. The batch size
    is left out of the key: the layout depends on the channels, and a last, smaller batch (or the
    service's slots running different batch sizes at once) must not re-pack at every call."""
    key = (w.data_ptr(), w._version, tuple(x_shape[1:]))
    hit = cache.get(slot)
    if hit is None or hit[0] != key:
        stride, padding, dilation, groups = geometry
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            w.contiguous().to_mkldnn(), list(padding), list(stride), list(dilation), groups, list(x_shape))
        cache[slot] = hit = (key, packed)
    return hit[1]


def _transposed_weight(w: Tensor, groups: int) -> Tensor:
    """The weight whose unit-stride convolution is the input gradient: (in, out/g, kh, kw), flipped."""
    o, i_g, kh, kw = w.shape
    w = w.reshape(groups, o // groups, i_g, kh, kw).transpose(1, 2).reshape(groups * i_g, o // groups, kh, kw)
    return w.flip(2, 3).contiguous()


class _PrepackedConvFn(torch.autograd.Function):
    """``F.conv2d`` on prepacked weights; gradient to the input only (the weights are constants)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, bias: Value, geometry: Any, cache: dict[str, Any]) -> Tensor:
        stride, padding, dilation, groups = geometry
        packed = _packed_weight(cache, "forward", w, x.shape, geometry)
        y = torch.ops.mkldnn._convolution_pointwise(x, packed, bias, list(padding), list(stride),
                                                    list(dilation), groups, "none", [], "")
        if ctx.needs_input_grad[0]:
            ctx.w, ctx.geometry, ctx.cache = w, geometry, cache
            # Unit strides: the gradient is a convolution of the output gradient (padding
            # d·(k-1) - p ≥ 0 recovers the input size); otherwise aten needs the input's shape/layout.
            ctx.as_conv = all(s == 1 for s in stride) and all(
                d * (k - 1) >= p for d, k, p in zip(dilation, w.shape[2:], padding))
            ctx.save_for_backward(None if ctx.as_conv else x)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        w, (stride, padding, dilation, groups) = ctx.w, ctx.geometry
        if not ctx.as_conv:
            (x,) = ctx.saved_tensors
            gx = torch.ops.aten.convolution_backward(grad, x, w, None, list(stride), list(padding),
                                                     list(dilation), False, [0, 0], groups,
                                                     [True, False, False])[0]
            return gx, None, None, None, None
        back_pad = tuple(d * (k - 1) - p for d, k, p in zip(dilation, w.shape[2:], padding))
        back = ((1, 1), back_pad, tuple(dilation), groups)
        cache = ctx.cache
        wt = cache.get("transposed")
        if wt is None or wt[0] != (w.data_ptr(), w._version):
            cache["transposed"] = wt = ((w.data_ptr(), w._version), _transposed_weight(w, groups))
        packed = _packed_weight(cache, "backward", wt[1], grad.shape, back)
        gx = torch.ops.mkldnn._convolution_pointwise(grad, packed, None, list(back_pad), [1, 1],
                                                     list(dilation), groups, "none", [], "")
        return gx, None, None, None, None


def _pool_args(
    x: Tensor, a: dict[str, Any]
) -> tuple[list[int], list[int], list[int], list[tuple[int, int]]]:
    kernel = list(a["kernel_shape"])
    n = len(kernel)
    strides = a.get("strides", [1] * n)
    dilations = a.get("dilations", [1] * n)
    return kernel, strides, dilations, _pads(x, kernel, strides, dilations, a)


@_op("MaxPool")
def _max_pool(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x = i[0]
    assert x is not None
    kernel, strides, dilations, pads = _pool_args(x, a)
    n = len(kernel)
    # torch pads symmetrically and at most half a kernel; otherwise pad with -inf beforehand.
    if not _symmetric(pads) or any(b > k // 2 for (b, _), k in zip(pads, kernel)):
        x, pads = F.pad(x, _torch_pad(pads), value=-math.inf), [(0, 0)] * n
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    return pool(x, kernel, strides, [b for b, _ in pads], dilations, bool(a.get("ceil_mode", 0)))


@_op("AveragePool")
def _avg_pool(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x = i[0]
    assert x is not None
    kernel, strides, _, pads = _pool_args(x, a)
    n = len(kernel)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    ceil, include = bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0))
    if _symmetric(pads) and all(b <= k // 2 for (b, _), k in zip(pads, kernel)):
        return pool(x, kernel, strides, [b for b, _ in pads], ceil, include)
    xp = F.pad(x, _torch_pad(pads))
    if include:
        return pool(xp, kernel, strides, 0, ceil)
    # Padding excluded from the count: window sum / number of real pixels in the window.
    ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(pads))
    return pool(xp, kernel, strides, 0, ceil) / pool(ones, kernel, strides, 0, ceil)


@_op("GlobalAveragePool")
def _global_avg_pool(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x = i[0]
    assert x is not None
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("GlobalMaxPool")
def _global_max_pool(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x = i[0]
    assert x is not None
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# --- normalisation --------------------------------------------------------------------------------

@_op("BatchNormalization")
def _batch_norm(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x, scale, bias, mean, var = i[:5]
    eps = a.get("epsilon", 1e-5)
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)  # type: ignore[arg-type]


@_op("InstanceNormalization")
def _instance_norm(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x, scale, bias = i[:3]
    eps = a.get("epsilon", 1e-5)
    return F.instance_norm(x, weight=scale, bias=bias, eps=eps)  # type: ignore[arg-type]


@_op("LayerNormalization")
def _layer_norm(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x, scale = i[0], i[1]
    assert x is not None and scale is not None
    bias = i[2] if len(i) > 2 else None
    shape = x.shape[a.get("axis", -1) % x.dim():]
    if scale.shape == shape and (bias is None or bias.shape == shape):
        return F.layer_norm(x, shape, scale, bias, a.get("epsilon", 1e-5))
    y = F.layer_norm(x, shape, eps=a.get("epsilon", 1e-5)) * scale  # scale/bias may broadcast
    return y if bias is None else y + bias


def _softmax_op(fn: Callable[..., Tensor]) -> OpFn:
    def run(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
        x = i[0]
        assert x is not None
        if m.opset >= 13:
            return fn(x, dim=a.get("axis", -1))
        # Before opset 13 the input is flattened to 2-D at `axis` and normalised per row.
        axis = a.get("axis", 1) % x.dim()
        return fn(x.reshape(math.prod(x.shape[:axis]), -1), dim=1).reshape(x.shape)
    return run


_OPS["Softmax"] = _softmax_op(torch.softmax)
_OPS["LogSoftmax"] = _softmax_op(torch.log_softmax)


# --- reductions -------------------------------------------------------------------------------------

def _reduce_op(fn: Callable[[Tensor, tuple[int, ...], bool], Tensor]) -> OpFn:
    def run(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
        x = i[0]
        assert x is not None
        axes = _axes(x, i, a, 1)  # attribute, or input 1 (ReduceSum opset 13, others opset 18)
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, tuple(axes), bool(a.get("keepdims", 1)))
    return run


for _name, _fn in {
    "ReduceMean": lambda x, d, k: x.mean(d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(d, keepdim=k),
    "ReduceProd": lambda x, d, k: reduce(lambda t, ax: t.prod(ax, keepdim=True), d, x)
    if k else reduce(lambda t, ax: t.prod(ax, keepdim=True), d, x).squeeze(d),
    "ReduceL1": lambda x, d, k: x.abs().sum(d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.linalg.vector_norm(x, 2, d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}.items():
    _OPS[_name] = _reduce_op(_fn)


# --- shapes and indexing ----------------------------------------------------------------------------

@_op("Shape")
def _shape(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x = i[0]
    assert x is not None
    dims = list(x.shape)[a.get("start", 0):a.get("end", x.dim())]  # slicing clamps like ONNX
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@_op("Size")
def _size(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    return torch.tensor(i[0].numel(), dtype=torch.int64, device=i[0].device)  # type: ignore[union-attr]


@_op("ConstantOfShape")
def _constant_of_shape(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    shape = i[0]
    assert shape is not None
    value = a.get("value", torch.zeros(1))
    return torch.full(_ints(shape), value.item(), dtype=value.dtype, device=shape.device)


@_op("Range")
def _range(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    start, limit, delta = i[0], i[1], i[2]
    assert start is not None and limit is not None and delta is not None
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype,
                        device=start.device)


@_op("Flatten")
def _flatten(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x = i[0]
    assert x is not None
    axis = a.get("axis", 1) % (x.dim() + 1)  # axis may equal the rank
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@_op("Reshape")
def _reshape(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x = i[0]
    assert x is not None
    shape = _ints(i[1])
    if not a.get("allowzero", 0):  # 0 = keep that input dim; -1 is inferred by torch as in ONNX
        shape = [x.shape[d] if s == 0 else s for d, s in enumerate(shape)]
    return x.reshape(shape)


@_op("Transpose")
def _transpose(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x = i[0]
    assert x is not None
    return x.permute(a.get("perm", list(reversed(range(x.dim())))))


@_op("Squeeze")
def _squeeze(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x = i[0]
    assert x is not None
    axes = _axes(x, i, a, 1)
    return x.squeeze() if axes is None else x.squeeze(tuple(axes))


@_op("Unsqueeze")
def _unsqueeze(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x = i[0]
    assert x is not None
    raw = a["axes"] if "axes" in a else _ints(i[1])
    rank = x.dim() + len(raw)  # negative axes count from the end of the *output*
    for axis in sorted(ax % rank for ax in raw):
        x = x.unsqueeze(axis)
    return x


@_op("Concat")
def _concat(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    return torch.cat([t for t in i if t is not None], dim=a["axis"])


@_op("Split")
def _split(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> tuple[Tensor, ...]:
    x = i[0]
    assert x is not None
    axis = a.get("axis", 0)
    sizes = a["split"] if "split" in a else _ints(i[1]) if len(i) > 1 and i[1] is not None else None
    if sizes is None:  # equal parts; the last one smaller if the dim does not divide evenly
        sizes = math.ceil(x.shape[axis] / a["num_outputs"])
    return tuple(torch.split(x, sizes, dim=axis))


@_op("Slice")
def _slice(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x = i[0]
    assert x is not None
    if "starts" in a:  # opset < 10
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends = _ints(i[1]), _ints(i[2])
        axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else None
        steps = _ints(i[4]) if len(i) > 4 and i[4] is not None else None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = x.shape[axis]
        start, end = start + size if start < 0 else start, end + size if end < 0 else end
        if step > 0:
            index = slice(min(max(start, 0), size), min(max(end, 0), size), step)
            x = x[(slice(None),) * (axis % x.dim()) + (index,)]
        else:  # torch has no negative-step slicing: gather the indices instead
            start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
            idx = torch.arange(start, end, step, device=x.device)
            x = x.index_select(axis, idx)
    return x


@_op("Gather")
def _gather(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x, idx = i[0], i[1]
    assert x is not None and idx is not None
    axis = a.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)  # ONNX allows negative indices
    out = x.index_select(axis, idx.reshape(-1).to(x.device))
    return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


@_op("GatherElements")
def _gather_elements(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x, idx = i[0], i[1]
    assert x is not None and idx is not None
    axis = a.get("axis", 0) % x.dim()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


@_op("Expand")
def _expand(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x = i[0]
    assert x is not None
    # Bidirectional broadcast: the target may have fewer dims or 1s where x is larger.
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(i[1]))))


@_op("Tile")
def _tile(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    return i[0].repeat(_ints(i[1]))  # type: ignore[union-attr]


@_op("Einsum")
def _einsum(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    return torch.einsum(a["equation"], *i)


@_op("Pad")
def _pad(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x = i[0]
    assert x is not None
    if "pads" in a:  # opset < 11
        pads, value, axes = list(a["pads"]), a.get("value", 0.0), None
    else:
        pads = _ints(i[1])
        value = i[2].item() if len(i) > 2 and i[2] is not None and i[2].numel() else 0.0
        axes = _axes(x, i, a, 3)
    axes = list(range(x.dim())) if axes is None else axes
    n = len(axes)
    per_dim = [(0, 0)] * x.dim()
    for axis, begin, end in zip(axes, pads[:n], pads[n:]):
        per_dim[axis] = (begin, end)
    while per_dim and per_dim[0] == (0, 0):  # F.pad's non-constant modes pad trailing dims only
        per_dim.pop(0)
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
            "wrap": "circular"}[a.get("mode", "constant")]
    if mode == "constant":
        return F.pad(x, _torch_pad(per_dim), value=value)
    return F.pad(x, _torch_pad(per_dim), mode=mode)


# --- Resize: implemented per axis from the spec's coordinate formulas, so every
# coordinate_transformation_mode / nearest_mode combination matches ONNX exactly. ---------------

_RESIZE_COORDS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
                  "tf_half_pixel_for_nn")


def _resize_coords(out: int, size: int, scale: float, mode: str, device: torch.device) -> Tensor:
    """Input coordinate of each output position along one axis.

    float32 like onnxruntime: nearest rounding of ties (e.g. 4.5) depends on it.
    """
    o = torch.arange(out, dtype=torch.float32, device=device)
    if mode == "half_pixel" or (mode == "pytorch_half_pixel" and out > 1):
        return (o + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return torch.zeros_like(o)
    if mode == "align_corners":
        return o * (size - 1) / (out - 1) if out > 1 else torch.zeros_like(o)
    if mode == "tf_half_pixel_for_nn":
        return (o + 0.5) / scale
    return o / scale  # asymmetric


_NEAREST = {
    "round_prefer_floor": lambda c: torch.ceil(c - 0.5),
    "round_prefer_ceil": lambda c: torch.floor(c + 0.5),
    "floor": torch.floor,
    "ceil": torch.ceil,
}


@_op("Resize")
def _resize(m: OnnxGraphModule, i: list[Value], a: dict[str, Any]) -> Tensor:
    x = i[0]
    assert x is not None
    scales = i[1] if m.opset < 11 else (i[2] if len(i) > 2 else None)  # opset 10: (X, scales)
    sizes = i[3] if len(i) > 3 else None
    axes = [ax % x.dim() for ax in a.get("axes", range(x.dim()))]
    out_sizes, factors = list(x.shape), [1.0] * x.dim()
    if sizes is not None and sizes.numel():
        for ax, s in zip(axes, _ints(sizes)):
            out_sizes[ax], factors[ax] = s, s / x.shape[ax]
    elif scales is not None:
        for ax, s in zip(axes, scales.tolist()):
            out_sizes[ax], factors[ax] = math.floor(x.shape[ax] * s), s
    ctm = a.get("coordinate_transformation_mode", "half_pixel")
    linear = a.get("mode", "nearest") == "linear"
    for ax in range(x.dim()):
        size, out = x.shape[ax], out_sizes[ax]
        if out == size and factors[ax] == 1.0:
            continue
        coords = _resize_coords(out, size, factors[ax], ctm, x.device)
        if not linear:
            idx = _NEAREST[a.get("nearest_mode", "round_prefer_floor")](coords)
            x = x.index_select(ax, idx.clamp(0, size - 1).long())
            continue
        coords = coords.clamp(0, size - 1)  # outside the image: the edge pixel
        lo = coords.floor()
        frac = (coords - lo).to(x.dtype).reshape([-1 if d == ax else 1 for d in range(x.dim())])
        lo = lo.long()
        hi = (lo + 1).clamp(max=size - 1)
        x = x.index_select(ax, lo) * (1 - frac) + x.index_select(ax, hi) * frac
    return x
