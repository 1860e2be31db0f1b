"""Sources: folders of images, Parquet shards with image bytes, manifests of URIs.

A source is planned into *units*: small, stable pieces of the input (a chunk
of files, or one row group of a shard). Units are what the scan commits:
a unit's rows are written together, once, so a rerun skips finished units.
"""
from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.scan.schema import INDEX, UNIT

LABEL_FOLDERS = {"0_real": 0, "nature": 0, "1_fake": 1, "ai": 1}
LABEL_NAMES = {**LABEL_FOLDERS, "0": 0, "1": 1, "real": 0, "fake": 1}
DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp", "gif", "tif", "tiff", "avif")
INPUT_FORMATS = ("auto", "folder", "parquet", "manifest")


@dataclass
class ColumnMap:
    """Names of the record columns in Parquet shards and manifests."""

    bytes: str = "bytes"
    uri: str = "uri"
    id: str = "id"
    label: str = "label"
    subset: str = "subset"


@dataclass
class SourceOptions:
    input_format: str = "auto"
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    columns: ColumnMap = field(default_factory=ColumnMap)
    unit_size: int = 256  # records per unit for folders and manifests


@dataclass
class Unit:
    """kind 'inline': records listed in the plan; kind 'shard': one Parquet row group."""

    unit_id: str
    kind: str
    rows: int
    file: str | None = None
    row_group: int | None = None


