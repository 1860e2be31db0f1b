"""Progress for corpus-sized steps, on the `mirror` logger (the CLI sends it to stderr;
a library user decides).

`step` logs when a step starts and how long it took. `progress` wraps a loop in a tqdm
bar on an interactive stderr, and elsewhere (a job's log) logs a line of its count every
LOG_EVERY_S. `RowProgress` logs a pipeline's rows done of its total, its rate and the time
left, every so often: Ray Data's own progress counts blocks per stage and knows no total
of rows.
`stall_reports` warns while no rows come, with a picture of why.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

from mirror_core.errors import error_text

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


LOG_EVERY_S = 60.0  # a progress line this often where stderr is no terminal


def progress(items: Iterable[T], what: str, total: int | None = None, unit: str = "it",
             every_s: float = LOG_EVERY_S) -> Iterable[T]:
    """`items`, counted: a tqdm bar on a terminal, else a line every `every_s` (0: none)."""
    if sys.stderr.isatty():
        return tqdm(items, desc=what, total=total, unit=unit, file=sys.stderr, mininterval=0.5, leave=False)
    plural = "items" if unit == "it" else unit if unit.endswith("s") else unit + "s"
    return _logged(items, RowProgress(what, total, every_s, unit=plural))


def _logged(items: Iterable[T], meter: "RowProgress") -> Iterator[T]:
    for item in items:
        yield item
        meter.add(1)


RAY_DATA_LOG_INTERVAL = "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL"  # Ray Data's, read when it first runs


def pace_ray_data_log(every_s: float) -> None:
    """Where stdout is no terminal (a job's log), Ray Data logs a block of lines per stage
    every 10 s, thousands of lines an hour that bury ours: paced as our own line (once an
    hour when that is off), unless the user chose a pace. Takes effect for the process's
    first Ray Data run."""
    os.environ.setdefault(RAY_DATA_LOG_INTERVAL, str(max(10, int(every_s)) if every_s > 0 else 3600))


def log_to_console() -> None:
    """The CLI's choice: `mirror` step lines on stderr, like Ray's own INFO lines."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s mirror -- %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def duration(seconds: float) -> str:
    """3725 -> '1h 2m', 125 -> '2m 5s', 7.2 -> '7s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"


class RowProgress:
    """`add(rows)` as rows are done; a line every `every_s` seconds (0: never):
    'scoring: 120,000 / 1,000,000 rows (12.0%), 2,850 rows/s, about 5m 9s left' (`unit`
    names what is counted; with no `total`: 'indexing: 1,200 shards, 35 shards/s'). The
    rate is that since the first rows came, so start-up does not lower it."""

    def __init__(self, what: str, total: int | None, every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, unit: str = "rows"):
        self.what, self.total, self.every_s, self.clock, self.unit = what, total, every_s, clock, unit
        self.done = 0
        self.first: tuple[float, int] | None = None  # (time, rows) of the first rows
        self.last_line = self.last_rows_at = clock()

    def add(self, rows: int) -> None:
        now = self.clock()
        self.done += rows
        self.last_rows_at = now
        if self.first is None:
            self.first = (now, self.done)
        if self.every_s and now - self.last_line >= self.every_s and (self.total is None or self.done < self.total):
            self.last_line = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        text = f"{self.what}: {self.done:,}" + (
            f" {self.unit}" if self.total is None else
            f" / {self.total:,} {self.unit} ({100 * self.done / max(self.total, 1):.1f}%)")
        t0, rows0 = self.first or (now, self.done)
        if now > t0 and self.done > rows0:
            rate = (self.done - rows0) / (now - t0)
            text += f", {rate:,.0f} {self.unit}/s"
            if self.total is not None:
                text += f", about {duration((self.total - self.done) / rate)} left"
        return text


@contextlib.contextmanager
def every(period_s: float, call: Callable[[], None], name: str) -> Iterator[None]:
    """`call()` every `period_s` seconds, in a thread of its own, while inside (a watch, a
    heartbeat); the thread has ended when the block has."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(period_s):
            call()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def stall_reports(meter: RowProgress, after_s: float, explain: Callable[[], str]) -> Iterator[None]:
    """While inside, a warning each `after_s` seconds in which no rows reach `meter` (0:
    none), with `explain()` (what the cluster has free, say): a pipeline waiting for
    resources it will never get would otherwise be silent."""
    if not after_s:
        yield
        return
    warned = meter.last_rows_at

    def watch() -> None:
        nonlocal warned
        now = meter.clock()
        if now - meter.last_rows_at >= after_s and now - warned >= after_s:
            warned = now
            try:
                why = explain()
            except Exception as err:  # a report must never end the run
                why = f"no picture of the cluster ({error_text(err)})"
            log.warning("no rows done for %s (%s of %s so far): %s", duration(now - meter.last_rows_at),
                        f"{meter.done:,}", f"{meter.total:,}", why)

    with every(after_s / 4, watch, "stall-reports"):
        yield
