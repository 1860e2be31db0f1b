"""Reading what a plan names, in the decode tasks (and in training's and an audit's
readers): a Parquet shard unit's rows, checked against the version planned, and the files,
links and Hugging Face image paths records name, each as its bytes or the error-row text
saying why there are none. Planning is `sources.py` (Parquet shards: `parquet_shards.py`);
nothing here lists an input."""
from __future__ import annotations

import posixpath
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mirror_core.errors import error_text
from mirror_core.uri import image_name, is_web_url
from pipeline.scan import web
from pipeline.scan.image_column import class_label_names, find_image_column, split_image_column
from pipeline.scan.labels import LABEL_NAMES
from pipeline.scan.sample import shard_row_key, shard_rows_in_sample
from pipeline.scan.schema import RECORD_ERROR, shard_changed
from pipeline.scan.sources import standard_records
from pipeline.scan.units import ColumnMap, Unit
from pipeline.storage import opened_version, read_ahead, resolve_relative

NAME_COLUMN_KEY = b"mirror_name_column"  # records' metadata: the column naming each image (HF path)


class ShardChangedError(ValueError):
    """A Parquet shard unit's file is not the one planned (written again since)."""


def shard_unit_rows(unit: Unit) -> np.ndarray:
    """The indexes, within its row group, of a shard unit's rows (a sampled plan's: those drawn)."""
    return shard_rows_in_sample(unit.file, unit.row_group, planned_group_rows(unit), unit.sample)


def planned_group_rows(unit: Unit) -> int:
    return unit.group_rows if unit.group_rows is not None else unit.rows


def shard_unit_uris(unit: Unit, positions: np.ndarray | None = None) -> pa.Array:
    """The uri of each of a shard unit's rows that names none: its place in the shard."""
    positions = shard_unit_rows(unit) if positions is None else positions
    return pa.array([shard_row_key(unit.file, unit.row_group, int(i)) for i in positions], pa.string())


def read_shard_unit(unit: Unit, columns: ColumnMap, with_bytes: bool) -> pa.Table:
    """The records of one row group (a sampled plan's unit: those of its rows drawn), in
    standard names; bytes only when asked. A Hugging Face Image struct becomes `bytes` and
    `<column>_path`; ClassLabel names become labels. A ShardChangedError when the file is
    another version than the unit's, or its row group another size (the rows would not be
    the planned ones)."""
    group_rows = planned_group_rows(unit)
    with fsspec.open(unit.file, "rb") as f:
        if unit.version is not None and (now := opened_version(f)) != unit.version:
            raise ShardChangedError(shard_changed(unit.file, f"was written again since it was planned (version "
                                                             f"{now}, planned {unit.version})"))
        pf = pq.ParquetFile(f)
        if unit.row_group >= pf.metadata.num_row_groups or pf.metadata.row_group(unit.row_group).num_rows != group_rows:
            raise ShardChangedError(shard_changed(unit.file, f"holds other row groups than planned (row group "
                                                             f"{unit.row_group} of {group_rows} rows)"))
        schema = pf.schema_arrow
        image = find_image_column(schema, columns.bytes, unit.file)
        names = [n for n in schema.names if image is None or n != image.column]
        if image is not None and (with_bytes or image.path_field):
            names.append(image.column if with_bytes else f"{image.column}.{image.path_field}")
        table = pf.read_row_group(unit.row_group, columns=names)
    positions = shard_unit_rows(unit)
    if unit.sample is not None:
        table = table.take(pa.array(positions))
    if image is not None and image.column in table.column_names:
        table = split_image_column(table, image)
    labels = class_label_names(schema, columns.label)
    if labels and columns.label in table.column_names and all(n.strip().lower() in LABEL_NAMES for n in labels):
        at = table.column_names.index(columns.label)  # label i means labels[i] (e.g. ['fake', 'real'])
        table = table.set_column(at, columns.label, pa.array([None if i is None else labels[i]
                                                               for i in table[columns.label].to_pylist()], pa.string()))
    table = standard_records(table, columns)
    path = image.path_column if image is not None and image.path_column in table.column_names else None
    if "uri" not in table.column_names:
        fallback = shard_unit_uris(unit, positions)
        table = table.append_column("uri", pc.coalesce(table[path], fallback) if path else fallback)
    return table.replace_schema_metadata({NAME_COLUMN_KEY: path.encode()} if path else None)


