"""Training data preparation as a Ray Data stage: bytes -> uint8 crops, on CPU tasks.

Training workers receive ready crops (and never decode): the train split is augmented
(phase 1 views + JPEG; phase 2 format alignment + JPEG), the held-out split gets the
official evaluation crop. Augmentation is seeded per (seed, epoch, record), so a record
is augmented the same way whichever task, batch or worker sees it, and an epoch after a
resume draws what it would have drawn in an uninterrupted run. Ray Data re-runs the stage
every epoch; the epoch comes from an `EpochClock` actor that rank 0 advances between
epochs (while every worker waits at the epoch's checkpoint report).
Images decode as at evaluation (truncated files as far as they go, at most
`PreprocessConfig.max_pixels`), and each view decodes a JPEG only where it reads
(`ImageRegions`). A record that cannot be read or decoded becomes a row with `ok` false (a
zero crop) and its `skip_reason` (a scan's error-row text), so the worker counts it as
skipped and the model card names it: training never dies on one bad file, nor loops on one
that crashes its decoder (`pipeline.scan.isolation`).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa

from pipeline.scan import faults
from pipeline.scan.decode import decode_error
from pipeline.scan.isolation import attempt

CROPS = "crops"  # uint8 [224, 224, 3] per row
OK = "ok"  # False: unreadable or undecodable (skipped, counted)
SKIP_REASON = "skip_reason"  # why a row is not ok, as a scan's error row says it (null when ok)
PREPARED_BY = "prepared_by_pid"  # the process that decoded the row (never a training worker)


def epoch_clock(initial: int = 0):
    """A tiny actor holding the current epoch (read by the preparation tasks)."""
    import ray

    @ray.remote(num_cpus=0)
    class EpochClock:
        def __init__(self, epoch: int):
            self.epoch = epoch

        def set(self, epoch: int) -> None:
            self.epoch = epoch

        def get(self) -> int:
            return self.epoch

    return EpochClock.remote(initial)


def record_seed(seed: int, epoch: int, uri: str) -> list[int]:
    return [seed, epoch, int(hashlib.sha256(uri.encode()).hexdigest()[:12], 16)]


def prepared_crop(data: bytes, uri: str, label: int | None, phase: int, seed: int, epoch: int,
                  evaluation: bool) -> np.ndarray:
    """One record's crop (the native decoding of untrusted bytes runs here): the held-out
    split's official crop, or the phase's augmentation seeded per (seed, epoch, uri)."""
    from mirror_core.config import PreprocessConfig
    from mirror_core.preprocess import ImageRegions, official_preprocess
    from mirror_core.train.augment import phase1_augment, phase2_augment

    faults.before_decode(uri)
    cfg = PreprocessConfig()
    if evaluation:
        return official_preprocess(data, cfg, name=uri).pixels
    rng = np.random.default_rng(record_seed(seed, epoch, uri))
    image = ImageRegions.of_bytes(data, cfg.max_pixels)
    return phase1_augment(image, rng) if phase == 1 else phase2_augment(image, int(label), rng)


def prepare_batch(batch: pa.Table, *, phase: int, seed: int, clock=None, evaluation: bool = False,
                  attempts=None) -> pa.Table:
    """Ray map_batches function (pyarrow): uri, label, bytes[, error] -> uri, label, crops, ok,
    skip_reason, prepared_by_pid. `error`: why a record's bytes could not be read.
    `attempts` (a DecodeAttempts actor): a batch whose earlier attempt died is prepared one
    record per child process, so that a file crashing its decoder is skipped, not retried forever."""
    import ray

    epoch = ray.get(clock.get.remote()) if clock is not None and not evaluation else 0
    uris, labels, datas = (batch[c].to_pylist() for c in ("uri", "label", "bytes"))
    read_errors = batch["error"].to_pylist() if "error" in batch.column_names else [None] * len(uris)
    key = f"{'val' if evaluation else 'train'}/{epoch}/{uris[0]}/{len(uris)}" if uris else None
    crops = np.zeros((len(uris), 224, 224, 3), np.uint8)
    reasons: list[str | None] = [None] * len(uris)
    with attempt(attempts, key, prepared_crop) as prepare:
        for i, (uri, label, data) in enumerate(zip(uris, labels, datas)):
            if data is None:  # unreadable: skipped, counted and named by the worker
                reasons[i] = read_errors[i] or "read failed: no bytes"
                continue
            try:
                crops[i] = prepare(data, uri, label, phase, seed, epoch, evaluation)
            except Exception as err:  # undecodable (or, isolated, crashing its decoder)
                reasons[i] = decode_error(err)
    from ray.data.extensions import ArrowTensorArray

    return pa.table({"uri": batch["uri"], "label": batch["label"], CROPS: ArrowTensorArray.from_numpy(crops),
                     OK: pa.array([r is None for r in reasons]), SKIP_REASON: pa.array(reasons, pa.string()),
                     PREPARED_BY: pa.array(np.full(len(uris), os.getpid(), np.int64))})
