"""Where activation's time goes: ms per image in each step of ``release_batch``, one run.

Run it from the repository root (after ``bench/activate.py``, whose cached images it reuses)::

    .venv/bin/python bench/activate_stages.py
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 .venv/bin/python bench/activate_stages.py

Wraps the steps of :func:`activeindex.activation.add.release_batch` with timers and runs it over
``--n`` of the bench's 256×256 (``--size``) reference files in batches of 16: describing (the originals and the
written files), the targets, the rank-1 check, the optimisation, and encoding + checking the files
(wall time; inside it, SSIM, PNG and PSNR as CPU time summed over the threads). Informational: the
figures move with the machine's load; ``bench/activate.py`` gives the ratio that counts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import activeindex.activation.add as add
import activeindex.activation.optimize as optimize
import activeindex.activation.release as release
from activeindex.activation.optimize import configure
from activeindex.extractors import create_extractor
from activeindex.hardware import machine_summary

sys.path.insert(0, str(Path(__file__).resolve().parent))
from activate import CACHE, build_collection  # noqa: E402  (the same collection and images)

STEPS = [(add, "describe_arrays"), (add, "compute_targets"), (add, "own_code_first"), (add, "_optimise"),
         (optimize, "_pad_batch"), (optimize, "jnd_heatmap"),
         (add, "_finalize_all"), (release, "ssim"), (release, "encode"), (release, "psnr")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--size", default="256x256", help="WxH of the reference files (as bench/activate.py --size)")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    print(f"machine: {machine_summary()}", flush=True)
    ex = create_extractor("builtin")
    coll, refs = build_collection(CACHE, ex, 1024, 1024, "IVF32,PQ32x8", (width, height))
    images = add.load_arrays(refs[: args.n], add.activation_limits())
    cfg = configure({}, ex)
    spent: dict[str, float] = {}
    for module, name in STEPS:
        fn = getattr(module, name)

        def timed(*a, __fn=fn, __name=name, **k):
            t = time.perf_counter()
            try:
                return __fn(*a, **k)
            finally:
                spent[__name] = spent.get(__name, 0.0) + time.perf_counter() - t

        setattr(module, name, timed)
    add.release_batch(ex, coll.index, images[:16], cfg)  # warm-up: caches, the bf16 check
    spent.clear()
    t0 = time.perf_counter()
    for start in range(0, len(images), 16):
        add.release_batch(ex, coll.index, images[start : start + 16], cfg)
    total = time.perf_counter() - t0
    n = len(images)
    print(f"release_batch over {n} files ({cfg.iterations} iterations): {1000 * total / n:.1f} ms per image")
    for name, seconds in spent.items():
        print(f"  {name:16s} {1000 * seconds / n:7.1f} ms/img")
    coll.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
