"""Score stage: an actor holding one MIRROR replica, built from shared weights.

The driver loads a bundle once and puts its tensors (as numpy arrays) in the
Ray object store; each actor builds its replica from those shared arrays and
never reads weights from storage itself.
"""
from __future__ import annotations

import time
import uuid

import numpy as np
import pyarrow as pa

from mirror_core.config import MirrorConfig
from mirror_core.detector import SIGNALS, Detector
from mirror_core.model import assemble_model
from mirror_core.weights import MirrorWeights
from pipeline.scan.schema import DECODED_SCHEMA, PIXELS, PRED, READOUT, REPLICA, SCORE_SECONDS


class Scorer:
    """Callable class for `map_batches(..., compute=ActorPoolStrategy(...))`."""

    def __init__(self, weights, config: dict, model_id: str, device: str = "cpu", precision: str = "fp32",
                 compile: bool = False, batch_size: int = 32):
        import ray

        from pipeline.scan.faults import FaultHooks

        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        cfg = MirrorConfig.from_dict(config)  # with the scan's overrides applied already
        model = assemble_model(cfg, MirrorWeights.from_numpy(weights))
        self.detector = Detector(model, cfg, model_id, device=device, precision=precision, compile=compile)
        self.faults = FaultHooks.from_env()
        self.batch_size = batch_size
        self.replica = uuid.uuid4().hex  # this replica's identity: a run counts the replicas it built

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """One whole block (a unit's rows): scored in model calls of `batch_size` images,
        returned whole, so the commit stage receives the unit in one piece."""
        t0 = time.perf_counter()
        errors = batch["error"]
        ok = np.array([e is None for e in errors], dtype=bool)
        n = len(errors)
        scores = {k: np.full(n, np.nan) for k in SIGNALS}
        pixels = np.asarray(batch[PIXELS])
        for start in range(0, n, self.batch_size):
            self.faults.before_score_batch()
            sel = ok[start : start + self.batch_size]
            if not sel.any():
                continue
            chunk = pixels[start : start + self.batch_size]
            got = self.detector.score_pixels(chunk if sel.all() else chunk[sel])  # no copy in the common case
            for k in SIGNALS:
                scores[k][start : start + self.batch_size][sel] = got[k]
        seconds = (time.perf_counter() - t0) / max(n, 1)
        # Pass the decode columns through with their types (numpy batches carry
        # nullable ints as floats with NaN: from_pandas maps NaN back to null).
        columns = {f.name: pa.array(batch[f.name], f.type, from_pandas=True) for f in DECODED_SCHEMA}
        columns[SCORE_SECONDS] = pa.array(np.full(n, seconds), pa.float64())
        columns[READOUT] = pa.array([self.detector.readout] * n, pa.string())
        columns[REPLICA] = pa.array([self.replica] * n, pa.string())
        table = pa.table(columns)
        for k in SIGNALS:
            table = table.append_column(k, pa.array(scores[k], pa.float64(), mask=~ok))
        pred = (scores["prob_fake"] > self.detector.threshold).astype(np.int64)
        return table.append_column(PRED, pa.array(pred, pa.int64(), mask=~ok))
