"""Evaluation: the paper's experiment (``protocol``), its sources, output files and report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from activeindex.evaluation.protocol import EvalSettings, Method, RunResult, check_settings, run_evaluation
from activeindex.evaluation.sources import EvalData, disc21_source, synthetic_source
from activeindex.extractors import Extractor

__all__ = ["EvalData", "EvalSettings", "Method", "RunResult", "check_settings", "disc21_source", "evaluate_and_report",
           "run_evaluation", "synthetic_source"]


def evaluate_and_report(
    data: EvalData, ex: Extractor, settings: EvalSettings, out: str | Path, *, log: Callable[[str], None] | None = None
) -> tuple[list[RunResult], dict[str, Any], dict[str, Path]]:
    """Run the protocol and write every output under ``out``: ``retr_df.csv``, ``icd_df.csv``,
    ``predictions/``, ``summary.json`` and ``report.html``. Returns results, summary and paths."""
    from activeindex.evaluation.outputs import write_outputs
    from activeindex.evaluation.report import write_report

    results, summary = run_evaluation(data, ex, settings, out, log=log)
    paths = write_outputs(out, results, summary)
    paths["report"] = write_report(Path(out) / "report.html", results, summary)
    return results, summary, paths
