"""A scan of a fraction of the input (`--sample`): which records, and what they tell.

A record is in the sample when a hash of its identity (its `uri`; a Parquet shard's row:
`shard#row_group:index`) falls below the fraction. The choice is the same on every run,
planner and node, needs no state, and keeps what an `--update` adds to the input in the
same proportion; a smaller fraction's sample lies within a larger one's.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable

import numpy as np
import pyarrow as pa

from pipeline.scan.webdataset import UNREADABLE

SAMPLE_DOMAIN = b"mirror-sample:"  # keeps the draw apart from any other hash of the same names


def in_sample(keys: Iterable[str | None], fraction: float) -> np.ndarray:
    """Whether each key's record is in the sample (a bool per key; a null key is '')."""
    bound = int(fraction * 2**64)
    return np.fromiter((int.from_bytes(hashlib.blake2b(SAMPLE_DOMAIN + (k or "").encode("utf-8", "surrogateescape"),
                                                       digest_size=8).digest(), "big") < bound for k in keys),
                       dtype=bool)


def sample_records(records: pa.Table, fraction: float | None) -> pa.Table:
    """The records in the sample, by their `uri` (all of them when `fraction` is None). A
    damaged tar shard's record for its unreadable rest is no sample and always stays: a
    sample's scan says which shards are damaged as a whole scan would."""
    if fraction is None or not records.num_rows:
        return records
    uris = records["uri"].to_pylist()
    rest = np.fromiter(((u or "").endswith(f"#{UNREADABLE}") for u in uris), dtype=bool, count=len(uris))
    return records.filter(pa.array(in_sample(uris, fraction) | rest))


class Draw:
    """A sampled plan's draw: the records in the sample of each batch, counting the records
    it was drawn from (`seen`). `fraction` None: every record, nothing counted."""

    def __init__(self, fraction: float | None):
        self.fraction = fraction
        self.seen = 0

    def __call__(self, records: pa.Table, listed: int | None = None) -> pa.Table:
        """`records`' sample; `listed`: the records they were picked from, if more (an
        update's listing, of which `records` are the new ones)."""
        if self.fraction is not None:
            self.seen += records.num_rows if listed is None else listed
        return sample_records(records, self.fraction)


def shard_row_key(shard: str, row_group: int, index: int) -> str:
    """A Parquet shard row's identity: also its `uri` where the shard names none."""
    return f"{shard}#{row_group}:{index}"


def shard_rows_in_sample(shard: str, row_group: int, rows: int, fraction: float | None) -> np.ndarray:
    """The indexes, within its row group of `rows` rows, of a shard's rows in the sample."""
    if fraction is None:
        return np.arange(rows, dtype=np.int64)
    return np.flatnonzero(in_sample((shard_row_key(shard, row_group, i) for i in range(rows)), fraction))


Z_95 = 1.959964  # the normal quantile of a two-sided 95% interval


def sample_figures(fraction: float, drawn_from: int, scored: int, flagged: int) -> dict:
    """What a sampled scan says of its whole input (summary.json's `sample`): the fraction,
    the records it was drawn from, and the share of scored images flagged fake with its 95%
    interval (Wilson), the input's own share lying within it 19 times in 20."""
    interval = share_interval(flagged, scored)
    return {"fraction": fraction, "drawn_from": drawn_from,
            "flagged_share": round(flagged / scored, 6) if scored else None,
            "flagged_share_95": [round(x, 6) for x in interval] if interval else None}


def sample_line(figures: dict) -> str:
    """The console's words for `sample_figures`."""
    line = f"a {100 * figures['fraction']:.4g}% sample of {figures['drawn_from']:,} records"
    if figures["flagged_share_95"] is not None:
        low, high = figures["flagged_share_95"]
        line += f" (flagged share in the whole input: {100 * low:.2f}% to {100 * high:.2f}%, 95% interval)"
    return line


def share_interval(hits: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson's score interval of a share `hits / n` (None for n = 0): what a sample's
    flagged share says of the whole input's, without a normal approximation's nonsense
    (below 0, above 1) at shares near 0, where fakes in a real corpus usually are."""
    if n <= 0:
        return None
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
