"""``make demo`` / ``python -m activeindex.demo``: the end-to-end story with what exists today.

make images → create a collection (train the index) → add references → query edited copies →
print recall@1 per edit and one query's matches. Runs on the embedded default descriptor in about a
minute on a 2-core CPU. Activation and the full evaluation protocol come with their own issues.
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from activeindex.collection import Collection
from activeindex.datasets.synthetic import write_synthetic_images
from activeindex.extractors import create_extractor
from activeindex.features import extract_paths

# A few common edits, to show retrieval of copies. The paper's full edit suite lives in its own module
# once the descriptor issue lands; these stay deliberately plain and explicit.
EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "identity": lambda im: im,
    "jpeg 50": lambda im: _jpeg(im, 50),
    "resize 0.5 (area)": lambda im: im.resize((round(im.width / 2**0.5), round(im.height / 2**0.5)), Image.BILINEAR),
    "brightness 1.5": lambda im: ImageEnhance.Brightness(im).enhance(1.5),
    "center crop 0.5 (area)": lambda im: _center_crop(im, 0.5),
}


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _center_crop(im: Image.Image, area: float) -> Image.Image:
    s = area**0.5
    w, h = round(im.width * s), round(im.height * s)
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((left, top, left + w, top + h))


def run(out: Path, n_train: int = 512, n_refs: int = 256, n_queries: int = 100) -> dict[str, float]:
    t0 = time.perf_counter()
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    say(f"activeindex demo → {out}")
    train = write_synthetic_images(out / "images" / "train", n_train, seed=0)
    refs = write_synthetic_images(out / "images" / "references", n_refs, seed=1)
    say(f"1. images: {len(train)} training + {len(refs)} references (procedural, 256×256)")

    extractor = create_extractor("builtin")
    trained = "trained" if extractor.trained else "UNTRAINED (no packaged weights yet)"
    say(f"2. model: {extractor.spec_string}, {extractor.dim}-d, {extractor.preprocessing.input_size} px, "
        f"{extractor.precision.value}, {trained}")

    coll_dir = out / "collection"
    shutil.rmtree(coll_dir, ignore_errors=True)
    xt = extract_paths(train, extractor).features
    factory = "IVF32,PQ16x8"
    coll = Collection.create(coll_dir, extractor, factory, xt, nprobe=1)
    say(f"3. collection: {factory}, trained on {len(xt)} descriptors")

    report = coll.add_images(refs)
    say(f"4. added {len(report.added)} references ({len(report.duplicates)} duplicates, "
        f"{len(report.failures)} unreadable)")
    ids = {name: i for i, name in report.added}

    query_dir = out / "queries"
    shutil.rmtree(query_dir, ignore_errors=True)
    recalls: dict[str, float] = {}
    say(f"5. querying {n_queries} edited copies per edit (nprobe 1):")
    for e, (edit_name, edit) in enumerate(EDITS.items()):
        qdir = query_dir / f"edit{e}"
        qdir.mkdir(parents=True)
        qpaths = []
        for ref in refs[:n_queries]:
            q = qdir / ref.name
            edit(Image.open(ref).convert("RGB")).save(q)
            qpaths.append(q)
        results, _ = coll.query_images(qpaths, k=1)
        hits = [bool(r.matches) and r.matches[0].id == ids[Path(r.query).name] for r in results]
        recalls[edit_name] = float(np.mean(hits))
        say(f"   {edit_name:24s} R@1 = {recalls[edit_name]:.2f}")

    results, _ = coll.query_images([query_dir / "edit1" / refs[0].name], k=3)
    say(f"6. one query ({results[0].query}):")
    for m in results[0].matches:
        say(f"   id {m.id:4d}  score {m.score:.3f}  {m.name}")
    coll.close()
    say(f"done in {time.perf_counter() - t0:.0f} s. Try: activeindex info {coll_dir}")
    return recalls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="  note: %(message)s")
    run(args.out)


if __name__ == "__main__":
    sys.exit(main())