@dataclass
class Plan:
    input: str
    input_format: str
    units: list[Unit]
    records: pa.Table  # inline units' records (+ _unit, _index); empty for shards
    skipped_by_extension: int = 0  # files of a folder input left out for their extension

    @property
    def total_rows(self) -> int:
        return sum(u.rows for u in self.units)


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def full_uri(fs, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def label_and_subset(parts: tuple[str, ...]) -> tuple[int | None, str | None]:
    """Folders of a file below the root -> (label of the deepest label folder, subset)."""
    label, depth = None, None
    for i, name in enumerate(parts):
        if name in LABEL_FOLDERS:
            label, depth = LABEL_FOLDERS[name], i
    subset = parts[0] if depth is not None and parts[0] not in LABEL_FOLDERS else None
    return label, subset


def list_files(root: str) -> list[str]:
    """Every file below a folder (local or fsspec), sorted: one listing serves a plan."""
    fs, base = fsspec.core.url_to_fs(root)
    return sorted(fs.find(base))


def list_images(root: str, extensions=DEFAULT_EXTENSIONS, files: list[str] | None = None) -> pa.Table:
    """Recursive listing, sorted: uri, label, subset (`files`: the folder's listing, if made)."""
    fs, base = fsspec.core.url_to_fs(root)
    if files is None:
        if not fs.isdir(base):
            raise FileNotFoundError(f"input folder {root} does not exist")
        files = list_files(root)
    wanted = {"." + e.lower().lstrip(".") for e in extensions}
    rows = {"uri": [], "label": [], "subset": []}
    for path in files:
        rel = PurePosixPath(path).relative_to(PurePosixPath(base))
        if rel.suffix.lower() not in wanted:
            continue
        label, subset = label_and_subset(rel.parts[:-1])
        rows["uri"].append(full_uri(fs, path))
        rows["label"].append(label)
        rows["subset"].append(subset)
    return pa.table({"uri": pa.array(rows["uri"], pa.string()), "label": pa.array(rows["label"], pa.int64()),
                     "subset": pa.array(rows["subset"], pa.string())})


def normalize_labels(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """0/1 integers, booleans, or names (real/fake, 0_real/1_fake, nature/ai) -> int64."""
    if pa.types.is_integer(col.type) or pa.types.is_boolean(col.type):
        out = pc.cast(col, pa.int64())
    else:
        values = []
        for v in col.to_pylist():
            key = None if v is None else str(v).strip().lower()
            if key is not None and key not in LABEL_NAMES:
                raise ValueError(f"label value {v!r} is not one of 0/1/real/fake/0_real/1_fake/nature/ai")
            values.append(None if key is None else LABEL_NAMES[key])
        out = pa.array(values, pa.int64())
    bad = pc.sum(pc.and_(pc.is_valid(out), pc.invert(pc.is_in(out, pa.array([0, 1]))))).as_py()
    if bad:
        raise ValueError(f"{bad} label values are not 0 or 1")
    return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out


def standard_records(table: pa.Table, columns: ColumnMap) -> pa.Table:
    """Rename configured columns to uri/id/label/subset; other columns stay as they are."""
    renames = {columns.uri: "uri", columns.id: "id", columns.label: "label", columns.subset: "subset",
               columns.bytes: "bytes"}
    names = [renames.get(n, n) for n in table.column_names]
    table = table.rename_columns(names)
    if "label" in table.column_names:
        table = table.set_column(names.index("label"), "label", normalize_labels(table["label"]))
    for name in ("uri", "id", "subset"):
        if name in table.column_names and not pa.types.is_string(table[name].type):
            table = table.set_column(table.column_names.index(name), name, pc.cast(table[name], pa.string()))
    return table


def read_manifest(uri: str, columns: ColumnMap) -> pa.Table:
    with fsspec.open(uri, "rb") as f:
        data = f.read()
    table = pacsv.read_csv(io.BytesIO(data)) if uri.lower().endswith(".csv") else pq.read_table(io.BytesIO(data))
    table = standard_records(table, columns)
    if "uri" not in table.column_names:
        raise ValueError(f"manifest {uri} has no {columns.uri!r} column (set columns.uri)")
    return table


def _unit_id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:20]


def inline_units(records: pa.Table, unit_size: int, source: str) -> tuple[list[Unit], pa.Table]:
    units, unit_col, index_col = [], [], []
    uris = records["uri"].to_pylist()
    for start in range(0, records.num_rows, unit_size):
        chunk = uris[start : start + unit_size]
        unit = Unit(_unit_id("inline", source, str(start), *chunk), "inline", len(chunk))
        units.append(unit)
        unit_col += [unit.unit_id] * len(chunk)
        index_col += list(range(len(chunk)))
    records = records.append_column(UNIT, pa.array(unit_col, pa.string())).append_column(INDEX, pa.array(index_col, pa.int64()))
    return units, records


def shard_files(root: str, files: list[str] | None = None) -> list[str]:
    fs, base = fsspec.core.url_to_fs(root)
    if files is None:
        if fs.isfile(base):
            return [full_uri(fs, base)]
        if not fs.isdir(base):
            raise FileNotFoundError(f"input {root} does not exist")
        files = list_files(root)
    return [full_uri(fs, p) for p in files if p.endswith(".parquet") and "/_" not in p[len(base):]]


FOOTER_THREADS = 32  # Parquet footers read at once (object-store latency, not bandwidth)


def shard_units(files: list[str]) -> list[Unit]:
    from pipeline.progress import progress

    def row_groups(uri: str) -> list[int]:
        with fsspec.open(uri, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        return [meta.row_group(rg).num_rows for rg in range(meta.num_row_groups)]

    units = []
    with ThreadPoolExecutor(max_workers=FOOTER_THREADS) as pool:
        for uri, sizes in zip(files, progress(pool.map(row_groups, files), "reading shard footers",
                                               total=len(files), unit="file")):
            units += [Unit(_unit_id("shard", uri, str(rg), str(rows)), "shard", rows, uri, rg)
                      for rg, rows in enumerate(sizes)]
    return units


def _has_bytes_column(uri: str, columns: ColumnMap) -> bool:
    with fsspec.open(uri, "rb") as f:
        return columns.bytes in pq.ParquetFile(f).schema_arrow.names


def detect_format(uri: str, options: SourceOptions, files: list[str] | None = None) -> str:
    """`files`: the input folder's listing when it has been made (None for single files)."""
    if options.input_format != "auto":
        return options.input_format
    low = uri.lower()
    if low.endswith(".csv"):
        return "manifest"
    fs, base = fsspec.core.url_to_fs(uri)
    if low.endswith(".parquet") and fs.isfile(base):
        return "parquet" if _has_bytes_column(uri, options.columns) else "manifest"
    if files is None:
        if not fs.isdir(base):
            raise FileNotFoundError(f"input {uri} does not exist")
        files = list_files(uri)
    wanted = {"." + e.lower() for e in options.extensions}
    if any(PurePosixPath(p).suffix.lower() in wanted for p in files):
        return "folder"
    parquet = [p for p in files if p.endswith(".parquet")]
    if parquet:
        return "parquet" if _has_bytes_column(full_uri(fs, parquet[0]), options.columns) else "manifest"
    raise ValueError(f"input {uri} holds no images ({', '.join(options.extensions)}) and no Parquet files")


def plan_source(uri: str, options: SourceOptions) -> Plan:
    """The input's units, from one listing of it."""
    fs, base = fsspec.core.url_to_fs(uri)
    listing = list_files(uri) if not uri.lower().endswith((".csv", ".parquet")) and fs.isdir(base) else None
    fmt = detect_format(uri, options, listing)
    skipped = 0
    if fmt == "folder":
        images = list_images(uri, options.extensions, listing)
        skipped = len(listing) - images.num_rows if listing is not None else 0
        units, records = inline_units(images, options.unit_size, uri)
    elif fmt == "manifest":
        files = [uri] if uri.lower().endswith((".csv", ".parquet")) else shard_files(uri, listing)
        table = pa.concat_tables([read_manifest(f, options.columns) for f in files], promote_options="permissive")
        units, records = inline_units(table, options.unit_size, uri)
    elif fmt == "parquet":
        units, records = shard_units(shard_files(uri, listing)), pa.table({})
    else:
        raise ValueError(f"unknown input format {fmt!r}; expected one of {INPUT_FORMATS}")
    return Plan(uri, fmt, units, records, skipped)


def read_shard_unit(unit: Unit, columns: ColumnMap, with_bytes: bool) -> pa.Table:
    """The records of one row group, in standard names; bytes only when asked."""
    with fsspec.open(unit.file, "rb") as f:
        pf = pq.ParquetFile(f)
        names = [n for n in pf.schema_arrow.names if with_bytes or n != columns.bytes]
        table = pf.read_row_group(unit.row_group, columns=names)
    table = standard_records(table, columns)
    if "uri" not in table.column_names:
        table = table.append_column("uri", pa.array([f"{unit.file}#{unit.row_group}:{i}" for i in range(table.num_rows)], pa.string()))
    return table


DEFAULT_MAX_FILE_BYTES = 256 * 2**20


def fetch_all(uris: list[str], threads: int, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Iterator[tuple[bytes | None, str | None]]:
    """(bytes, None) or (None, error message) per URI, in order; I/O in a thread pool.
    Files over `max_bytes` are refused after reading at most max_bytes + 1 bytes."""

    def fetch(uri: str):
        try:
            with fsspec.open(uri, "rb") as f:
                data = f.read(max_bytes + 1)
        except Exception as err:  # recorded on the row, never raised
            return None, f"read failed: {type(err).__name__}: {err}"
        if len(data) > max_bytes:
            return None, f"file too large: over {max_bytes:,} bytes"
        return data, None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        yield from pool.map(fetch, uris)
