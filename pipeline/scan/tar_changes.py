"""What `--update` finds changed in place or removed among WebDataset tar shards.

A tar sample is planned as the offsets of its members in its shard, so a shard written
again (img2dataset run again into the same folder) holds other bytes at those offsets,
whatever its name. Each shard's version (`storage.listed_version`) is recorded when it is
indexed: in the plan's shards table, and as the `version` of each of its units, which
decode tasks check before they trust the offsets (`webdataset.read_samples`). An update
compares the versions listed now with the recorded ones:
- a known shard with another version is indexed again; each of its units' records is
  refreshed from the new index by sample uri (a sample no longer there: an error record,
  SAMPLE_REMOVED) and stored anew, and the units are scored again; samples new to the
  shard become new units, as those of a new shard do;
- a known shard no longer there: its units are scored again (their rows: read errors);
- a shard planned without a version (by earlier versions of MIRROR) gets the one listed
  now, nothing scored again.
The refreshed units' records and versions, and the shards' versions, are stored once the
run has scored those units (`FileChanges.unit_records`, `unit_versions`,
`shard_versions`): an update interrupted before finds the same shards changed again.

Memory: the known samples' URI digests (16 bytes each, as `UriSet`) and each shard's unit
ids; a changed shard's new index while its units are refreshed.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable

import pyarrow as pa

from pipeline.scan import webdataset
from pipeline.scan.changes import REMOVED, FileChanges
from pipeline.scan.schema import UNIT
from pipeline.scan.uri_set import UriSet
from pipeline.storage import current_version, read_ahead

SAMPLE_REMOVED = "sample removed"  # the error of a planned sample its shard no longer holds
REFRESHED = (webdataset.MEMBERS, webdataset.IMAGE_MEMBER, webdataset.PLAN_ERROR, "label", "subset")
VERSION_THREADS = 16  # shards asked for their version at once when no listing gave it (a brace pattern)
RECORDS_READS_AT_ONCE = 8  # a changed shard's units' stored records read concurrently (object-store latency)


class KnownSamples(UriSet):
    """A WebDataset plan's samples by URI digest, and each shard's units (from the stored
    records' uri and unit), with what refreshing a changed shard's units needs: `read`
    gives a unit's stored records, `sink` stores refreshed ones."""

    def __init__(self, records: Iterable[pa.Table], read: Callable, sink):
        self.shard_units: dict[str, list[str]] = {}

        def uris() -> Iterable[pa.ChunkedArray]:
            for t in records:
                shards = webdataset.sample_shards(t["uri"])
                pairs = pa.table({"unit": t[UNIT], "shard": shards}).group_by(["unit", "shard"], use_threads=False)
                for row in pairs.aggregate([]).to_pylist():
                    units = self.shard_units.setdefault(row["shard"], [])
                    if not units or units[-1] != row["unit"]:
                        units.append(row["unit"])
                yield t["uri"]

        super().__init__(uris())
        self.read, self.sink = read, sink


def listed_versions(shards: list[str], listing: dict[str, str | None] | None) -> dict[str, str | None]:
    """Each shard's version now: from the folder's listing, else (a brace pattern, one
    .tar) asked of its store, a few at once; a shard that is not there: left out."""
    if listing is not None:
        return {s: listing[s] for s in shards if s in listing}

    def ask(shard: str) -> tuple[bool, str | None]:
        try:
            return True, current_version(shard)
        except FileNotFoundError:
            return False, None

    return {s: v for s, (there, v) in zip(shards, read_ahead(ask, shards, VERSION_THREADS)) if there}


class TarShardUpdate:
    """One update's check of the plan's tar shards (`shards`, webdataset.shards_table) against
    their versions now (`listed`: a shard not there is absent): `to_index` says which shards
    to index, `indexed` takes each one's new index, `finish` gives the shards table to store
    now and what changed."""

    def __init__(self, units: list, shards: pa.Table, listed: dict[str, str | None], known: KnownSamples):
        self.units = {u.unit_id: u for u in units}
        self.rows = {r["uri"]: r for r in shards.to_pylist()}
        self.listed, self.known = listed, known
        self.changes = FileChanges(checked=True)

    def _stale(self, row: dict) -> bool:
        """Whether a known shard (listed now) must be indexed again: written again since, or
        damaged when indexed and of no known version."""
        now, before = self.listed[row["uri"]], row["version"]
        if now is not None and before is not None:
            return now != before
        return row["damaged"]  # no version to tell: a shard still being written, as before versions

    def to_index(self, shards: list[str]) -> list[str]:
        """The shards to index: new ones and known ones written again. Known shards gone, or
        versioned for the first time, are noted on the way."""
        for shard, row in self.rows.items():
            if shard not in self.listed:
                if row["version"] != REMOVED:
                    self._redo(shard, REMOVED)
                    self.changes.removed += 1
            elif row["version"] is None and self.listed[shard] is not None and not row["damaged"]:
                row["version"] = self.listed[shard]  # stored now: nothing to score again
                for uid in self.known.shard_units.get(shard, []):
                    self.units[uid].version = row["version"]
                self.changes.versioned += 1
        return [s for s in shards if s not in self.rows or (s in self.listed and self._stale(self.rows[s]))]

    def _redo(self, shard: str, version: str) -> None:
        for uid in self.known.shard_units.get(shard, []):
            self.changes.unit_versions[uid] = version
        self.changes.shard_versions[shard] = version

    def indexed(self, shard: str, samples: pa.Table, row: dict) -> dict:
        """A shard's new index: a known shard's units get refreshed records, to be scored
        again. Returns its row for the shards table stored now (a known shard keeps its
        recorded version until the run has scored its units)."""
        old = self.rows.get(shard)
        if old is None:
            return row
        self.changes.changed += 1
        at = {uri: i for i, uri in enumerate(samples["uri"].to_pylist())}
        fresh = {name: samples[name].to_pylist() for name in REFRESHED}
        uids = self.known.shard_units.get(shard, [])
        stored = read_ahead(lambda uid: self.known.read(self.units[uid]), uids, RECORDS_READS_AT_ONCE)
        for uid, records in zip(uids, stored):
            unit = replace(self.units[uid])  # a copy: the plan's unit takes its new records once scored
            self.known.sink.add(unit, refreshed(records, at, fresh))
            self.changes.unit_records[uid] = (unit.file, unit.row_group)
        self._redo(shard, row["version"])
        return {**row, "version": old["version"]}

    def finish(self, indexed: list[dict]) -> pa.Table:
        """The shards table to store now (known shards not indexed again, then those
        indexed); `changes` then holds the units to score again and what they take once scored."""
        again = {r["uri"] for r in indexed}
        kept = [r for s, r in self.rows.items() if s not in again]
        self.changes.units = frozenset(self.changes.unit_versions)
        return pa.Table.from_pylist(kept + indexed, webdataset.SHARDS_SCHEMA)


def refreshed(records: pa.Table, at: dict[str, int], fresh: dict[str, list]) -> pa.Table:
    """A unit's stored records with what a new index of their shard says of each sample
    (`at`: its position there; `fresh`: the index's REFRESHED columns). A sample the shard
    no longer holds becomes an error record; the record of a damaged shard's unreadable
    rest keeps what it said."""
    columns = {name: records[name].to_pylist() for name in records.column_names}
    for i, uri in enumerate(columns["uri"]):
        j = at.get(uri)
        if j is not None:
            for name in REFRESHED:
                columns[name][i] = fresh[name][j]
        elif not uri.endswith(f"#{webdataset.UNREADABLE}"):
            columns[webdataset.MEMBERS][i], columns[webdataset.IMAGE_MEMBER][i] = "{}", None
            columns[webdataset.PLAN_ERROR][i] = f"{SAMPLE_REMOVED}: {uri} is no longer in its shard"
    return pa.table(columns, schema=records.schema)
