"""Unedited and half-size copies of activated real photos: found first as often as their originals?

Run it from the repository root::

    .venv/bin/python bench/unedited.py                          # builtin, IVF64,PQ8x8
    .venv/bin/python bench/unedited.py --model sscd-distilled
    .venv/bin/python bench/unedited.py --config robust=1,target=centroid   # any activation knobs

Activation pulls a descriptor towards its own stored code; the nearest *other* codes can move closer
too, and an activated file published unchanged could then rank a neighbour first (issue 21: 7 of
170 real photos at the paper's step size). ``add --activate`` describes every written file again
and checks it (:mod:`activeindex.activation.verify`); this bench measures what a user sees.

Images: real photographs, crops of the 19 photos bundled with scikit-image, scikit-learn and
matplotlib (``--crops`` random crops of each, 20–60 % of the area, 320 px on the long side), so
that every image has near neighbours from the same photo: the hard case. (The builtin model's
synthetic training set holds tiles of the scikit-image photos; SSCD never saw them.) Every other
crop is released activated, the rest are distractors added as they are; the index is trained on
``--n-train`` synthetic images (cached under ``bench/.cache/unedited``).

For each released image: R@1 of the original and of the written file, unedited and halved in area
(the collection's own query path: PIL decode, resize, describe, search), and how many written files
needed a fix to stay found first (a second activation with the competitor term, or the original
released unchanged). Prints a Markdown table; exits 0: it measures, it does not gate.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from activeindex.activation.add import add_activated
from activeindex.activation.optimize import configure
from activeindex.collection import Collection
from activeindex.copies import describe_copies
from activeindex.datasets.photos import core_photos, optional_photos
from activeindex.datasets.synthetic import make_images
from activeindex.edits import NamedEdit
from activeindex.extractors import create_extractor
from activeindex.features import extract_paths
from activeindex.hardware import machine_summary

sys.path.insert(0, str(Path(__file__).resolve().parent))
from activation_study import parse_config  # noqa: E402  (the same knob=value syntax)

CACHE = Path(__file__).resolve().parent / ".cache" / "unedited"
EDITS = (NamedEdit("identity", "identity", {}), NamedEdit("resize 0.5", "resize", {"area": 0.5}))


def photo_crops(folder: Path, n_crops: int, seed: int = 0) -> list[Path]:
    """``n_crops`` random crops of each bundled photo, written once as PNG under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for photo in core_photos() + optional_photos():
        im = Image.fromarray(photo.pixels).convert("RGB")
        for c in range(n_crops):
            area, aspect = rng.uniform(0.2, 0.6), np.exp(rng.uniform(-0.3, 0.3))
            w = min(im.width, int(im.width * np.sqrt(area * aspect)))
            h = min(im.height, int(im.height * np.sqrt(area / aspect)))
            x, y = int(rng.integers(0, im.width - w + 1)), int(rng.integers(0, im.height - h + 1))
            crop = im.crop((x, y, x + w, y + h))
            s = 320 / max(crop.size)
            path = folder / f"{photo.name}_{c:02d}.png"
            if not path.exists():
                crop.resize((max(8, round(crop.width * s)), max(8, round(crop.height * s))), Image.BICUBIC).save(path)
            paths.append(path)
    return paths


def recall(coll: Collection, images: list[Image.Image], ids: list[int]) -> dict[str, float]:
    out = {}
    for e, edit in enumerate(EDITS):
        copies = describe_copies(images, [edit] * len(images), coll.extractor, edit_keys=[e] * len(images))
        _, found, _ = coll.search_arrays(copies.features, 1)
        out[edit.label] = float(np.mean(found[:, 0] == np.asarray(ids)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--index", default="IVF64,PQ8x8")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--crops", type=int, default=16, help="crops per bundled photo")
    ap.add_argument("--target", default=None, help="activation target (default: the model's)")
    ap.add_argument("--config", default="", help="more knobs, as bench/activation_study.py takes them: "
                    "knob=value[,knob=value...], e.g. robust=1,target=centroid")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    print(f"machine: {machine_summary()}", flush=True)
    ex = create_extractor(args.model)
    crops = photo_crops(CACHE / "crops", args.crops)
    released, distractors = crops[::2], crops[1::2]
    train = make_images(CACHE / "train", args.n_train, seed=7)
    root = CACHE / f"collection-{args.model}"
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(CACHE / "released", ignore_errors=True)
    coll = Collection.create(root, ex, args.index, extract_paths(train, ex).features, nprobe=1)
    coll.add_images(distractors)
    knobs = {"target": args.target, **parse_config(args.config)}
    report = add_activated(coll, released, CACHE / "released", configure(knobs, ex))
    by_name = {p.name: p for p in released}
    ids = [r.id for r in report.released]
    originals = [Image.open(by_name[r.name]).convert("RGB") for r in report.released]
    files = [Image.open(r.released).convert("RGB") for r in report.released]
    passive, active = recall(coll, originals, ids), recall(coll, files, ids)
    fixes = report.fixes()
    q = report.quality_summary()
    coll.close()
    print(f"{len(released)} released real-photo crops, {len(distractors)} distractor crops of the same 19 photos, "
          f"{args.index} (nprobe 1), {args.model}, target {report.config['target']}"
          f"{', robust' if report.config['robust'] else ''}; PSNR mean {q['psnr']['mean']:.2f} dB (min {q['psnr']['min']:.2f}); "
          f"cosine to the target {q['cos_before']['mean']:.3f} → {q['cos_after']['mean']:.3f}")
    print("| copy | original R@1 | released file R@1 |")
    print("|---|---|---|")
    for edit in EDITS:
        print(f"| {edit.label} | {passive[edit.label]:.3f} | {active[edit.label]:.3f} |")
    print(f"written files that lost rank 1 unedited and were fixed: {fixes['margin']} by a second activation with the "
          f"competitor term, {fixes['original']} released unchanged (of {len(ids)}); {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
