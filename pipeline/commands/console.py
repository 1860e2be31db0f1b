"""The command line's console: Ray's known false alarms kept off it.

1. Ray Data starts every actor of an actor pool with two of its own objects passed by
   reference (the pickled map function and the DataContext, both `ray.put` by the
   operator), and with `max_restarts=-1` so that a dead replica is restarted; Ray Train's
   controller starts its `PreemptionWatcher` the same way. Ray's core worker then logs,
   at ERROR level and once per process, that the actor "has constructor arguments in the
   object store and max_restarts > 0" (ray-project/ray#53727). The risk it names (those
   objects freed before a restart) does not arise while their owner (the driver running
   the dataset, the training controller) holds them to the end, and the suite's
   killed-actor test proves restarts work. Turning restarts off would make a dead replica
   fail the scan.
2. Ray Train's `PlacementGroupCleaner` (it frees a run's resources should the training
   controller die) asks the state API every second whether the controller lives; that
   API is served by the dashboard, which a local Ray started by `mirror` does not run
   (nor do clusters started without it), so every second of a training run logged a
   warning that it "Failed to query Ray Train Controller actor state". A local cluster
   ends with the command, resources and all, so there is nothing for it to clean.

So the `mirror` command (and `jobs/*.py`) run their process with file descriptor 2
piped through a small child process that drops exactly those lines and passes every
other byte on unchanged and at once (progress bars included). The lines stay in Ray's
session logs. A child process, not a thread, so that whatever a crashing driver writes
last still reaches the console.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys

# Matched against whole lines of the driver's stderr (a remote process's lines come prefixed).
FALSE_ALARMS = (
    r"core_worker\.cc:\d+: Actor with class name: '(MapWorker\(.*|PreemptionWatcher)' and ID: '[0-9a-f]+' has "
    r"constructor arguments in the object store and max_restarts > 0\.",
    r"\(PlacementGroupCleaner pid=\d+(, ip=[^)]*)?\).* Failed to query Ray Train Controller actor state\. ",
)
FALSE_ALARM = "|".join(f"(?:{pattern})" for pattern in FALSE_ALARMS)

# The child: reads the pipe, holds back a partial line until its end comes (the driver
# may write a forwarded line in two pieces), forwards everything else at once: a partial
# line holding a carriage return or a cursor-up is a progress bar redrawing, and passes.
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
    if b"\r" not in tail and b"\x1b[A" not in tail and len(tail) < 65536:
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
