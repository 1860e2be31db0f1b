"""Parquet shards with image bytes: which files, and one unit per row group (its size from
the footer, every footer read concurrently; a sampled plan's unit holds its drawn rows)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from mirror_core.errors import error_text
from mirror_core.sniff import what_file_holds
from pipeline.scan import webdataset
from pipeline.scan.image_column import ImageColumnError, find_image_column
from pipeline.scan.listing import full_uri, list_files
from pipeline.scan.sample import Draw, shard_rows_in_sample
from pipeline.scan.units import ColumnMap, Unit, unit_id, warn_label_case
from pipeline.storage import opened_version


def shard_files(root: str, files: list[str] | None = None) -> list[str]:
    """Parquet shards: a brace pattern ('data/train-{00000..00041}-of-00042.parquet'), one
    file, or a folder's `.parquet` files (but those below a folder named `_...`)."""
    if webdataset.has_braces(root):
        return webdataset.expand_braces(root)
    fs, base = fsspec.core.url_to_fs(root)
    if files is None:
        if fs.isfile(base):
            return [full_uri(fs, base)]
        if not fs.isdir(base):
            raise FileNotFoundError(f"input {root} does not exist")
        files = list_files(root)
    return [full_uri(fs, p) for p in files if p.endswith(".parquet") and "/_" not in p[len(base):]]


FOOTER_THREADS = 32  # Parquet footers read at once (object-store latency, not bandwidth)


def shard_units(files: list[str], columns: ColumnMap | None = None, gone_ok: bool = False,
                draw: Draw | None = None) -> list[Unit]:
    """One unit per row group, footers read concurrently; every shard's image column is
    checked on the way (a wrong type is an error before any scoring). `gone_ok`: a file
    not there is left out (an update's: a shard of a pattern removed), else an error.
    `draw` (a sampled plan): a unit holds its row group's rows in the sample (none: no unit),
    and the draw counts every row group's rows."""
    columns = columns or ColumnMap()
    fraction = draw.fraction if draw is not None else None
    from pipeline.progress import progress

    units, warned, unreadable = [], False, []
    with ThreadPoolExecutor(max_workers=FOOTER_THREADS) as pool:
        footers = pool.map(lambda uri: read_footer(uri, columns, gone_ok), files)
        for uri, footer in zip(files, progress(footers, "reading shard footers", total=len(files), unit="file")):
            if footer.unreadable is not None:
                unreadable.append(f"{uri}: {footer.unreadable}")
                continue
            sizes, version = footer.sizes, footer.version
            warned = warned or warn_label_case(footer.names, columns, uri)
            if fraction is None:
                units += [Unit(unit_id("shard", uri, str(rg), str(rows)), "shard", rows, uri, rg, version)
                          for rg, rows in enumerate(sizes)]
                continue
            draw.seen += sum(sizes)
            for rg, rows in enumerate(sizes):
                if drawn := len(shard_rows_in_sample(uri, rg, rows, fraction)):
                    units.append(Unit(unit_id("shard", uri, str(rg), str(rows), f"sample {fraction!r}"), "shard",
                                      drawn, uri, rg, version, fraction, rows))
    if unreadable:  # its rows are not known: nothing could stand for them in the output
        raise ValueError(f"{len(unreadable):,} of {len(files):,} Parquet shards cannot be read (download them again, "
                         f"or move them out of the input), such as {unreadable[0]}")
    return units


@dataclass
class Footer:
    """What planning reads of a Parquet shard: its row groups' sizes, its version and columns,
    or why it cannot be read as Parquet."""

    sizes: list[int]
    version: str
    names: list[str]
    unreadable: str | None = None


def read_footer(uri: str, columns: ColumnMap, gone_ok: bool = False) -> Footer:
    """A Parquet shard's footer (its image column checked: a wrong type is an error before
    any work). `gone_ok`: a file not there has no row groups, else it is an error."""
    try:
        f = fsspec.open(uri, "rb").open()
    except FileNotFoundError:
        if gone_ok:
            return Footer([], "", [])
        raise FileNotFoundError(f"Parquet shard {uri} does not exist") from None
    with f:
        version = opened_version(f)  # what the open found (an object store's HEAD), else the file's stat
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as err:  # a truncated download, a Git LFS pointer
            what = what_file_holds(f)
            return Footer([], version, [], f"it is {what}" if what else error_text(err))
        if find_image_column(pf.schema_arrow, columns.bytes, uri) is None:
            raise ImageColumnError(f"{uri}: no image column ({columns.bytes!r}, or a Hugging Face Image struct)")
        meta = pf.metadata
    return Footer([meta.row_group(rg).num_rows for rg in range(meta.num_row_groups)], version,
                  pf.schema_arrow.names)


def has_bytes_column(uri: str, columns: ColumnMap) -> bool:
    """Whether a Parquet file holds images (a shard) rather than records of URIs (a manifest);
    one that cannot be read as Parquet is taken for a shard, which planning then names."""
    with fsspec.open(uri, "rb") as f:
        try:
            schema = pq.ParquetFile(f).schema_arrow
        except (pa.ArrowInvalid, OSError):
            return True
        return find_image_column(schema, columns.bytes, uri) is not None
