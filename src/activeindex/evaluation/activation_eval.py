"""Does activation pay? R@1 of edited copies, passive vs activated, on a collection's IVF-PQ index.

The paper's experiment in small (METHOD.md §2), on the synthetic source and the embedded default:
an index (``IVF32,PQ32x8``, ``nprobe 1``) trained on one set of images holds the *original* codes
of ``n_refs`` references; the first ``n_active`` of them are released either as they are (passive)
or activated by each configuration compared. Every released image goes through each of the paper's
14 edits (the same random draw for every configuration) and is searched for; R@1 is the share whose
nearest stored vector is its own original. Also reported: the PSNR/SSIM/L∞ of the released files and
the activation speed.

    python -m activeindex.evaluation.activation_eval --out runs/activation
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from activeindex.activation.add import release_batch
from activeindex.activation.optimize import ActivationConfig
from activeindex.activation.release import decode
from activeindex.collection import Collection
from activeindex.datasets.synthetic import make_images
from activeindex.edits import paper_edits
from activeindex.extractors import Extractor, create_extractor
from activeindex.features import extract_paths


@dataclass
class ReleasedSet:
    """One way of releasing the images: their pixels and what it cost."""

    images: list[np.ndarray]
    seconds: float = 0.0
    quality: dict[str, list[float]] = field(default_factory=dict)


def build_collection(out: Path, extractor: Extractor, n_train: int, n_refs: int, factory: str, seed: int = 7) -> tuple[Collection, list[Path]]:
    """Synthetic training and reference images under ``out/images`` (made once, then reused) and a
    fresh collection at ``out/collection`` holding the references' original codes."""
    import shutil

    train = make_images(out / "images" / "train", n_train, seed=seed, workers=1)
    refs = make_images(out / "images" / "references", n_refs, seed=seed, start=n_train, workers=1)
    shutil.rmtree(out / "collection", ignore_errors=True)
    xt = extract_paths(train, extractor).features
    coll = Collection.create(out / "collection", extractor, factory, xt, nprobe=1)
    coll.add_images(refs)
    return coll, refs


def release(coll: Collection, originals: Sequence[np.ndarray], config: ActivationConfig, batch_size: int = 16) -> ReleasedSet:
    """Activate ``originals`` against ``coll``'s index and return the decoded PNG files' pixels."""
    out = ReleasedSet([], quality={"psnr": [], "ssim": [], "linf": [], "cos_before": [], "cos_after": []})
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(originals), batch_size), desc="activate", leave=False):
        _, act, files = release_batch(coll, list(originals[start : start + batch_size]), config)
        for r in files:
            if isinstance(r, Exception):  # a lossless PNG always meets its budget
                raise r
            out.images.append(decode(r.data))
            for k, v in r.quality().items():
                out.quality[k].append(v)
        out.quality["cos_before"].extend(act.cos_before.tolist())
        out.quality["cos_after"].extend(act.cos_after.tolist())
    out.seconds = time.perf_counter() - t0
    return out


def recall_at_1(coll: Collection, released: Sequence[np.ndarray], ids: Sequence[int], batch_size: int = 64) -> dict[str, float]:
    """R@1 per paper edit of edited copies of ``released`` (image i's original has id ``ids[i]``)."""
    ex = coll.extractor
    out: dict[str, float] = {}
    for e, (name, edit) in enumerate(paper_edits().items()):
        hits = []
        for start in range(0, len(released), batch_size):
            idx = range(start, min(start + batch_size, len(released)))
            # The same draw for every way of releasing: the rng depends on the edit and image only.
            edited = [edit(Image.fromarray(released[i]), np.random.default_rng([e, i])).image for i in idx]
            xq = ex.features(np.stack([ex.preprocessing.prepare(im) for im in edited]))
            for i, matches in zip(idx, coll.search(xq, k=1)):
                hits.append(bool(matches) and matches[0].id == ids[i])
        out[name] = float(np.mean(hits))
    out["mean"] = float(np.mean(list(out.values())))
    return out


def run(
    out: Path,
    configs: dict[str, ActivationConfig],
    *,
    n_train: int = 1024,
    n_refs: int = 1024,
    n_active: int = 200,
    factory: str = "IVF32,PQ32x8",
    model: str = "builtin",
) -> dict:
    extractor = create_extractor(model)
    coll, refs = build_collection(out, extractor, n_train, n_refs, factory)
    ids = [int(r[0]) for r in coll.db.execute("SELECT id FROM images ORDER BY id LIMIT ?", (n_active,))]
    originals = [np.asarray(Image.open(p).convert("RGB")) for p in refs[:n_active]]
    results: dict = {
        "setup": {"model": extractor.spec_string, "factory": factory, "nprobe": 1, "n_train": n_train,
                  "n_refs": n_refs, "n_active": n_active, "edits": list(paper_edits())},
        "recall_at_1": {"passive": recall_at_1(coll, originals, ids)},
        "release": {},
    }
    for name, config in configs.items():
        rel = release(coll, originals, config)
        results["recall_at_1"][name] = recall_at_1(coll, rel.images, ids)
        q = {k: np.asarray(v, dtype=float) for k, v in rel.quality.items()}
        results["release"][name] = {
            "config": {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(config).items()},
            "images_per_s": n_active / rel.seconds,
            **{f"{k}_mean": float(v.mean()) for k, v in q.items()},
            "psnr_min": float(q["psnr"].min()),
            "linf_max": float(q["linf"].max()),
        }
    coll.close()
    return results


def format_table(results: dict) -> str:
    r1 = results["recall_at_1"]
    cols = list(r1)
    lines = ["| edit | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for edit in r1["passive"]:
        cells = [f"{r1[c][edit]:.2f}" for c in cols]
        lines.append(f"| {'**mean**' if edit == 'mean' else edit} | " + " | ".join(cells) + " |")
    for name, rel in results["release"].items():
        lines.append(
            f"\n{name}: PSNR {rel['psnr_mean']:.2f} dB (min {rel['psnr_min']:.2f}), SSIM {rel['ssim_mean']:.3f}, "
            f"L∞ {rel['linf_mean']:.1f}/255 (max {rel['linf_max']:.0f}), cos to target "
            f"{rel['cos_before_mean']:.3f} → {rel['cos_after_mean']:.3f}, {rel['images_per_s']:.1f} img/s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/activation"))
    parser.add_argument("--n-active", type=int, default=200)
    parser.add_argument("--psnr", type=float, default=42.0)
    parser.add_argument("--views", type=int, default=3)
    parser.add_argument("--no-robust", action="store_true", help="compare passive and plain only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    configs = {
        "plain": ActivationConfig(psnr=args.psnr),
        "plain, centroid target": ActivationConfig(psnr=args.psnr, target="centroid"),
    }
    if not args.no_robust:
        configs["robust"] = ActivationConfig(psnr=args.psnr, robust=True, views=args.views)
    results = run(args.out, configs, n_active=args.n_active)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = format_table(results)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
