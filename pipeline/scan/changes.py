"""What `--update` finds changed in place or removed among a folder's planned files (and
among Parquet shards: `shard_changes`; tar shards: tar_changes.py).

A folder's planned records carry each file's version as the listing gave it (VERSION:
an S3 ETag, a disk's mtime and size). An update lists the folder again and compares: a
known file listed with another version was changed in place; a known file the listing
lacks was removed. The units holding either are scored again (their parts replaced, one
row per record: a removed file's row says `read failed: FileNotFoundError`), and each
such file's version as listed now is recorded below `_plan/versions/`, so that it is not
found changed again. A file removed and later put back is changed again.

Records planned without a version (by versions of this product that recorded none) get
the version listed now, with nothing scored again: their changes are found from then on.

A manifest whose records carry versions (`columns.version`: a column of ETags, hashes or
times) is checked the same way, except that a record the manifest no longer holds keeps
its row: its file was not removed, the manifest just no longer names it.

An update's versions are written as it lists (`VersionsWriter`: files of a generation in
VERSIONS_DIR, `<generation>-<file>.parquet`) and count only once its run has scored every
unit (`commit` writes `<generation>.committed` beside them): an update interrupted before
that finds the same changes when run again. One listing of VERSIONS_DIR finds them all;
past MAX_GENERATIONS they are merged into one (each URI's latest version).

Memory: per planned record, its URI digest (16 bytes), version digest (8), unit (4) and two
flags (listed, stale): 30 bytes, 3 GB for 100M records (about 52 bytes while sorted).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa

from pipeline.scan.schema import UNIT, VERSION
from pipeline.scan.uri_set import DIGEST, UriSet, uri_digests
from pipeline.storage import Location

VERSIONS_DIR = "_plan/versions"
COMMITTED = ".committed"  # a generation whose run scored every unit it found changed
VERSIONS_SCHEMA = pa.schema([pa.field("uri_digest", pa.binary(16)), pa.field("version", pa.uint64())])
VERSION_ROWS_PER_FILE = 1 << 20
MAX_GENERATIONS = 16  # committed generations an update reads before they are merged into one
NO_VERSION = 0  # a record planned without one
GONE = 1  # a file removed when an update last listed the folder


def version_digests(versions: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An 8-byte digest per version (a null version: NO_VERSION)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") | 2
                        if v is not None else NO_VERSION  # bit 1 set: never NO_VERSION or GONE
                        for v in versions.to_pylist()), np.uint64, len(versions))


@dataclass
class FileChanges:
    """What an update found: files (or shards) changed in place, removed, given their first
    version, and the units to score again for the first two; for shards, what those units
    take (their versions; tar samples' refreshed records: file, row group) and what the
    shards take (tar shards' versions), once the run has scored them."""

    changed: int = 0
    removed: int = 0
    versioned: int = 0
    units: frozenset[str] = frozenset()
    unit_versions: dict[str, str] = field(default_factory=dict)
    unit_records: dict[str, tuple[str, int]] = field(default_factory=dict)
    shard_versions: dict[str, str] = field(default_factory=dict)
    checked: bool = False  # the input's files were checked (a folder, Parquet or tar shards)

    def as_dict(self) -> dict:
        return {"files_changed": self.changed, "files_removed": self.removed, "files_versioned": self.versioned,
                "units_changed": len(self.units)}


class VersionsWriter:
    """One update's versions (URI digest, version digest), written a file at a time as a new
    generation in VERSIONS_DIR; they count once `commit` marks the generation."""

    def __init__(self, store: Location):
        self.store = store
        committed, uncommitted = versions_files(store)
        for name in uncommitted:  # of an update interrupted before its run ended: found again now
            Location(store.uri_of(VERSIONS_DIR, name)).remove()
        self.generation = f"{max((int(g) for g, _ in committed), default=0) + 1:06d}"
        self.buffered: list[pa.Table] = []
        self.rows = self.files = 0  # rows buffered, files written

    def add(self, digests: np.ndarray, versions: np.ndarray) -> None:
        if len(digests):
            uri_digest = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(digests),
                                                              [None, pa.py_buffer(digests.tobytes())])
            self.buffered.append(pa.table([uri_digest, pa.array(versions, pa.uint64())], schema=VERSIONS_SCHEMA))
            self.rows += len(digests)
            if self.rows >= VERSION_ROWS_PER_FILE:
                self.flush()

    def flush(self) -> None:
        if self.buffered:
            self.store.write_parquet(f"{VERSIONS_DIR}/{self.generation}-{self.files:06d}.parquet",
                                     pa.concat_tables(self.buffered))
            self.buffered, self.rows, self.files = [], 0, self.files + 1

    def commit(self, merge: bool = True) -> None:
        self.flush()
        if not self.files:
            return
        self.store.write_bytes(f"{VERSIONS_DIR}/{self.generation}{COMMITTED}", b"")
        committed = versions_files(self.store)[0]
        if merge and len({g for g, _ in committed}) > MAX_GENERATIONS:
            merge_generations(self.store, committed)


def digests_of(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size binary column of URI digests as DIGEST values (no copy)."""
    column = column.combine_chunks()
    return np.frombuffer(column.buffers()[1], DIGEST, len(column), column.offset * DIGEST.itemsize)


def merge_generations(store: Location, committed: list[tuple[str, str]]) -> None:
    """The committed generations as one newer generation holding each URI's latest version;
    the old ones deleted once it is committed (left behind by a crash, they only repeat it)."""
    merged = pa.concat_tables([store.read_parquet(f"{VERSIONS_DIR}/{name}") for _, name in committed])
    digests = digests_of(merged["uri_digest"])
    _, last = np.unique(digests[::-1], return_index=True)  # each digest's last row, counted from the end
    merged = merged.take(pa.array(np.sort(len(digests) - 1 - last)))
    writer = VersionsWriter(store)
    for start in range(0, merged.num_rows, VERSION_ROWS_PER_FILE):
        writer.buffered.append(merged.slice(start, VERSION_ROWS_PER_FILE))
        writer.flush()
    writer.commit(merge=False)
    for generation in dict.fromkeys(g for g, _ in committed):
        for name in [n for g, n in committed if g == generation] + [f"{generation}{COMMITTED}"]:
            Location(store.uri_of(VERSIONS_DIR, name)).remove()


def versions_files(store: Location) -> tuple[list[tuple[str, str]], list[str]]:
    """From one listing of VERSIONS_DIR: (generation, file name) of the committed
    generations' files, oldest first; the names of the uncommitted ones' files."""
    names = store.names(VERSIONS_DIR)
    done = {n.removesuffix(COMMITTED) for n in names if n.endswith(COMMITTED)}
    files = [(n.split("-", 1)[0], n) for n in names if n.endswith(".parquet")]
    return [(g, n) for g, n in files if g in done], [n for g, n in files if g not in done]


def recorded_versions(store: Location) -> Iterable[pa.Table]:
    """Every committed generation's versions, oldest first (a later one wins)."""
    for _, name in versions_files(store)[0]:
        yield store.read_parquet(f"{VERSIONS_DIR}/{name}")


def removed_files(store: Location) -> UriSet:
    """The files (a manifest's records) that the latest update to list each found gone: a
    read of one fails again, so --retry-errors leaves their rows as they are."""
    gone = np.empty(0, DIGEST)  # sorted
    for table in recorded_versions(store):  # oldest first: a file found back later is not gone
        digests, versions = digests_of(table["uri_digest"]), table["version"].to_numpy()
        if len(gone):
            at = np.minimum(np.searchsorted(gone, digests), len(gone) - 1)
            back = at[(gone[at] == digests) & (versions != GONE)]
            gone = np.delete(gone, back)
        gone = np.union1d(gone, digests[versions == GONE])
    return UriSet.of_digests(gone)


class KnownFiles(UriSet):
    """A folder plan's records (or a manifest's with versions: `columns.version`) by URI
    digest, with each one's version and unit: what an update checks its listing (or the
    manifest read again) against (`check_listed`), then asks what changed (`finish`)."""

    def __init__(self, records: Iterable[pa.Table], rows: int, unit_ids: list[str], recorded: Iterable[pa.Table],
                 versions: VersionsWriter):
        """`records`: the plan's `rows` stored records (uri, unit and, where planned with
        one, version), streamed; filled in place and sorted one array at a time, so the
        peak stays near twice what is held."""
        unit_index = {u: i for i, u in enumerate(unit_ids)}
        digests, planned = np.empty(rows, DIGEST), np.full(rows, NO_VERSION, np.uint64)
        owners, at = np.empty(rows, np.int32), 0
        for t in records:
            if at + t.num_rows > rows:
                raise ValueError(f"the plan's records hold more than its units' {rows} rows")
            digests[at:at + t.num_rows] = uri_digests(t["uri"])
            if VERSION in t.column_names:
                planned[at:at + t.num_rows] = version_digests(t[VERSION])
            units = t[UNIT].combine_chunks().dictionary_encode()
            local = np.array([unit_index.get(u, -1) for u in units.dictionary.to_pylist()], np.int32)
            owners[at:at + t.num_rows] = local[units.indices.to_numpy(zero_copy_only=False)]
            at += t.num_rows
        if at != rows:
            raise ValueError(f"the plan's records hold {at} rows, its units {rows}")
        order = np.argsort(digests)
        self.digests = digests[order]
        del digests
        self.versions = planned[order]
        del planned
        self.owners = owners[order]
        del owners, order
        for table in recorded:
            at, found = self.positions(digests_of(table["uri_digest"]))
            self.versions[at[found]] = table["version"].to_numpy()[found]
        self.listed = np.zeros(len(self.digests), bool)
        self.stale = np.zeros(len(self.digests), bool)
        self.unit_ids, self.writer = unit_ids, versions
        self.changes = FileChanges(checked=True)

    def _spread_over_repeats(self) -> np.ndarray | None:
        """A URI planned more than once (a manifest naming a file in two rows) is checked at
        its first copy (`positions`): what was found there holds for every copy. Returns
        which records repeat an earlier copy (None when none does)."""
        repeats = np.flatnonzero(self.digests[1:] == self.digests[:-1])  # i: copy i + 1 repeats copy i
        if not len(repeats):
            return None
        starts = np.r_[True, repeats[1:] != repeats[:-1] + 1]  # a new run of copies
        first = np.repeat(repeats[starts], np.diff(np.r_[np.flatnonzero(starts), len(repeats)]))
        for flags in (self.listed, self.stale, self.versions):
            flags[repeats + 1] = flags[first]
        repeated = np.zeros(len(self.digests), bool)
        repeated[repeats + 1] = True
        return repeated

    def check_listed(self, records: pa.Table) -> np.ndarray:
        at, known = self.positions(uri_digests(records["uri"]))
        at = at[known]
        self.listed[at] = True  # listed, whether or not the listing gave its version: not removed
        if VERSION not in records.column_names or not len(at):
            return known
        now = version_digests(records[VERSION])[known]
        before = self.versions[at]
        differs = (before != now) & (now != NO_VERSION)  # a file the listing gave no version: unknown
        first = differs & (before == NO_VERSION)
        changed = differs & ~first
        self.stale[at[changed]] = True
        self.changes.versioned += int(first.sum())
        self.writer.add(self.digests[at[differs]], now[differs])
        return known

    def finish(self, removed_stale: bool = True) -> FileChanges:
        """After the listing: the files it lacked are removed (`removed_stale`: their units
        are scored again); the units to score again."""
        self.changes.changed = int(np.count_nonzero(self.stale))  # so far: first copies only
        repeated = self._spread_over_repeats()
        removed = ~self.listed & (self.versions != NO_VERSION) & (self.versions != GONE)
        if removed_stale:
            self.stale |= removed
        self.changes.removed = int(np.count_nonzero(removed if repeated is None else removed & ~repeated))
        self.writer.add(self.digests[removed], np.full(int(removed.sum()), GONE, np.uint64))
        self.writer.flush()
        owners = np.unique(self.owners[self.stale])
        self.changes.units = frozenset(self.unit_ids[i] for i in owners if i >= 0)
        return self.changes


REMOVED = "removed"  # a shard unit's version once its file was found gone (its rows: read errors)


def removed_shard_units(units: list) -> set[str]:
    """Of a plan's units (`units.Unit`s), those of shards an update found removed: a read
    of their rows fails again."""
    return {u.unit_id for u in units if u.version == REMOVED}


def shard_changes(planned: list, listed: list) -> tuple[list, FileChanges]:
    """Parquet shards listed again (`listed`: their units, `units.Unit`s, as their
    footers give them now) against the plan's units: the units of new shards, and the
    shards changed in place (another version, the same row groups) or removed, whose units
    are scored again. A planned shard with other row groups now is refused: its rows cannot
    be replaced unit by unit. Shards planned without versions get them here (`versioned`),
    nothing scored."""
    def by_file(units: list) -> dict[str, list]:
        files: dict[str, list] = {}
        for u in units:
            if u.kind == "shard":
                files.setdefault(u.file, []).append(u)
        return files

    before, now = by_file(planned), by_file(listed)
    added, refused, changes, later = [], [], FileChanges(checked=True), {}
    for file, units in now.items():
        old, version = before.get(file), units[0].version
        if old is None:
            added += units
        elif [u.unit_id for u in old] != [u.unit_id for u in units]:
            refused.append(file)
        elif version is not None and version != old[0].version:
            if old[0].version is None:  # planned before versions were recorded
                for u in old:
                    u.version = version
                changes.versioned += 1
            else:
                changes.changed += 1
                later.update((u.unit_id, version) for u in old)
    if refused:
        raise ValueError(f"{len(refused)} Parquet shards were written again with other row groups since they were "
                         f"planned, such as {refused[0]}: their rows cannot be replaced unit by unit; scan the "
                         "input into a new --output")
    for file, old in before.items():
        if file not in now and old[0].version != REMOVED:
            changes.removed += 1
            later.update((u.unit_id, REMOVED) for u in old)
    changes.units, changes.unit_versions = frozenset(later), later
    return added, changes
