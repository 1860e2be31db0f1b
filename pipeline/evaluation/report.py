"""Markdown benchmark report with matplotlib figures (PNG files next to it)."""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from mirror_core.metrics import OFFICIAL_COLUMNS
from pipeline.reporting import figure_png, markdown_table, pyplot
from pipeline.scan.store import ScanStore
from pipeline.storage import Location

EXTRA_COLUMNS = ("n", "errors", "EER", "TPR@1%FPR", "TPR@5%FPR", "ECE")


def benchmark_figures(rows, name: str) -> dict[str, bytes]:
    """ROC curves per sub-dataset and real-vs-fake score histograms, as PNG bytes."""
    from sklearn.metrics import roc_curve

    plt = pyplot()
    ok = rows.filter(pc.and_(pc.is_null(rows["error"]), pc.is_valid(rows["label"])))
    figures = {}
    fig, ax = plt.subplots(figsize=(5, 5))
    for subset in sorted(set(ok["subset"].to_pylist()), key=str):
        sel = ok.filter(pc.equal(ok["subset"], subset))
        labels = sel["label"].to_numpy()
        if labels.min() != labels.max():
            fpr, tpr, _ = roc_curve(labels, sel["prob_fake"].to_numpy())
            ax.plot(fpr, tpr, label=str(subset))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{name}: ROC")
    ax.legend(fontsize=7)
    figures[f"{name}_roc.png"] = figure_png(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 41)
    labels, probs = ok["label"].to_numpy(), ok["prob_fake"].to_numpy()
    ax.hist(probs[labels == 0], bins=bins, alpha=0.6, label="real")
    ax.hist(probs[labels == 1], bins=bins, alpha=0.6, label="fake")
    ax.set(xlabel="prob_fake", ylabel="images", title=f"{name}: scores")
    ax.legend()
    figures[f"{name}_scores.png"] = figure_png(fig)
    return figures


def write_report(output: str, stamp: str, results, comparison_md: str | None = None) -> str:
    """Writes report_{stamp}.md and report_{stamp}/*.png under `output`; returns the report URI."""
    out = Location(output)
    folder = f"report_{stamp}"
    lines = [f"# MIRROR benchmark report {stamp}", ""]
    if results:
        d = results[0].detail
        lines += [f"model `{d['model_id']}`, preprocessing `{d['preprocess']}`, threshold {d['threshold']}", ""]
    for r in results:
        lines += [f"## {r.name}", "", *markdown_table(["Dataset", *OFFICIAL_COLUMNS], [[row["Dataset"], *(row[k] for k in OFFICIAL_COLUMNS)] for row in r.rows]), ""]
        subsets = r.detail["subsets"]
        lines += markdown_table(["Dataset", *EXTRA_COLUMNS], [[s, *(m.get(k, "") for k in EXTRA_COLUMNS)] for s, m in subsets.items()])
        if r.missing_subsets:
            lines += ["", f"Not found (skipped): {', '.join(r.missing_subsets)}"]
        sweep = r.detail["perturbations"]
        if sweep:
            table = [["clean", *_mean(subsets)]] + [[p, *_mean(per)] for p, per in sweep.items()]
            lines += ["", "Robustness (mean over sub-datasets):", "", *markdown_table(["perturbation", "Bal_Acc", "AUC", "AP"], table)]
        scores = ScanStore(r.detail["scan"]).read_scores(columns=["label", "subset", "prob_fake", "error"])
        for name, png in benchmark_figures(scores, r.name).items():
            out.write_bytes(f"{folder}/{name}", png)
            lines += ["", f"![{name}]({folder}/{name})"]
        lines.append("")
    if comparison_md:
        lines += ["## Comparison with the previous run", "", comparison_md]
    name = f"report_{stamp}.md"
    out.write_bytes(name, "\n".join(lines).encode())
    return out.uri_of(name)


def _mean(per_subset: dict[str, dict]) -> list[float]:
    return [float(np.mean([m[k] for m in per_subset.values()])) for k in ("Bal_Acc", "AUC", "AP")]
