"""The scan's store: output layout, plan persistence and exactly-once unit commits.

    OUTPUT/scores/part-<unit_id>.parquet   one file per finished unit (the scored rows)
    OUTPUT/summary.json                    counts, throughput, metrics, effective config
    OUTPUT/_summary/part_tallies.parquet   each part's counts, so a later summary reads only new parts
    OUTPUT/_summary/labeled/               labeled parts' scored labeled rows, kept for the metrics
    OUTPUT/_scan.json                      what this output belongs to (model, input, policy)
    OUTPUT/_plan/units.parquet             the units of the input (extended by --update)
    OUTPUT/_plan/records/<unit_id>.parquet records of folder/manifest/tar-sample units: one
                                           row group per unit, UNITS_PER_RECORDS_FILE units a
                                           file, named by its first unit
    OUTPUT/_plan/versions/                 folder files' versions recorded by --update
                                           (changes.py)

A unit's file appears only once all of its rows are scored, written to a
temporary name and renamed (a single PUT on object stores), so its presence
means "done" and a rerun skips it. `--retry-errors` scores a unit again and
replaces its part the same way.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import socket
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.progress import every
from pipeline.scan.changes import FileChanges, KnownFiles, VersionsWriter, recorded_versions, removed_files
from pipeline.scan.labels import label_folders_identity
from pipeline.scan.schema import PLAN_BOOKKEEPING, UNIT, VERSION
from pipeline.scan.sources import canonical_input, update_plan
from pipeline.scan.tar_changes import KnownSamples
from pipeline.scan.units import RECORD_KINDS, Plan, SourceOptions, Unit
from pipeline.scan.uri_set import UriSet
from pipeline.storage import Location, parquet_schema, read_ahead, s3_connections

SCORES_DIR = "scores"
PART_PREFIX = "part-"
RECORDS_DIR = "_plan/records"
LEGACY_RECORDS = "_plan/records.parquet"  # one file of every record, as plans were first stored
UNITS_PER_RECORDS_FILE = 256  # 65,536 records a file at the default unit size: a small footer to read per unit
RECORDS_WRITES_IN_FLIGHT = 4  # records files being written while planning goes on (object-store latency)
RECORDS_READ_TRIES = 3
RECORDS_FILES_READ_AT_ONCE = 16  # a plan's records files read concurrently (object-store latency)
UNIT_FIELDS = (("unit_id", pa.string()), ("kind", pa.string()), ("rows", pa.int64()), ("file", pa.string()),
               ("row_group", pa.int64()), ("version", pa.string()), ("sample", pa.float64()),
               ("group_rows", pa.int64()))


class PlanRecordsWriter:
    """The records sink of a scan's planning: each unit's records become one row group of a
    records file below RECORDS_DIR, and the unit learns where (`file`, relative to the
    store, and `row_group`). Planning holds at most a file's worth of records, so a
    manifest of any length plans in bounded memory; files are written in the background."""

    def __init__(self, store: Location, suffix: str = ""):
        """`suffix`: added to file names (records of units already stored elsewhere: an
        update's refreshed tar samples must not take the name of the file they replace)."""
        self.store, self.suffix = store, suffix
        self.buffered: list[pa.Table] = []
        self.name: str | None = None
        self.pool = ThreadPoolExecutor(RECORDS_WRITES_IN_FLIGHT)
        self.writes: list[Future] = []

    def add(self, unit: Unit, records: pa.Table) -> None:
        if self.buffered and (len(self.buffered) == UNITS_PER_RECORDS_FILE
                              or not records.schema.equals(self.buffered[0].schema)):
            self.flush()  # a file holds one schema (manifests may differ in their columns)
        if not self.buffered:
            self.name = f"{RECORDS_DIR}/{unit.unit_id}{self.suffix}.parquet"
        unit.file, unit.row_group = self.name, len(self.buffered)
        self.buffered.append(records)

    def flush(self) -> None:
        if not self.buffered:
            return
        while self.writes and (self.writes[0].done() or len(self.writes) >= RECORDS_WRITES_IN_FLIGHT):
            self.writes.pop(0).result()  # a failed write fails the planning here
        self.writes.append(self.pool.submit(self._write, self.name, self.buffered))
        self.buffered = []

    def _write(self, name: str, tables: list[pa.Table]) -> None:
        buf = io.BytesIO()
        # no dictionaries or statistics: a unit's row group is read whole, by position
        with pq.ParquetWriter(buf, tables[0].schema, use_dictionary=False, write_statistics=False) as writer:
            for table in tables:  # one row group each
                writer.write_table(table, row_group_size=max(1, table.num_rows))
        self.store.write_bytes(name, buf.getvalue())

    def close(self) -> None:
        try:
            self.flush()
            for write in self.writes:
                write.result()
        finally:
            self.pool.shutdown()

    def __enter__(self) -> "PlanRecordsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # the planning failed: what is buffered is not written
            self.pool.shutdown(cancel_futures=True)


def read_unit_records(uri: str, row_group: int) -> pa.Table:
    """One unit's records (a row group of a records file), bookkeeping columns included.
    Runs in decode tasks: a failed read is tried again before it fails the task."""
    for attempt in range(RECORDS_READ_TRIES):
        try:
            with fsspec.open(uri, "rb") as f:
                return pq.ParquetFile(f).read_row_group(row_group)
        except FileNotFoundError as err:  # gone: another try will not find it
            if "://" in uri:
                raise
            # a local output the command saw on every node at its start, but not on this
            # one: a node that joined the cluster since (autoscaling) without the same mount
            raise FileNotFoundError(f"{uri}: the scan's plan records are not on node {socket.gethostname()}; a "
                                    "local --output must be on a filesystem every node mounts at the same path "
                                    "(nodes that join later too), or use an object store (s3://...)") from err
        except (OSError, TimeoutError):
            if attempt == RECORDS_READ_TRIES - 1:
                raise
            time.sleep(2**attempt)


PART_FIELDS = ["unit_id", "bytes", "version"]  # what a listing says of a committed part
PARTS_READ_AT_ONCE = 16  # committed parts read concurrently (at least; an s3fs client's connections if more)


def stored_records(store: Location, plan: Plan, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The records of the plan's folder/manifest/tar-sample units in `store`, a records file
    at a time in the order of the units (each unit's records together; `columns`: only
    those a file holds), a few files read at once and no more ahead: the plan's records
    streamed in bounded memory (a file is 65,536 records at the default unit size). Only
    the row groups of the plan's units are read: a file may also hold the records of units
    an update refreshed since (stored anew elsewhere: `tar_changes`)."""
    files: dict[str, list[int]] = {}
    for u in plan.units:
        if u.kind in RECORD_KINDS:
            files.setdefault(u.file, []).append(u.row_group)

    def read(name: str) -> pa.Table:
        data = store.read_bytes(name)
        if data is None:
            raise FileNotFoundError(f"{store.uri_of(name)}: a records file of the plan is missing")
        f = pq.ParquetFile(io.BytesIO(data))
        wanted = columns if columns is None else [c for c in columns if c in f.schema_arrow.names]
        return f.read_row_groups(files[name], columns=wanted)

    return read_ahead(read, list(files), RECORDS_FILES_READ_AT_ONCE, ahead=RECORDS_FILES_READ_AT_ONCE)


def records_schemas(store: Location, plan: Plan) -> Iterator[pa.Schema]:
    """The schema of each records file of the plan's folder/manifest/tar-sample units (their
    footers), in unit order, a few read at once."""
    files = list(dict.fromkeys(u.file for u in plan.units if u.kind in RECORD_KINDS))
    return read_ahead(lambda f: parquet_schema(store.uri_of(f)), files, RECORDS_FILES_READ_AT_ONCE)


def records_schema(store: Location, plan: Plan) -> pa.Schema:
    """One schema for the plan's records files (files of different --update generations may
    differ in columns), without the plan's bookkeeping columns."""
    schemas = list(records_schemas(store, plan))
    schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    return pa.schema([f for f in schema if f.name not in PLAN_BOOKKEEPING])


