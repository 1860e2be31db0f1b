"""A record that crashes its decoder becomes an error row, not a scan that never ends.

Decoding runs native code (Pillow's codecs, libjpeg) over untrusted files; a file that
makes it crash the process (a segfault, an abort) kills the decode task's worker. Ray
retries such a task (Ray Data retries them forever by default), and the same file would
kill every attempt. So the driver keeps a small `DecodeAttempts` actor: a decode task
says when it begins and ends each unit, and a unit begun by an earlier attempt that never
ended it is decoded in isolation: each record in a child process (`IsolatedDecoder`), where
a crash (or a decode that hangs) costs that record only, which becomes an error row.

The child speaks a small length-prefixed protocol over its stdin/stdout (JSON headers and
raw bytes; no pickle): request = header {name, preprocess, perturbation} + the file's
bytes; answer = header {kind: crop | gpu | error, ...} + the crop's pixels.
"""
from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import struct
import subprocess
import sys

import numpy as np

from mirror_core.config import PreprocessConfig
from mirror_core.preprocess import Preprocessed

ISOLATED_RECORD_TIMEOUT_S = 300.0  # a record whose decode takes longer is given up as hung


def decode_attempts():
    """The actor that remembers which units a decode task began and ended."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)  # decode tasks wait on it: it must come back
    class DecodeAttempts:
        def __init__(self):
            self.open: set[str] = set()
            self.isolated: set[str] = set()

        def begin(self, key: str) -> bool:
            """True when an earlier attempt began this unit and died before ending it."""
            died = key in self.open
            if died:
                self.isolated.add(key)
            self.open.add(key)
            return died

        def end(self, key: str) -> None:
            self.open.discard(key)

        def isolated_units(self) -> list[str]:
            return sorted(self.isolated)

    return DecodeAttempts.remote()


class RecordFailed(Exception):
    """A record's decode failed in the child (or the child died on it): `text` is the error."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def _send(stream, header: dict, payload: bytes = b"") -> None:
    head = json.dumps(header).encode()
    stream.write(struct.pack(">II", len(head), len(payload)) + head + payload)
    stream.flush()


def _read_exactly(stream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = stream.read(n - len(out))
        if not got:
            raise EOFError
        out += got
    return bytes(out)


def _receive(stream) -> tuple[dict, bytes]:
    head_len, payload_len = struct.unpack(">II", _read_exactly(stream, 8))
    return json.loads(_read_exactly(stream, head_len)), _read_exactly(stream, payload_len)


class IsolatedDecoder:
    """`decode(data, name, cfg, perturbation)` (a module-level function: crop or GPU size),
    each call in a child process; the child is reused until it dies."""

    def __init__(self, decode, timeout_s: float = ISOLATED_RECORD_TIMEOUT_S):
        self.function = f"{decode.__module__}:{decode.__qualname__}"
        self.timeout_s = timeout_s
        self.child: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        """A child with its imports done (it says so first), so that the timeout counts decoding only."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        child = subprocess.Popen([sys.executable, "-m", "pipeline.scan.isolation", self.function],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        try:
            _receive(child.stdout)
        except EOFError:
            raise RuntimeError(f"the isolated decoder ({self.function}) did not start: exit code {child.wait()}")
        return child

    def __call__(self, data: bytes, name: str | None, cfg: PreprocessConfig, perturbation: str | None):
        if self.child is None or self.child.poll() is not None:
            self.child = self._start()
        child = self.child
        try:
            _send(child.stdin, {"name": name, "preprocess": dataclasses.asdict(cfg), "perturbation": perturbation},
                  data)
            ready, _, _ = select.select([child.stdout], [], [], self.timeout_s)
            if not ready:
                self.close()
                raise RecordFailed(f"no result in {self.timeout_s:.0f} s: hung (its process was killed)")
            header, payload = _receive(child.stdout)
        except (EOFError, BrokenPipeError):
            code = child.wait()
            self.child = None
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            raise RecordFailed(f"the decoding process died on this record ({how})") from None
        if header["kind"] == "error":
            raise RecordFailed(header["text"])
        if header["kind"] == "gpu":
            return tuple(header["size"])
        pixels = np.frombuffer(payload, np.uint8).reshape(header.pop("shape")).copy()
        return Preprocessed(pixels, header["width"], header["height"], header["format"], header["aligned"],
                            header["region_decoded"])

    def close(self) -> None:
        if self.child is not None:
            self.child.kill()
            self.child.wait()
            self.child = None


def serve(decode, stdin, stdout) -> None:
    """The child's loop: ready, then one answer per request until stdin closes."""
    _send(stdout, {"kind": "ready"})
    while True:
        try:
            header, data = _receive(stdin)
        except EOFError:
            return
        try:
            got = decode(data, header["name"], PreprocessConfig(**header["preprocess"]), header["perturbation"])
        except Exception as err:
            _send(stdout, {"kind": "error", "text": f"{type(err).__name__}: {err}"})
            continue
        if isinstance(got, tuple):
            _send(stdout, {"kind": "gpu", "size": list(got)})
        else:
            pixels = np.ascontiguousarray(got.pixels)
            _send(stdout, {"kind": "crop", "shape": list(pixels.shape), "width": got.width, "height": got.height,
                           "format": got.format, "aligned": got.aligned, "region_decoded": got.region_decoded},
                  pixels.tobytes())


if __name__ == "__main__":
    import importlib

    module, function = sys.argv[1].split(":")
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything else written to stdout (a library's print) goes to stderr, not into the answers
    sys.stdout = sys.stderr
    serve(getattr(importlib.import_module(module), function), sys.stdin.buffer, answers)