def record_names(records: pa.Table) -> list[str | None]:
    """The name of each record's image (alignment by extension): its HF path, else its uri."""
    path = (records.schema.metadata or {}).get(NAME_COLUMN_KEY)
    if path and path.decode() in records.column_names:
        return pc.coalesce(records[path.decode()], records["uri"]).to_pylist()
    return records["uri"].to_pylist()


DEFAULT_MAX_FILE_BYTES = 256 * 2**20
# Errors that another try may heal (storage), unlike undecodable or oversized images.
TRANSIENT_ERROR_PREFIXES = ("read failed:", "shard read failed:")


def planned_errors(stored: pa.Table) -> list[str | None] | None:
    """A unit's stored records' RECORD_ERROR: what the plan knows cannot be read (None: nothing)."""
    return stored[RECORD_ERROR].to_pylist() if RECORD_ERROR in stored.column_names else None


def fetch_planned(uris: list[str | None], errors: list[str | None] | None, threads: int,
                  max_bytes: int = DEFAULT_MAX_FILE_BYTES, honour_opt_out: bool = False
                  ) -> Iterator[tuple[bytes | None, str | None]]:
    """`fetch_all`, but a record the plan knows cannot be read (`errors`, `planned_errors`)
    is that error and is not read."""
    if not errors or not any(errors):
        return fetch_all(uris, threads, max_bytes, honour_opt_out)
    fetched = fetch_all([None if e else u for u, e in zip(uris, errors)], threads, max_bytes, honour_opt_out)
    return ((None, e) if e else payload for payload, e in zip(fetched, errors))


def fetch_all(uris: list[str | None], threads: int, max_bytes: int = DEFAULT_MAX_FILE_BYTES,
              honour_opt_out: bool = False) -> Iterator[tuple[bytes | None, str | None]]:
    """(bytes, None) or (None, error message) per URI, in order; I/O in a thread pool.
    Files over `max_bytes` are refused after reading at most max_bytes + 1 bytes.
    `honour_opt_out`: a web image whose site opts out of AI use is not read (ingest)."""

    def fetch(uri: str | None):
        if not uri:
            return None, "no uri: the record names no file (an empty manifest cell)"
        try:
            if is_web_url(uri):
                data = web.read_web(uri, max_bytes, honour_opt_out=honour_opt_out)
            else:
                with fsspec.open(uri, "rb") as f:
                    data = f.read(max_bytes + 1)
        except web.OptedOut as err:  # no storage error: another try must not read it
            return None, f"opted out: {err}"
        except FileNotFoundError as err:
            hint = " (a Windows path? '/' separates folders here)" if "\\" in uri and not is_web_url(uri) else ""
            return None, f"read failed: {error_text(err)}{hint}"
        except Exception as err:  # recorded on the row, never raised
            return None, f"read failed: {error_text(err)}"
        if len(data) > max_bytes:
            return None, f"file too large: over {max_bytes:,} bytes"
        return data, None

    yield from read_ahead(fetch, uris, threads)  # a bounded number read and not yet taken


def shard_payloads(records: pa.Table, shard: str, threads: int,
                   max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> list[tuple[bytes | None, str | None]]:
    """(bytes, None) or (None, why there are none) per record of a shard (`bytes`: its image
    column). A Hugging Face Image whose bytes are null but whose path names a file (a dataset
    written with its images kept as files) is read from that file, a relative path below
    the shard's folder, as a manifest's are."""
    datas = records["bytes"].to_pylist()
    column = (records.schema.metadata or {}).get(NAME_COLUMN_KEY, b"").decode()
    paths = records[column].to_pylist() if column in records.column_names else [None] * len(datas)
    elsewhere = [i for i, (d, p) in enumerate(zip(datas, paths)) if d is None and p]
    fetched = {}
    if elsewhere:
        folder = posixpath.dirname(image_name(shard))
        uris = resolve_relative(pa.array([paths[i] for i in elsewhere], pa.string()), folder).to_pylist()
        fetched = dict(zip(elsewhere, fetch_all(uris, threads, max_bytes)))
    return [fetched[i] if i in fetched else
            (None, "no image bytes (null)") if d is None else
            (None, f"file too large: over {max_bytes:,} bytes") if len(d) > max_bytes else (d, None)
            for i, d in enumerate(datas)]
