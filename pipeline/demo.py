"""`mirror demo`: offline, deterministic, end to end.

Builds SMOKE-TEST weights (a tiny random MIRROR in the official checkpoint
format; not a detector, its scores mean nothing), a small generated image folder
in benchmark layout, imports the weights, scans the folder on local Ray, and
returns the summary.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mirror_core.config import BackboneConfig, MemoryConfig, MirrorConfig
from mirror_core.model import MirrorModel
from mirror_core.official import export_official_state, import_official_bundle
from mirror_core.weights import MirrorWeights

from .config import ScanConfig
from .scan import run_scan

DEMO_BACKBONE = {  # a DINOv3 ViT far smaller than any real one
    "model_type": "dinov3_vit", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 128, "patch_size": 16, "num_register_tokens": 4, "image_size": 224,
}
DEMO_MEMORY = MemoryConfig(num_slots=512, num_heads=8, top_k=64)


def random_mirror(cfg: MirrorConfig, seed: int = 0, lora_scale: float = 0.05) -> tuple[MirrorModel, MirrorWeights]:
    """A randomly initialised MIRROR (non-zero LoRA) and its weights, reproducibly."""
    from mirror_core.backbone import lora_shapes

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
    model.backbone.save_pretrained(folder / "backbone")
    detector = {k: v for k, v in official.items() if not k.startswith("memory_bank.")}
    note = argparse.Namespace(note="MIRROR smoke-test weights: random, NOT a detector")
    torch.save({"model": detector, "epoch": 0, "args": note}, folder / "checkpoint-smoke-test.pth")
    memory = {k[len("memory_bank."):]: v for k, v in official.items() if k.startswith("memory_bank.")}
    memory_config = {"feature_dim": cfg.dim, "mem_slots": DEMO_MEMORY.num_slots,
                     "num_heads": DEMO_MEMORY.num_heads, "top_k": DEMO_MEMORY.top_k}
    torch.save({"model_state_dict": memory, "memory_config": memory_config, "epoch": 0}, folder / "mirror_phase1-smoke-test.pth")
    return folder / "checkpoint-smoke-test.pth", folder / "mirror_phase1-smoke-test.pth", folder / "backbone"


def write_demo_images(root: Path, per_class: int = 6, seed: int = 0) -> int:
    """Benchmark layout: root/{portraits,landscapes}/{0_real,1_fake}/ with JPEG and PNG files.
    'Fakes' carry a periodic grid (an upsampling-like trace); 'reals' are smooth noise."""
    rng = np.random.default_rng(seed)
    count = 0
    for subset in ("portraits", "landscapes"):
        for label, folder in ((0, "0_real"), (1, "1_fake")):
            (root / subset / folder).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = int(rng.integers(180, 700)), int(rng.integers(180, 700))
                base = rng.normal(128, 40, (h // 8 + 1, w // 8 + 1, 3)).clip(0, 255).astype(np.uint8)
                img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.int16)
                if label:
                    img[::4, :] += 24
                    img[:, ::4] += 24
                img = Image.fromarray(img.clip(0, 255).astype(np.uint8))
                fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
                buf = io.BytesIO()
                img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
                (root / subset / folder / f"{folder}_{i:03d}.{ext}").write_bytes(buf.getvalue())
                count += 1
    return count


def run_demo(workdir: str | Path, scan_config: ScanConfig | None = None, log=print) -> dict:
    workdir = Path(workdir)
    log("MIRROR demo: SMOKE-TEST weights (tiny, random; NOT a detector, scores are meaningless)")
    checkpoint, memory, backbone = write_smoke_test_weights(workdir / "smoke-test-weights")
    n = write_demo_images(workdir / "images")
    log(f"generated {n} images under {workdir / 'images'} (benchmark layout)")
    model_id, report = import_official_bundle(checkpoint, backbone, str(workdir / "bundle"), memory=memory)
    log(f"imported official-format weights -> {workdir / 'bundle'} (model_id {model_id})")
    cfg = scan_config or ScanConfig(unit_size=8)
    return run_scan(str(workdir / "bundle"), str(workdir / "images"), str(workdir / "scan"), cfg)
