"""``python -m activeindex.datasets OUT -n N``: write synthetic images and print the rate.

A thin front end to :func:`activeindex.datasets.synthetic.make_images` (parse → call → print), e.g.::

    python -m activeindex.datasets data/train -n 20000 --seed 0 --size 256x256 --workers 2

Re-running the same command resumes: files already present are kept.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from activeindex.datasets.synthetic import make_images


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 256x256, got {text!r}") from None
    return w, h


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m activeindex.datasets", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write img_NNNNNN.png files into")
    parser.add_argument("-n", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="source seed (default 0)")
    parser.add_argument("--start", type=int, default=0, help="first index (default 0)")
    parser.add_argument("--size", type=_size, default=(256, 256), help="WIDTHxHEIGHT (default 256x256)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)

    present: list[int] = []

    def progress(count: int) -> None:
        if not present:
            present.append(count)  # the first call reports the files that were already there
        print(f"\r{count}/{args.n}", end="", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    try:
        make_images(args.out, args.n, seed=args.seed, size=args.size, workers=args.workers,
                    progress=progress, start=args.start)  # fmt: skip
    except ValueError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    made = args.n - present[0]
    print(f"\nwrote {made} images ({present[0]} already present) to {args.out} in {dt:.1f} s: "
          f"{made / dt if dt > 0 else 0.0:.1f} images/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
