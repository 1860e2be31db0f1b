"""Commit stage: a unit's scored rows -> its part file, written by a Ray worker.

Runs in a pool of writer actors after the score stage. Each block holds whole units (the
decode stage emits blocks of whole units and the score stage keeps blocks whole), so a writer
can assemble a unit's output rows from its packed records and scored rows and write its
part once, whole (atomic rename locally, one PUT on object stores). A re-executed call
writes the same part again under the same name: never a duplicate row. What reaches the
driver is one completion record per unit (ids, counts, the part's size and version), never rows.
"""
from __future__ import annotations

import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.scan.schema import (
    DECODE_SECONDS,
    INDEX,
    OUTPUT_COLUMNS,
    READOUT,
    REGION_DECODED,
    REPLICA,
    ROW_PREPROCESS,
    SCORE_SECONDS,
    SHA256,
    STAGE_RESULT_FIELDS,
    UNIT,
    UNIT_RECORDS,
    UNIT_TARGET,
    conform,
    error_kind_counts,
    flagged_count,
    scored_labeled,
    unpack_records,
)

WRITER_METADATA = b"mirror_writer"  # part files record which node and process wrote them

COMPLETION_SCHEMA = pa.schema([
    ("store", pa.string()), ("unit_id", pa.string()), ("rows", pa.int64()), ("errors", pa.int64()),
    ("labeled", pa.int64()), ("flagged", pa.int64()), ("error_kinds", pa.string()), ("part_bytes", pa.int64()),
    ("part_version", pa.string()),
    ("decode_s", pa.float64()), ("score_s", pa.float64()), ("readout", pa.string()), ("replicas", pa.string()),
    ("cpu_decoded_in_gpu_mode", pa.int64()), ("jpeg_region_decoded", pa.int64()),
    ("writer_node", pa.string()), ("writer_pid", pa.int64()),
])


def assemble_rows(records: pa.Table, scored: pa.Table, run: dict[str, Any]) -> pa.Table:
    """Input record columns + stage results -> output rows in the documented schema."""
    if records.num_rows != scored.num_rows:
        raise RuntimeError(f"unit has {records.num_rows} records but {scored.num_rows} scored rows")
    table = records.drop_columns([c for c in records.column_names if c == "bytes"])
    # carried input columns that collide with output names keep their data under input_<name>
    clashes = [c for c in table.column_names if c in OUTPUT_COLUMNS and c not in ("uri", "id", "label", "subset")]
    table = table.rename_columns([f"input_{c}" if c in clashes else c for c in table.column_names])
    given_id = table["id"] if "id" in table.column_names else pa.nulls(table.num_rows, pa.string())
    ids = pc.coalesce(pc.cast(given_id, pa.string()), scored[SHA256])
    table = table.drop_columns([c for c in ("id",) if c in table.column_names]).append_column("id", ids)
    for field in STAGE_RESULT_FIELDS:
        table = table.append_column(field.name, scored[field.name])
    for name, value in run.items():
        table = table.append_column(name, pa.array([value] * table.num_rows))
    if ROW_PREPROCESS in scored.column_names and "preprocess" in run:  # rows decoded under another policy
        at = table.column_names.index("preprocess")
        table = table.set_column(at, "preprocess", pc.coalesce(scored[ROW_PREPROCESS], table["preprocess"]))
    return conform(table)


def unit_rows(scored: pa.Table, unit_id: str) -> tuple[pa.Table, dict, pa.Table]:
    """(records, target, scored rows in index order) of one whole unit; a partial unit is an error."""
    part = scored.filter(pc.equal(scored[UNIT], unit_id))
    first = part.filter(pc.equal(part[INDEX], 0))
    if not first.num_rows:
        raise RuntimeError(f"unit {unit_id}: its block lost the first row (records and target)")
    records, target = unpack_records(first[UNIT_RECORDS][0].as_py()), json.loads(first[UNIT_TARGET][0].as_py())
    _, first = np.unique(part[INDEX].to_numpy(), return_index=True)  # a re-run batch: first row per index
    part = part.take(pa.array(first)).sort_by(INDEX)
    if part.num_rows != records.num_rows or part[INDEX][0].as_py() != 0:
        raise RuntimeError(f"unit {unit_id} reached the commit stage split: {part.num_rows} of "
                           f"{records.num_rows} rows in one block")
    return records, target, part


