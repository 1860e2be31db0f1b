"""Training throughput figures for benchmarks/run.py (section `train`), tiny DINOv3 model.

- train_step_img_s: phase 2 optimizer steps (LoRA + head, batch 16) on ready crops, one
  process: the worker's compute alone;
- train_e2e_img_s_per_worker: `run_training` (Ray Train, one worker; data read, decoded and
  augmented by Ray Data tasks) over a labelled folder: trained images / fit wall time,
  start-up included, and the same from the second epoch on (steady).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def train_figures(device: str = "cpu", images: int = 96, epochs: int = 3, batch: int = 16) -> dict:
    from PIL import Image

    from mirror_core.bundle import save_bundle
    from mirror_core.config import BackboneConfig, MemoryConfig, MirrorConfig
    from mirror_core.model import assemble_model
    from mirror_core.smoke import DEMO_BACKBONE, random_mirror
    from mirror_core.train.loop import OptimConfig, PhaseTrainer
    from pipeline.cluster import ensure_ray
    from pipeline.train.run import TrainConfig, run_training

    cfg = MirrorConfig(backbone=BackboneConfig(dict(DEMO_BACKBONE)), memory=MemoryConfig(256, 8, 32))
    _, weights = random_mirror(cfg, seed=0)
    model = assemble_model(cfg, weights, merge_lora=False).to(device)
    trainer = PhaseTrainer(model, 2, OptimConfig(lr=1e-3, total_steps=100))
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)).to(device)
    y = torch.from_numpy(rng.integers(0, 2, batch)).to(device)
    trainer.step(x, y)
    t = time.perf_counter()
    steps = 10
    for _ in range(steps):
        trainer.step(x, y)
    res = {"train_model": "DINOv3 64/2/4 (tiny), memory 256/8/32", "train_batch": batch,
           "train_step_img_s": steps * batch / (time.perf_counter() - t)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_bundle(str(tmp / "base"), cfg, weights)
        for i in range(images):
            folder = tmp / "data" / ("1_fake" if i % 2 else "0_real")
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(small).resize((384, 320), Image.BICUBIC).save(folder / f"{i:03d}.jpg", quality=90)
        ensure_ray()
        tc = TrainConfig(phase=2, epochs=epochs, batch_size=batch, val_fraction=0.2, use_gpu=device == "cuda")
        t = time.perf_counter()
        card = run_training(str(tmp / "base"), str(tmp / "data"), str(tmp / "out"), str(tmp / "store"), tc)
        wall = time.perf_counter() - t
    res.update({"train_e2e_images": card["train_images"] * epochs, "train_e2e_wall_s": round(wall, 1),
                "train_e2e_img_s_per_worker": card["train_images"] * epochs / wall})
    return res
