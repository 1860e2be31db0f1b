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
