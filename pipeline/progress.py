"""Progress for corpus-sized steps that run outside Ray Data (which shows its own).

`step` logs when a step starts and how long it took, on the `mirror` logger (the CLI
sends it to stderr; a library user decides). `progress` wraps a loop in a tqdm bar on
an interactive stderr and stays silent elsewhere (job logs get the step lines).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

log = logging.getLogger("mirror")
T = TypeVar("T")


@contextlib.contextmanager
def step(what: str) -> Iterator[dict]:
    """`with step("listing s3://x") as info: ...; info["items"] = n` -> two log lines."""
    info: dict = {}
    log.info("%s ...", what)
    t0 = time.perf_counter()
    yield info
    items = f", {info['items']:,} {info.get('unit', 'items')}" if "items" in info else ""
    log.info("%s: done in %.1fs%s", what, time.perf_counter() - t0, items)


def progress(items: Iterable[T], what: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    return tqdm(items, desc=what, total=total, unit=unit, file=sys.stderr, mininterval=0.5, leave=False,
                disable=None)  # None: only when stderr is a terminal


def log_to_console() -> None:
    """The CLI's choice: `mirror` step lines on stderr, like Ray's own INFO lines."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s\tINFO mirror -- %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
