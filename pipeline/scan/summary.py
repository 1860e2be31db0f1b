"""A scan's counts and metrics over its committed parts, for `summary.json`.

Every run ends with a summary of the whole output, not of its own units: a nightly
`--update` that adds a thousand units to a hundred thousand must not read a hundred
thousand parts again, nor a first run read back the parts it has just written. Each
part's counts (rows, errors, labeled rows, error rows per kind) are kept in
`OUTPUT/_summary/part_tallies.parquet` with the part's size and version (ETag, mtime).
The commit stage reports the counts, size and version of each part it writes; a summary
reads only the parts it has no counts for (written where the store gave no version),
those changed since counted, and labeled parts whose scored labeled rows it has not kept.
The metrics need those rows (label, subset, prob_fake, pred) of every part: a summary
that reads parts keeps theirs in one file below `_summary/labeled/`, named in the counts
of each part, and a later summary reads those few files instead of the parts. Past
MAX_LABELED_FILES they are merged into one; files no count names are removed. An
unlabeled corpus's summary costs one listing and one small file; a labeled one's, the
labeled rows (about 10 bytes each) besides.
"""
from __future__ import annotations

import collections
import json
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mirror_core.errors import by_frequency
from mirror_core.metrics import binary_metrics
from pipeline.scan.schema import error_kind_counts, flagged_count, scored_labeled
from pipeline.scan.store import PART_FIELDS, ScanStore

PART_TALLIES = "_summary/part_tallies.parquet"
TALLY_SCHEMA = pa.schema([("unit_id", pa.string()), ("bytes", pa.int64()), ("version", pa.string()),
                          ("rows", pa.int64()), ("errors", pa.int64()), ("labeled", pa.int64()),
                          ("flagged", pa.int64()), ("error_kinds", pa.string())])  # JSON: error rows per kind
LABELED_ROWS = "labeled_rows"  # the file below LABELED_DIR keeping a part's scored labeled rows
KEPT_SCHEMA = TALLY_SCHEMA.append(pa.field(LABELED_ROWS, pa.string()))  # PART_TALLIES' columns
LABELED_DIR = "_summary/labeled"
MAX_LABELED_FILES = 8
SUMMARY_COLUMNS = ["label", "subset", "prob_fake", "pred", "error"]
METRIC_COLUMNS = ["label", "subset", "prob_fake", "pred"]
LABELED_SCHEMA = pa.schema([("unit_id", pa.string()), ("label", pa.int64()), ("subset", pa.string()),
                            ("prob_fake", pa.float64()), ("pred", pa.int64())])


def kept_tallies(out: ScanStore) -> pa.Table:
    """The counts kept by the last summary (KEPT_SCHEMA; empty where none, or in a form
    not understood, such as counts without flagged rows: every part is then counted again,
    once). Counts kept before labeled rows were serve, their rows unkept."""
    kept = out.read_parquet(PART_TALLIES)
    if kept is not None and kept.schema.equals(TALLY_SCHEMA):
        kept = kept.append_column(LABELED_ROWS, pa.nulls(kept.num_rows, pa.string()))
    return kept if kept is not None and kept.schema.equals(KEPT_SCHEMA) else KEPT_SCHEMA.empty_table()


