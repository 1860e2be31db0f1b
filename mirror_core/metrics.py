"""Detection metrics with the official semantics (fractions 0-1)."""
from __future__ import annotations

import numpy as np

OFFICIAL_COLUMNS = ("Acc", "Real_Acc", "Fake_Acc", "Bal_Acc", "AUC", "AP")


def binary_metrics(labels, probs, preds) -> dict[str, float]:
    """Acc, Real_Acc, Fake_Acc, Bal_Acc, AUC, AP as the official script computes them.

    Real_Acc / Fake_Acc are 0 when that class is absent; with one class only,
    AUC = 0.5 and AP = 0.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    preds = np.asarray(preds, dtype=np.int64)
    if labels.size == 0:
        raise ValueError("no labeled, scored images to compute metrics on")
    real, fake = labels == 0, labels == 1
    real_acc = float((preds[real] == 0).mean()) if real.any() else 0.0
    fake_acc = float((preds[fake] == 1).mean()) if fake.any() else 0.0
    both = real.any() and fake.any()
    return {
        "Acc": float((preds == labels).mean()),
        "Real_Acc": real_acc,
        "Fake_Acc": fake_acc,
        "Bal_Acc": (real_acc + fake_acc) / 2,
        "AUC": float(roc_auc_score(labels, probs)) if both else 0.5,
        "AP": float(average_precision_score(labels, probs)) if both else 0.0,
    }


def eer(labels, probs) -> float:
    """Equal error rate: where the false-positive rate meets the miss rate (interpolated)."""
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, probs)
    fnr = 1 - tpr
    i = int(np.nonzero(fnr <= fpr)[0][0])  # first operating point past the crossing
    if i == 0:
        return float(fpr[0])
    # linear interpolation between points i-1 and i of (fpr - fnr) crossing zero
    d0, d1 = fpr[i - 1] - fnr[i - 1], fpr[i] - fnr[i]
    t = d0 / (d0 - d1) if d0 != d1 else 0.0
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def tpr_at_fpr(labels, probs, max_fpr: float) -> float:
    """Highest true-positive rate among thresholds whose false-positive rate is <= max_fpr."""
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, probs)
    return float(tpr[fpr <= max_fpr].max())


def expected_calibration_error(labels, probs, bins: int = 15) -> float:
    """ECE of prob_fake as a probability of 'fake': equal-width bins, weighted |freq - conf|."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(labels[sel].mean() - probs[sel].mean())
    return float(total)
