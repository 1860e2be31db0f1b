"""`mirror ingest`: a folder tree of images, or the links of a manifest (one file, a folder
of them such as LAION's metadata, a brace pattern of Parquet ones) -> Parquet shards with
the bytes inside.

Scanning a few big files beats opening millions of small ones (on S3 above all), and a
manifest of web links is downloaded once, not at every scan or training epoch. The input
is listed as a scan lists it (a folder streamed in sorted order, a manifest read in
chunks, in bounded memory), each fixed slice of the listing (a shard) stored as records
below the output's `_ingest_plan/` while the ingest runs; each shard is then read and
written by one Ray task, a row group at a time, under a name given by its position. A
manifest's other columns (captions, ids) are carried into its shards. `_ingest.json` ties the output to its
input listing: a rerun of the same ingest skips the shards already there and writes the
rest, byte for byte what an uninterrupted run writes; a rerun over a changed input is
refused.
"""
from __future__ import annotations

import collections
import hashlib
import io
import itertools
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mirror_core.errors import by_frequency, error_kind, error_text, most_frequent_kinds
from pipeline.cluster import completed_tasks, ensure_ray, require_shared_paths, resources_line, task_window
from pipeline.progress import RowProgress, log, stall_reports, step
from pipeline.scan.faults import FaultHooks
from pipeline.scan.labels import label_folders as folder_labels
from pipeline.scan.labels import label_folders_identity
from pipeline.scan.manifest import is_manifest_name
from pipeline.scan.reads import fetch_planned, planned_errors
from pipeline.scan.schema import PLAN_BOOKKEEPING
from pipeline.scan.sources import canonical_input, plan_source
from pipeline.scan.store import PlanRecordsWriter, read_unit_records
from pipeline.scan.units import DEFAULT_EXTENSIONS, SourceOptions, Unit
from pipeline.scan.webdataset import has_braces
from pipeline.storage import Location, read_ahead

SHARD_SCHEMA = pa.schema([
    ("uri", pa.string()), ("label", pa.int64()), ("subset", pa.string()), ("bytes", pa.binary()),
    ("sha256", pa.string()), ("original_format", pa.string()), ("read_error", pa.string()),
])
IDENTITY_FILE = "_ingest.json"
SHARD_TASK_CPUS = 1.0
STATUS_READS_AT_ONCE = 10  # shards' read_error columns read concurrently by `ingest_status(count=True)`
PLAN_DIR = "_ingest_plan"  # the listing's records while an ingest runs (its shard tasks read them)


@dataclass
class IngestResult:
    files: int
    shards: int
    skipped_shards: int
    read_errors: dict[str, int]  # rows kept with a read_error, per kind (mirror_core.errors.error_kind), this run
    output: str
    failed_shards: dict[str, str] = field(default_factory=dict)  # shard name -> why it was not written

    def line(self) -> str:
        """The console's account of the run (and, when shards failed, what to do)."""
        errors = sum(self.read_errors.values())
        kinds = most_frequent_kinds(self.read_errors)
        text = (f"ingested {self.files} files into {self.shards} shards ({self.skipped_shards} already there, "
                f"{errors} unreadable kept as rows with read_error{f': {kinds}' if kinds else ''}): {self.output}")
        if self.failed_shards:
            first, why = next(iter(self.failed_shards.items()))
            text += (f"\n{len(self.failed_shards)} of {self.shards} shards could not be written (first: {first}: "
                     f"{why}); the others are written: run the same command again to write the rest")
        return text


def sniff_format(data: bytes) -> str | None:
    """Container format from the header (no full decode); None when unrecognised."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except Exception:
        return None


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


class ListingDigest:
    """A planning sink that digests the listing (every uri, in order) on its way to `sink`."""

    def __init__(self, sink):
        self.sink, self.digest, self.files = sink, hashlib.sha256(), 0

    def add(self, unit, records: pa.Table) -> None:
        self.digest.update("".join(uri + "\n" for uri in records["uri"].to_pylist()).encode())  # each uri, then '\n'
        self.files += records.num_rows
        self.sink.add(unit, records)


def shard_table(listing: pa.Table, cols: dict[str, list]) -> pa.Table:
    """The shard's columns (SHARD_SCHEMA: a label and subset null where the listing has
    none), then the listing's other columns (a clashing name as input_<name>)."""
    given = [listing[f.name].cast(f.type) if f.name in listing.column_names else pa.nulls(listing.num_rows, f.type)
             for f in list(SHARD_SCHEMA)[:3]]
    table = pa.Table.from_arrays(given + [pa.array(cols[f.name], f.type) for f in list(SHARD_SCHEMA)[3:]],
                                 schema=SHARD_SCHEMA)
    for name in listing.column_names:
        if name not in ("uri", "label", "subset", *PLAN_BOOKKEEPING):
            table = table.append_column(f"input_{name}" if name in SHARD_SCHEMA.names else name, listing[name])
    return table


