"""Precision modes of a Detector: names, weight casts, scores near fp32."""
import numpy as np
import pytest
import torch

from mirror_core.config import BackboneConfig, MirrorConfig
from mirror_core.detector import Detector
from mirror_core.model import assemble_model
from mirror_core.smoke import DEMO_BACKBONE, DEMO_MEMORY, random_mirror
from pipeline.scan.config import ConfigError, ScanConfig


def test_bf16_weights_mode_casts_the_model_and_scores_near_fp32():
    cfg = MirrorConfig(backbone=BackboneConfig(dict(DEMO_BACKBONE)), memory=DEMO_MEMORY)
    _, weights = random_mirror(cfg, seed=7)
    fp32 = Detector(assemble_model(cfg, weights), cfg, "m")
    half = Detector(assemble_model(cfg, weights), cfg, "m", precision="bf16-weights")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    pixels = np.random.default_rng(1).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    a, b = fp32.score_pixels(pixels), half.score_pixels(pixels)
    assert all(v.dtype == np.float32 for v in b.values())
    np.testing.assert_allclose(b["prob_fake"], a["prob_fake"], atol=0.02)
    assert not np.array_equal(b["prob_fake"], a["prob_fake"])  # it really ran in bf16


def test_bf16_autocast_runs_on_cpu_too():
    # Asked for on a CPU, bf16 is really used (it once fell back to fp32 without a word).
    cfg = MirrorConfig(backbone=BackboneConfig(dict(DEMO_BACKBONE)), memory=DEMO_MEMORY)
    _, weights = random_mirror(cfg, seed=7)
    fp32 = Detector(assemble_model(cfg, weights), cfg, "m")
    auto = Detector(assemble_model(cfg, weights), cfg, "m", precision="bf16")
    pixels = np.random.default_rng(2).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    a, b = fp32.score_pixels(pixels), auto.score_pixels(pixels)
    np.testing.assert_allclose(b["prob_fake"], a["prob_fake"], atol=0.02)
    assert not np.array_equal(b["prob_fake"], a["prob_fake"])


def test_unknown_precision_is_refused_by_detector_and_scan_settings():
    cfg = MirrorConfig(backbone=BackboneConfig(dict(DEMO_BACKBONE)), memory=DEMO_MEMORY)
    _, weights = random_mirror(cfg, seed=7)
    with pytest.raises(ValueError, match="bf16-weights"):
        Detector(assemble_model(cfg, weights), cfg, "m", precision="int4")
    with pytest.raises(ConfigError, match="precision"):
        ScanConfig(precision="half")
    assert ScanConfig(precision="bf16-weights").precision == "bf16-weights"