def part_tallies(out: ScanStore, written: pa.Table | None) -> tuple[pa.Table, pa.Table | None]:
    """Each committed part's counts (KEPT_SCHEMA), and the scored labeled rows
    (METRIC_COLUMNS) of every part holding any, in unit order, or None. `written`: the
    counts of the parts this run committed, as their writers reported them; they replace
    what was kept of those units. A count, and a part's kept labeled rows, serve while the
    part is listed with the same size and version; the rest are read, a few parts at once,
    and the counts are stored again."""
    parts = out.committed_parts()  # unit_id, bytes, version: what the listing holds now
    kept = kept_tallies(out)
    written = TALLY_SCHEMA.empty_table() if written is None else written
    written = written.append_column(LABELED_ROWS, pa.nulls(written.num_rows, pa.string()))  # their rows: unread
    kept = pa.concat_tables([kept.filter(pc.invert(pc.is_in(kept["unit_id"], written["unit_id"]))),
                             written.filter(written["version"].is_valid())])
    files = set(out.names(LABELED_DIR))
    known = kept.join(parts, PART_FIELDS, join_type="inner").select(KEPT_SCHEMA.names)
    rows_kept = pc.is_in(known[LABELED_ROWS], pa.array(sorted(files), pa.string())).fill_null(False)
    reused = known.filter(pc.or_(pc.equal(known["labeled"], 0), rows_kept))  # a labeled part's rows: kept
    to_read = set(parts["unit_id"].to_pylist()) - set(reused["unit_id"].to_pylist())
    counts = {"unit_id": [], "rows": [], "errors": [], "labeled": [], "flagged": [], "error_kinds": []}
    read: list[pa.Table] = []
    for unit, part in out.scores_by_unit(SUMMARY_COLUMNS, to_read):
        rows = scored_labeled(part)
        for name, value in zip(counts, (unit, part.num_rows, part.num_rows - part["error"].null_count, rows.num_rows,
                                        flagged_count(part), error_kind_counts(part))):
            counts[name].append(value)
        if rows.num_rows:
            read.append(pa.table([pa.array([unit] * rows.num_rows, pa.string())] + rows.select(METRIC_COLUMNS).columns,
                                 schema=LABELED_SCHEMA))
    fresh = pa.table(counts, schema=pa.schema([f for f in TALLY_SCHEMA if f.name not in PART_FIELDS[1:]]))
    fresh = fresh.join(parts, "unit_id").select(TALLY_SCHEMA.names)
    fresh = fresh.append_column(LABELED_ROWS, pa.nulls(fresh.num_rows, pa.string()))
    labeled = pa.concat_tables([LABELED_SCHEMA.empty_table(), *_kept_labeled_rows(out, reused), *read])
    labeled = labeled.sort_by("unit_id")  # unit order, each part's rows in order (a stable sort)
    tallies = pa.concat_tables([reused, fresh]).sort_by("unit_id")
    named = set(tallies[LABELED_ROWS].drop_null().to_pylist())
    merge = len(named) + bool(read) > MAX_LABELED_FILES  # one file more would be too many: all in one
    if read or merge:  # the rows read now (or all of them) kept in a file of their own
        name = uuid.uuid4().hex + ".parquet"
        keep = labeled if merge else labeled.filter(pc.is_in(labeled["unit_id"], fresh["unit_id"]))
        out.write_parquet(f"{LABELED_DIR}/{name}", keep)
        now = pc.is_in(tallies["unit_id"], keep["unit_id"].unique())
        tallies = tallies.set_column(tallies.schema.get_field_index(LABELED_ROWS), LABELED_ROWS,
                                     pc.if_else(now, name, tallies[LABELED_ROWS]))
    if fresh.num_rows or written.num_rows or merge or tallies.num_rows != kept.num_rows:
        out.write_parquet(PART_TALLIES, tallies)  # before the files it no longer names are removed
    named = set(tallies[LABELED_ROWS].drop_null().to_pylist())
    out.remove_files([f"{LABELED_DIR}/{f}" for f in files if f not in named])
    return tallies, labeled.select(METRIC_COLUMNS) if labeled.num_rows else None


def _kept_labeled_rows(out: ScanStore, reused: pa.Table) -> list[pa.Table]:
    """The kept labeled rows of the parts `reused` names them for, file by file."""
    tables = []
    for name in sorted(set(reused[LABELED_ROWS].drop_null().to_pylist())):
        units = reused.filter(pc.equal(reused[LABELED_ROWS], name))["unit_id"]
        rows = out.read_parquet(f"{LABELED_DIR}/{name}")
        tables.append(rows.filter(pc.is_in(rows["unit_id"], units)))
    return tables


def summarize(out: ScanStore, rows_in: int, skipped_by_extension: int, extra: dict[str, Any],
              written: pa.Table | None) -> dict[str, Any]:
    """Counts over every committed part and metrics over the scored rows with a label
    (`written`: the counts of the parts this run committed, TALLY_SCHEMA)."""
    tallies, labeled = part_tallies(out, written)
    n = int(pc.sum(tallies["rows"]).as_py() or 0)
    errors = int(pc.sum(tallies["errors"]).as_py() or 0)
    summary = {"rows_in": rows_in, "rows_out": n, "scored": n - errors, "errors": errors,
               "flagged": int(pc.sum(tallies["flagged"]).as_py() or 0),  # scored fake (pred 1)
               "errors_by_kind": errors_by_kind(tallies), "skipped_by_extension": skipped_by_extension, **extra}
    if labeled is not None:
        summary["metrics"] = {"ALL": _metrics(labeled)}
        subsets = sorted(s for s in set(labeled["subset"].to_pylist()) if s is not None)
        for s in subsets:
            summary["metrics"][s] = _metrics(labeled.filter(pc.equal(labeled["subset"], s)))
    return summary


def errors_by_kind(tallies: pa.Table) -> dict[str, int]:
    """Error rows per kind over every part, the most frequent first."""
    total: collections.Counter = collections.Counter()
    for kinds in tallies["error_kinds"].drop_null().to_pylist():
        total.update(json.loads(kinds))
    return by_frequency(total)


def _metrics(t: pa.Table) -> dict[str, float]:
    m = binary_metrics(t["label"].to_numpy(), t["prob_fake"].to_numpy(), t["pred"].to_numpy())
    return {**m, "n": t.num_rows}
