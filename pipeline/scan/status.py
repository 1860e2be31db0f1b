"""How far a scan's output has got, from what its store holds: no Ray, nothing scored.

`mirror status --output URI` answers an operator's questions about a long scan (or the
scans of an audit's or a benchmark run's output): is it planned, how many records
and units are committed and how many are left, which errors the counted parts hold. It
costs one listing of the parts, the plan's units file and the kept part counts: it may
run while the scan does, from any machine that reads the output.

Parts committed since the last summary have no kept counts yet (the summary at the end
of a run counts them); their rows count as committed, their errors only once counted,
or at once with `count` (`--count`): each such part read, one GET each, as a summary
reads one, and nothing written.
"""
from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mirror_core.errors import most_frequent_kinds
from pipeline.scan.schema import PRED, error_kind_counts, flagged_count
from pipeline.scan.store import PART_FIELDS, RUNNING_FILE, ScanStore, run_alive
from pipeline.scan.summary import errors_by_kind, kept_tallies
from pipeline.storage import Location


def scans_below(output_uri: str) -> list[str]:
    """The scans an output holds: itself, else an audit's `scan/`, else a benchmark run's
    `scans/<benchmark>/<clean or perturbation>/`."""
    out = Location(output_uri)
    if out.read_json("_scan.json") is not None:
        return [out.uri]
    if out.read_json("scan/_scan.json") is not None:
        return [out.uri_of("scan")]
    return [out.uri_of("scans", name, kind) for name in out.names("scans") for kind in out.names(f"scans/{name}")
            if out.read_json(f"scans/{name}/{kind}/_scan.json") is not None]


def output_status(output_uri: str, count: bool = False) -> dict[str, Any]:
    """`scan_status` of a scan's output, or of each scan an audit's or a benchmark run's
    output holds (`{"output": ..., "scans": [...]}`)."""
    scans = scans_below(output_uri)
    if scans == [Location(output_uri).uri]:
        return scan_status(scans[0], count)
    if not scans:
        raise FileNotFoundError(f"{output_uri} holds no scan (no _scan.json, nor an audit's scan/ or a benchmark "
                                "run's scans/) nor an ingest (_ingest.json) nor an export (_export.json): give the "
                                "--output of a scan, an audit, a benchmark run, an ingest or an export")
    return {"output": Location(output_uri).uri, "scans": [scan_status(s, count) for s in scans]}


def scan_status(output_uri: str, count: bool = False) -> dict[str, Any]:
    """What `output_uri` holds of its scan: identity, plan, committed and left (records and
    units), the counted parts' errors (`count`: every committed part counted, those the
    last summary did not count read now). A FileNotFoundError when it holds no scan."""
    out = ScanStore(output_uri)
    identity = out.read_json("_scan.json")
    if identity is None:
        raise FileNotFoundError(f"{out.uri} holds no scan (no _scan.json): give the --output of a scan")
    holder = out.read_json(RUNNING_FILE)
    status: dict[str, Any] = {"output": out.uri, **identity,
                              "running": holder if holder is not None and run_alive(holder) else None}
    plan = out.read_plan()  # read only: status never moves or checks a plan
    if plan is None:  # claimed, planning not finished (or interrupted)
        return {**status, "planned": False, "complete": False}
    rows = {u.unit_id: u.rows for u in plan.units}
    parts = out.committed_parts()
    done = [u for u in parts["unit_id"].to_pylist() if u in rows]
    committed = sum(rows[u] for u in done)
    total = sum(rows.values())
    counted = kept_tallies(out).join(parts, PART_FIELDS, join_type="inner").select(["unit_id", "rows", "errors",
                                                                                    "flagged", "error_kinds"])
    if count:
        uncounted = set(done) - set(counted["unit_id"].to_pylist())
        read = [(unit, part.num_rows, part.num_rows - part["error"].null_count, flagged_count(part),
                 error_kind_counts(part)) for unit, part in out.scores_by_unit(["error", PRED], uncounted)]
        counted = pa.concat_tables([counted, pa.Table.from_pylist(
            [dict(zip(counted.column_names, values)) for values in read], counted.schema)])
    return {**status, "planned": True, "input_format": plan.input_format, "complete": len(done) == len(rows),
            "skipped_by_extension": plan.skipped_by_extension, "drawn_from": plan.drawn_from,
            "records": {"total": total, "committed": committed, "left": total - committed},
            "units": {"total": len(rows), "committed": len(done), "left": len(rows) - len(done)},
            "parts_not_in_plan": parts.num_rows - len(done),
            "counted": {"parts": counted.num_rows, "rows": int(pc.sum(counted["rows"]).as_py() or 0),
                        "errors": int(pc.sum(counted["errors"]).as_py() or 0),
                        "flagged": int(pc.sum(counted["flagged"]).as_py() or 0),
                        "errors_by_kind": errors_by_kind(counted)}}


def status_lines(status: dict[str, Any]) -> list[str]:
    """The status as a few lines of text (of each scan, for an output holding several)."""
    if "scans" in status:
        return [line for scan in status["scans"] for line in status_lines(scan)]
    lines = [f"{status['output']}: scan of {status['input']} by model {status['model_id']} ({status['preprocess']}, "
             f"threshold {status['threshold']:.6g})"]
    if status.get("running"):
        run = status["running"]
        lines.append(f"  being written now by host {run['host']}, pid {run['pid']} (since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(run['since'])))})")
    if not status["planned"]:
        return lines + ["  not planned yet (planning has not finished): nothing committed"]
    records, units = status["records"], status["units"]
    share = 100 * records["committed"] / records["total"] if records["total"] else 100.0
    skipped = status.get("skipped_by_extension", 0)
    lines += [f"  {status['input_format']} input: {records['total']:,} records in {units['total']:,} units"
              + (f" ({skipped:,} file{'s' * (skipped > 1)} left out for their extension)" if skipped else "")
              + (f", a {100 * status['sample']:.4g}% sample of {status['drawn_from']:,}" if status.get("sample") else ""),
              f"  committed: {records['committed']:,} records ({share:.1f}%) in {units['committed']:,} units"
              + ("; complete" if status["complete"] else
                 f"; left: {records['left']:,} records in {units['left']:,} units (rerun the scan to finish)")]
    counted = status["counted"]
    uncounted = units["committed"] - counted["parts"]
    if counted["parts"]:
        kinds = most_frequent_kinds(counted["errors_by_kind"])
        lines.append(f"  counted parts: {counted['rows']:,} rows, {counted['errors']:,} errors"
                     + (f" ({kinds})" if kinds else "") + f", {counted['flagged']:,} flagged fake")
    if uncounted:
        lines.append(f"  {uncounted:,} committed parts are counted by the next summary (a run's end), or now "
                     "with --count")
    if status["parts_not_in_plan"]:
        lines.append(f"  {status['parts_not_in_plan']:,} parts belong to no unit of the plan")
    return lines
