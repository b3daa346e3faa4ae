"""The evaluation's files: ``retr_df.csv``, ``icd_df.csv``, ISC-format predictions, ``summary.json``.

Column names follow the paper's seed tool where it has them (``batch, image_index, attack,
attack_param, retrieved_distances, retrieved_indices, rank, r@1, r@10, r@100, ap`` for retrieval;
``batch, image_index, attack, retrieved_distances, retrieved_ids`` for copy detection, with
``image_index`` -1 for a non-matching query), plus ``index``, ``method``, ``image_name``,
``query_id`` and ``retrieved_scores`` (normalised scores). Retrieved lists hold the first
:data:`~activeindex.evaluation.protocol.CSV_NEIGHBOURS` neighbours, space separated; ranks and
recalls are computed on the full k. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from activeindex.atomic import write_text_atomic
from activeindex.evaluation.protocol import RunResult, factory_slug


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def write_outputs(out: str | Path, results: Sequence[RunResult], summary: dict[str, Any]) -> dict[str, Path]:
    """Write the CSVs, predictions and summary under ``out``; returns their paths by kind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"retr_df": out / "retr_df.csv", "icd_df": out / "icd_df.csv", "summary": out / "summary.json"}
    write_text_atomic(paths["retr_df"], _csv_text([row for r in results for row in r.retrieval]))
    write_text_atomic(paths["icd_df"], _csv_text([row for r in results for row in r.icd]))
    pred_dir = out / "predictions"
    pred_dir.mkdir(exist_ok=True)
    for r in results:
        name = f"{factory_slug(r.factory)}__{r.method.value}.csv"
        rows = [{"query_id": q, "reference_id": ref, "score": f"{s:.6f}"} for q, ref, s in r.predictions]
        write_text_atomic(pred_dir / name, _csv_text(rows) or "query_id,reference_id,score\n")
    write_text_atomic(paths["summary"], json.dumps(summary, indent=2) + "\n")
    return paths


def format_table(summary: dict[str, Any]) -> str:
    """Markdown: per (index, method) mean R@1 over the 14 edits, µAP (normalised and raw), R@P90,
    precision/recall at the calibrated threshold, and PSNR of the released files."""
    lines = [
        "| index | method | mean R@1 | µAP | µAP raw | R@P90 | P / R at threshold | PSNR (dB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["results"].values():
        rel = r.get("release") or {}
        at = r["at_calibrated_threshold"]
        pr = "—" if at["threshold"] is None else (
            f"{at['precision']:.2f} / {at['recall']:.2f}" if at["precision"] is not None else f"— / {at['recall']:.2f}")
        psnr = f"{rel['psnr_mean']:.2f} (min {rel['psnr_min']:.2f})" if rel else "—"
        lines.append(f"| {r['factory']} | {r['method']} | {r['r@1']['mean']:.3f} | {r['uap']:.3f} | "
                     f"{r['uap_raw']:.3f} | {r['recall_at_p90']:.3f} | {pr} | {psnr} |")
    return "\n".join(lines)


def format_edit_table(summary: dict[str, Any]) -> str:
    """Markdown: R@1 per edit, one column per (index, method)."""
    results = list(summary["results"].values())
    cols = [f"{r['factory']} {r['method']}" for r in results]
    lines = ["| edit | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for edit in results[0]["r@1"]:
        label = "**mean**" if edit == "mean" else edit
        lines.append(f"| {label} | " + " | ".join(f"{r['r@1'][edit]:.2f}" for r in results) + " |")
    return "\n".join(lines)
