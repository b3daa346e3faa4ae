"""``make demo`` / ``activeindex demo``: the whole story on the embedded default, in minutes on a CPU.

1. make synthetic images (training, references, non-matching);
2. create a collection: train the index, keep a normalisation background, calibrate the copy
   threshold to flag about 1 in 100 unrelated images (a false-positive rate of 0.01);
3. add the references, the first 64 *activated* (released files written beside the collection),
   and recalibrate the threshold against the filled index;
4. query an edited copy of a released image and an unrelated image: matches and copy decisions;
5. evaluate (the paper's protocol on these images): R@1 under the 14 edits and copy detection,
   passive vs activated (plain activation); write the CSVs, summary and HTML report. Robust activation is
   left to ``activeindex evaluate --methods passive,plain,robust``: through its edited views it costs
   about 1.7x plain activation's release time for a small gain (+0.015 mean R@1, README), which on
   a CPU without native bf16 would take the demo past five minutes.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from PIL import Image

from activeindex.activation.optimize import configure
from activeindex.activation.add import add_activated
from activeindex.calibration import create_collection, recalibrate
from activeindex.evaluation import EvalSettings, Method, evaluate_and_report, synthetic_source
from activeindex.evaluation.outputs import format_table
from activeindex.extractors import create_extractor
from activeindex.hardware import machine_summary

FACTORY = "IVF32,PQ8x8"


def run(out: Path, n_train: int = 1024, n_refs: int = 1024, n_active: int = 64, n_nonmatch: int = 256) -> dict:
    t0 = time.perf_counter()
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    say(f"activeindex demo → {out}")
    data = synthetic_source(out / "images", n_train=n_train, n_refs=n_refs, n_test=n_active, n_nonmatch=n_nonmatch)
    stages = {"images": time.perf_counter() - t0}
    say(f"1. images: {n_train} training, {n_refs} references, {n_nonmatch} non-matching (synthetic, 256×256)")

    extractor = create_extractor("builtin")
    trained = "trained" if extractor.trained else "UNTRAINED (no packaged weights yet)"
    say(f"2. model: {extractor.spec_string}, {extractor.dim}-d, {extractor.preprocessing.input_size} px, "
        f"{extractor.precision.value}, {trained}")
    say(f"   machine: {machine_summary()}")

    coll_dir, released_dir = out / "collection", out / "released"
    shutil.rmtree(coll_dir, ignore_errors=True)
    shutil.rmtree(released_dir, ignore_errors=True)
    coll, thr = create_collection(coll_dir, extractor, FACTORY, data.train, nprobe=1)
    n_bg = coll.config.normalization["background"]
    say(f"3. collection: {FACTORY} (nprobe 1) trained on {n_bg} of the {n_train} training images, also the "
        f"normalisation background; the other {n_train - n_bg} held out to calibrate")
    if thr is not None:
        say(f"   copy decision: {thr.meaning}")

    stages["collection"] = time.perf_counter() - t0 - sum(stages.values())
    t_act = time.perf_counter()
    active = add_activated(coll, data.under_test, released_dir, configure({}, coll.extractor))
    t_act = time.perf_counter() - t_act
    passive = coll.add_images(data.distractors)
    # The false-positive rate of a fixed threshold grows with the index: recalibrate now it is filled.
    thr = recalibrate(coll) if thr is not None else None
    q = active.quality_summary()
    say(f"4. added {len(passive.added)} references as they are and {len(active.added)} activated "
        f"({t_act / max(1, len(active.added)):.2f} s each) → {released_dir}")
    say(f"   released files: PSNR {q['psnr']['mean']:.2f} dB (min {q['psnr']['min']:.2f}), "
        f"SSIM {q['ssim']['mean']:.3f}, L∞ {q['linf']['mean']:.1f}/255; "
        f"cosine to the stored code {q['cos_before']['mean']:.3f} → {q['cos_after']['mean']:.3f}")
    fixes = active.fixes()
    say(f"   unedited released files found first wherever their originals are: {fixes['margin']} after a "
        f"second activation with the competitor term, {fixes['original']} released unchanged")
    if thr is not None:
        say(f"   recalibrated (activeindex calibrate): {thr.meaning}")

    stages["add"] = time.perf_counter() - t0 - sum(stages.values())
    copy_q, other_q = out / "query.jpg", out / "unrelated.jpg"
    released = Image.open(active.released[0].released)
    released.crop((0, 0, released.width * 9 // 10, released.height)).resize(
        (released.width // 2, released.height // 2)).save(copy_q, quality=70)
    Image.open(data.nonmatching[0]).save(other_q, quality=90)
    results, _ = coll.query_images([copy_q, other_q], k=3)
    say("5. queries, top 3 with the copy decision:")
    for label, r in zip(("a released image, 10 % cropped, halved, JPEG 70", "an image not in the collection"), results):
        say(f"   {r.query} ({label}):")
        for m in r.matches:
            say(f"     id {m.id:4d}  score {m.score:6.3f}  {'COPY' if m.copy else 'no  '}  {m.name}")
    coll.close()

    stages["queries"] = time.perf_counter() - t0 - sum(stages.values())
    say(f"6. evaluation (the paper's protocol on these images, {FACTORY}, nprobe 1): "
        f"{n_active} images under test × 14 edits, {n_active} + {n_nonmatch} copy-detection queries")
    settings = EvalSettings(factories=(FACTORY,), methods=(Method.PASSIVE, Method.PLAIN))
    _, summary, paths = evaluate_and_report(data, extractor, settings, out / "evaluation", log=say)
    runs = list(summary["results"].values())
    say("   R@1 per edit: " + " / ".join(r["method"] for r in runs))
    for edit in runs[0]["r@1"]:
        say(f"   {edit:16s} " + "  ".join(f"{r['r@1'][edit]:.2f}" for r in runs))
    say(format_table(summary))
    say(f"report: {paths['report']}")
    stages["evaluation"] = time.perf_counter() - t0 - sum(stages.values())
    say(f"done in {time.perf_counter() - t0:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()) + f"). Try: activeindex info {coll_dir}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="  note: %(message)s")
    run(args.out)


if __name__ == "__main__":
    sys.exit(main())
