"""`mirror ingest`: a folder tree of images -> Parquet shards with the bytes inside.

Scanning a few big files beats opening millions of small ones (on S3 above all). The
work runs on Ray: the folder's top-level directories are listed by tasks, and each shard
(a fixed slice of the sorted listing) is read and written by one task, whole, under a
name given by its position. `_ingest.json` ties the output to its input listing: a rerun
of the same ingest skips the shards already there and writes the rest, byte for byte
what an uninterrupted run writes; a rerun over a changed input is refused.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.cluster import ensure_ray
from pipeline.progress import progress, step
from pipeline.scan.faults import FaultHooks
from pipeline.scan.sources import DEFAULT_EXTENSIONS, fetch_all, list_images
from pipeline.storage import Location

SHARD_SCHEMA = pa.schema([
    ("uri", pa.string()), ("label", pa.int64()), ("subset", pa.string()), ("bytes", pa.binary()),
    ("sha256", pa.string()), ("original_format", pa.string()), ("read_error", pa.string()),
])
IDENTITY_FILE = "_ingest.json"
SHARD_TASK_CPUS = 1.0
LIST_TASK_CPUS = 0.25  # listing waits on storage


@dataclass
class IngestResult:
    files: int
    shards: int
    skipped_shards: int
    read_errors: int
    output: str


def sniff_format(data: bytes) -> str | None:
    """Container format from the header (no full decode); None when unrecognised."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except Exception:
        return None


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


def files_below(uri: str) -> list[str]:
    """Every file below a directory, as its filesystem names them (a Ray task)."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.find(path)


def list_folder(root: str) -> list[str]:
    """Every file below `root`, sorted; each top-level directory is listed by a Ray task."""
    import ray

    fs, base = fsspec.core.url_to_fs(root)
    if not fs.isdir(base):
        raise FileNotFoundError(f"input folder {root} does not exist")
    entries = fs.ls(base, detail=True)
    files = [e["name"] for e in entries if e["type"] != "directory"]
    task = ray.remote(num_cpus=LIST_TASK_CPUS)(files_below)
    found = [task.remote(fs.unstrip_protocol(e["name"])) for e in entries if e["type"] == "directory"]
    for names in ray.get(found):
        files += names
    return sorted(files)


def write_shard(listing: pa.Table, output_uri: str, name: str, rows_per_row_group: int, fetch_threads: int) -> int:
    """Read one slice of the listing and write it as one shard (a Ray task); returns the
    number of unreadable files (kept as rows with read_error)."""
    cols = {"bytes": [], "sha256": [], "original_format": [], "read_error": []}
    for data, error in fetch_all(listing["uri"].to_pylist(), fetch_threads):
        cols["bytes"].append(data)
        cols["sha256"].append(hashlib.sha256(data).hexdigest() if data is not None else None)
        cols["original_format"].append(sniff_format(data) if data else None)
        cols["read_error"].append(error)
    table = pa.Table.from_arrays(
        [listing["uri"], listing["label"], listing["subset"]]
        + [pa.array(cols[f.name], f.type) for f in list(SHARD_SCHEMA)[3:]], schema=SHARD_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=rows_per_row_group)
    FaultHooks.from_env().before_write()
    Location(output_uri).write_bytes(name, buf.getvalue())
    return sum(e is not None for e in cols["read_error"])


def listing_identity(input_uri: str, listing: pa.Table, rows_per_shard: int, rows_per_row_group: int) -> dict:
    digest = hashlib.sha256()
    for uri in listing["uri"].to_pylist():
        digest.update(uri.encode() + b"\n")
    return {"input": input_uri, "files": listing.num_rows, "listing_sha256": digest.hexdigest(),
            "rows_per_shard": rows_per_shard, "rows_per_row_group": rows_per_row_group}


def ingest_folder(input_uri: str, output_uri: str, rows_per_shard: int = 4096, rows_per_row_group: int = 256,
                  extensions=DEFAULT_EXTENSIONS, fetch_threads: int = 16, address: str | None = None) -> IngestResult:
    import ray

    ensure_ray(address)
    with step(f"listing {input_uri}") as info:
        listing = list_images(input_uri, extensions, list_folder(input_uri))
        info.update(items=listing.num_rows, unit="images")
    out = Location(output_uri)
    identity = listing_identity(input_uri, listing, rows_per_shard, rows_per_row_group)
    previous = out.read_json(IDENTITY_FILE)
    if previous is not None and previous != identity:
        changed = [k for k in identity if previous.get(k) != identity[k]]
        raise ValueError(f"{output_uri} holds shards of another ingest ({', '.join(changed)} differ); "
                         "choose a new --output")
    out.write_json(IDENTITY_FILE, identity)
    existing = set(out.names())
    task = ray.remote(num_cpus=SHARD_TASK_CPUS)(write_shard)
    pending, skipped = [], 0
    for index, start in enumerate(range(0, listing.num_rows, rows_per_shard)):
        if shard_name(index) in existing:
            skipped += 1
            continue
        pending.append(task.remote(listing.slice(start, rows_per_shard), out.uri, shard_name(index),
                                   rows_per_row_group, fetch_threads))
    errors = sum(ray.get(ref) for ref in progress(pending, "writing shards", unit="shard"))
    shards = -(-listing.num_rows // rows_per_shard)
    return IngestResult(listing.num_rows, shards, skipped, errors, out.uri)