WRITE_THREADS = 16  # a block's part writes in flight at once (object stores: latency-bound)
CALLS_PER_WRITER = 8  # blocks one writer commits at once


def commit_units(batch: pa.Table) -> pa.Table:
    """Ray map_batches function (pyarrow, whole blocks): write each unit's part where its
    target says (a block's parts in parallel), return one completion record per unit."""
    import ray

    from pipeline.scan.faults import FaultHooks

    faults = FaultHooks.from_env()
    # outside Ray (a stage run by hand) the writer is named by its host
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()
    writer = {"node": node, "pid": os.getpid()}
    keys = list(dict.fromkeys(batch[UNIT].to_pylist()))
    if len(keys) == 1:
        return pa.Table.from_pylist([_commit_unit(batch, keys[0], writer, faults)], schema=COMPLETION_SCHEMA)
    with ThreadPoolExecutor(min(WRITE_THREADS, len(keys))) as pool:
        done = list(pool.map(lambda key: _commit_unit(batch, key, writer, faults), keys))
    return pa.Table.from_pylist(done, schema=COMPLETION_SCHEMA)


def _commit_unit(batch: pa.Table, key: str, writer: dict, faults) -> dict:
    """One unit of the block: its part written whole, its completion record returned."""
    from pipeline.scan.store import ScanStore

    records, target, scored = unit_rows(batch, key)
    rows = assemble_rows(records, scored, target["run"])
    out = ScanStore(target["store"])
    faults.before_write()
    metadata = {WRITER_METADATA: f'{{"node": "{writer["node"]}", "pid": {writer["pid"]}}}'.encode()}
    size, version = out.write_parquet(out.part_name(target["unit_id"]),
                                      rows.replace_schema_metadata({**(rows.schema.metadata or {}), **metadata}))
    # the part's counts, size and version: the summary counts the part from these (no read)
    # while the listing shows it as written
    return {"store": target["store"], "unit_id": target["unit_id"], "rows": rows.num_rows,
            "errors": rows.num_rows - rows["error"].null_count, "labeled": scored_labeled(rows).num_rows,
            "flagged": flagged_count(rows), "error_kinds": error_kind_counts(rows), "part_bytes": size, "part_version": version,
            "decode_s": float(pc.sum(scored[DECODE_SECONDS]).as_py() or 0),
            "score_s": float(pc.sum(scored[SCORE_SECONDS]).as_py() or 0),
            "readout": ",".join(sorted(set(scored[READOUT].to_pylist()) - {None})),
            "replicas": ",".join(sorted(set(scored[REPLICA].to_pylist()) - {None})),
            "cpu_decoded_in_gpu_mode": scored.num_rows - scored[ROW_PREPROCESS].null_count,
            "jpeg_region_decoded": int(pc.sum(scored[REGION_DECODED]).as_py() or 0),
            "writer_node": writer["node"], "writer_pid": writer["pid"]}


class CommitWriter:
    """The commit stage's actor: `commit_units` on each block it is handed. Ray runs several
    calls of one writer at once (threads), so part writes, which wait on storage, overlap,
    and a long-lived writer spares every block a task's scheduling and process start."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        return commit_units(batch)


def add_commit_stage(ds, writers: int | None = None):
    """`ds` (whole-unit blocks of scored rows) -> one completion record per unit, the parts
    written by a pool of CommitWriter actors: `writers`, by default one per node with CPUs,
    kept off the nodes without CPUs (a head that schedules no work gets none;
    nodes that join later may host them). Writers reserve no CPU: a fraction of a core held
    for the whole scan would leave small nodes unable to start a decode task."""
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    cpu_less = [n["NodeID"] for n in alive if not n["Resources"].get("CPU", 0)]
    pool = ray.data.ActorPoolStrategy(size=writers or max(1, len(alive) - len(cpu_less)),
                                      max_concurrent_calls_per_actor=CALLS_PER_WRITER, enable_true_multi_threading=True)
    return ds.map_batches(CommitWriter, batch_size=None, batch_format="pyarrow", num_cpus=0, compute=pool,
                          label_selector={"ray.io/node-id": f"!in({','.join(cpu_less)})"} if cpu_less else None)
