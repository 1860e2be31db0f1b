"""Inference fusions: the fused backbone scores as the plain one does."""
import copy

import pytest
import torch

from mirror_core.config import BackboneConfig, MirrorConfig
from mirror_core.detector import Detector
from mirror_core.fused import (
    FusedGatedMLP,
    FusedQKVAttention,
    PatchEmbeddingAsLinear,
    PrecomputedRope,
    fuse_projections_,
    patch_embedding_as_linear_,
    precompute_rope_,
)
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


def test_precomputed_rope_gives_the_same_scores_without_recomputing():
    cfg = MirrorConfig(backbone=BackboneConfig(dict(DEMO_BACKBONE)), memory=DEMO_MEMORY)
    _, weights = random_mirror(cfg, seed=4)
    plain = assemble_model(cfg, weights).eval()
    det = Detector(assemble_model(cfg, weights), cfg, "m")  # every device precomputes
    rope = det.model.backbone.rope_embeddings
    assert isinstance(rope, PrecomputedRope) and not rope.training
    assert not precompute_rope_(det.model.backbone, 224)  # once is enough
    calls = []
    rope.rope.register_forward_hook(lambda *args: calls.append(1))
    pixels = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = plain(pixels), det.model(pixels)
        assert not calls  # the buffers served the 224 x 224 crops
        assert torch.equal(b.logits, a.logits) and torch.equal(b.entropy, a.entropy)  # the same values: bit-exact
        other = torch.rand(1, 3, 112, 112)
        torch.testing.assert_close(rope(other), plain.backbone.rope_embeddings(other), rtol=0, atol=0)
        assert len(calls) == 1  # another size: computed by the original module
    rope.train()
    rope(torch.rand(1, 3, 224, 224))
    assert len(calls) == 2  # training (coordinate jitter) never uses the buffers
    cfg2 = MirrorConfig(backbone=BackboneConfig(dict(DINOV2)), memory=DEMO_MEMORY)
    _, weights2 = random_mirror(cfg2, seed=0)
    assert not precompute_rope_(assemble_model(cfg2, weights2).backbone, 224)  # no RoPE in DINOv2


def test_patch_embedding_as_a_gemm_scores_as_the_convolution():
    cfg = MirrorConfig(backbone=BackboneConfig(dict(DEMO_BACKBONE)), memory=DEMO_MEMORY)
    _, weights = random_mirror(cfg, seed=5)
    plain = assemble_model(cfg, weights).eval()
    linear = copy.deepcopy(plain)
    assert patch_embedding_as_linear_(linear.backbone) and not patch_embedding_as_linear_(linear.backbone)
    assert isinstance(linear.backbone.embeddings.patch_embeddings, PatchEmbeddingAsLinear)
    pixels = torch.randint(0, 256, (3, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a, b = plain(pixels), linear(pixels)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.entropy, a.entropy, rtol=1e-5, atol=1e-5)
        odd = torch.rand(2, 3, 70, 51)  # a remainder the convolution drops
        conv, gemm = plain.backbone.embeddings.patch_embeddings, linear.backbone.embeddings.patch_embeddings
        torch.testing.assert_close(gemm(odd), conv(odd), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not a patch embedding"):
        PatchEmbeddingAsLinear(torch.nn.Conv2d(3, 8, 3, stride=1))
    cfg2 = MirrorConfig(backbone=BackboneConfig(dict(DINOV2)), memory=DEMO_MEMORY)
    _, weights2 = random_mirror(cfg2, seed=0)
    assert not patch_embedding_as_linear_(assemble_model(cfg2, weights2).backbone)  # DINOv2: left alone
    det = Detector(assemble_model(cfg, weights), cfg, "m")
    assert isinstance(det.model.backbone.embeddings.patch_embeddings, torch.nn.Conv2d)  # CPU: the official layout
