"""The audit's Markdown report: totals, per-group table, histogram, top flagged with heatmaps."""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.reporting import figure_png, markdown_table, pyplot
from pipeline.storage import Location

GROUP_COLUMNS = ("count", "scored", "errors", "flagged", "flagged_fraction", "p50", "p90", "p99")


def score_histogram(probs: np.ndarray, threshold: float) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(probs, bins=np.linspace(0, 1, 41), color="#4477aa")
    ax.axvline(threshold, color="#cc3311", ls="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel="prob_fake", ylabel="images", title="corpus scores")
    ax.legend()
    return figure_png(fig)


def write_audit_report(out: Location, result: dict[str, Any], scored_probs: np.ndarray, explanations: pa.Table) -> str:
    out.write_bytes("audit_histogram.png", score_histogram(scored_probs, result["threshold"]))
    g = result["group_column"]
    lines = [
        "# MIRROR corpus audit", "",
        f"- input: `{result['input']}`", f"- model: `{result['model_id']}`",
        f"- threshold: {result['threshold']:.6g} ({result['threshold_method']})",
        f"- rows: {result['rows']}, scored: {result['scored']}, errors: {result['errors']}"
        + "".join(f"\n  - {kind}: {n}" for kind, n in result["errors_by_kind"].items()),
        f"- flagged: {result['flagged']} ({100 * result['flagged_fraction']:.2f}% of scored)",
        f"- filtered output: `filtered/` ({result['filter_mode']}, {result['filtered_rows']} rows)", "",
        f"## By {g}", "",
        *([f"The {len(result['groups'])} most flagged of {result['groups_total']} groups; all are in "
           "`groups.parquet`.", ""] if result["groups_total"] > len(result["groups"]) else []),
        *markdown_table([g, *GROUP_COLUMNS], [[grp[g], *(grp[c] for c in GROUP_COLUMNS)] for grp in result["groups"]]),
        "", "## Scores", "", "![histogram](audit_histogram.png)", "",
        f"## Top {explanations.num_rows} flagged images", "",
        "Left: the 224x224 crop the model saw. Right: where the reconstruction from real-image",
        "memory misses most (per-patch residual norm, blue low to red high).", "",
    ]
    for e in explanations.to_pylist():
        shown = (f"   ![crop]({e['crop']}) ![heatmap]({e['heatmap']})" if e["error"] is None
                 else f"   not explained: {e['error']}")
        lines += [f"{e['rank']}. `{e['uri']}`: prob_fake {e['prob_fake']:.4f}", "", shown, ""]
    out.write_bytes("audit_report.md", "\n".join(lines).encode())
    return out.uri_of("audit_report.md")
