"""The evaluation's files: ``retr_df.csv``, ``icd_df.csv``, ISC-format predictions, ``summary.json``.

``predictions/`` holds, per (index, method), ``INDEX__METHOD.csv`` (normalised scores) and
``INDEX__METHOD__raw.csv`` (raw similarities), ``query_id,reference_id,score``, and one
``ground_truth.csv`` (``query_id,reference_id``; an empty reference for a non-matching query, as
DISC21 ships it), so the ISC21 tooling (``compute_metrics.py --preds_filepath ... --gt_filepath
...``) runs on them unchanged. Scores are written with 9 significant digits, which gives back the
float32 score exactly: metrics computed from the files equal the ones in ``summary.json``.

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


def predictions_csv(preds: Sequence[tuple[str, str, float]]) -> str:
    """ISC-format predictions; ``.9g`` round-trips a float32 score (ties stay ties, order is kept)."""
    rows = [{"query_id": q, "reference_id": ref, "score": f"{s:.9g}"} for q, ref, s in preds]
    return _csv_text(rows) or "query_id,reference_id,score\n"


def ground_truth_csv(gt: Sequence[tuple[str, str]], queries: Sequence[str]) -> str:
    """ISC-format ground truth: one row per true pair, then each query without one (empty reference)."""
    with_pair = {q for q, _ in gt}
    rows = [{"query_id": q, "reference_id": r} for q, r in gt]
    rows += [{"query_id": q, "reference_id": ""} for q in queries if q not in with_pair]
    return _csv_text(rows) or "query_id,reference_id\n"


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
        stem = f"{factory_slug(r.factory)}__{r.method.value}"
        for name, preds in ((f"{stem}.csv", r.predictions), (f"{stem}__raw.csv", r.raw_predictions)):
            write_text_atomic(pred_dir / name, predictions_csv(preds))
    if results:
        paths["ground_truth"] = pred_dir / "ground_truth.csv"
        write_text_atomic(paths["ground_truth"], ground_truth_csv(results[0].ground_truth, results[0].queries))
    write_text_atomic(paths["summary"], json.dumps(summary, indent=2) + "\n")
    return paths


def _ci(value: float, interval: Sequence[float] | None, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if not interval else f"{value:.{digits}f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def format_table(summary: dict[str, Any]) -> str:
    """Markdown: per (index, method) the images under test (n), mean R@1 and R@10 over the 14 edits
    and the gain in mean R@1 over passive, µAP (normalised and raw), R@P90, the false-positive rate
    and recall of the calibrated copy decision, and the PSNR of the released files. Brackets: 95 %
    intervals (bootstrap over images or queries, Wilson for rates; see
    :mod:`activeindex.evaluation.uncertainty`)."""
    lines = [
        "| index | method | n | mean R@1 | gain R@1 | mean R@10 | µAP | µAP raw | R@P90 | FPR / recall at threshold | PSNR (dB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["results"].values():
        rel = r.get("release") or {}
        ci = r.get("intervals", {})
        at = r["at_calibrated_threshold"]
        dec = "—" if at["threshold"] is None or at.get("fpr") is None else f"{at['fpr']:.3f} / {at['recall']:.2f}"
        gain = r.get("gain_over_passive", {}).get("r@1")
        g = "—" if gain is None else f"{gain['gain']:+.3f} [{gain['interval'][0]:+.2f}, {gain['interval'][1]:+.2f}]"
        psnr = f"{rel['psnr_mean']:.2f} (min {rel['psnr_min']:.2f})" if rel else "—"
        lines.append(
            f"| {r['factory']} | {r['method']} | {r.get('n_images', r['n_matching_queries'])} | "
            f"{_ci(r['r@1']['mean'], ci.get('r@1', {}).get('mean'))} | {g} | "
            f"{_ci(r['r@10']['mean'], ci.get('r@10', {}).get('mean'))} | {_ci(r['uap'], ci.get('uap'))} | "
            f"{r['uap_raw']:.3f} | {r['recall_at_p90']:.3f} | {dec} | {psnr} |")
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


def format_dihedral_table(summary: dict[str, Any]) -> str:
    """Markdown, for an evaluation run with ``dihedral``: R@1 per edit of single vs dihedral
    queries for each (index, method), then µAP, R@P90, the false-positive rate and recall at each
    mode's own calibrated threshold, and the cost per query of each mode. Empty without it."""
    results = [r for r in summary["results"].values() if "dihedral" in r]
    if not results:
        return ""
    cols = [f"{r['factory']} {r['method']} {mode}" for r in results for mode in ("single", "dihedral")]
    lines = ["| edit | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]

    def row(label: str, cell: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(r, m) for r in results for m in ("single", "dihedral")) + " |")

    def mode(r: dict[str, Any], m: str) -> dict[str, Any]:
        return r if m == "single" else r["dihedral"]

    for edit in results[0]["r@1"]:
        label = "**mean R@1**" if edit == "mean" else edit
        row(label, lambda r, m, e=edit: f"{mode(r, m)['r@1'][e]:.2f}")
    row("mean R@10", lambda r, m: f"{mode(r, m)['r@10']['mean']:.3f}")
    row("µAP", lambda r, m: f"{mode(r, m)['uap']:.3f}")
    row("R@P90", lambda r, m: f"{mode(r, m)['recall_at_p90']:.3f}")

    def at(r: dict[str, Any], m: str) -> str:
        a = mode(r, m)["at_calibrated_threshold"]
        if a["threshold"] is None or a.get("fpr") is None:
            return "no threshold"
        lo, hi = a["fpr_interval"]
        return f"{a['fpr']:.3f} [{lo:.3f}, {hi:.3f}] / {a['recall']:.2f}"

    def thr(r: dict[str, Any], m: str) -> str:
        t = mode(r, m)["at_calibrated_threshold"]["threshold"]
        return "—" if t is None else f"{t:.4f}"

    row("threshold", thr)
    row("FPR [95 %] / recall at threshold", at)

    def cost(r: dict[str, Any], m: str) -> str:
        c = r["dihedral"]["cost"]
        if "query_s_single" not in c:
            return "—"
        ms = c[f"query_s_{m}"] * 1e3
        return f"{ms:.2f} ms" + (f" (×{c['ratio']:.1f})" if m == "dihedral" else "")

    row("time per query (describe + search)", cost)
    return "\n".join(lines)
