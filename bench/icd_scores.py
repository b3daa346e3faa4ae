"""Scores of the copy-detection queries of ``activeindex evaluate`` runs, per method.

Run it from the repository root on one or more evaluation folders::

    .venv/bin/python bench/icd_scores.py runs/eval5k-builtin runs/eval5k-builtin-auto

For each run and method, from ``icd_df.csv``: how many positive queries (an "auto"-edited copy of
an image under test) rank their original first and the mean score they give it, and the share of
all positives that score above the 99th percentile of the non-matching queries' top scores — what
decides µAP. Used in docs/activation-study.md to explain why the centroid target costs µAP.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np


def summarise(run: Path) -> list[str]:
    csv.field_size_limit(1 << 30)
    by_method: dict[str, dict[str, list[float]]] = {}
    with open(run / "icd_df.csv", newline="") as f:
        for row in csv.DictReader(f):
            stats = by_method.setdefault(row["method"], {"first": [], "positives": [], "negatives": []})
            scores = [float(v) for v in row["retrieved_scores"].split()]
            ids = [int(v) for v in row["retrieved_ids"].split()]
            top = scores[0] if scores and scores[0] > -1e30 else -np.inf  # no result: -FLT_MAX
            if row["query_id"].startswith("pos"):
                stats["positives"].append(top if ids and ids[0] == int(row["image_index"]) else -np.inf)
                if ids and ids[0] == int(row["image_index"]):
                    stats["first"].append(top)
            else:
                stats["negatives"].append(top)
    lines = []
    for method, s in by_method.items():
        p99 = float(np.percentile(s["negatives"], 99))
        above = float(np.mean(np.asarray(s["positives"]) > p99))
        lines.append(f"{run.name:24s} {method:8s} positives first {len(s['first'])}/{len(s['positives'])}, "
                     f"mean score {np.mean(s['first']):.3f}; above the non-matching p99 ({p99:.3f}): {100 * above:.1f} %")
    return lines


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print("\n".join(summarise(Path(arg))))
