"""A self-contained HTML report of an evaluation: tables and plots embedded (no external files).

Plots (matplotlib, Agg backend): R@1 per edit, passive against each activation, one panel per
index; precision–recall curves of copy detection; the PSNR histogram of the released files; and
examples: original | activated | difference amplified.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from activeindex.atomic import write_text_atomic
from activeindex.evaluation.outputs import format_edit_table, format_table
from activeindex.evaluation.protocol import Method, RunResult

AMPLIFY = 10  # the |activated − original| difference is shown ×10


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _array_png(a: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display; a library must not pick a GUI backend
    import matplotlib.pyplot as plt

    return plt


def recall_plot(results: Sequence[RunResult]) -> str:
    plt = _plt()
    factories = list(dict.fromkeys(r.factory for r in results))
    fig, axes = plt.subplots(len(factories), 1, figsize=(11, 3.2 * len(factories)), squeeze=False)
    for ax, factory in zip(axes[:, 0], factories):
        runs = [r for r in results if r.factory == factory]
        edits = list(runs[0].summary["r@1"])
        width = 0.8 / len(runs)
        for j, r in enumerate(runs):
            vals = [r.summary["r@1"][e] for e in edits]
            ax.bar(np.arange(len(edits)) + j * width, vals, width, label=r.method.value)
        ax.set_xticks(np.arange(len(edits)) + 0.4 - width / 2, edits, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("R@1")
        ax.set_title(f"{factory}: R@1 per edit")
        ax.legend(fontsize=8, ncol=len(runs))
    fig.tight_layout()
    return _png(fig)


def pr_plot(results: Sequence[RunResult]) -> str:
    plt = _plt()
    factories = list(dict.fromkeys(r.factory for r in results))
    fig, axes = plt.subplots(1, len(factories), figsize=(4.2 * len(factories), 3.6), squeeze=False)
    for ax, factory in zip(axes[0], factories):
        for r in results:
            if r.factory == factory and r.curve is not None:
                recall, precision = r.curve
                ax.plot(recall, precision, label=f"{r.method.value} (µAP {r.summary['uap']:.3f})")
        ax.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(factory, fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    return _png(fig)


def psnr_plot(results: Sequence[RunResult]) -> str | None:
    runs = [r for r in results if r.psnr is not None and len(r.psnr)]
    if not runs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for r in runs:
        ax.hist(r.psnr, bins=30, alpha=0.5, label=f"{r.factory} {r.method.value}")
    ax.set_xlabel("PSNR of the released file (dB)")
    ax.set_ylabel("images")
    ax.legend(fontsize=7)
    return _png(fig)


def examples(results: Sequence[RunResult]) -> list[tuple[str, str, str, str]]:
    """(caption, original, activated, amplified difference) data URLs for the first activated run."""
    passive = next((r for r in results if r.method is Method.PASSIVE), None)
    active = next((r for r in results if r.method is not Method.PASSIVE and r.examples), None)
    if passive is None or active is None:
        return []
    out = []
    for i, (o, a) in enumerate(zip(passive.examples, active.examples)):
        diff = np.abs(a.astype(np.int16) - o.astype(np.int16))
        amp = np.clip(diff * AMPLIFY, 0, 255).astype(np.uint8)
        mse = float(np.mean((a.astype(float) - o.astype(float)) ** 2))
        psnr = 10 * np.log10(255**2 / mse) if mse > 0 else float("inf")
        cap = f"{active.factory}, {active.method.value}: PSNR {psnr:.2f} dB, L∞ {int(diff.max())}/255"
        out.append((cap, _array_png(o), _array_png(a), _array_png(amp)))
    return out


def _md_table(md: str) -> str:
    """The simple pipe tables of :mod:`outputs` as HTML."""
    rows = [ln.strip().strip("|").split("|") for ln in md.splitlines() if ln.strip() and not ln.startswith("|---")]
    head, body = rows[0], rows[1:]
    th = "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip().strip('*'))}</td>" for c in r) + "</tr>" for r in body
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def write_report(path: str | Path, results: Sequence[RunResult], summary: dict[str, Any]) -> Path:
    """Write the HTML report to ``path`` (atomically) and return it."""
    path = Path(path)
    s = summary["settings"]
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in summary["notes"]) or "<li>all images of each set</li>"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>activeindex evaluation</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
        "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%}"
        ".ex{display:flex;gap:8px;align-items:flex-start}.ex figure{margin:0;flex:1}figcaption{font-size:12px}",
        "</style></head><body>",
        "<h1>activeindex evaluation</h1>",
        f"<p>Source: {html.escape(summary['source'])}; model {html.escape(summary['model'])}; "
        f"counts {html.escape(str(summary['counts']))}; nprobe {s['nprobe']}, k {s['k']}, PSNR budget "
        f"{s['psnr']} dB, {s['iterations']} iterations, target {s['target']}; copy threshold calibrated for "
        f"precision {s['precision']}; ran {summary['seconds']:.0f} s.</p><ul>{notes}</ul>",
        "<h2>Summary</h2>",
        _md_table(format_table(summary)),
        "<p>mean R@1 over the paper's 14 edits; µAP and R@P90 of copy detection (one auto-edited copy per "
        "image under test + the non-matching queries) on normalised scores (µAP raw: raw similarities); "
        "P / R at threshold: precision and recall of the collection's calibrated copy decision.</p>",
        "<h2>R@1 per edit</h2>",
        f"<img src='{recall_plot(results)}'>",
        _md_table(format_edit_table(summary)),
        "<h2>Copy detection: precision–recall</h2>",
        f"<img src='{pr_plot(results)}'>",
    ]
    hist = psnr_plot(results)
    if hist:
        parts += ["<h2>Quality of the released files</h2>", f"<img src='{hist}'>"]
    ex = examples(results)
    if ex:
        parts.append(f"<h2>Examples: original | activated | difference ×{AMPLIFY}</h2>")
        for cap, o, a, d in ex:
            parts.append(
                f"<div class='ex'><figure><img src='{o}'><figcaption>original</figcaption></figure>"
                f"<figure><img src='{a}'><figcaption>{html.escape(cap)}</figcaption></figure>"
                f"<figure><img src='{d}'><figcaption>|activated − original| ×{AMPLIFY}</figcaption></figure></div>"
            )
    parts.append("</body></html>\n")
    write_text_atomic(path, "".join(parts))
    return path
