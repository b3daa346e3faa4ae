"""``make demo`` / ``python -m activeindex.demo``: the end-to-end story with what exists today.

make images → create a collection (train the index) → add references → query copies edited by the
paper's 14 edits → print recall@1 per edit and one query's matches. Runs on the embedded default
descriptor in a couple of minutes on a 2-core CPU. Activation and the full evaluation protocol
(distractors, non-matching queries, reports) come with their own issues.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from activeindex.collection import Collection
from activeindex.datasets.synthetic import make_images
from activeindex.edits import paper_edits
from activeindex.extractors import create_extractor
from activeindex.features import extract_paths

def run(out: Path, n_train: int = 1024, n_refs: int = 1024, n_queries: int = 100) -> dict[str, float]:
    t0 = time.perf_counter()
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    say(f"activeindex demo → {out}")
    # One source seed, disjoint index ranges: training and reference images share no content.
    train = make_images(out / "images" / "train", n_train, seed=7, workers=1)
    refs = make_images(out / "images" / "references", n_refs, seed=7, start=n_train, workers=1)
    say(f"1. images: {len(train)} training + {len(refs)} references (synthetic, 256×256)")

    extractor = create_extractor("builtin")
    trained = "trained" if extractor.trained else "UNTRAINED (no packaged weights yet)"
    say(f"2. model: {extractor.spec_string}, {extractor.dim}-d, {extractor.preprocessing.input_size} px, "
        f"{extractor.precision.value}, {trained}")

    coll_dir = out / "collection"
    shutil.rmtree(coll_dir, ignore_errors=True)
    xt = extract_paths(train, extractor).features
    factory = "IVF32,PQ32x8"
    coll = Collection.create(coll_dir, extractor, factory, xt, nprobe=1)
    say(f"3. collection: {factory}, trained on {len(xt)} descriptors")

    report = coll.add_images(refs)
    say(f"4. added {len(report.added)} references ({len(report.duplicates)} duplicates, "
        f"{len(report.failures)} unreadable)")
    ids = {name: i for i, name in report.added}

    query_dir = out / "queries"
    shutil.rmtree(query_dir, ignore_errors=True)
    recalls: dict[str, float] = {}
    say(f"5. querying {n_queries} edited copies per edit (the paper's 14 edits, nprobe 1):")
    for e, (edit_name, edit) in enumerate(paper_edits().items()):
        qdir = query_dir / f"edit{e:02d}"
        qdir.mkdir(parents=True)
        qpaths = []
        for q_i, ref in enumerate(refs[:n_queries]):
            q = qdir / ref.name
            edit(Image.open(ref).convert("RGB"), np.random.default_rng([e, q_i])).image.save(q)
            qpaths.append(q)
        results, _ = coll.query_images(qpaths, k=1)
        hits = [bool(r.matches) and r.matches[0].id == ids[Path(r.query).name] for r in results]
        recalls[edit_name] = float(np.mean(hits))
        say(f"   {edit_name:18s} R@1 = {recalls[edit_name]:.2f}")
    say(f"   {'mean':18s} R@1 = {np.mean(list(recalls.values())):.2f}")

    results, _ = coll.query_images([query_dir / "edit07" / refs[0].name], k=3)
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
