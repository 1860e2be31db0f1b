"""Ray Train wiring for Phase 1 (memory bank, real images) and Phase 2 (LoRA + head).

Data come from the same sources as scan (folders, manifests, Parquet shards, WebDataset;
local or s3://), planned into the run's storage (`data.py`: the driver holds units, not
records) and read by Ray Data; CPU tasks decode and augment them (`prepare.py`, seeded per
epoch and record) and training workers receive ready crops. Data parallel: gradients are averaged across workers
(torch.distributed all-reduce) before every optimizer step. Each epoch ends with a
validation on a held-out split (phase 1: reconstruction loss; phase 2: Bal_Acc, AUC)
and a Ray Train checkpoint (live weights, EMA shadow, optimizer, schedule, and the
exported weights); rerunning with the same --storage and --name resumes from the latest
one and ends with the bundle an uninterrupted run would have made (epoch-level: records
arrive in a fixed order, and every epoch seeds its own generators). The result is a bundle plus model_card.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mirror_core.bundle import Bundle, load_bundle, save_bundle
from mirror_core.config import MemoryConfig, MirrorConfig
from mirror_core.train.loop import trained_weights
from mirror_core.uri import join_uri
from mirror_core.weights import MirrorWeights
from pipeline.progress import RowProgress, log, log_to_console
from pipeline.scan import faults
from pipeline.scan.isolation import decode_attempts
from pipeline.storage import Location
from pipeline.train.data import TrainingData, plan_training_data, training_datasets
from pipeline.train.prepare import CROPS, OK, PREPARED_BY, SKIP_REASON, epoch_clock
from pipeline.train.skips import Skips, warn_skipped


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
    label: str = "label"  # the input's label column; WebDataset: the member (cls) or .json field
    label_folders: dict[str, Any] | None = None  # the input's own label folder names (labels.label_folders)
    ema_decay: float | None = None  # validate and export an EMA of the weights
    num_workers: int = 1
    use_gpu: bool = False
    seed: int = 0
    name: str = "mirror-train"
    max_failures: int = 3  # worker losses (a preempted node) the run resumes from its last checkpoint after


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


def _ready(batch: dict, skips: Skips) -> tuple[np.ndarray, np.ndarray, int]:
    """A prepared batch -> (crops, labels) of its good rows, rows prepared here; `skips` takes
    the others."""
    ok = np.asarray(batch[OK], bool)
    if not ok.all():
        skips.add(np.asarray(batch["uri"])[~ok].tolist(), np.asarray(batch[SKIP_REASON])[~ok].tolist())
    here = int(np.sum(np.asarray(batch[PREPARED_BY]) == os.getpid()))
    return np.asarray(batch[CROPS])[ok], np.asarray(batch["label"])[ok], here


def metrics_line(metrics: dict) -> str:
    """{'epoch': 2, 'train_loss': 0.55} -> 'epoch=2, train_loss=0.5500'."""
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker; the first one logs progress (Ray forwards its lines
    to the driver's console): a line per epoch, and one a minute within a long epoch."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from mirror_core.metrics import binary_metrics
    from mirror_core.model import assemble_model
    from mirror_core.train.loop import trainable_state

    tc = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    if rank == 0:
        log_to_console()
    device = ray.train.torch.get_device()
    cfg = MirrorConfig.from_dict(config["model_config"])
    model = assemble_model(cfg, MirrorWeights.from_numpy(ray.get(config["weights"])), merge_lora=tc.phase == 1).to(device)

    trainer = phase_trainer(model, tc, config["total_steps"], device)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint() or (ray.train.Checkpoint(config["resume_from"])
                                                if config.get("resume_from") else None)
    if checkpoint:  # exact resume: live weights, EMA, optimizer, schedule; epochs seed themselves
        with checkpoint.as_directory() as d:
            trainer.load_state_dict(torch.load(os.path.join(d, TRAINER_STATE), map_location="cpu", weights_only=True))
            meta = json.loads(Path(d, "meta.json").read_text())
            start_epoch, history = meta["epoch"] + 1, meta["history"]
    for epoch in range(start_epoch, tc.epochs):
        # Dropout draws from torch's generator, seeded by (seed, epoch, rank); augmentation
        # (in the preparation tasks) by (seed, epoch, record): an epoch after a resume draws
        # what it would have drawn in an uninterrupted run.
        torch.manual_seed(int(np.random.SeedSequence([tc.seed, epoch, rank]).generate_state(1)[0]))
        if rank == 0:
            ray.get(config["clock"].set.remote(epoch))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no worker starts the epoch's data before the clock says which epoch
        losses, skipped, prepared_here = [], Skips(), 0
        meter = RowProgress(f"epoch {epoch + 1}/{tc.epochs}", -(-config["train_images"] // ctx.get_world_size()),
                            every_s=60.0 if rank == 0 else 0)
        for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=tc.batch_size, batch_format="numpy"):
            meter.add(len(batch[OK]))
            crops, labels, here = _ready(batch, skipped)
            prepared_here += here
            weight = 1.0
            if not len(crops):
                if ctx.get_world_size() == 1:
                    continue
                # every worker steps on every batch (each step all-reduces): a worker with
                # nothing usable in its batch steps on a blank crop whose loss counts for nothing
                crops, labels, weight = np.zeros((1, *batch[CROPS].shape[1:]), np.uint8), np.zeros(1), 0.0
            targets = torch.from_numpy(labels.astype(np.int64)).to(device) if tc.phase == 2 else None
            loss = trainer.step(torch.from_numpy(crops).to(device), targets, weight)["loss"]
            if weight:
                losses.append(loss)
        skipped, val_skipped = skipped.of_all_workers(), Skips()
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                   "skipped_images": skipped.count, "prepared_in_training_worker": prepared_here}
        with trainer.averaged():
            metrics.update(_validate(model, tc.phase, device, binary_metrics, val_skipped))
            exported = trainable_state(model, tc.phase)
        metrics["val_skipped_images"] = val_skipped.count
        history.append(metrics)
        if rank == 0:
            said = {k: v for k, v in metrics.items() if k != "epoch"}
            log.info("epoch %d/%d: %s", epoch + 1, tc.epochs, metrics_line(said))
            if epoch == start_epoch:  # the same files every epoch: named once, and in the model card
                warn_skipped(skipped, val_skipped)
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                save_file(exported, os.path.join(d, EXPORT))  # what the bundle gets (the EMA with --ema)
                torch.save(trainer.state_dict(), os.path.join(d, TRAINER_STATE))
                Path(d, "meta.json").write_text(json.dumps({"epoch": epoch, "history": history,
                                                            "skipped": {"train": skipped.report(),
                                                                        "val": val_skipped.report()},
                                                            "resumed_from_epoch": start_epoch - 1 if start_epoch else None}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
        faults.after_checkpoint(epoch)


def phase_trainer(model, tc: TrainConfig, total_steps: int, device):
    """The worker's trainer; with several workers the trained module is wrapped by Ray
    Train's `prepare_model` (DDP: bucketed all-reduce overlapped with backward; gloo on
    CPU, NCCL on GPU)."""
    import ray.train.torch
    import torch

    from mirror_core.train.loop import OptimConfig, PhaseTrainer

    def wrap(module):
        if ray.train.get_context().get_world_size() == 1:
            return module
        return ray.train.torch.prepare_model(module, move_to_device=False, parallel_strategy="ddp")

    optim = OptimConfig(tc.lr, tc.weight_decay, tc.warmup_steps, total_steps, tc.grad_accum)
    return PhaseTrainer(model, tc.phase, optim, tc.label_smoothing, tc.ortho_weight, wrap,
                        torch.bfloat16 if device.type == "cuda" else None, tc.ema_decay)


# A checkpoint: EXPORT (the weights a bundle gets), TRAINER_STATE (to resume exactly), meta.json.
EXPORT = "export.safetensors"
TRAINER_STATE = "trainer.pt"


def _validate(model, phase: int, device, binary_metrics, skips: Skips) -> dict[str, float]:
    """On the whole held-out set (not split across workers: every worker sees all of it,
    so every worker reports the same numbers and no row is dropped by an even split);
    `skips` takes the images that could not be used."""
    import ray.train
    import torch

    from mirror_core.train.losses import phase1_loss

    model.eval()
    labels, probs, recon = [], [], []
    with torch.no_grad():
        for batch in ray.train.get_dataset_shard("val").iter_batches(batch_size=64, batch_format="numpy"):
            crops, batch_labels, _ = _ready(batch, skips)
            if not len(crops):
                continue
            images = torch.from_numpy(crops).to(device)
            if phase == 1:
                recon.append((float(phase1_loss(model, images)["reconstruction"]) * len(images), len(images)))
            else:
                probs += model(images).prob_fake.float().cpu().tolist()
                labels += batch_labels.astype(int).tolist()
    if phase == 1:  # NaN where no held-out image could be used (`skips` says why)
        n = sum(n for _, n in recon)
        return {"val_reconstruction": sum(t for t, _ in recon) / n if n else float("nan")}
    if not labels:
        return {"val_bal_acc": float("nan"), "val_auc": float("nan"), "val_n": 0}
    m = binary_metrics(labels, probs, (np.array(probs) > 0.5).astype(int))
    return {"val_bal_acc": m["Bal_Acc"], "val_auc": m["AUC"], "val_n": len(labels)}


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints


def recover_interrupted_run(storage: str, name: str) -> str | None:
    """Ray Train rewrites its checkpoint list in place: a run killed during that write
    leaves it unreadable, and every rerun then fails at start. In that case the list is
    removed and the newest complete checkpoint of ours (all its files there) is returned,
    for the rerun to resume from; None when there is nothing to recover."""
    run = Location(join_uri(storage, name))
    raw = run.read_bytes(SNAPSHOT)
    if raw is None:
        return None
    try:
        json.loads(raw)
        return None  # readable: Ray Train resumes by itself
    except ValueError:
        pass
    run.fs.rm(run.path(SNAPSHOT))
    for checkpoint in sorted((n for n in run.names() if n.startswith("checkpoint_")), reverse=True):
        files = set(run.names(checkpoint))
        if {EXPORT, TRAINER_STATE, "meta.json"} <= files:
            return run.uri_of(checkpoint)
    return None


def plan_into_run(input_uri: str, tc: TrainConfig, storage: str) -> TrainingData:
    """The training input planned into the run's folder, where every node (and a rerun)
    reads its records. An input that cannot train leaves no folder behind that it made."""
    run, top = Location(join_uri(storage, tc.name)), Location(storage)
    made_run, made_top = not run.exists(), not top.exists()
    try:
        return plan_training_data(input_uri, tc.phase, tc.val_fraction, run.uri, tc.label, tc.label_folders)
    except BaseException:
        if made_run:
            run.remove()
        if made_top and not top.names():  # other runs may have started there meanwhile: only when empty
            top.remove()
        raise


def _ordered():
    from ray.data import ExecutionOptions

    options = ExecutionOptions()
    options.preserve_order = True
    return options


def run_training(base: str, input_uri: str, output: str, storage: str, tc: TrainConfig,
                 address: str | None = None, memory: MemoryConfig | None = None) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    from pipeline.cluster import ensure_ray, require_placeable, require_shared_paths
    
    bundle = base_model(base, memory)
    storage = os.path.abspath(storage) if "://" not in storage else storage
    data = plan_into_run(input_uri, tc, storage)
    log.info("phase %d: %s training / %s held-out images in %s", tc.phase, f"{data.n_train:,}", f"{data.n_val:,}",
             input_uri)
    ensure_ray(address)
    workers = "a training worker (--workers" + (", --gpu)" if tc.use_gpu else ")")
    require_placeable({workers: {"CPU": 1, "GPU": 1 if tc.use_gpu else 0}}, address,
                      "fewer --workers" + (", or without --gpu" if tc.use_gpu else "") + ", or --address of a "
                      "cluster that has the nodes", counts={workers: tc.num_workers})
    read_here = "://" in data.root or data.input_format == "manifest"  # a manifest is read here only
    require_shared_paths({} if read_here else {os.path.abspath(data.root): "--input"},
                         {storage: "--storage"} if "://" not in storage else {})
    clock = epoch_clock()
    train_ds, val_ds = training_datasets(data, tc.seed, clock, decode_attempts())
    steps = tc.epochs * math.ceil(data.n_train / (tc.batch_size * tc.num_workers * tc.grad_accum))
    resume_from = recover_interrupted_run(storage, tc.name)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": dataclasses.asdict(tc), "model_config": bundle.config.to_dict(),
                           "weights": ray.put(bundle.weights.to_numpy()), "total_steps": steps, "clock": clock,
                           "train_images": data.n_train,
                           "resume_from": resume_from},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu),
        run_config=RunConfig(name=tc.name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=tc.max_failures)),
        datasets={"train": train_ds, "val": val_ds},
        # records in the same order every run: a resumed run sees each epoch's batches as the
        # uninterrupted run did (augmentation is seeded per epoch, not per position)
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=_ordered()),
    )
    result = trainer.fit()
    # A rerun that recovered a checkpoint of ours (above) with no epoch left to train
    # reports none to Ray Train: that checkpoint is the run's last.
    final = result.checkpoint or (ray.train.Checkpoint(resume_from) if resume_from else None)
    if final is None:
        raise RuntimeError(f"training run {tc.name} under {storage} ended without a checkpoint")
    with final.as_directory() as d:
        trained = load_file(os.path.join(d, EXPORT))
        meta = json.loads(Path(d, "meta.json").read_text())
    new = trained_weights(bundle.weights, trained)
    card = {"phase": tc.phase, "base": base, "base_model_id": bundle.model_id, "data": input_uri,
            "train_images": data.n_train, "val_images": data.n_val, "recipe": dataclasses.asdict(tc),
            "history": meta["history"], "final": meta["history"][-1],
            # the last epoch's (checkpoints of older versions did not record them)
            "skipped_images": meta.get("skipped"),
            # trained nothing more: this run resumed after the recovered checkpoint's epoch
            "resumed_from_epoch": meta["resumed_from_epoch"] if result.checkpoint else meta["epoch"]}
    model_id = save_bundle(output, bundle.config, new, {"trained": card})
    card["model_id"] = model_id
    Location(output).write_json("model_card.json", card)
    return card
