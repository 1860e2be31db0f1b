"""What planning makes and takes: units (the pieces a scan commits), plans, source
options and the names of record columns.

A unit's id is a hash of what it holds (`unit_id`): the same input planned again gives the
same units, so a rerun skips those finished.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa

from mirror_core.preprocess import IMAGE_EXTENSIONS
from pipeline.scan.labels import LABEL_FOLDERS

DEFAULT_EXTENSIONS = IMAGE_EXTENSIONS  # what a folder scan lists unless --extensions says otherwise
INPUT_FORMATS = ("auto", "folder", "parquet", "manifest", "webdataset")
RECORD_KINDS = ("inline", "samples")  # units whose records the plan holds (folders, manifests, tar samples)


@dataclass
class ColumnMap:
    """Names of the record columns in Parquet shards and manifests."""

    bytes: str = "bytes"
    uri: str = "uri"
    id: str = "id"
    label: str = "label"
    subset: str = "subset"
    # a manifest column holding each file's version (an ETag, a sha256, a modification
    # time): `--update` then scores a record again when its version changes
    version: str | None = None


@dataclass
class SourceOptions:
    input_format: str = "auto"
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    columns: ColumnMap = field(default_factory=ColumnMap)
    unit_size: int = 256  # records per unit for folders and manifests
    index_on_cluster: bool = False  # WebDataset: many tar shards indexed by Ray tasks over the cluster
    address: str | None = None  # that cluster (else RAY_ADDRESS, else a local Ray)
    sample: float | None = None  # plan only this fraction of the records (`pipeline.scan.sample`)
    label_folders: dict[str, int] = field(default_factory=lambda: LABEL_FOLDERS)  # labels.label_folders


@dataclass
class Unit:
    """kind 'inline': records listed in the plan; 'samples': tar samples listed in the plan
    (WebDataset); 'shard': one Parquet row group."""

    unit_id: str
    kind: str
    rows: int
    file: str | None = None
    row_group: int | None = None
    version: str | None = None  # a shard unit: its file's version (storage.listed_version) when scored
    # a shard unit of a sampled plan: the fraction drawn, and its row group's rows (`rows` of them are drawn)
    sample: float | None = None
    group_rows: int | None = None


class RecordsSink(Protocol):
    """Where planning puts each folder/manifest/tar-sample unit's records, unit by unit, in
    order (a scan's store: `store.PlanRecordsWriter`); it tells the unit where they went."""

    def add(self, unit: Unit, records: pa.Table) -> None: ...


@dataclass
class Plan:
    input: str
    input_format: str
    units: list[Unit]
    # records (+ _unit, _index) of the inline/sample units that no sink has taken, in unit
    # order: the whole listing for a plan made in memory, empty once they are stored
    records: pa.Table
    skipped_by_extension: int = 0  # files of a folder input left out for their extension
    shards: pa.Table | None = None  # WebDataset: the tar shards indexed (webdataset.SHARDS_SCHEMA)
    sample: float | None = None  # a sampled plan: the fraction of the records drawn
    drawn_from: int = 0  # and the records it was drawn from: the whole input as last listed

    @property
    def total_rows(self) -> int:
        return sum(u.rows for u in self.units)


def unit_id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:20]


def warn_label_case(names: list[str], columns: ColumnMap, source: str) -> bool:
    """A column named as the label column but in another case ('Label') is not read as
    labels (it may hold class names, which no label is): the console says how to read it.
    Whether it did."""
    other = next((n for n in names if n.lower() == columns.label.lower()), None) if columns.label not in names else None
    if other is not None:
        logging.getLogger("mirror").warning(
            "%s: column %r is not read as labels, the label column being %r: set `columns: {label: %s}` (--config) "
            "to read it, for metrics", source, other, columns.label, other)
    return other is not None
