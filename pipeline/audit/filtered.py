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

from pipeline.cluster import completed_tasks, ensure_ray, task_window
from pipeline.progress import progress
from pipeline.scan.schema import INDEX, UNIT, without_bookkeeping
from pipeline.scan.store import ScanStore, records_schema, stored_records
from pipeline.storage import Location

KEEP_COLUMN = "mirror_keep"
FILTER_TASK_CPUS = 0.5  # a shard task mostly waits on storage


def with_threshold_info(table: pa.Table, threshold: float, method: str) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta.update({b"mirror_threshold": repr(threshold).encode(), b"mirror_threshold_method": method.encode()})
    return table.replace_schema_metadata(meta)


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


def write_filtered(out: Location, scan: ScanStore, keep: dict[str, np.ndarray], mode: str, threshold: float,
                   method: str, address: str | None = None) -> int:
    """The corpus minus flagged rows (mode 'drop') or with a keep column ('mark'); `keep`:
    unit id -> flag per row. Parquet shards come out as shards with every original column,
    one Ray task per shard; the records of folders, manifests and tar samples come out as
    one manifest, streamed from the plan's records files (bounded memory)."""
    plan = scan.load_plan()
    if plan.input_format != "parquet":
        return _write_manifest(out, scan, plan, keep, mode, threshold, method)
    import ray

    ensure_ray(address)
    by_file: dict[str, list] = {}
    for u in plan.units:
        by_file.setdefault(u.file, []).append(u)
    task = ray.remote(num_cpus=FILTER_TASK_CPUS)(filter_shard)

    def submit(shard: tuple[str, list]):
        file, units = shard
        return task.remote(out.uri, file, np.concatenate([keep[u.unit_id] for u in units]), mode, threshold, method)

    done = completed_tasks(submit, by_file.items(), task_window())
    return sum(ray.get(ref) for _, ref in progress(done, "filtered shards", total=len(by_file), unit="shard"))


def _write_manifest(out: Location, scan: ScanStore, plan, keep: dict[str, np.ndarray], mode: str, threshold: float,
                    method: str) -> int:
    """filtered/manifest.parquet: the plan's records, a records file at a time, each with
    its keep flag (records of a unit are stored together, in index order)."""
    schema = records_schema(scan, plan)
    if mode == "mark":
        schema = schema.append(pa.field(KEEP_COLUMN, pa.bool_()))
    schema = with_threshold_info(schema.empty_table(), threshold, method).schema
    written = 0
    with out.parquet_writer("filtered/manifest.parquet", schema) as writer:
        for records in stored_records(scan, plan):
            flags = np.empty(records.num_rows, bool)
            index = records[INDEX].to_numpy()
            for unit, (start, end) in _runs(records[UNIT]).items():
                flags[start:end] = keep[unit][index[start:end]]
            part = _kept(without_bookkeeping(records), flags, mode)
            writer.write_table(pa.table([part[f.name].cast(f.type) if f.name in part.column_names
                                         else pa.nulls(part.num_rows, f.type) for f in schema], schema=schema))
            written += part.num_rows
    return written


def _kept(table: pa.Table, flags, mode: str) -> pa.Table:
    flags = pa.array(flags, pa.bool_())
    return table.filter(flags) if mode == "drop" else table.append_column(KEEP_COLUMN, flags)


def _write_part(out: Location, rel: str, table: pa.Table, flags, mode: str, threshold: float, method: str) -> int:
    table = _kept(table, flags, mode)
    out.write_parquet(rel, with_threshold_info(table, threshold, method))
    return table.num_rows
