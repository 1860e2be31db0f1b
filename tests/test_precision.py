"""Precision modes of a Detector: names, weight casts, scores near fp32."""
import numpy as np
import pytest
import torch

from mirror_core.config import BackboneConfig, MirrorConfig
from mirror_core.detector import Detector
from mirror_core.model import assemble_model
from mirror_core.smoke import DEMO_BACKBONE, DEMO_MEMORY, random_mirror
from pipeline.scan.config import ConfigError, ScanConfig


def demo_detectors(*precisions: str) -> list[Detector]:
    """The demo-sized model with the same random weights, once per precision."""
    cfg = MirrorConfig(backbone=BackboneConfig(dict(DEMO_BACKBONE)), memory=DEMO_MEMORY)
    _, weights = random_mirror(cfg, seed=7)
    return [Detector(assemble_model(cfg, weights), cfg, "m", precision=name) for name in precisions]


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


def test_fp8_linear_is_close_to_the_bf16_product_and_keeps_zero_rows():
    from mirror_core.fp8 import FP8, Fp8Linear

    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(128, 48).to(torch.bfloat16)
    torch.nn.init.normal_(linear.weight, generator=gen)
    fp8 = Fp8Linear(linear)
    assert fp8.weight.dtype == FP8 and fp8.weight_scale.shape == (1, 48)
    x = torch.randn(3, 20, 128, generator=gen).to(torch.bfloat16)
    x[0, 0] = 0  # an all-zero row: a finite scale, the bias alone comes out
    with torch.inference_mode():
        want, got = linear(x).float(), fp8(x).float()
    assert got.shape == (3, 20, 48) and torch.isfinite(got).all()
    torch.testing.assert_close(got[0, 0], linear.bias.float(), rtol=0, atol=0)
    rel = (got - want).norm() / want.norm()
    assert 1e-4 < rel < 0.05, rel  # e4m3 keeps 3 mantissa bits: close, and not the bf16 product


def test_fp8_mode_quantizes_the_backbone_gemms_and_scores_near_fp32():
    from mirror_core.fp8 import Fp8Linear

    fp32, half, fp8 = demo_detectors("fp32", "bf16-weights", "fp8")
    layers = DEMO_BACKBONE["num_hidden_layers"]
    assert sum(isinstance(m, Fp8Linear) for m in fp8.model.backbone.modules()) == 6 * layers  # q k v o, fc1 fc2
    assert not any(isinstance(m, Fp8Linear) for m in fp8.model.modules() if m not in set(fp8.model.backbone.modules()))
    pixels = np.random.default_rng(3).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    a, b, c = fp32.score_pixels(pixels), half.score_pixels(pixels), fp8.score_pixels(pixels)
    np.testing.assert_allclose(c["prob_fake"], a["prob_fake"], atol=0.02)
    assert not np.array_equal(c["prob_fake"], b["prob_fake"])  # the GEMMs really ran in FP8
    assert ScanConfig(precision="fp8").precision == "fp8"


def test_fp8_is_refused_on_gpus_without_fp8_tensor_cores(monkeypatch):
    cfg = MirrorConfig(backbone=BackboneConfig(dict(DEMO_BACKBONE)), memory=DEMO_MEMORY)
    _, weights = random_mirror(cfg, seed=7)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    with pytest.raises(ValueError, match="fp8 needs FP8 tensor cores"):
        Detector(assemble_model(cfg, weights), cfg, "m", device="cuda", precision="fp8")


def test_bf16_gelu_tanh_mode_approximates_the_gelu_and_scores_near_fp32():
    from mirror_core.gelu_gemm import CublasGeluMLP

    fp32, half, tanh = demo_detectors("fp32", "bf16-weights", "bf16-gelu-tanh")
    mlps = [m for m in tanh.model.modules() if isinstance(m, CublasGeluMLP)]
    assert len(mlps) == DEMO_BACKBONE["num_hidden_layers"]
    assert {p.dtype for p in tanh.model.parameters()} == {torch.bfloat16}
    pixels = np.random.default_rng(5).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    a, b, c = fp32.score_pixels(pixels), half.score_pixels(pixels), tanh.score_pixels(pixels)
    np.testing.assert_allclose(c["prob_fake"], a["prob_fake"], atol=0.02)
    assert not np.array_equal(c["prob_fake"], b["prob_fake"])  # the approximation really ran
    assert ScanConfig(precision="bf16-gelu-tanh").precision == "bf16-gelu-tanh"


def test_bf16_gelu_tanh_is_refused_for_a_backbone_without_gelu_mlps():
    # ViT-H+ (the official backbone) has gated SwiGLU MLPs: nothing to approximate, and a
    # run labelled with this precision would be a plain bf16-weights run.
    backbone = dict(DEMO_BACKBONE, use_gated_mlp=True, hidden_act="silu")
    cfg = MirrorConfig(backbone=BackboneConfig(backbone), memory=DEMO_MEMORY)
    _, weights = random_mirror(cfg, seed=7)
    with pytest.raises(ValueError, match="bf16-gelu-tanh .* has none .*use bf16-weights"):
        Detector(assemble_model(cfg, weights), cfg, "m", precision="bf16-gelu-tanh")
