"""Fault-injection hooks for reliability tests, off unless their variables are set.

MIRROR_FAULT_SCORE_DELAY_S   sleep this long before each scored batch (slows a scan
                             so a test can interrupt it mid-way)
MIRROR_FAULT_ACTOR_EXIT_AFTER  a scoring actor process exits after this many batches
                             (once per marker file MIRROR_FAULT_MARKER, so the
                             replacement actor lives)
MIRROR_FAULT_WRITER_EXIT       a commit task's process exits just before writing its
                             part (once per marker file MIRROR_FAULT_MARKER)
MIRROR_FAULT_WRITE_DELAY_S     sleep this long before each part or shard is written
MIRROR_FAULT_DECODE_CRASH      decoding a record whose name contains this text kills the
                             decoding process with SIGSEGV (a file that crashes a codec)
MIRROR_FAULT_DECODE_HANG       decoding a record whose name contains this text never ends
MIRROR_FAULT_DEVICE_DECODE_CRASH  a replica's device decode of a block holding a JPEG whose
                             bytes contain this text (a JPEG comment) kills the replica
                             with SIGSEGV (a file that crashes nvJPEG)
MIRROR_FAULT_DEVICE_DECODE_ERROR  the same block raises a CUDA error instead (one that
                             leaves the replica's CUDA context unusable)
MIRROR_FAULT_TRAIN_EXIT_AFTER_EPOCH  a training worker process exits once it has reported
                             this epoch's checkpoint (once per marker file MIRROR_FAULT_MARKER:
                             a preempted training node)
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass


@dataclass
class FaultHooks:
    score_delay_s: float = 0.0
    actor_exit_after: int = 0
    marker: str | None = None
    writer_exit: bool = False
    write_delay_s: float = 0.0
    device_decode_crash: bytes | None = None
    device_decode_error: bytes | None = None
    batches: int = 0

    @classmethod
    def from_env(cls) -> "FaultHooks":
        return cls(
            score_delay_s=float(os.environ.get("MIRROR_FAULT_SCORE_DELAY_S", 0) or 0),
            actor_exit_after=int(os.environ.get("MIRROR_FAULT_ACTOR_EXIT_AFTER", 0) or 0),
            marker=os.environ.get("MIRROR_FAULT_MARKER"),
            writer_exit=bool(os.environ.get("MIRROR_FAULT_WRITER_EXIT")),
            write_delay_s=float(os.environ.get("MIRROR_FAULT_WRITE_DELAY_S", 0) or 0),
            device_decode_crash=os.environ.get("MIRROR_FAULT_DEVICE_DECODE_CRASH", "").encode() or None,
            device_decode_error=os.environ.get("MIRROR_FAULT_DEVICE_DECODE_ERROR", "").encode() or None,
        )

    def before_score_batch(self) -> None:
        self.batches += 1
        if self.score_delay_s:
            time.sleep(self.score_delay_s)
        if self.actor_exit_after and self.batches > self.actor_exit_after:
            self._exit_once()

    def before_write(self) -> None:
        if self.write_delay_s:
            time.sleep(self.write_delay_s)
        if self.writer_exit:
            self._exit_once()

    def before_device_decode(self, payloads: list[bytes]) -> None:
        if self.device_decode_crash and any(self.device_decode_crash in p for p in payloads):
            os.kill(os.getpid(), signal.SIGSEGV)
        if self.device_decode_error and any(self.device_decode_error in p for p in payloads):
            import torch

            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered (fault hook)")

    def _exit_once(self) -> None:
        if self.marker and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)


def after_checkpoint(epoch: int) -> None:
    """The training hook: the worker dies after this epoch's checkpoint (once per marker)."""
    after = os.environ.get("MIRROR_FAULT_TRAIN_EXIT_AFTER_EPOCH")
    if after and int(after) == epoch:
        FaultHooks.from_env()._exit_once()


def before_decode(name: str | None) -> None:
    """The decode hooks: a record named for it crashes or hangs its decoding process."""
    crash, hang = os.environ.get("MIRROR_FAULT_DECODE_CRASH"), os.environ.get("MIRROR_FAULT_DECODE_HANG")
    if crash and name and crash in name:
        os.kill(os.getpid(), signal.SIGSEGV)
    if hang and name and hang in name:
        time.sleep(3600)
