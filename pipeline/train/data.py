"""A training input as two Ray datasets (train, held out), in bounded driver memory.

The input is planned as a scan plans it, from any scan source (folders, manifests,
Parquet shards, WebDataset tar shards; local or s3://): the driver holds the units only,
and the records of folder/manifest/tar-sample units are stored below the run's storage
(`_plan/records/`, the scan store's layout) where every node reads them. A split is a
dataset of unit descriptors: a CPU task reads a unit's records, keeps those of its split
and only then reads their image bytes (a record is read by one split, never both).

The split is deterministic: a hash of each record's path below the input (`split_keys`),
so the same records are held out in every run, resume and copy of the corpus.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mirror_core.uri import WEB_URL_PATTERN
from pipeline.scan.decode import unit_inputs
from pipeline.scan.labels import label_folders as folder_labels
from pipeline.scan.reads import planned_errors, read_shard_unit
from pipeline.scan.schema import without_bookkeeping
from pipeline.scan.sources import input_root, plan_source
from pipeline.scan.store import PlanRecordsWriter, read_unit_records, stored_records
from pipeline.scan.units import RECORD_KINDS, ColumnMap, Plan, SourceOptions, Unit
from pipeline.storage import Location, read_ahead, relative_paths
from pipeline.train.prepare import prepare_batch

SHARD_UNITS_READ_AT_ONCE = 16  # Parquet row groups whose labels are read concurrently when counting
FETCH_THREADS = 16  # image reads in flight per unit (object-store latency)


def is_held_out(keys: list[str], val_fraction: float) -> np.ndarray:
    """Whether each record (by its `split_keys` key) is held out: the same in every run."""
    heads = b"".join(hashlib.sha256(k.encode()).digest()[:4] for k in keys)  # each digest's first 32 bits
    return np.frombuffer(heads, ">u4") % 1000 < val_fraction * 1000


def split_keys(uris: pa.Array | pa.ChunkedArray, root: str) -> list[str]:
    """Each record's name below the input root ('0_real/a.png'), or its uri when it is not
    below it, so a corpus copied to another folder or bucket keeps its split."""
    uris = uris.combine_chunks() if isinstance(uris, pa.ChunkedArray) else uris
    return pc.coalesce(relative_paths(uris, root), uris).to_pylist()


def labels_of(records: pa.Table) -> pa.Array:
    """The records' labels (int64; null where a record has none, or the input no label column)."""
    if "label" in records.column_names:
        return records["label"].combine_chunks()
    return pa.nulls(records.num_rows, pa.int64())


def split_of(records: pa.Table, phase: int, val_fraction: float, root: str) -> tuple[np.ndarray, np.ndarray]:
    """(usable, held out) per record: phase 1 trains on real or unlabeled images only."""
    held = is_held_out(split_keys(records["uri"], root), val_fraction)
    if phase != 1:
        return np.ones(records.num_rows, bool), held
    fake = pc.fill_null(pc.equal(labels_of(records), 1), False)
    return ~np.asarray(fake.to_numpy(zero_copy_only=False), bool), held


def in_split(records: pa.Table, phase: int, val_fraction: float, held_out: bool, root: str) -> np.ndarray:
    """Which records belong to a split."""
    usable, held = split_of(records, phase, val_fraction, root)
    return usable & (held == held_out)


@dataclass
class TrainingData:
    """A planned training input: its units (records stay in `store`), its split and its sizes.
    Made before Ray starts, so a wrong input fails at once."""
    input_uri: str
    phase: int
    val_fraction: float
    root: str  # the folder the split hashes record paths below (`input_root`)
    store: str  # where the plan's records are (the run's storage)
    label: str  # the input's label column (read again from Parquet row groups)
    units: list[Unit]
    n_train: int
    n_val: int
    input_format: str  # as planning found it (folder, parquet, manifest, webdataset)


def record_tables(plan: Plan, store: Location, columns: ColumnMap) -> Iterator[pa.Table]:
    """Every record of the plan (bookkeeping and image bytes aside), a table at a time."""
    if any(u.kind in RECORD_KINDS for u in plan.units):
        return stored_records(store, plan)
    return read_ahead(lambda u: read_shard_unit(u, columns, with_bytes=False), plan.units,
                      SHARD_UNITS_READ_AT_ONCE, ahead=SHARD_UNITS_READ_AT_ONCE)


