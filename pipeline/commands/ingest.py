"""`mirror ingest`: a folder tree of images -> Parquet shards with the bytes inside.

Scanning a few big files beats opening millions of small ones (on S3 above
all). Shards are named by position in the sorted listing and written whole,
so an interrupted ingest reruns by skipping shards that already exist.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.progress import progress, step
from pipeline.scan.sources import DEFAULT_EXTENSIONS, fetch_all, list_images
from pipeline.storage import Location

SHARD_SCHEMA = pa.schema([
    ("uri", pa.string()), ("label", pa.int64()), ("subset", pa.string()), ("bytes", pa.binary()),
    ("sha256", pa.string()), ("original_format", pa.string()), ("read_error", pa.string()),
])


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


def ingest_folder(input_uri: str, output_uri: str, rows_per_shard: int = 4096, rows_per_row_group: int = 256,
                  extensions=DEFAULT_EXTENSIONS, fetch_threads: int = 16) -> IngestResult:
    with step(f"listing {input_uri}") as info:
        listing = list_images(input_uri, extensions)
        info.update(items=listing.num_rows, unit="images")
    out = Location(output_uri)
    existing = {p.rsplit("/", 1)[-1] for p in out.fs.find(out.root)} if out.fs.exists(out.root) else set()
    shards = skipped = errors = 0
    for start in progress(range(0, listing.num_rows, rows_per_shard), "writing shards", unit="shard"):
        name = f"shard-{start // rows_per_shard:06d}.parquet"
        shards += 1
        if name in existing:
            skipped += 1
            continue
        chunk = listing.slice(start, rows_per_shard)
        cols = {"bytes": [], "sha256": [], "original_format": [], "read_error": []}
        for data, error in fetch_all(chunk["uri"].to_pylist(), fetch_threads):
            # an unreadable file keeps its row (bytes null, error set): scan reports it
            errors += error is not None
            cols["bytes"].append(data)
            cols["sha256"].append(hashlib.sha256(data).hexdigest() if data is not None else None)
            cols["original_format"].append(sniff_format(data) if data else None)
            cols["read_error"].append(error)
        table = pa.Table.from_arrays(
            [chunk["uri"], chunk["label"], chunk["subset"]] + [pa.array(cols[f.name], f.type) for f in list(SHARD_SCHEMA)[3:]],
            schema=SHARD_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=rows_per_row_group)
        out.write_bytes(name, buf.getvalue())
    return IngestResult(listing.num_rows, shards, skipped, errors, out.uri)
