import io

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from mirror_core.config import PreprocessConfig
from mirror_core.metrics import binary_metrics, eer, expected_calibration_error, tpr_at_fpr
from mirror_core.perturb import apply_perturbation, expand_sweep
from mirror_core.preprocess import official_preprocess


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    preds = (probs > 0.5).astype(int)
    m = binary_metrics(labels, probs, preds)
    assert m["Acc"] == pytest.approx(accuracy_score(labels, preds), abs=1e-12)
    assert m["Real_Acc"] == pytest.approx(accuracy_score(labels[labels == 0], preds[labels == 0]), abs=1e-12)
    assert m["Fake_Acc"] == pytest.approx(accuracy_score(labels[labels == 1], preds[labels == 1]), abs=1e-12)
    assert m["Bal_Acc"] == pytest.approx((m["Real_Acc"] + m["Fake_Acc"]) / 2, abs=1e-12)
    assert m["AUC"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    assert m["AP"] == pytest.approx(average_precision_score(labels, probs), abs=1e-12)


def test_single_class_sets_follow_official_semantics():
    only_fake = binary_metrics([1, 1, 1], [0.9, 0.2, 0.7], [1, 0, 1])
    assert only_fake == {"Acc": 2 / 3, "Real_Acc": 0.0, "Fake_Acc": 2 / 3, "Bal_Acc": 1 / 3, "AUC": 0.5, "AP": 0.0}
    only_real = binary_metrics([0, 0], [0.1, 0.8], [0, 1])
    assert (only_real["Real_Acc"], only_real["Fake_Acc"], only_real["AUC"], only_real["AP"]) == (0.5, 0.0, 0.5, 0.0)


def test_eer_and_tpr_at_fpr_hand_checked():
    # perfectly separated: EER 0, TPR 1 at any FPR budget
    assert eer([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert tpr_at_fpr([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 0.01) == 1.0
    # reals 0.1 0.2 0.3 0.6, fakes 0.4 0.5 0.7 0.8: at threshold 0.4 -> FPR 1/4, FNR 0 ... the
    # ROC points (fpr, fnr): (0, 1) (0, .5) (.25, .5) (.25, 0) (1, 0) cross at 0.25
    labels, probs = [0, 0, 0, 0, 1, 1, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.4, 0.5, 0.7, 0.8]
    assert eer(labels, probs) == pytest.approx(0.25)
    assert tpr_at_fpr(labels, probs, 0.05) == 0.5  # only thresholds above 0.6 keep FPR at 0
    assert tpr_at_fpr(labels, probs, 0.25) == 1.0
    # inverted scores: EER 1
    assert eer([0, 1], [0.9, 0.1]) == pytest.approx(1.0)


def test_ece_hand_checked():
    # bin [0.0667,0.133): probs 0.1,0.1 with labels 0,1 -> |0.5-0.1| * 2/4; bin of 0.9,0.9 labels 1,1 -> |1-0.9| * 2/4
    assert expected_calibration_error([0, 1, 1, 1], [0.1, 0.1, 0.9, 0.9]) == pytest.approx(0.4 * 0.5 + 0.1 * 0.5)
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0


def _png(seed=0, size=(300, 280)):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return img, buf.getvalue()


@pytest.mark.parametrize("spec", ["jpeg:75", "blur:1.5", "resize:0.5"])
def test_perturbations_are_deterministic_and_change_the_input(spec):
    img, data = _png()
    a, b = apply_perturbation(img, spec), apply_perturbation(img, spec)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != img.tobytes() or a.size != img.size
    cfg = PreprocessConfig()
    clean = official_preprocess(data, cfg, name="x.png")
    pert = official_preprocess(data, cfg, name="x.png", perturbation=spec)
    assert not np.array_equal(clean.pixels, pert.pixels) and (pert.width, pert.height) == (300, 280)


def test_sweep_expansion_and_errors():
    assert expand_sweep(["jpeg:95,75", "blur:1", "resize:0.5"]) == ["jpeg:95", "jpeg:75", "blur:1", "resize:0.5"]
    for bad in (["jpeg:0"], ["sharpen:1"], ["blur:x"], ["resize:-1"]):
        with pytest.raises(ValueError, match="perturbation"):
            expand_sweep(bad)