def read_error_kinds(read_errors: list[str | None]) -> collections.Counter:
    """How many rows of a shard keep a read_error, by kind (`mirror_core.errors.error_kind`)."""
    return collections.Counter(error_kind(e) for e in read_errors if e is not None)


def write_shard(records_uri: str, row_group: int, output_uri: str, name: str, rows_per_row_group: int,
                fetch_threads: int, honour_opt_out: bool = True) -> dict[str, int]:
    """Read one slice of the listing (its stored records) and write it as one shard (a Ray
    task), a row group at a time: the task holds a row group's images and the reads ahead,
    not the shard's (spooled to local disk, published whole at the end). Returns how many
    files were unreadable (kept as rows with read_error), by kind."""
    listing = read_unit_records(records_uri, row_group)
    fetched = fetch_planned(listing["uri"].to_pylist(), planned_errors(listing), fetch_threads,
                            honour_opt_out=honour_opt_out)
    errors: collections.Counter = collections.Counter()
    schema = shard_table(listing.slice(0, 0), {f.name: [] for f in SHARD_SCHEMA}).schema
    with Location(output_uri).parquet_writer(name, schema) as writer:
        for start in range(0, listing.num_rows, rows_per_row_group):
            part = listing.slice(start, rows_per_row_group)
            cols: dict[str, list] = {"bytes": [], "sha256": [], "original_format": [], "read_error": []}
            for data, error in itertools.islice(fetched, part.num_rows):
                cols["bytes"].append(data)
                cols["sha256"].append(hashlib.sha256(data).hexdigest() if data is not None else None)
                cols["original_format"].append(sniff_format(data) if data else None)
                cols["read_error"].append(error)
            errors += read_error_kinds(cols["read_error"])
            writer.write_table(shard_table(part, cols))
        FaultHooks.from_env().before_write()
    return dict(errors)


