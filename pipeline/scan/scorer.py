"""Score stage: an actor holding one MIRROR replica, built from shared weights.

The driver loads a bundle once and puts its tensors (as numpy arrays) in the
Ray object store; each actor builds its replica from those shared arrays and
never reads weights from storage itself.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from dataclasses import replace

import numpy as np
import pyarrow as pa
import torch

from mirror_core.config import MirrorConfig
from mirror_core.detector import Detector
from mirror_core.gpu_decode import decode_crops, device_jpeg_decoder
from mirror_core.model import assemble_model
from mirror_core.signals import SIGNALS
from mirror_core.weights import MirrorWeights
from pipeline.scan.decode import decode_error, decode_record
from pipeline.scan.isolation import RECORD_TIMEOUT_S, IsolatedCalls, attempt
from pipeline.scan.schema import (
    DECODED_SCHEMA,
    ENCODED,
    PIXELS,
    PRED,
    READOUT,
    REPLICA,
    ROW_PREPROCESS,
    SCORE_SECONDS,
    UNIT,
)

# An attempt at decoding a block on the device is tracked under its first unit's key plus this.
DEVICE_DECODE_KEY = "#device-decode"


class Scorer:
    """Callable class for `map_batches(..., compute=ActorPoolStrategy(...))`."""

    def __init__(self, weights, config: dict, model_id: str, device: str = "cpu", precision: str = "fp32",
                 compile: bool = False, batch_size: int = 32, attempts=None, decode_timeout_s: float = RECORD_TIMEOUT_S):
        """`attempts` (a DecodeAttempts actor): in GPU decode mode, a block whose device decode
        killed an earlier attempt (a JPEG crashing nvJPEG, or a CUDA error there: Ray restarts
        the replica and retries the block) has its JPEGs decoded by the exact CPU path, one
        per child process."""
        import ray

        from pipeline.scan.faults import FaultHooks

        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        cfg = MirrorConfig.from_dict(config)  # with the scan's overrides applied already
        model = assemble_model(cfg, MirrorWeights.from_numpy(weights))
        self.detector = Detector(model, cfg, model_id, device=device, precision=precision, compile=compile)
        self.preprocess = cfg.preprocess
        self.gpu_decoder = device_jpeg_decoder(device) if cfg.preprocess.gpu_decode else None
        self.faults = FaultHooks.from_env()
        self.batch_size = batch_size
        self.attempts, self.decode_timeout_s = attempts, decode_timeout_s
        # Ray runs two calls of a GPU replica at once: one moves its block to the device (or
        # decodes its JPEGs there) on a side stream while the other's model scores, so the
        # device never waits for a block's upload. One of each at a time.
        self._upload_lock, self._model_lock = threading.Lock(), threading.Lock()
        self._side_stream = torch.cuda.Stream(self.detector.device) if self.detector.device.type == "cuda" else None
        self.replica = uuid.uuid4().hex  # this replica's identity: a run counts the replicas it built

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """One whole block (a unit's rows): scored in model calls of `batch_size` images,
        returned whole, so the commit stage receives the unit in one piece."""
        t0 = time.perf_counter()
        # Pass the decode columns through with their types (numpy batches carry
        # nullable ints as floats with NaN: from_pandas maps NaN back to null).
        columns = {f.name: pa.array(batch[f.name], f.type, from_pandas=True) for f in DECODED_SCHEMA}
        pixels = np.asarray(batch[PIXELS])
        encoded = [i for i, e in enumerate(batch.get(ENCODED, ())) if isinstance(e, bytes)]
        if encoded:  # GPU decode mode: crops made here, on the replica's device
            key = f"{batch[UNIT][0]}{DEVICE_DECODE_KEY}"  # a retry brings the same block
            with attempt(self.attempts, key, decode_record, self.decode_timeout_s) as cpu_decode:
                try:
                    pixels, columns = self._decode_on_device(pixels, [batch[ENCODED][i] for i in encoded], encoded,
                                                             columns, cpu_decode)
                except torch.AcceleratorError:
                    if isinstance(cpu_decode, IsolatedCalls):
                        raise  # the device fails without nvJPEG too: not this block's JPEGs
                    # A CUDA error is sticky: this process's device context is lost. Ending the
                    # process makes Ray start a fresh replica and retry the block, isolated.
                    os._exit(70)
        elif self._side_stream is not None:
            pixels = self._upload(pixels)
        ok = np.asarray(columns["error"].is_null().to_numpy(zero_copy_only=False), dtype=bool)
        n = len(ok)
        scores = {k: np.full(n, np.nan) for k in SIGNALS}
        with self._model_lock:
            self._score_block(pixels, ok, scores)
        seconds = (time.perf_counter() - t0) / max(n, 1)
        columns[SCORE_SECONDS] = pa.array(np.full(n, seconds), pa.float64())
        columns[READOUT] = pa.array([self.detector.readout] * n, pa.string())
        columns[REPLICA] = pa.array([self.replica] * n, pa.string())
        table = pa.table(columns)
        for k in SIGNALS:
            table = table.append_column(k, pa.array(scores[k], pa.float64(), mask=~ok))
        pred = (scores["prob_fake"] > self.detector.threshold).astype(np.int64)
        return table.append_column(PRED, pa.array(pred, pa.int64(), mask=~ok))

    def _score_block(self, pixels, ok: np.ndarray, scores: dict[str, np.ndarray]) -> None:
        """Model calls of `batch_size` images over the block's decodable rows, into `scores`."""
        n = len(ok)
        for start in range(0, n, self.batch_size):
            self.faults.before_score_batch()
            sel = ok[start : start + self.batch_size]
            if not sel.any():
                continue
            chunk = pixels[start : start + self.batch_size]
            if not sel.all():
                chunk = chunk[sel] if isinstance(chunk, np.ndarray) else chunk[torch.from_numpy(sel).to(chunk.device)]
            got = (self.detector.score_pixels(chunk) if isinstance(chunk, np.ndarray)  # no copy in the common case
                   else self.detector.score_tensor(chunk))
            for k in SIGNALS:
                scores[k][start : start + self.batch_size][sel] = got[k]

    def _to_device(self, pixels: np.ndarray) -> torch.Tensor:
        """A writable copy of the block's crops on the replica's device (through pinned
        memory on CUDA: the copy runs asynchronously on the current stream)."""
        if self.detector.device.type != "cuda":
            return torch.from_numpy(np.array(pixels))
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.numpy()[...] = pixels
        return host.to(self.detector.device, non_blocking=True)

    def _hand_over(self, block: torch.Tensor) -> None:
        """Work queued on the side stream for `block` is done before the model's stream reads it."""
        self._side_stream.synchronize()
        block.record_stream(torch.cuda.default_stream(self.detector.device))

    def _upload(self, pixels: np.ndarray) -> torch.Tensor:
        """The block's crops on the GPU, copied on the side stream."""
        with self._upload_lock, torch.cuda.stream(self._side_stream):
            block = self._to_device(pixels)
            self._hand_over(block)
        return block

    def _decode_on_device(self, pixels: np.ndarray, payloads: list[bytes], rows: list[int], columns: dict,
                          cpu_decode=decode_record):
        """The block's crops as one device tensor, the ENCODED rows decoded into it on the GPU;
        a JPEG the GPU decoder refuses takes the exact CPU path (`cpu_decode`, recorded in
        ROW_PREPROCESS), and one the CPU cannot decode either becomes an error row. When an
        earlier attempt at this block died (`cpu_decode` runs in child processes), every
        JPEG takes the CPU path: the device decoder is not trusted with them again."""
        cfg = self.preprocess
        device = self.detector.device
        stream = self._side_stream
        isolated = isinstance(cpu_decode, IsolatedCalls)
        with self._upload_lock, torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            block = self._to_device(pixels)
            sizes = list(zip(columns["width"].to_pylist(), columns["height"].to_pylist()))  # from the headers
            refused = (["an earlier attempt at this block died"] * len(rows) if isolated
                       else self._decode_into(block, payloads, [sizes[r] for r in rows], rows))
            if stream is not None:  # the crops are whole before the model's stream reads them
                self._hand_over(block)
        fallback = [(row, data) for row, data, why in zip(rows, payloads, refused) if why is not None]
        if fallback:
            errors, formats = columns["error"].to_pylist(), columns[ROW_PREPROCESS].to_pylist()
            cpu = replace(cfg, gpu_decode=False)
            for row, data in fallback:
                formats[row] = cfg.cpu_name
                try:
                    block[row] = torch.from_numpy(cpu_decode(data, None, cpu, None).pixels).to(device)
                except Exception as err:  # the record becomes an error row
                    errors[row] = decode_error(err)
            columns = {**columns, "error": pa.array(errors, pa.string()), ROW_PREPROCESS: pa.array(formats, pa.string())}
        return block, columns

    def _decode_into(self, block: torch.Tensor, payloads: list[bytes], sizes: list[tuple[int, int]],
                     rows: list[int]) -> list[str | None]:
        """GPU-decoded crops into `block`'s `rows`; per row None or why it was refused."""
        self.faults.before_device_decode(payloads)
        if self.gpu_decoder is None:
            return ["no GPU JPEG decoder in this replica (CUDA and torchvision's decode_jpeg needed)"] * len(rows)
        crops, refused = decode_crops(payloads, sizes, self.preprocess, self.gpu_decoder, block.device)
        block[torch.tensor(rows, device=block.device)] = crops
        return refused
