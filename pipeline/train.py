"""Ray Train wiring for Phase 1 (memory bank, real images) and Phase 2 (LoRA + head).

Data come from the same sources as scan (folders, manifests, Parquet shards; local or
s3://) through Ray Data; each worker decodes and augments its shard with a generator
seeded by (seed, epoch, rank). Data parallel: gradients are averaged across workers
(torch.distributed all-reduce) before every optimizer step. Each epoch ends with a
validation on a held-out split (phase 1: reconstruction loss; phase 2: Bal_Acc, AUC)
and a Ray Train checkpoint; rerunning with the same --storage and --name resumes from
the latest one. The result is a bundle plus model_card.json.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mirror_core.bundle import Bundle, load_bundle, save_bundle
from mirror_core.config import MemoryConfig, MirrorConfig
from mirror_core.weights import MirrorWeights

from .sinks import Output
from .sources import SourceOptions, fetch_all, plan_source, read_shard_unit


@dataclass
class TrainConfig:
    phase: int
    epochs: int = 10
    batch_size: int = 32  # per worker
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    grad_accum: int = 1
    label_smoothing: float = 0.0
    ortho_weight: float = 0.01
    val_fraction: float = 0.2
    ema_decay: float | None = None  # validate and export an EMA of the weights
    num_workers: int = 1
    use_gpu: bool = False
    seed: int = 0
    name: str = "mirror-train"
    max_failures: int = 0


def base_model(base: str, memory: MemoryConfig | None = None) -> Bundle:
    """A bundle, or (phase 1 from scratch) a DINOv3/DINOv2 directory: its weights plus a
    freshly initialised memory bank (orthogonal) and head."""
    if Path(base, "mirror.json").is_file() or "://" in base:
        return load_bundle(base)
    import torch

    from mirror_core.backbone import lora_shapes, read_backbone_config, read_backbone_weights
    from mirror_core.model import MirrorModel

    cfg = MirrorConfig(backbone=read_backbone_config(base), memory=memory or MemoryConfig())
    torch.manual_seed(0)
    model = MirrorModel(cfg)
    state = model.state_dict()
    lora = {k: torch.zeros(s) for k, s in lora_shapes(model.backbone, cfg.lora).items()}  # B = 0: no change yet
    weights = MirrorWeights(backbone=read_backbone_weights(base), lora=lora,
                            mirror={k: v for k, v in state.items() if not k.startswith("backbone.")})
    return Bundle(cfg, weights, "untrained")


def training_records(input_uri: str, columns=None) -> pa.Table:
    """uri, label, bytes for every record of the source (bytes fetched for folders/manifests)."""
    plan = plan_source(input_uri, SourceOptions() if columns is None else SourceOptions(columns=columns))
    if plan.input_format == "parquet":
        tables = [read_shard_unit(u, SourceOptions().columns, with_bytes=True).select(["uri", "label", "bytes"])
                  for u in plan.units]
        return pa.concat_tables(tables)
    uris = plan.records["uri"].to_pylist()
    data = [d for d, _ in fetch_all(uris, 16)]
    labels = plan.records["label"] if "label" in plan.records.column_names else pa.nulls(len(uris), pa.int64())
    return pa.table({"uri": uris, "label": labels, "bytes": pa.array(data, pa.binary())})


def split(records: pa.Table, val_fraction: float) -> tuple[pa.Table, pa.Table]:
    """Deterministic held-out split by uri hash (stable across runs and resumes)."""
    held = np.array([int(hashlib.sha256(u.encode()).hexdigest()[:8], 16) % 1000 < val_fraction * 1000
                     for u in records["uri"].to_pylist()], dtype=bool)
    return records.filter(pa.array(~held)), records.filter(pa.array(held))


def _decode_augment(batch: dict, phase: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    from mirror_core.train.augment import phase1_augment, phase2_augment

    out = []
    for data, label in zip(batch["bytes"], batch["label"]):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        out.append(phase1_augment(img, rng) if phase == 1 else phase2_augment(img, int(label), rng))
    return np.stack(out)


def _eval_crops(batch: dict) -> np.ndarray:
    from mirror_core.config import PreprocessConfig
    from mirror_core.preprocess import official_preprocess

    cfg = PreprocessConfig()
    return np.stack([official_preprocess(d, cfg, name=u).pixels for d, u in zip(batch["bytes"], batch["uri"])])


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from mirror_core.metrics import binary_metrics
    from mirror_core.model import assemble_model
    from mirror_core.train.loop import OptimConfig, PhaseTrainer, trainable_state

    from .scorer import weights_from_numpy

    tc = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cfg = MirrorConfig.from_dict(config["model_config"])
    model = assemble_model(cfg, weights_from_numpy(ray.get(config["weights"])), merge_lora=tc.phase == 1).to(device)

    def sync_grads(params):
        if world > 1:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world

    optim = OptimConfig(tc.lr, tc.weight_decay, tc.warmup_steps, config["total_steps"], tc.grad_accum)
    trainer = PhaseTrainer(model, tc.phase, optim, tc.label_smoothing, tc.ortho_weight, sync_grads,
                           torch.bfloat16 if device.type == "cuda" else None, tc.ema_decay)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, "trainable.safetensors"), device=str(device)), strict=False)
            state = torch.load(os.path.join(d, "optimizer.pt"), map_location=device, weights_only=True)
            trainer.optimizer.load_state_dict(state["optimizer"])
            trainer.scheduler.load_state_dict(state["scheduler"])
            meta = json.loads(Path(d, "meta.json").read_text())
            start_epoch, history = meta["epoch"] + 1, meta["history"]
    for epoch in range(start_epoch, tc.epochs):
        rng = np.random.default_rng([tc.seed, epoch, rank])
        losses = []
        for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=tc.batch_size, batch_format="numpy"):
            images = torch.from_numpy(_decode_augment(batch, tc.phase, rng)).to(device)
            labels = torch.from_numpy(batch["label"].astype(np.int64)).to(device) if tc.phase == 2 else None
            losses.append(trainer.step(images, labels)["loss"])
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan")}
        with trainer.averaged():
            metrics.update(_validate(model, tc.phase, device, binary_metrics))
            exported = trainable_state(model, tc.phase)
        history.append(metrics)
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                save_file(exported, os.path.join(d, "trainable.safetensors"))
                torch.save({"optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict()},
                           os.path.join(d, "optimizer.pt"))
                Path(d, "meta.json").write_text(json.dumps({"epoch": epoch, "history": history,
                                                            "resumed_from_epoch": start_epoch - 1 if start_epoch else None}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def _validate(model, phase: int, device, binary_metrics) -> dict[str, float]:
    """On the whole held-out set (not split across workers: every worker sees all of it,
    so every worker reports the same numbers and no row is dropped by an even split)."""
    import ray.train
    import torch

    from mirror_core.train.losses import phase1_loss

    model.eval()
    labels, probs, recon = [], [], []
    with torch.no_grad():
        for batch in ray.train.get_dataset_shard("val").iter_batches(batch_size=64, batch_format="numpy"):
            images = torch.from_numpy(_eval_crops(batch)).to(device)
            if phase == 1:
                recon.append((float(phase1_loss(model, images)["reconstruction"]) * len(images), len(images)))
            else:
                probs += model(images).prob_fake.float().cpu().tolist()
                labels += batch["label"].astype(int).tolist()
    if phase == 1:
        return {"val_reconstruction": sum(t for t, _ in recon) / max(1, sum(n for _, n in recon))}
    m = binary_metrics(labels, probs, (np.array(probs) > 0.5).astype(int))
    return {"val_bal_acc": m["Bal_Acc"], "val_auc": m["AUC"], "val_n": len(labels)}


def run_training(base: str, input_uri: str, output: str, storage: str, tc: TrainConfig,
                 address: str | None = None, memory: MemoryConfig | None = None) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    from .scan import ensure_ray
    from .scorer import weights_to_numpy

    bundle = base_model(base, memory)
    records = training_records(input_uri)
    if tc.phase == 1:  # real images only: label 0, or unlabeled
        records = records.filter(pc.invert(pc.fill_null(pc.equal(records["label"], 1), False)))
    elif records["label"].null_count:
        raise ValueError(f"phase 2 needs a label for every image; {records['label'].null_count} have none")
    train, val = split(records, tc.val_fraction)
    if train.num_rows == 0 or val.num_rows == 0:
        raise ValueError(f"not enough images: {train.num_rows} to train on, {val.num_rows} held out")
    ensure_ray(address)
    steps = tc.epochs * math.ceil(train.num_rows / (tc.batch_size * tc.num_workers * tc.grad_accum))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": dataclasses.asdict(tc), "model_config": bundle.config.to_dict(),
                           "weights": ray.put(weights_to_numpy(bundle.weights)), "total_steps": steps},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu),
        run_config=RunConfig(name=tc.name, storage_path=os.path.abspath(storage) if "://" not in storage else storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=tc.max_failures)),
        datasets={"train": ray.data.from_arrow(train), "val": ray.data.from_arrow(val)},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        trained = load_file(os.path.join(d, "trainable.safetensors"))
        meta = json.loads(Path(d, "meta.json").read_text())
    weights = bundle.weights
    lora = dict(weights.lora)
    mirror = dict(weights.mirror)
    for key, tensor in trained.items():
        if key.startswith("backbone."):  # peft name '…q_proj.lora_A.default.weight' -> bundle name
            module, _, part = key[len("backbone."):].rpartition(".lora_")
            lora[f"{module}.lora_{part[0]}.weight"] = tensor
        else:
            mirror[key] = tensor
    new = MirrorWeights(backbone=weights.backbone, lora=lora, mirror=mirror)
    card = {"phase": tc.phase, "base": base, "base_model_id": bundle.model_id, "data": input_uri,
            "train_images": train.num_rows, "val_images": val.num_rows, "recipe": dataclasses.asdict(tc),
            "history": meta["history"], "final": meta["history"][-1], "resumed_from_epoch": meta["resumed_from_epoch"]}
    model_id = save_bundle(output, bundle.config, new, {"trained": card})
    card["model_id"] = model_id
    Output(output).write_json("model_card.json", card)
    return card