def plan_training_data(input_uri: str, phase: int, val_fraction: float, store_uri: str,
                       label: str = "label", label_folders: dict | None = None) -> TrainingData:
    """Plan a training input into `store_uri` and check it can train, streaming its records
    once: phase 2 needs a label on every record, and both splits need images (phase 1
    counts reals only). `label`: the input's label column (WebDataset: member or .json field);
    `label_folders`: the input's own label folder names (`labels.label_folders`)."""
    store, columns = Location(store_uri), ColumnMap(label=label)
    with PlanRecordsWriter(store) as sink:
        plan = plan_source(input_uri, SourceOptions(columns=columns, label_folders=folder_labels(label_folders)), sink)
    root = input_root(input_uri)
    n_train = n_val = unlabeled = web_links = 0
    for records in record_tables(plan, store, columns):
        unlabeled += labels_of(records).null_count
        web_links += int(pc.sum(pc.match_substring_regex(records["uri"], WEB_URL_PATTERN)).as_py() or 0)
        usable, held = split_of(records, phase, val_fraction, root)
        n_train, n_val = n_train + int((usable & ~held).sum()), n_val + int((usable & held).sum())
    if phase == 2 and unlabeled:
        raise ValueError(f"phase 2 needs a label for every image; {unlabeled} in {input_uri} have none")
    if n_train == 0 or n_val == 0:
        raise ValueError(f"not enough images in {input_uri}: {n_train} to train on, {n_val} held out"
                         + (" (phase 1 trains on real images only)" if phase == 1 else ""))
    if web_links:  # each epoch reads every image again
        logging.getLogger("mirror").warning(
            "%s of %s's images are web links, downloaded again at every epoch: `mirror ingest` them into "
            "Parquet shards once and train on those", f"{web_links:,}", input_uri)
    return TrainingData(input_uri, phase, val_fraction, root, store.uri, label, plan.units, n_train, n_val,
                        plan.input_format)


def split_rows(batch: pa.Table, *, phase: int, val_fraction: float, held_out: bool, root: str,
               label: str = "label") -> Iterator[pa.Table]:
    """Ray map_batches function over unit descriptors: each unit's records of one split, with
    their image bytes (uri, label, bytes, error; bytes null and error set where a record
    cannot be read, so the preparation skips it and says why). Only the split's records are
    read, and a record the plan knows cannot be read (`planned_errors`) is not."""
    columns = ColumnMap(label=label)
    for unit_json, records_uri in zip(batch["unit"].to_pylist(), batch["records"].to_pylist()):
        unit = Unit(**json.loads(unit_json))
        if unit.kind in RECORD_KINDS:  # select first: the other split's images are never read
            stored = read_unit_records(records_uri, unit.row_group)
            stored = stored.filter(pa.array(in_split(stored, phase, val_fraction, held_out, root)))
            records, _, payloads = unit_inputs(unit, without_bookkeeping(stored), columns, FETCH_THREADS,
                                               planned_errors=planned_errors(stored))  # reads what is given
            payloads = list(payloads)
        else:  # a Parquet row group holds its bytes: read whole, then selected
            records, _, payloads = unit_inputs(unit, None, columns, FETCH_THREADS)
            keep = in_split(records, phase, val_fraction, held_out, root)
            payloads = [p for p, k in zip(payloads, keep) if k]
            records = records.filter(pa.array(keep))
        yield pa.table({"uri": records["uri"], "label": labels_of(records),
                        "bytes": pa.array([d for d, _ in payloads], pa.binary()),
                        "error": pa.array([e for _, e in payloads], pa.string())})


def training_datasets(data: TrainingData, seed: int = 0, clock=None, attempts=None):
    """Streaming Ray datasets (train, val) of prepared crops, over the plan's units in order.
    Image bytes are read by Ray tasks (`split_rows`), decoded and augmented by others
    (`prepare.prepare_batch`; `attempts`: a DecodeAttempts actor, so that a file crashing
    its decoder is skipped). The driver holds one small item per unit."""
    import ray

    store = Location(data.store)
    units = ray.data.from_items([{"unit": json.dumps(vars(u)),
                                  "records": store.uri_of(u.file) if u.kind in RECORD_KINDS else None}
                                 for u in data.units])
    splits = [units.map_batches(split_rows, batch_size=1, batch_format="pyarrow",
                                fn_kwargs={"phase": data.phase, "val_fraction": data.val_fraction, "held_out": held,
                                           "root": data.root, "label": data.label})
                   .map_batches(prepare_batch, batch_format="pyarrow", batch_size=PREPARE_ROWS,
                                fn_kwargs={"phase": data.phase, "seed": seed, "clock": clock, "evaluation": held,
                                           "attempts": attempts})
              for held in (False, True)]
    for split in splits:
        # Their progress bars would be drawn in remote processes (the split coordinator, the
        # workers), whose forwarded lines cannot redraw: the training worker logs its own lines
        split.context.enable_progress_bars = False
        split.context.print_on_execution_start = False
    return splits[0], splits[1]


PREPARE_ROWS = 32  # records per preparation task call
