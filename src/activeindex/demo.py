"""``make demo`` / ``python -m activeindex.demo``: the whole story on the embedded default, in minutes.

make images → create a collection (train the index) → add references, the first 100 *activated*
(released files written next to the collection) → query copies of the released images edited by the
paper's 14 edits, and copies of the same images released as they were → print R@1 per edit, passive
against activated, and one query's matches. The full protocol (distractors, non-matching queries,
calibrated decisions, reports) is the evaluation harness's.
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

from activeindex.activation import ActivationConfig
from activeindex.activation.add import add_activated
from activeindex.collection import Collection
from activeindex.datasets.synthetic import make_images
from activeindex.evaluation.activation_eval import recall_at_1
from activeindex.extractors import create_extractor
from activeindex.features import extract_paths


def run(out: Path, n_train: int = 1024, n_refs: int = 1024, n_active: int = 100) -> dict[str, dict[str, float]]:
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

    coll_dir, released_dir = out / "collection", out / "released"
    shutil.rmtree(coll_dir, ignore_errors=True)
    shutil.rmtree(released_dir, ignore_errors=True)
    xt = extract_paths(train, extractor).features
    factory = "IVF32,PQ32x8"
    coll = Collection.create(coll_dir, extractor, factory, xt, nprobe=1)
    say(f"3. collection: {factory}, trained on {len(xt)} descriptors")

    t_act = time.perf_counter()
    active = add_activated(coll, refs[:n_active], released_dir, ActivationConfig())
    t_act = time.perf_counter() - t_act
    passive = coll.add_images(refs[n_active:])
    q = active.quality_summary()
    say(f"4. added {len(passive.added)} references as they are and {len(active.added)} activated "
        f"({t_act / max(1, len(active.added)):.2f} s each) → {released_dir}")
    say(f"   released files: PSNR {q['psnr']['mean']:.2f} dB (min {q['psnr']['min']:.2f}), "
        f"SSIM {q['ssim']['mean']:.3f}, L∞ {q['linf']['mean']:.1f}/255; "
        f"cosine to the stored code {q['cos_before']['mean']:.3f} → {q['cos_after']['mean']:.3f}")

    by_name = {p.name: p for p in refs[:n_active]}
    ids = [r.id for r in active.released]
    originals = [np.asarray(Image.open(by_name[r.name]).convert("RGB")) for r in active.released]
    released = [np.asarray(Image.open(r.released).convert("RGB")) for r in active.released]
    say(f"5. R@1 of {n_active} images under the paper's 14 edits (nprobe 1), released as they were "
        "vs activated:")
    recalls = {"passive": recall_at_1(coll, originals, ids), "activated": recall_at_1(coll, released, ids)}
    for edit in recalls["passive"]:
        say(f"   {edit:18s} {recalls['passive'][edit]:.2f} → {recalls['activated'][edit]:.2f}")

    query = out / "query.jpg"
    Image.open(active.released[0].released).rotate(10, expand=True).save(query, quality=60)
    results, _ = coll.query_images([query], k=3)
    say(f"6. one query ({query}: a released image rotated 10°, JPEG 60):")
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
