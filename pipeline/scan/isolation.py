"""A record that crashes its decoder becomes an error row, not a job that never ends.

Decoding runs native code (Pillow's codecs, libjpeg) over untrusted files; a file that
makes it crash the process (a segfault, an abort) kills the task's worker. Ray retries
such a task (Ray Data retries them forever by default), and the same file would kill
every attempt. So the driver keeps a small `DecodeAttempts` actor: a task says when it
begins and ends each piece of work (a scan's unit, a training batch), and a piece begun by
an earlier attempt that never ended it is done again in isolation: each record in a child
process (`IsolatedCalls`), where a crash (or a decode that hangs) costs that record only.
A tracked attempt's in-process calls run under a deadline (`Deadlined`): a decode that
hangs in native code is killed by SIGALRM after `timeout_s` and so ends like a crash.

The child speaks a small length-prefixed protocol over its stdin/stdout (JSON headers and
raw bytes; no pickle): request = header {args} + the record's bytes; answer = header
{kind: array | dataclass | value | error, ...} + an array's bytes. Arguments are JSON
values or dataclasses of them; results an array, a dataclass with one array field, or a
JSON value (tuples come back as tuples).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading

import numpy as np

from mirror_core.errors import error_text

RECORD_TIMEOUT_S = 300.0  # a record whose call takes longer is given up as hung


def decode_attempts():
    """The actor that remembers which pieces of work a task began and ended. It lives on
    the driver's node, whose loss ends the run anyway: on a worker node, that node's loss
    would take its record of open attempts with it and stall every task calling it until
    Ray had noticed the loss and restarted it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)  # tasks wait on it: it must come back
    class DecodeAttempts:
        def __init__(self):
            self.open: set[str] = set()
            self.isolated: set[str] = set()

        def begin(self, key: str) -> bool:
            """True when an earlier attempt began this piece and died before ending it."""
            died = key in self.open
            if died:
                self.isolated.add(key)
            self.open.add(key)
            return died

        def end(self, key: str) -> None:
            self.open.discard(key)

        def isolated_units(self) -> list[str]:
            return sorted(self.isolated)

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return DecodeAttempts.options(scheduling_strategy=here).remote()


@contextlib.contextmanager
def attempt(attempts, key: str | None, function, timeout_s: float = RECORD_TIMEOUT_S):
    """One attempt at a piece of work (`key`) that calls `function` per record: yields it
    under a deadline, or IsolatedCalls of it where an earlier attempt began this piece and
    died; the piece is marked ended when the block exits normally. `attempts` None:
    `function` itself, untracked (a killed process would only be retried)."""
    import ray

    if attempts is None or key is None:
        yield function
        return
    isolated = IsolatedCalls(function, timeout_s) if ray.get(attempts.begin.remote(key)) else None
    try:
        yield isolated or Deadlined(function, timeout_s)
    finally:
        if isolated is not None:
            isolated.close()
    attempts.end.remote(key)


class Deadlined:
    """`function`, killing this process (SIGALRM's default action) when a call runs longer
    than `timeout_s`: native code that hangs cannot be interrupted otherwise, and a killed
    process is what `attempt` isolates. Unarmed off the main thread, or where SIGALRM has a
    handler."""

    def __init__(self, function, timeout_s: float):
        self.function, self.timeout_s = function, timeout_s

    def __call__(self, *args):
        armed = (threading.current_thread() is threading.main_thread()
                 and signal.getsignal(signal.SIGALRM) == signal.SIG_DFL)
        if armed:
            signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
        try:
            return self.function(*args)
        finally:
            if armed:
                signal.setitimer(signal.ITIMER_REAL, 0)


class RecordFailed(Exception):
    """A call failed in the child (or the child died in it): `text` is the error."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def _name_of(obj) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _named(name: str):
    module, qualname = name.split(":")
    return getattr(importlib.import_module(module), qualname)


def _encode_arg(value):
    if dataclasses.is_dataclass(value):
        return {"dataclass": _name_of(type(value)), "fields": dataclasses.asdict(value)}
    return value


def _decode_arg(value):
    if isinstance(value, dict) and "dataclass" in value:
        return _named(value["dataclass"])(**value["fields"])
    return value


def _encode_result(value) -> tuple[dict, bytes]:
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return {"kind": "array", "shape": list(array.shape), "dtype": array.dtype.str}, array.tobytes()
    if dataclasses.is_dataclass(value):
        (field,) = [f.name for f in dataclasses.fields(value) if isinstance(getattr(value, f.name), np.ndarray)]
        head, payload = _encode_result(getattr(value, field))
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.name != field}
        return {**head, "kind": "dataclass", "class": _name_of(type(value)), "field": field, "fields": fields}, payload
    return {"kind": "value", "value": value, "tuple": isinstance(value, tuple)}, b""


def _decode_result(head: dict, payload: bytes):
    if head["kind"] == "value":
        return tuple(head["value"]) if head["tuple"] else head["value"]
    array = np.frombuffer(payload, np.dtype(head["dtype"])).reshape(head["shape"]).copy()
    if head["kind"] == "array":
        return array
    return _named(head["class"])(**head["fields"], **{head["field"]: array})


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


class IsolatedCalls:
    """`function(data, *args)` (a module-level function over a record's bytes), each call in
    a child process: its result, or RecordFailed with the exception's type and message, or
    with how the child died (which costs that call only; a new child takes the next one)."""

    def __init__(self, function, timeout_s: float = RECORD_TIMEOUT_S):
        self.function = _name_of(function)
        self.timeout_s = timeout_s
        self.child: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        """A child with its imports done (it says so first), so that the timeout counts the call only."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        child = subprocess.Popen([sys.executable, "-m", "pipeline.scan.isolation", self.function],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        try:
            _receive(child.stdout)
        except EOFError:
            raise RuntimeError(f"the isolated process for {self.function} did not start: exit code {child.wait()}")
        return child

    def __call__(self, data: bytes, *args):
        if self.child is None or self.child.poll() is not None:
            self.child = self._start()
        child = self.child
        try:
            _send(child.stdin, {"args": [_encode_arg(a) for a in args]}, data)
            ready, _, _ = select.select([child.stdout], [], [], self.timeout_s)
            if not ready:
                self.close()
                raise RecordFailed(f"no result in {self.timeout_s:.0f} s: hung (its process was killed)")
            head, payload = _receive(child.stdout)
        except (EOFError, BrokenPipeError):
            code = child.wait()
            self.child = None
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            raise RecordFailed(f"the decoding process died on this record ({how})") from None
        if head["kind"] == "error":
            raise RecordFailed(head["text"])
        return _decode_result(head, payload)

    def close(self) -> None:
        if self.child is not None:
            self.child.kill()
            self.child.wait()
            self.child = None


def serve(function, stdin, stdout) -> None:
    """The child's loop: ready, then one answer per request until stdin closes."""
    _send(stdout, {"kind": "ready"})
    while True:
        try:
            head, data = _receive(stdin)
        except EOFError:
            return
        try:
            result = function(data, *[_decode_arg(a) for a in head["args"]])
        except Exception as err:
            _send(stdout, {"kind": "error", "text": error_text(err)})
            continue
        _send(stdout, *_encode_result(result))


if __name__ == "__main__":
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything else written to stdout (a library's print) goes to stderr, not into the answers
    sys.stdout = sys.stderr
    serve(_named(sys.argv[1]), sys.stdin.buffer, answers)
