"""Judge a descriptor on copy detection: R@1 and µAP of edited copies against distractors.

The protocol behind ``docs/models.md``: held-out images (a synthetic source seed never used for
training, procedural families only — training used every cell of the sample photos, so photo tiles
of another seed would repeat training content) are split into originals, distractors and
non-matching images. The database holds the
originals and the distractors; every original and every non-matching image goes through each edit
of the paper's table (plus overlay onto screenshot). Search is exact (``IndexFlatIP``), so the
numbers judge the descriptor alone, not an index. Methods are compared in the same run, on the same
edited images: any set of extractors, and a perceptual hash (pHash, 64 bits) as the baseline.

Run it (the model card's command)::

    python -m activeindex.evaluation.descriptor_eval --out runs/model-card
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
from PIL import Image
from tqdm import tqdm

from activeindex.datasets.synthetic import Family, synthetic_image, synthetic_image_info
from activeindex.edits import paper_edits, paper_extra_edits
from activeindex.extractors import Extractor, ResizePolicy, create_extractor
from activeindex.metrics import Predictions, micro_average_precision, recall_at_k_from_knn

Describe = Callable[[Sequence[Image.Image]], np.ndarray]  # images → (n, d) float32, IP similarity


@dataclass(frozen=True)
class EvalConfig:
    n_originals: int = 250
    n_distractors: int = 2000
    n_nonmatching: int = 250
    size: int | tuple[int, int] = (256, 256)  # (width, height), or one side, of every image before its edits
    seed: int = 1000  # the synthetic source seed; training used seed 0
    k: int = 10


def extractor_describer(extractor: Extractor, batch_size: int = 64) -> Describe:
    pre = extractor.preprocessing

    def describe(images: Sequence[Image.Image]) -> np.ndarray:
        out = [
            extractor.features(np.stack([pre.prepare(im) for im in images[i : i + batch_size]]))
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out)

    return describe


def phash_describer() -> Describe:
    """pHash bits as ±1/8 vectors: inner product = 1 − 2·Hamming/64, so search ranks by Hamming."""
    import imagehash

    def describe(images: Sequence[Image.Image]) -> np.ndarray:
        bits = np.stack([imagehash.phash(im).hash.reshape(-1) for im in images]).astype(np.float32)
        return (2 * bits - 1) / 8.0

    return describe


def _held_out_indices(seed: int, n: int) -> np.ndarray:
    """The first ``n`` indices of source ``seed`` whose image owes nothing to the sample photos."""
    photo = {Family.PHOTO_TILE, Family.PHOTO_LEAVES}
    out: list[int] = []
    i = 0
    while len(out) < n:
        if synthetic_image_info(i, seed=seed).family not in photo:
            out.append(i)
        i += 1
    return np.array(out)


def _search(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(np.ascontiguousarray(xb, dtype=np.float32))
    return index.search(np.ascontiguousarray(xq, dtype=np.float32), k)


def evaluate_descriptors(
    methods: dict[str, Describe], cfg: EvalConfig = EvalConfig(), progress: bool = True
) -> dict[str, dict[str, dict[str, float]]]:
    """→ {edit label: {method: {"R@1", "uAP"}}}, every method on exactly the same images."""
    n_o, n_d, n_n = cfg.n_originals, cfg.n_distractors, cfg.n_nonmatching
    held_out = _held_out_indices(cfg.seed, n_o + n_d + n_n)
    size = (cfg.size, cfg.size) if isinstance(cfg.size, int) else tuple(cfg.size)  # a side, or (width, height)
    gen = lambda i: synthetic_image(int(held_out[i]), seed=cfg.seed, size=size)  # noqa: E731
    originals = [gen(i) for i in range(n_o)]
    database = originals + [gen(n_o + i) for i in range(n_d)]
    nonmatching = [gen(n_o + n_d + i) for i in range(n_n)]
    xbs = {name: describe(database) for name, describe in methods.items()}
    edits = {**paper_edits(), **paper_extra_edits()}
    results: dict[str, dict[str, dict[str, float]]] = {}
    true_ids = np.concatenate([np.arange(n_o), np.full(n_n, -1)])
    for e, (label, edit) in enumerate(tqdm(edits.items(), desc="edits", disable=not progress)):
        # One generator per (edit, query): the same edited image for every method.
        queries = [
            edit(im, np.random.default_rng([cfg.seed, e, q])).image
            for q, im in enumerate(originals + nonmatching)
        ]
        results[label] = {}
        for name, describe in methods.items():
            S, I = _search(xbs[name], describe(queries), cfg.k)
            r1 = recall_at_k_from_knn(I, S, true_ids, ks=(1,))[1]
            qids = np.repeat(np.arange(len(queries)), cfg.k)
            preds = Predictions(qids, I.reshape(-1), S.reshape(-1).astype(np.float64))
            gt = [(q, q) for q in range(n_o)]
            uap = micro_average_precision(preds, gt)
            results[label][name] = {"R@1": float(r1), "uAP": float(uap)}
    return results


def markdown_table(results: dict[str, dict[str, dict[str, float]]], mean_over: Sequence[str]) -> str:
    methods = list(next(iter(results.values())))
    head = "| edit | " + " | ".join(f"{m} R@1 | {m} µAP" for m in methods) + " |"
    sep = "|---|" + "---:|" * (2 * len(methods))
    rows = [
        f"| {label} | " + " | ".join(f"{r[m]['R@1']:.2f} | {r[m]['uAP']:.2f}" for m in methods) + " |"
        for label, r in results.items()
    ]
    means = {
        m: (np.mean([results[e][m]["R@1"] for e in mean_over]), np.mean([results[e][m]["uAP"] for e in mean_over]))
        for m in methods
    }
    rows.append(
        f"| **mean of the {len(mean_over)} table edits** | "
        + " | ".join(f"**{means[m][0]:.2f}** | **{means[m][1]:.2f}**" for m in methods)
        + " |"
    )
    return "\n".join([head, sep, *rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Copy-detection quality of descriptors (model card).")
    parser.add_argument("--out", type=Path, default=Path("runs/model-card"))
    parser.add_argument("--model", action="append", default=None,
                        help="extractor spec(s) to judge (default: builtin)")
    parser.add_argument("--n-distractors", type=int, default=EvalConfig.n_distractors)
    parser.add_argument("--n-originals", type=int, default=EvalConfig.n_originals)
    parser.add_argument("--seed", type=int, default=EvalConfig.seed,
                        help="synthetic source seed (1000: the model card's; training used 0)")
    parser.add_argument("--size", default="256x256", help="WIDTHxHEIGHT of the originals (e.g. 384x288: 4:3)")
    parser.add_argument("--resize", action="append", choices=[p.value for p in ResizePolicy], default=None,
                        help="file models: judge each model under this resize policy (repeat for several)")
    parser.add_argument("--no-phash", action="store_true", help="leave the pHash baseline out")
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size takes WIDTHxHEIGHT, e.g. 384x288; got {args.size!r}")
    cfg = EvalConfig(n_distractors=args.n_distractors, n_originals=args.n_originals,
                     n_nonmatching=args.n_originals, size=(width, height), seed=args.seed)
    methods: dict[str, Describe] = {}
    for spec in args.model or ["builtin"]:
        for resize in args.resize or [None]:
            ex = create_extractor(spec, resize=resize) if resize else create_extractor(spec)
            label = f"{ex.spec_string}{f' ({resize})' if resize else ''}"
            methods[f"{label}{'' if ex.trained else ' (untrained)'}"] = extractor_describer(ex)
        if ex.trained and ex.spec.get("kind") == "builtin":
            from activeindex.extractors.builtin import build_builtin
            from activeindex.extractors.base import state_dict_digest

            # The same architecture with its seeded initial weights: what training bought.
            module, entry, _ = build_builtin(ex.spec["name"], load_weights=False)
            raw = Extractor(module, entry.preprocessing, {"kind": "builtin", "name": ex.spec["name"]},
                            state_dict_digest(module), trained=False)
            methods[f"{ex.spec_string} (untrained)"] = extractor_describer(raw)
    if not args.no_phash:
        methods["pHash (imagehash)"] = phash_describer()
    t0 = time.perf_counter()
    results = evaluate_descriptors(methods, cfg)
    table = markdown_table(results, mean_over=list(paper_edits()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=2))
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    print(f"\n{cfg.n_originals} originals + {cfg.n_distractors} distractors in the database, "
          f"{cfg.n_nonmatching} non-matching queries per edit, exact search; "
          f"{time.perf_counter() - t0:.0f} s → {args.out}")


if __name__ == "__main__":
    main()