@dataclass
class PendingPlan:
    """An update's plan as the run scores it (shard units' new versions, tar samples'
    refreshed records, tar shards' versions), stored once the run has scored those units
    (an update interrupted before finds them again)."""

    store: "ScanStore"
    plan: Plan

    def commit(self) -> None:
        self.store.save_plan(self.plan)
        self.store.remove_unreferenced_records(self.plan)


def apply_changes(plan: Plan, found: FileChanges) -> None:
    """What the units an update scores again take (versions, refreshed records) and its tar
    shards' versions, in the plan the run scores."""
    for u in plan.units:
        u.version = found.unit_versions.get(u.unit_id, u.version)
        u.file, u.row_group = found.unit_records.get(u.unit_id, (u.file, u.row_group))
    if found.shard_versions:
        versions = [found.shard_versions.get(s, v) for s, v in zip(plan.shards["uri"].to_pylist(),
                                                                    plan.shards["version"].to_pylist())]
        plan.shards = plan.shards.set_column(plan.shards.schema.get_field_index("version"), "version",
                                             pa.array(versions, pa.string()))


class OutputMismatchError(ValueError):
    pass


class OutputBusyError(ValueError):
    """Another run is writing this output now."""


RUNNING_FILE = "_running.json"  # the run writing an output now: host, pid, start, last sign of life
RUNNING_BEAT_S = 60.0  # how often a run says it is alive
RUNNING_STALE_S = 300.0  # a run on another host silent this long is gone (a lost driver)


