"""The audit's filtered copy: the corpus minus flagged rows (or with a keep column).

Parquet shards come out as shards with every original column, one Ray task per shard, so
shard bytes never pass through the driver; folders and manifests come out as a manifest
of their records. Free of torch: the shard tasks import this module only.
"""
from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cluster import ensure_ray
from pipeline.progress import progress
from pipeline.scan.store import ScanStore
from pipeline.storage import Location

KEEP_COLUMN = "mirror_keep"
FILTER_TASK_CPUS = 0.5  # a shard task mostly waits on storage


def with_threshold_info(table: pa.Table, threshold: float, method: str) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta.update({b"mirror_threshold": repr(threshold).encode(), b"mirror_threshold_method": method.encode()})
    return table.replace_schema_metadata(meta)


def keep_by_unit(rows: pa.Table, keep: np.ndarray) -> dict[str, np.ndarray]:
    """Scan rows (`_unit`, `_index`) and their keep flags -> unit id -> flags in record order."""
    table = pa.table({"u": rows["_unit"], "i": rows["_index"], "k": pa.array(keep, pa.bool_())})
    table = table.sort_by([("u", "ascending"), ("i", "ascending")])
    flags = table["k"].to_numpy(zero_copy_only=False)
    return {u: flags[s:e] for u, (s, e) in _runs(table["u"]).items()}


def record_positions(records: pa.Table) -> dict[str, np.ndarray]:
    """Plan records (`_unit`, `_index`) -> unit id -> row positions in index order."""
    order = pa.table({"u": records["_unit"], "i": records["_index"],
                      "pos": pa.array(np.arange(records.num_rows))}).sort_by([("u", "ascending"), ("i", "ascending")])
    positions = order["pos"].to_numpy()
    return {u: positions[s:e] for u, (s, e) in _runs(order["u"]).items()}


def _runs(sorted_units: pa.ChunkedArray) -> dict[str, tuple[int, int]]:
    """A sorted unit-id column -> unit id -> (start, end) of its run."""
    units = sorted_units.combine_chunks().dictionary_encode()
    codes = units.indices.to_numpy()
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else np.array([], int)
    bounds = np.r_[starts, len(codes)]
    names = units.dictionary.to_pylist()
    return {names[codes[s]]: (s, e) for s, e in zip(bounds[:-1], bounds[1:])}


def filter_shard(out_uri: str, file: str, keep: np.ndarray, mode: str, threshold: float, method: str) -> int:
    """One shard of the filtered copy (every original column, image bytes included): runs
    as a Ray task, so shard bytes never pass through the driver."""
    with fsspec.open(file, "rb") as f:
        table = pq.read_table(f)
    return _write_part(Location(out_uri), f"filtered/{file.rsplit('/', 1)[-1]}", table, keep, mode, threshold, method)


def write_filtered(out: Location, scan: ScanStore, rows: pa.Table, keep: np.ndarray, mode: str, threshold: float,
                   method: str, address: str | None = None) -> int:
    """The corpus minus flagged rows (mode 'drop') or with a keep column ('mark').
    Parquet shards come out as shards with every original column, one Ray task per shard;
    folders and manifests come out as a manifest of their records."""
    plan = scan.load_plan()
    flags_of = keep_by_unit(rows, keep)
    written = 0
    if plan.input_format == "parquet":
        import ray

        ensure_ray(address)
        by_file: dict[str, list] = {}
        for u in plan.units:
            by_file.setdefault(u.file, []).append(u)
        task = ray.remote(num_cpus=FILTER_TASK_CPUS)(filter_shard)
        pending = [task.remote(out.uri, file, np.concatenate([flags_of[u.unit_id] for u in units]), mode, threshold,
                               method) for file, units in by_file.items()]
        for ref in progress(pending, "filtered shards", unit="shard"):
            written += ray.get(ref)
    else:
        records = scan.plan_records(plan)
        flags = np.zeros(records.num_rows, bool)
        for unit_id, positions in record_positions(records).items():
            flags[positions] = flags_of[unit_id]
        written += _write_part(out, "filtered/manifest.parquet", records.drop_columns(["_unit", "_index"]), flags,
                               mode, threshold, method)
    return written


def _write_part(out: Location, rel: str, table: pa.Table, flags, mode: str, threshold: float, method: str) -> int:
    flags = pa.array(flags, pa.bool_())
    table = table.filter(flags) if mode == "drop" else table.append_column(KEEP_COLUMN, flags)
    out.write_parquet(rel, with_threshold_info(table, threshold, method))
    return table.num_rows


