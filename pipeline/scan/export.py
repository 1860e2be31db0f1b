"""A scan's rows as a few large Parquet files, in the input's order (`mirror export`).

A scan commits one small part per unit (256 records by default), named by the unit's
hash: what resuming needs, not what a reader wants. A hundred million images make
~390,000 parts, which a query engine opens one by one, in no useful order. An export
reads the committed parts in the plan's order (the input's: a folder's sorted listing, a
manifest's rows, shard by shard), keeps the rows asked for (all, scored, errors or
flagged), and writes `scores-00000.parquet`, ... of at most `rows_per_file` rows each in
row groups of ROW_GROUP_ROWS, then `_export.json` (the scan's identity, the choice, the
files). The parts are left as they are (the scan resumes and updates from them); a rerun
writes the export again and removes its files a smaller export no longer names.

Memory: a few parts read ahead (`ScanStore.scores_by_unit`) and a row group's rows; each
file is spooled to local disk and published whole (`Location.parquet_writer`).
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mirror_core.uri import is_within
from pipeline.progress import progress
from pipeline.scan.schema import PRED, conform
from pipeline.scan.status import scans_below
from pipeline.scan.store import RUNNING_FILE, OutputBusyError, ScanStore, run_alive
from pipeline.storage import Location

ROW_GROUP_ROWS = 65_536
EXPORT_FILE = "_export.json"
FILE_NAME = re.compile(r"scores-(\d{5,})\.parquet")
ROW_CHOICES = ("all", "scored", "errors", "flagged")


def chosen_rows(rows: pa.Table, only: str) -> pa.Table:
    """`only`: all rows, those scored, those with an error, or those flagged fake (pred 1)."""
    if only == "all":
        return rows
    if only == "scored":
        return rows.filter(rows["error"].is_null())
    if only == "errors":
        return rows.filter(rows["error"].is_valid())
    if only == "flagged":
        return rows.filter(pc.equal(rows[PRED], 1).fill_null(False))
    raise ValueError(f"--only {only!r}: expected one of {', '.join(ROW_CHOICES)}")


def file_name(index: int) -> str:
    return f"scores-{index:05d}.parquet"


@dataclass
class ExportResult:
    scan: str
    output: str
    only: str
    rows: int = 0
    parts: int = 0
    files: list[str] = field(default_factory=list)
    units_left: int = 0  # units of the plan not committed (exported with `partial` only)

    def line(self) -> str:
        left = f"; {self.units_left:,} units not committed yet were left out" if self.units_left else ""
        parts = f"{self.parts:,} part{'s' * (self.parts != 1)}"
        return (f"exported {self.rows:,} rows ({self.only}) of {parts} of {self.scan} into "
                f"{len(self.files):,} file{'s' * (len(self.files) != 1)} under {self.output}{left}")


class _RollingWriter:
    """Parquet files of at most `rows_per_file` rows, written a row group at a time. A
    part with columns the open file lacks (carried input columns of a later --update
    generation) starts the next file, with both sets of columns."""

    def __init__(self, out: Location, rows_per_file: int):
        self.out, self.rows_per_file = out, rows_per_file
        self.files: list[str] = []
        self.schema: pa.Schema | None = None
        self.pending: list[pa.Table] = []
        self.pending_rows = self.file_rows = 0
        self._stack: contextlib.ExitStack | None = None
        self._writer = None

    def add(self, rows: pa.Table) -> None:
        if self.schema is not None and not set(rows.column_names) <= set(self.schema.names):
            self._flush()
            self._close()
            self.schema = pa.unify_schemas([self.schema, rows.schema], promote_options="permissive")
        elif self.schema is None:
            self.schema = rows.schema
        start = 0
        while start < rows.num_rows:  # a part may straddle a file's end
            take = min(rows.num_rows - start, self.rows_per_file - self.file_rows - self.pending_rows)
            self.pending.append(rows.slice(start, take))
            self.pending_rows += take
            start += take
            if self.pending_rows >= ROW_GROUP_ROWS or self.file_rows + self.pending_rows == self.rows_per_file:
                self._flush()
            if self.file_rows == self.rows_per_file:
                self._close()

    def _flush(self) -> None:
        if not self.pending_rows:
            return
        if self._writer is None:
            self._stack = contextlib.ExitStack()
            self.files.append(file_name(len(self.files)))
            self._writer = self._stack.enter_context(self.out.parquet_writer(self.files[-1], self.schema))
        table = pa.concat_tables(self.pending, promote_options="permissive")
        for name in self.schema.names:  # a column earlier parts had and these lack: null here
            if name not in table.column_names:
                table = table.append_column(self.schema.field(name), pa.nulls(table.num_rows,
                                                                              self.schema.field(name).type))
        self._writer.write_table(table.select(self.schema.names).cast(self.schema), row_group_size=ROW_GROUP_ROWS)
        self.file_rows += self.pending_rows
        self.pending, self.pending_rows = [], 0

    def _close(self) -> None:
        if self._stack is not None:
            self._stack.close()  # publishes the file
        self._stack = self._writer = None
        self.file_rows = 0

    def finish(self) -> list[str]:
        self._flush()
        self._close()
        return self.files

    def abandon(self, err: BaseException) -> None:
        """After `err`: the open file is not published (its spool is removed)."""
        if self._stack is not None:
            self._stack.__exit__(type(err), err, err.__traceback__)
        self._stack = self._writer = None


def export_scores(scan_uri: str, output_uri: str, only: str = "all", rows_per_file: int = 1_000_000,
                  partial: bool = False) -> ExportResult:
    """The committed rows of the scan at `scan_uri` (`only`: `chosen_rows`) into
    `output_uri` as described above. An unfinished scan is refused unless `partial`."""
    if rows_per_file < 1:
        raise ValueError(f"--rows-per-file must be >= 1, got {rows_per_file}")
    chosen_rows(pa.table({"error": pa.array([], pa.string()), PRED: pa.array([], pa.int64())}), only)  # checks `only`
    scan = ScanStore(scan_uri)
    identity = scan.read_json("_scan.json")
    plan = scan.read_plan()
    if identity is None:
        below = scans_below(scan.uri)  # an audit's output, a benchmark run's: the scans they hold
        raise FileNotFoundError(f"{scan.uri} holds no scan (no _scan.json)" + (
            f"; it holds {len(below)} below it: give one as --scan ({', '.join(below[:3])}"
            f"{', ...' if len(below) > 3 else ''})" if below else ": give a scan's --output"))
    if plan is None:
        raise FileNotFoundError(f"{scan.uri} holds a scan that was never planned: nothing to export")
    holder = scan.read_json(RUNNING_FILE)
    if holder is not None and run_alive(holder):  # an --update replacing parts as they are read
        raise OutputBusyError(f"{scan.uri} is being written by a run now (host {holder.get('host')}, pid "
                              f"{holder.get('pid')}): export it once that run has ended")
    out = Location(output_uri)
    if is_within(out.uri, scan.uri):
        raise ValueError(f"--output {output_uri} lies inside the scan's output {scan.uri}: choose another folder")
    done = scan.done_units()
    order = [u.unit_id for u in plan.units if u.unit_id in done]
    result = ExportResult(scan.uri, out.uri, only, units_left=len(plan.units) - len(order))
    if result.units_left and not partial:
        raise ValueError(f"the scan {scan.uri} is not complete ({len(order):,} of {len(plan.units):,} units "
                         "committed): rerun it to finish, or export what is committed with --partial")
    writer = _RollingWriter(out, rows_per_file)
    try:
        for _, part in progress(scan.scores_by_unit(units=order), "exporting parts", total=len(order), unit="part"):
            rows = chosen_rows(conform(part), only)
            result.parts += 1
            result.rows += rows.num_rows
            if rows.num_rows:
                writer.add(rows)
        result.files = writer.finish()
    except BaseException as err:
        writer.abandon(err)
        raise
    stale = [n for n in out.names() if FILE_NAME.fullmatch(n) and n not in result.files]
    if stale:
        logging.getLogger("mirror").info("removing %d files of an earlier, larger export", len(stale))
        out.remove_files(stale)
    out.write_json(EXPORT_FILE, export_record(identity, result, rows_per_file))
    return result


def export_record(identity: dict[str, Any], result: ExportResult, rows_per_file: int) -> dict[str, Any]:
    return {"scan": result.scan, **{k: identity[k] for k in ("input", "model_id", "preprocess", "threshold")
                                    if k in identity},
            "only": result.only, "rows": result.rows, "parts": result.parts, "rows_per_file": rows_per_file,
            "files": result.files, "units_left": result.units_left}


def export_status(output_uri: str) -> dict[str, Any] | None:
    """What an export's output holds (its `_export.json`, and whether its files are all
    there), or None when it holds no export."""
    out = Location(output_uri)
    record = out.read_json(EXPORT_FILE)
    if record is None:
        return None
    present = set(out.names())
    return {"output": out.uri, **record, "missing_files": [n for n in record["files"] if n not in present]}


def export_status_lines(status: dict[str, Any]) -> list[str]:
    lines = [f"{status['output']}: export of the scan {status['scan']} of {status.get('input')} by model "
             f"{status.get('model_id')} (threshold {status.get('threshold')})",
             f"  {status['rows']:,} rows ({status['only']}) of {status['parts']:,} parts in {len(status['files']):,} "
             f"file{'s' * (len(status['files']) != 1)} of at most {status['rows_per_file']:,} rows"]
    if status["units_left"]:
        lines.append(f"  partial: {status['units_left']:,} units of the scan were not committed when it was made")
    if status["missing_files"]:
        lines.append(f"  {len(status['missing_files']):,} of its files are missing (first: "
                     f"{status['missing_files'][0]}): run the export again")
    return lines
