"""The command line's console: one known false alarm of Ray's C++ core kept off it.

Ray Data starts every actor of an actor pool with two of its own objects passed by
reference (the pickled map function and the DataContext, both `ray.put` by the
operator), and with `max_restarts=-1` so that a dead replica is restarted. Ray's core
worker then logs, at ERROR level and once per process, that the actor "has constructor
arguments in the object store and max_restarts > 0" (ray-project/ray#53727). It does so
for any actor pool, even one whose class takes no arguments at all; the risk it names
(those objects freed before a restart) does not arise while the driver runs the
dataset, which holds both references until the end, and the suite's killed-actor test
proves restarts work. Turning restarts off would make a dead replica fail the scan.

So the `mirror` command (and `jobs/*.py`) run their process with file descriptor 2
piped through a small child process that drops exactly that line and passes every
other byte on unchanged and at once (progress bars included). The line stays in Ray's
session log (`python-core-driver-*.log`). A child process, not a thread, so that
whatever a crashing driver writes last still reaches the console.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys

# Matched against whole lines of the driver's stderr.
FALSE_ALARM = (r"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*' and ID: '[0-9a-f]+' has constructor "
               r"arguments in the object store and max_restarts > 0\.")

# The child: reads the pipe, holds back only a partial line that could still become a
# native log line ('[' first, as Ray's C++ logs are), forwards everything else at once.
_FILTER = r"""
import os, re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # outlive the driver's Ctrl-C to print its traceback
alarm = re.compile(sys.argv[1].encode())
held = b""
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    data = held + chunk
    lines = data.split(b"\n")
    tail = lines.pop()
    out = b"".join(line + b"\n" for line in lines if not alarm.search(line))
    if tail.startswith(b"[") and b"\r" not in tail and len(tail) < 65536:
        held = tail
    else:
        held, out = b"", out + tail
    if out:
        os.write(1, out)
if held and not alarm.search(held):
    os.write(1, held)
"""


def filter_ray_false_alarm() -> None:
    """Route this process's fd 2 through the filter child (once; no-op when already done)."""
    if os.environ.get("MIRROR_CONSOLE_FILTER") == str(os.getpid()):
        return
    read_end, write_end = os.pipe()
    console = os.dup(2)
    child = subprocess.Popen([sys.executable, "-c", _FILTER, FALSE_ALARM], stdin=read_end, stdout=console,
                             close_fds=True)
    os.close(read_end)
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    os.environ["MIRROR_CONSOLE_FILTER"] = str(os.getpid())

    def restore() -> None:
        # Give the console back and let the child drain; processes that inherited the
        # pipe (a local Ray's daemons) may keep it open a while, so wait only briefly.
        sys.stderr.flush()
        os.dup2(console, 2)
        try:
            child.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass

    atexit.register(restore)
