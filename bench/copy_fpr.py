"""Does a threshold calibrated for a false-positive rate hold on images unlike the calibration ones?

Run it from the repository root (about 6 minutes on 2 cores the first time; images are kept in
``--out`` and reused)::

    .venv/bin/python bench/copy_fpr.py                       # the run quoted in the README
    .venv/bin/python bench/copy_fpr.py --n-train 512 --n-refs 400 --n-queries 200   # quick

A collection is created the way a user creates one (:func:`activeindex.calibration.create_collection`,
the builtin model, ``--factory``, ``--target-fpr``) from ``--n-train`` synthetic images (source seed
7, as ``activeindex evaluate``), and filled with ``--n-refs`` other images of the same source. Then:

- matching queries: JPEG-60 copies of ``--n-queries`` references (JPEG 60 is not a calibration
  edit: calibration uses JPEG 50). Kept: the share flagged *with the true original as best match*.
- non-matching queries from families and edits that calibration never saw:

  * ``synthetic seed 11``: images of another source seed (indices from 2000, past the photo
    cells, so none is a tile of a training photo);
  * ``real photos``: the photos bundled with scikit-image, scikit-learn and matplotlib, whole and
    as random crops (10 %–60 % of the area), resized to 256 px on the long side;

  each through one of :data:`OTHER_EDITS` (none of them is one of the paper's 14 calibration edits)
  or ``auto`` (also a calibration edit, but with other random draws).

Flagged: the best match's score is >= the collection's threshold. Printed: the threshold and what
calibration measured, then per query family the FPR with a 95 % Wilson interval, and the recall.
It measures; it does not gate (exit code 0), except that it says whether the issue's criterion
(FPR <= 3 % on every other family, recall >= 80 %) is met.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from activeindex.calibration import create_collection
from activeindex.copies import describe_copies
from activeindex.datasets.photos import core_photos, optional_photos
from activeindex.datasets.synthetic import make_images
from activeindex.edits.registry import NamedEdit
from activeindex.extractors import create_extractor
from activeindex.intervals import wilson_interval
from activeindex.scoring import CopyTarget

OTHER_EDITS = (
    NamedEdit("JPEG 70", "jpeg", {"quality": 70}),
    NamedEdit("hflip", "hflip", {}),
    NamedEdit("grayscale", "grayscale", {}),
    NamedEdit("pad square", "pad_square", {}),
    NamedEdit("aspect 1.6", "change_aspect_ratio", {"ratio": 1.6}),
    NamedEdit("rotation 10", "rotate", {"degrees": 10.0}),
    NamedEdit("blur r6", "blur", {"radius": 6}),
    NamedEdit("pixelization 0.3", "pixelization", {"ratio": 0.3}),
    NamedEdit("emoji", "overlay_emoji", {"emoji_size": 0.4}),
    NamedEdit("screenshot", "overlay_onto_screenshot", {}),
    NamedEdit("auto", "auto", {}),
)
JPEG_60 = NamedEdit("JPEG 60", "jpeg", {"quality": 60})


def real_photos(n_crops: int, seed: int) -> list[Image.Image]:
    """Every bundled photo whole, plus ``n_crops`` random crops of each, 256 px on the long side."""
    rng = np.random.default_rng(seed)
    out = []
    for photo in core_photos() + optional_photos():
        im = Image.fromarray(photo.pixels)
        views = [im]
        for _ in range(n_crops):
            area = rng.uniform(0.1, 0.6)
            aspect = np.exp(rng.uniform(-0.4, 0.4))
            w = min(im.width, int(im.width * np.sqrt(area * aspect)))
            h = min(im.height, int(im.height * np.sqrt(area / aspect)))
            x, y = int(rng.integers(0, im.width - w + 1)), int(rng.integers(0, im.height - h + 1))
            views.append(im.crop((x, y, x + w, y + h)))
        for v in views:
            s = 256 / max(v.size)
            out.append(v.resize((max(1, round(v.width * s)), max(1, round(v.height * s))), Image.BICUBIC))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/.cache/copy_fpr"))
    ap.add_argument("--n-train", type=int, default=2048)
    ap.add_argument("--n-refs", type=int, default=1000)
    ap.add_argument("--n-queries", type=int, default=500, help="matching and synthetic non-matching queries")
    ap.add_argument("--n-crops", type=int, default=20, help="random crops per bundled photo")
    ap.add_argument("--factory", default="IVF64,PQ8x8")
    ap.add_argument("--target-fpr", type=float, default=0.01)
    ap.add_argument("--save-scores", type=Path, default=None, help="write the query scores (npz) here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="  note: %(message)s")
    t0 = time.perf_counter()
    ex = create_extractor("builtin")
    imgs = args.out / "images"
    train = make_images(imgs / "train", args.n_train, seed=7)
    refs = make_images(imgs / "refs", args.n_refs, seed=7, start=args.n_train)
    other = make_images(imgs / "seed11", args.n_queries, seed=11, start=2000)
    shutil.rmtree(args.out / "collection", ignore_errors=True)
    coll, thr = create_collection(args.out / "collection", ex, args.factory, train,
                                  target=CopyTarget(fpr=args.target_fpr))
    added = dict((name, i) for i, name in coll.add_images(refs).added)
    # Recalibrate against the filled index, as the README advises (activeindex calibrate --images).
    from activeindex.calibration import calibrate_from_images, split_training

    _, cal_idx = split_training(len(train))
    thr = calibrate_from_images(coll, [train[i] for i in cal_idx], CopyTarget(fpr=args.target_fpr))
    print(f"model {ex.spec_string} ({ex.precision.value}), {args.factory}, {args.n_train} training images, "
          f"{coll.count()} references")
    print(f"threshold {thr.threshold:.4f}: {thr.meaning}")

    def flagged(x: np.ndarray, true_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        S, I, _ = coll.search_arrays(x, 1)
        hit = S[:, 0] >= thr.threshold
        return hit, (hit if true_ids is None else hit & (I[:, 0] == true_ids))

    def copies(images: list[Image.Image], edits: list[NamedEdit], seed: int) -> np.ndarray:
        return describe_copies(images, edits, ex, seed=seed).features

    n = min(args.n_queries, len(refs))
    ref_imgs = [Image.open(p).convert("RGB") for p in refs[:n]]
    ids = np.asarray([added[p.name] for p in refs[:n]])
    _, kept = flagged(copies(ref_imgs, [JPEG_60] * n, seed=3), ids)
    rows = [("JPEG-60 copies of references (recall)", kept)]
    syn = [Image.open(p).convert("RGB") for p in other]
    photos = real_photos(args.n_crops, seed=5)
    families = {"synthetic seed 11, other edits": syn, "real photos + crops, other edits": photos}
    scores = {}
    for name, images in families.items():
        edits = [OTHER_EDITS[i % len(OTHER_EDITS)] for i in range(len(images))]
        x = copies(images, edits, seed=4)
        hit, _ = flagged(x)
        scores[name] = coll.search_arrays(x, 1)[0][:, 0]
        rows.append((f"{name} (FPR)", hit))
        for e in OTHER_EDITS:
            sel = np.asarray([ed is e for ed in edits])
            rows.append((f"  {e.label}", hit[sel]))
    pooled = np.concatenate([r[1] for r in rows[1:] if not r[0].startswith("  ")])
    rows.append(("all other non-matching (FPR)", pooled))
    print(f"{'queries':42s} {'n':>5s} {'flagged':>8s}  95 % Wilson interval")
    for name, hit in rows:
        lo, hi = wilson_interval(int(hit.sum()), len(hit))
        print(f"{name:42s} {len(hit):5d} {hit.mean():8.3f}  [{lo:.3f}, {hi:.3f}]")
    fams = [r[1].mean() for r in rows[1:] if r[0].endswith("(FPR)")]
    ok = max(fams) <= 0.03 and kept.mean() >= 0.8
    print(f"criterion (FPR <= 0.03 on each other family, JPEG-60 recall >= 0.80): {'met' if ok else 'NOT met'}")
    if args.save_scores:
        np.savez(args.save_scores, jpeg60=coll.search_arrays(copies(ref_imgs, [JPEG_60] * n, seed=3), 1)[0][:, 0],
                 **{k.split(",")[0].replace(" ", "_"): v for k, v in scores.items()})
    print(f"done in {time.perf_counter() - t0:.0f} s")
    coll.close()


if __name__ == "__main__":
    main()
