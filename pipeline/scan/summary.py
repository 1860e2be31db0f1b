"""A scan's counts and metrics over its committed parts, for `summary.json`.

Every run ends with a summary of the whole output, not of its own units: a nightly
`--update` that adds a thousand units to a hundred thousand must not read a hundred
thousand parts again, nor a first run read back the parts it has just written. Each
part's counts (rows, errors, labeled rows, error rows per kind) are kept in
`OUTPUT/_summary/part_tallies.parquet` with the part's size and version (ETag, mtime).
The commit stage reports the counts, size and version of each part it writes; a summary
reads only the parts it has no counts for (written where the store gave no version),
those changed since counted, and those holding labeled rows (the metrics need their
scores). An unlabeled corpus's summary costs one listing and one small file.
"""
from __future__ import annotations

import collections
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mirror_core.metrics import binary_metrics
from pipeline.scan.schema import error_kind_counts, scored_labeled
from pipeline.scan.store import PART_FIELDS, ScanStore

PART_TALLIES = "_summary/part_tallies.parquet"
TALLY_SCHEMA = pa.schema([("unit_id", pa.string()), ("bytes", pa.int64()), ("version", pa.string()),
                          ("rows", pa.int64()), ("errors", pa.int64()), ("labeled", pa.int64()),
                          ("error_kinds", pa.string())])  # JSON: error rows per kind
SUMMARY_COLUMNS = ["label", "subset", "prob_fake", "pred", "error"]
METRIC_COLUMNS = ["label", "subset", "prob_fake", "pred"]


def part_tallies(out: ScanStore, written: pa.Table | None) -> tuple[pa.Table, pa.Table | None]:
    """Each committed part's counts (TALLY_SCHEMA), and the scored labeled rows
    (METRIC_COLUMNS) of every part holding any, or None. `written`: the counts of the parts
    this run committed, as their writers reported them; they replace what was kept of those
    units. A count serves while its part is listed with the same size and version; the
    rest are read, a few parts at once, and the counts are stored again."""
    parts = out.committed_parts()  # unit_id, bytes, version: what the listing holds now
    kept = out.read_parquet(PART_TALLIES)
    if kept is None or not kept.schema.equals(TALLY_SCHEMA):
        kept = TALLY_SCHEMA.empty_table()
    written = TALLY_SCHEMA.empty_table() if written is None else written
    kept = pa.concat_tables([kept.filter(pc.invert(pc.is_in(kept["unit_id"], written["unit_id"]))),
                             written.filter(written["version"].is_valid())])
    # parts with labeled rows are read all the same (the metrics need their scores)
    known = kept.join(parts, PART_FIELDS, join_type="inner").select(TALLY_SCHEMA.names)
    reused = known.filter(pc.equal(known["labeled"], 0))
    to_read = set(parts["unit_id"].to_pylist()) - set(reused["unit_id"].to_pylist())
    counts = {"unit_id": [], "rows": [], "errors": [], "labeled": [], "error_kinds": []}
    labeled = []
    for unit, part in out.scores_by_unit(SUMMARY_COLUMNS, to_read):
        rows = scored_labeled(part)
        for name, value in zip(counts, (unit, part.num_rows, part.num_rows - part["error"].null_count, rows.num_rows,
                                        error_kind_counts(part))):
            counts[name].append(value)
        if rows.num_rows:
            labeled.append(rows.select(METRIC_COLUMNS))
    fresh = pa.table(counts, schema=pa.schema([f for f in TALLY_SCHEMA if f.name not in PART_FIELDS[1:]]))
    fresh = fresh.join(parts, "unit_id")
    tallies = pa.concat_tables([reused, fresh.select(TALLY_SCHEMA.names)]).sort_by("unit_id")
    if fresh.num_rows or written.num_rows:
        out.write_parquet(PART_TALLIES, tallies)
    return tallies, pa.concat_tables(labeled) if labeled else None


def summarize(out: ScanStore, rows_in: int, skipped_by_extension: int, extra: dict[str, Any],
              written: pa.Table | None) -> dict[str, Any]:
    """Counts over every committed part and metrics over the scored rows with a label
    (`written`: the counts of the parts this run committed, TALLY_SCHEMA)."""
    tallies, labeled = part_tallies(out, written)
    n = int(pc.sum(tallies["rows"]).as_py() or 0)
    errors = int(pc.sum(tallies["errors"]).as_py() or 0)
    summary = {"rows_in": rows_in, "rows_out": n, "scored": n - errors, "errors": errors,
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
    return dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0])))


def _metrics(t: pa.Table) -> dict[str, float]:
    m = binary_metrics(t["label"].to_numpy(), t["prob_fake"].to_numpy(), t["pred"].to_numpy())
    return {**m, "n": t.num_rows}
