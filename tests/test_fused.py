"""Inference fusions: the fused backbone scores as the plain one does."""
import copy

import pytest
import torch

from mirror_core.config import BackboneConfig, MirrorConfig
from mirror_core.detector import Detector
from mirror_core.fused import FusedGatedMLP, FusedQKVAttention, fuse_projections_
from mirror_core.model import assemble_model
from mirror_core.smoke import DEMO_BACKBONE, DEMO_MEMORY, random_mirror

DINOV2 = {"model_type": "dinov2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 128, "patch_size": 14, "image_size": 224}


@pytest.mark.parametrize("extra", [{}, {"use_gated_mlp": True, "hidden_act": "silu"}, {"query_bias": False, "key_bias": True}])
def test_fused_projections_score_as_the_plain_backbone(extra):
    cfg = MirrorConfig(backbone=BackboneConfig({**DEMO_BACKBONE, **extra}), memory=DEMO_MEMORY)
    _, weights = random_mirror(cfg, seed=3)
    plain = assemble_model(cfg, weights)
    fused = copy.deepcopy(plain)
    replaced = fuse_projections_(fused.backbone)
    assert replaced == 2 * (2 if extra.get("use_gated_mlp") else 1)  # two layers
    kinds = {type(m) for m in fused.backbone.modules()}
    assert FusedQKVAttention in kinds and (FusedGatedMLP in kinds) == bool(extra.get("use_gated_mlp"))
    pixels = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = plain(pixels), fused(pixels)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.entropy, a.entropy, rtol=1e-5, atol=1e-5)


def test_other_families_are_left_alone_and_cpu_detectors_do_not_fuse():
    cfg = MirrorConfig(backbone=BackboneConfig(dict(DINOV2)), memory=DEMO_MEMORY)
    _, weights = random_mirror(cfg, seed=0)
    assert fuse_projections_(assemble_model(cfg, weights).backbone) == 0
    cfg = MirrorConfig(backbone=BackboneConfig(dict(DEMO_BACKBONE)), memory=DEMO_MEMORY)
    _, weights = random_mirror(cfg, seed=0)
    det = Detector(assemble_model(cfg, weights), cfg, "m")
    assert not any(isinstance(m, FusedQKVAttention) for m in det.model.modules())  # bit-exact CPU parity stays
