"""Smoke-test models: tiny random MIRRORs, reproducible from a seed.

For the demo, the tests and the performance harness: they exercise every code path
(official checkpoint layout included) and detect nothing. `official_sized` builds the
configuration of a real model around any backbone (the official memory bank).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from .backbone import lora_shapes
from .config import BackboneConfig, MemoryConfig, MirrorConfig
from .model import MirrorModel
from .official import export_official_state
from .weights import MirrorWeights

DEMO_BACKBONE = {  # a DINOv3 ViT far smaller than any real one
    "model_type": "dinov3_vit", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 128, "patch_size": 16, "num_register_tokens": 4, "image_size": 224,
}
DEMO_MEMORY = MemoryConfig(num_slots=512, num_heads=8, top_k=64)


def random_mirror(cfg: MirrorConfig, seed: int = 0, lora_scale: float = 0.05) -> tuple[MirrorModel, MirrorWeights]:
    """A randomly initialised MIRROR (non-zero LoRA) and its weights, reproducibly."""
    torch.manual_seed(seed)
    model = MirrorModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    lora = {k: torch.randn(*shape, generator=gen) * lora_scale for k, shape in lora_shapes(model.backbone, cfg.lora).items()}
    state = model.state_dict()
    weights = MirrorWeights(
        backbone={k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")},
        lora=lora,
        mirror={k: v for k, v in state.items() if not k.startswith("backbone.")},
    )
    return model, weights


def write_smoke_test_weights(folder: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """Random weights in the official layout: (checkpoint.pth, mirror_phase1.pth, backbone dir)."""
    cfg = MirrorConfig(backbone=BackboneConfig(dict(DEMO_BACKBONE)), memory=DEMO_MEMORY)
    model, weights = random_mirror(cfg, seed)
    official = export_official_state(cfg, weights)
    folder.mkdir(parents=True, exist_ok=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar over one tiny shard is noise on the demo's console
    try:
        model.backbone.save_pretrained(folder / "backbone")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    detector = {k: v for k, v in official.items() if not k.startswith("memory_bank.")}
    note = argparse.Namespace(note="MIRROR smoke-test weights: random, NOT a detector")
    torch.save({"model": detector, "epoch": 0, "args": note}, folder / "checkpoint-smoke-test.pth")
    memory = {k[len("memory_bank."):]: v for k, v in official.items() if k.startswith("memory_bank.")}
    memory_config = {"feature_dim": cfg.dim, "mem_slots": DEMO_MEMORY.num_slots,
                     "num_heads": DEMO_MEMORY.num_heads, "top_k": DEMO_MEMORY.top_k}
    torch.save({"model_state_dict": memory, "memory_config": memory_config, "epoch": 0}, folder / "mirror_phase1-smoke-test.pth")
    return folder / "checkpoint-smoke-test.pth", folder / "mirror_phase1-smoke-test.pth", folder / "backbone"



def official_sized(backbone: dict) -> MirrorConfig:
    """A MIRROR around this backbone config with the official memory bank and head."""
    return MirrorConfig(backbone=BackboneConfig(dict(backbone)), memory=MemoryConfig())