def process_identity(pid: int) -> str | None:
    """A process told apart from a later one given the same pid (a container's driver
    restarted in place is pid 1 again): the boot and the process's start time, from
    /proc (None where there is none)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open(f"/proc/{pid}/stat") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]  # field 22, after the command's name
    except (OSError, IndexError):
        return None
    return f"{boot}:{started}"


def run_alive(holder: dict) -> bool:
    """Whether the run named in an output's RUNNING_FILE is still going: on this host, its
    process (the same one, not a later one given its pid); on another, a sign of life
    within RUNNING_STALE_S."""
    if holder.get("host") == socket.gethostname():
        if holder.get("process") and process_identity(int(holder["pid"])) != holder["process"]:
            return False
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: alive
            return True
        return True
    return time.time() - float(holder.get("beat", 0)) < RUNNING_STALE_S


class ScanStore(Location):
    """A scan's output: its identity, its plan, and one committed part per finished unit."""

    # --- units --------------------------------------------------------------
    def part_name(self, unit_id: str) -> str:
        return f"{SCORES_DIR}/{PART_PREFIX}{unit_id}.parquet"

    def committed_parts(self) -> pa.Table:
        """unit_id, bytes and version (`Location.file_entries`) of every committed part,
        listed afresh, in unit order."""
        parts = [(name[len(PART_PREFIX) : -len(".parquet")], size, version) for name, size, version
                 in self.file_entries(SCORES_DIR) if name.startswith(PART_PREFIX) and name.endswith(".parquet")]
        columns = list(zip(*parts)) if parts else [[], [], []]
        return pa.table({name: pa.array(column, type) for name, column, type
                         in zip(PART_FIELDS, columns, (pa.string(), pa.int64(), pa.string()))})

    def done_units(self) -> set[str]:
        return set(self.committed_parts()["unit_id"].to_pylist())

    def units_with_transient_errors(self, units: set[str]) -> set[str]:
        """Finished units holding a row whose error another try may heal (a read failure),
        not counting rows of files an update found removed: read again, they are still gone
        (units of removed shards: `changes.removed_shard_units`)."""
        from pipeline.scan.reads import TRANSIENT_ERROR_PREFIXES

        gone = removed_files(self)

        def transient(part: pa.Table) -> bool:
            failed = np.zeros(part.num_rows, bool)
            for prefix in TRANSIENT_ERROR_PREFIXES:
                failed |= pc.starts_with(part["error"], prefix).fill_null(False).to_numpy(zero_copy_only=False)
            return bool(failed.any()) and not gone.contains(part["uri"].filter(pa.array(failed))).all()

        return {unit for unit, part in self.scores_by_unit(["uri", "error"], units) if transient(part)}

    def scores_by_unit(self, columns=None, units: set[str] | list[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
        """(unit id, its rows) for every committed part (`units`: those of them), in unit
        order (`units` a list: in its order), a few read at once and no more ahead (a
        corpus's scores in bounded memory).
        `columns`: only those, where a part has them (carried input columns may differ by
        part). A part is one GET on an object store (the listing gave its size): every
        reader of a scan's parts (summary, audit, reports, --retry-errors) goes through here."""
        def read(unit: str) -> tuple[str, pa.Table]:
            part = pq.ParquetFile(io.BytesIO(self.read_bytes(self.part_name(unit))))
            return unit, part.read(None if columns is None else [c for c in columns if c in part.schema_arrow.names])

        threads = max(PARTS_READ_AT_ONCE, s3_connections(self.fs) or 0)
        order = list(units) if isinstance(units, list) else sorted(self.done_units() if units is None else units)
        return read_ahead(read, order, threads)

    def read_scores(self, columns=None) -> pa.Table:
        """Every committed row (`columns`: only those), read as `scores_by_unit` streams them;
        parts of different --update generations may differ in carried columns: a column is
        null in the rows of a part without it."""
        tables = [t for _, t in self.scores_by_unit(columns)]
        return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})

    # --- scan identity and plan --------------------------------------------
    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """This output held by this run while the block lasts: a second run into it (a
        nightly job still going when the next starts) is refused instead of writing the
        same plan and summary at once. A run that died holds nothing: killed, its process
        is gone; on another host, it stops saying it is alive (RUNNING_STALE_S)."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "process": process_identity(os.getpid()),
              "run": uuid.uuid4().hex, "since": time.time()}
        holder = self.read_json(RUNNING_FILE)
        if holder is not None and run_alive(holder):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
            raise OutputBusyError(f"{self.uri} is being written by another run (host {holder.get('host')}, pid "
                                  f"{holder.get('pid')}, since {since}): wait for it to end; if that run is gone, "
                                  f"remove {self.uri_of(RUNNING_FILE)}")
        def beat() -> None:
            self.write_json(RUNNING_FILE, {**me, "beat": time.time()})

        beat()
        # held: what a killed writer of an earlier run left half written is no one's
        self.remove_spools(("", "_plan", SCORES_DIR, RECORDS_DIR))
        try:
            with every(RUNNING_BEAT_S, beat, "output-held"):
                yield
        finally:
            if (self.read_json(RUNNING_FILE) or {}).get("run") == me["run"]:
                self.remove_files([RUNNING_FILE])

    def claim(self, identity: dict) -> None:
        """Tie this output to one model/input/policy; a different scan is refused, unless the
        claim's planning never ended (nothing stored: its input mistyped, say)."""
        existing = self.read_json("_scan.json")
        if existing is None:
            self.write_json("_scan.json", identity)
            return
        if "input" in existing:  # recorded as given by earlier versions: 'data/' is '/home/u/data' run from /home/u
            existing["input"] = canonical_input(existing["input"])
        if existing.get("label_folders"):  # recorded as given by earlier versions: REAL=real, not REAL=0
            existing["label_folders"] = label_folders_identity(existing["label_folders"])
        diffs = [k for k in identity if existing.get(k) != identity[k]]
        if diffs and self.read_plan() is None and not self.committed_parts().num_rows:
            # claimed by a run whose planning never ended (an input mistyped, not there): it holds nothing
            Location(self.uri_of("_plan")).remove()
            self.write_json("_scan.json", identity)
            return
        if diffs:
            details = "; ".join(f"{k}: {existing.get(k)!r} there, {identity[k]!r} now" for k in diffs)
            raise OutputMismatchError(f"{self.uri} holds another scan ({details}); choose a new --output")

    def grown_from(self, sample: float | None) -> float | None:
        """The fraction this output holds a sample of, when `sample` draws more of the same
        input (a 1% draw lies within a 5% one, every draw within the whole input, None):
        the run then plans what the larger draw adds, as --update plans what is new
        (`relist(..., grow_sample=True)`). None otherwise (a smaller draw is another scan:
        the claim refuses it). Folders and manifests only: Parquet and tar shards' units
        are their row groups and samples as first drawn."""
        existing = self.read_json("_scan.json")
        held = existing.get("sample") if existing else None
        if held is None or held == sample or (sample is not None and sample < held):
            return None
        plan = self.read_plan()
        if plan is None:  # its planning never ended: the claim starts it again
            return None
        if plan.input_format not in ("folder", "manifest"):
            raise OutputMismatchError(f"{self.uri} holds a sample of {held} of {plan.input_format} input: a larger "
                                      "draw grows in place for folders and manifests only; choose a new --output")
        return held

    def save_plan(self, plan: Plan) -> None:
        """Units, and the records of units that have none stored yet (`plan.records`, which
        then moves to the store: the plan keeps the units only)."""
        unstored = [u for u in plan.units if u.kind in RECORD_KINDS and u.file is None]
        if unstored:
            if plan.records.num_rows != sum(u.rows for u in unstored):
                raise RuntimeError(f"plan of {plan.input} holds {plan.records.num_rows} records for "
                                   f"{sum(u.rows for u in unstored)} rows of units without stored records")
            with PlanRecordsWriter(self) as sink:
                start = 0
                for u in unstored:
                    sink.add(u, plan.records.slice(start, u.rows))
                    start += u.rows
            plan.records = pa.table({})
        units = pa.table({name: pa.array([getattr(u, name) for u in plan.units], kind)
                          for name, kind in UNIT_FIELDS})
        units = units.replace_schema_metadata({"input": plan.input, "input_format": plan.input_format,
                                               "skipped_by_extension": str(plan.skipped_by_extension),
                                               **({"sample": repr(plan.sample), "drawn_from": str(plan.drawn_from)}
                                                  if plan.sample is not None else {})})
        if plan.shards is not None:
            self.write_parquet("_plan/shards.parquet", plan.shards)
        self.write_parquet("_plan/units.parquet", units)  # written last: its presence means "plan complete"

    def read_plan(self) -> Plan | None:
        """The stored plan's units and shards, as they are (nothing checked or moved)."""
        units = self.read_parquet("_plan/units.parquet")
        if units is None:
            return None
        meta = {k.decode(): v.decode() for k, v in (units.schema.metadata or {}).items()}
        return Plan(meta["input"], meta["input_format"], [Unit(**row) for row in units.to_pylist()], pa.table({}),
                    int(meta.get("skipped_by_extension", 0)), self.read_parquet("_plan/shards.parquet"),
                    float(meta["sample"]) if "sample" in meta else None, int(meta.get("drawn_from", 0)))

    def load_plan(self) -> Plan | None:
        """The stored plan: its units (records stay in the store: `unit_records`,
        `plan_records`). A plan stored in the first layout (every record in one file) is
        moved to the current one on the way."""
        plan = self.read_plan()
        if plan is None:
            return None
        if any(u.kind in RECORD_KINDS and u.file is None for u in plan.units):
            plan.records = self.read_parquet(LEGACY_RECORDS)
            self.save_plan(plan)
        stored = {f"{RECORDS_DIR}/{name}" for name in self.names(RECORDS_DIR)}
        missing = sorted({u.file for u in plan.units if u.kind in RECORD_KINDS} - stored)
        if missing:  # found now, not by every decode task of the run
            raise OutputMismatchError(f"{self.uri}: the plan's records files are missing ({len(missing)}, such as "
                                      f"{missing[0]}); scan into a new --output")
        return plan

    def remove_unreferenced_records(self, plan: Plan) -> list[str]:
        """Removes the records files no unit of the stored `plan` names: those of tar
        samples whose units an update refreshed, and refreshed records of an update
        interrupted before its run ended (found again, and written again, by the next).
        Returns their names."""
        named = {u.file for u in plan.units if u.kind in RECORD_KINDS}
        unnamed = [f"{RECORDS_DIR}/{name}" for name in self.names(RECORDS_DIR) if f"{RECORDS_DIR}/{name}" not in named]
        self.remove_files(unnamed)
        return unnamed

    def unit_records(self, unit: Unit) -> pa.Table:
        """A folder/manifest/tar-sample unit's records, as planned."""
        return read_unit_records(self.uri_of(unit.file), unit.row_group)

    def plan_records(self, plan: Plan, columns: list[str] | None = None) -> pa.Table:
        """Every stored record of the plan, in unit order (`columns`: only those), held
        whole: as large as the input's listing (commands stream `stored_records` instead)."""
        tables = list(stored_records(self, plan, columns))
        return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})

    def relist(self, plan: Plan, options: SourceOptions,
               grow_sample: bool = False) -> tuple[Plan, list[Unit], FileChanges, Any]:
        """--update: the input listed again against the stored plan. Returns the plan with
        its new units (stored), the units added, what changed among a folder's files, the
        records of a manifest with versions (`columns.version`), Parquet or tar shards, and
        what to `commit` once every unit is scored (the versions found:
        those units are not found changed again; None where there is nothing).
        `grow_sample`: the plan becomes a sample of `options.sample`, a larger draw
        (`grown_from`), and the records it adds are new."""
        checked = plan.input_format == "folder" or (plan.input_format == "manifest" and options.columns.version)
        versions = VersionsWriter(self) if checked else None
        grown = grow_sample and plan.sample != options.sample
        if grown:
            plan = dataclasses.replace(plan, sample=options.sample)
        before, drawn_before = plan.shards, plan.drawn_from
        # new units' records go to the store as a first plan's do; a changed tar shard's
        # units' refreshed records to files of their own (named apart: unique per update)
        with PlanRecordsWriter(self) as records, PlanRecordsWriter(self, f"-{uuid.uuid4().hex[:12]}") as refreshed:
            known = (self.known_files(plan, versions) if versions is not None
                     else KnownSamples(stored_records(self, plan, ["uri", UNIT]), self.unit_records, refreshed)
                     if plan.input_format == "webdataset" else self.known_uris(plan))
            plan, added, found = update_plan(plan, options, known, records)
        if added or found.versioned or (plan.shards is not None and (before is None or not plan.shards.equals(before))) \
                or plan.drawn_from != drawn_before or grown:
            self.save_plan(plan)  # new units, first versions of shards, tar shards indexed anew, or a sample's count
        if found.unit_versions or found.shard_versions:  # the run scores them so; stored once it has
            apply_changes(plan, found)
            versions = PendingPlan(self, plan)
        return plan, added, found, versions

    def known_files(self, plan: Plan, versions: VersionsWriter) -> KnownFiles:
        """A folder plan's records with their versions (as planned, or as an update since
        recorded them) and units: what --update checks a folder's new listing against."""
        rows = sum(u.rows for u in plan.units if u.kind in RECORD_KINDS)
        return KnownFiles(stored_records(self, plan, ["uri", UNIT, VERSION]), rows, [u.unit_id for u in plan.units],
                          recorded_versions(self), versions)

    def known_uris(self, plan: Plan) -> UriSet:
        """The URIs of the plan's stored records, as a set of digests (what --update checks a
        new listing against), read a few records files at a time: bounded memory besides
        the set's 16 bytes a URI."""
        return UriSet(t["uri"] for t in stored_records(self, plan, ["uri"]))