def ingest(input_uri: str, output_uri: str, rows_per_shard: int = 4096, rows_per_row_group: int = 256,
           extensions=DEFAULT_EXTENSIONS, fetch_threads: int = 16, address: str | None = None,
           honour_opt_out: bool = True, progress_every_s: float = 60.0, stall_report_s: float = 600.0,
           sample: float | None = None, label_folders: dict | None = None) -> IngestResult:
    """Pack a folder of images, or the images a manifest file names, into shards. A web
    image whose site opts out of AI use (X-Robots-Tag noai / noimageai) is kept as a row
    without bytes (`read_error` 'opted out: ...') unless `honour_opt_out` is False.
    `sample`: only that fraction of the records, drawn as a scan's `--sample` draws them.
    `label_folders`: a folder tree's own label folder names (`labels.label_folders`).

    Shard tasks run a window at a time (`task_window`), finishing in any order; a line of
    progress comes every `progress_every_s` and a warning after `stall_report_s` without a
    shard written (0: none). A shard whose task fails is named in the result, and the
    others are still written: a rerun writes what is missing."""
    import ray

    if sample is not None and not 0.0 < sample <= 1.0:
        raise ValueError(f"--sample must be a fraction within (0, 1], got {sample}")
    fs, base = fsspec.core.url_to_fs(input_uri)
    manifest = is_manifest_name(input_uri) and (fs.isfile(base) or has_braces(input_uri))
    if not manifest and not fs.isdir(base):
        if fs.isfile(base):
            raise ValueError(f"input {input_uri} is a file, not a folder or a manifest: ingest packs a folder's images "
                             "or a manifest's into shards")
        raise FileNotFoundError(f"input folder {input_uri} does not exist")
    out = Location(output_uri)
    work = Location(out.uri_of(PLAN_DIR))
    work.remove()  # an interrupted run's listing: listed again
    try:
        with step(f"listing {input_uri}") as info, PlanRecordsWriter(work) as writer:
            listing = ListingDigest(writer)
            # a folder of images, or of manifests (LAION's metadata: Parquet files of URLs), as a scan finds
            options = SourceOptions(input_format="manifest" if manifest else "auto", extensions=tuple(extensions),
                                    unit_size=rows_per_shard, sample=sample,
                                    label_folders=folder_labels(label_folders))
            plan = plan_source(input_uri, options, listing)  # one unit a shard, in listing order
            if plan.input_format not in ("folder", "manifest"):
                raise ValueError(f"{input_uri} holds {plan.input_format} shards, images packed already: scan it "
                                 "as it is")
            units = plan.units
            info.update(items=listing.files, unit="images" if plan.input_format == "folder" else "records")
        identity = {"input": canonical_input(input_uri), "files": listing.files,
                    "listing_sha256": listing.digest.hexdigest(),
                    "rows_per_shard": rows_per_shard, "rows_per_row_group": rows_per_row_group,
                    # only when set: outputs of ingests that honoured opt-outs (all earlier ones) keep their identity
                    **({} if honour_opt_out else {"opt_out_ignored": True}),
                    **({"sample": sample} if sample is not None else {}),
                    **({"label_folders": label_folders_identity(label_folders)} if label_folders else {})}
        previous = out.read_json(IDENTITY_FILE)
        if previous is not None:  # recorded as given by earlier versions
            previous["input"] = canonical_input(previous["input"])
            if previous.get("label_folders"):
                previous["label_folders"] = label_folders_identity(previous["label_folders"])
        if previous is not None and previous != identity:
            changed = [k for k in identity if previous.get(k) != identity[k]]
            raise ValueError(f"{output_uri} holds shards of another ingest ({', '.join(changed)} differ); "
                             "choose a new --output")
        out.write_json(IDENTITY_FILE, identity)
        ensure_ray(address)  # once the input is known good: a mistake is told before Ray starts
        require_shared_paths({base: "--input"} if "://" not in input_uri else {},
                             {out.root: "--output"} if out.local else {})
        out.remove_spools()  # an interrupted run's, half written
        existing = set(out.names())
        todo = [(shard_name(i), u) for i, u in enumerate(units) if shard_name(i) not in existing]
        task = ray.remote(num_cpus=SHARD_TASK_CPUS)(write_shard)

        def submit(shard: tuple[str, Unit]):
            name, unit = shard
            return task.remote(work.uri_of(unit.file), unit.row_group, out.uri, name, rows_per_row_group,
                               fetch_threads, honour_opt_out)

        result = IngestResult(listing.files, len(units), len(units) - len(todo), {}, out.uri)
        read_errors: collections.Counter = collections.Counter()
        meter = RowProgress("ingest", sum(u.rows for _, u in todo), progress_every_s)
        with step(f"writing {len(todo)} shards"), stall_reports(meter, stall_report_s, resources_line):
            for (name, unit), ref in completed_tasks(submit, todo, task_window()):
                try:
                    read_errors.update(ray.get(ref))
                except Exception as err:  # the task's own error (a write refused): named, the other shards go on
                    why = error_text(getattr(err, "cause", None) or err)
                    result.failed_shards[name] = why
                    log.warning("shard %s could not be written: %s", name, why)
                meter.add(unit.rows)
        result.read_errors = dict(read_errors)
    finally:
        work.remove()
    return result


def ingest_status(output_uri: str, count: bool = False) -> dict | None:
    """How far an ingest into `output_uri` has got, from its store alone (None where it
    holds none): the shards written and left; `count`: also the rows kept with a read_error
    in the written shards, by kind (that column read, one request a shard)."""
    out = Location(output_uri)
    identity = out.read_json(IDENTITY_FILE)
    if identity is None:
        return None
    names = set(out.names())
    total = -(-identity["files"] // identity["rows_per_shard"])  # the listing's slices: every shard but the last full
    written = [shard_name(i) for i in range(total) if shard_name(i) in names]
    status = {"output": out.uri, "input": identity["input"], "files": identity["files"], "complete": len(written) == total,
              "shards": {"total": total, "written": len(written), "left": total - len(written)},
              "listing_kept": PLAN_DIR in names}  # an ingest running, or one interrupted
    if count:
        def kinds(name: str) -> collections.Counter:
            return read_error_kinds(pq.read_table(out.uri_of(name), columns=["read_error"])["read_error"].to_pylist())

        counted = sum(read_ahead(kinds, written, STATUS_READS_AT_ONCE), collections.Counter())
        status["read_errors"] = by_frequency(counted)
    return status


def ingest_status_lines(status: dict) -> list[str]:
    shards = status["shards"]
    share = 100 * shards["written"] / shards["total"] if shards["total"] else 100.0
    lines = [f"{status['output']}: ingest of {status['input']}: {status['files']:,} files into {shards['total']:,} shards",
             f"  written: {shards['written']:,} shards ({share:.1f}%)" + (
                 "; complete" if status["complete"] else
                 f"; left: {shards['left']:,} (run the same ingest again to write them, unless one is running)")]
    if "read_errors" in status:
        errors = status["read_errors"]
        kinds = most_frequent_kinds(errors)
        lines.append(f"  written shards hold {sum(errors.values()):,} rows with a read_error"
                     + (f": {kinds}" if kinds else ""))
    return lines
