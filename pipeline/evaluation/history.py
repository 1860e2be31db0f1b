"""Nightly mode: a metrics history table and regression verdicts.

The history is a Parquet dataset (a folder, local or s3://): each run appends
one file of rows (run, model_id, benchmark, subset, metric, value, precision), so
concurrent or interrupted runs never corrupt earlier ones. A run is compared with the
latest earlier one of the same model in the same precision: fp8 or bf16-gelu-tanh
metrics moving against fp32 ones are no regression of the model.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.storage import Location

HISTORY_SCHEMA = pa.schema([("run", pa.string()), ("model_id", pa.string()), ("benchmark", pa.string()),
                            ("subset", pa.string()), ("metric", pa.string()), ("value", pa.float64()),
                            ("precision", pa.string())])  # null: a run recorded before precisions were
LOWER_IS_BETTER = {"EER", "ECE", "errors"}
TRACKED = ("Acc", "Real_Acc", "Fake_Acc", "Bal_Acc", "AUC", "AP", "EER", "TPR@1%FPR", "TPR@5%FPR", "ECE")


@dataclass
class Comparison:
    previous_run: str | None
    deltas: list[dict[str, Any]] = field(default_factory=list)

    @property
    def regressions(self) -> list[dict[str, Any]]:
        return [d for d in self.deltas if d["regression"]]


def history_rows(run: str, model_id: str, benchmark: str, per_subset: dict[str, dict], official_rows,
                 precision: str | None = None) -> pa.Table:
    rows = []
    mean = next((r for r in official_rows if r["Dataset"] == "MEAN"), None)
    sets = dict(per_subset, **({"MEAN": mean} if mean else {}))
    for subset, metrics in sets.items():
        for metric in TRACKED:
            if metric in metrics and metrics[metric] == metrics[metric]:  # skip NaN
                rows.append({"run": run, "model_id": model_id, "benchmark": benchmark, "subset": subset,
                             "metric": metric, "value": float(metrics[metric]), "precision": precision})
    return pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA)


def read_history(uri: str) -> pa.Table:
    out = Location(uri)
    tables = [out.read_parquet(n) for n in out.names() if n.endswith(".parquet")]
    return pa.concat_tables([_as_history(t) for t in tables]) if tables else HISTORY_SCHEMA.empty_table()


def _as_history(table: pa.Table) -> pa.Table:
    """A history file in the current schema (files of earlier versions lack `precision`)."""
    columns = [table[f.name] if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in HISTORY_SCHEMA]
    return pa.Table.from_arrays(columns, names=HISTORY_SCHEMA.names).cast(HISTORY_SCHEMA)


def append_history(uri: str, rows: pa.Table) -> None:
    run = rows["run"][0].as_py() if rows.num_rows else "empty"
    Location(uri).write_parquet(f"run-{run}-{uuid.uuid4().hex[:8]}.parquet", rows)


def compare(history: pa.Table, current: pa.Table, tolerance: float) -> Comparison:
    """Deltas against the latest earlier run of the same model on the same benchmarks, in
    the same precision (or one recorded before precisions were)."""
    if current.num_rows == 0:
        return Comparison(None)
    run, model_id = current["run"][0].as_py(), current["model_id"][0].as_py()
    precision = current["precision"][0].as_py() if "precision" in current.column_names else None
    benchmarks = set(current["benchmark"].to_pylist())
    earlier = history.filter(pc.and_(pc.equal(history["model_id"], model_id), pc.less(history["run"], run)))
    if precision is not None:
        earlier = earlier.filter(pc.or_kleene(earlier["precision"].is_null(), pc.equal(earlier["precision"], precision)))
    earlier = earlier.filter(pc.is_in(earlier["benchmark"], pa.array(sorted(benchmarks))))
    if earlier.num_rows == 0:
        return Comparison(None)
    previous_run = max(earlier["run"].to_pylist())
    before = {(r["benchmark"], r["subset"], r["metric"]): r["value"]
              for r in earlier.filter(pc.equal(earlier["run"], previous_run)).to_pylist()}
    result = Comparison(previous_run)
    for r in current.to_pylist():
        key = (r["benchmark"], r["subset"], r["metric"])
        if key not in before:
            continue
        delta = r["value"] - before[key]
        worse = delta > tolerance if r["metric"] in LOWER_IS_BETTER else delta < -tolerance
        result.deltas.append({"benchmark": key[0], "subset": key[1], "metric": key[2], "previous": before[key],
                              "current": r["value"], "delta": delta, "regression": bool(worse)})
    return result


def comparison_markdown(c: Comparison, tolerance: float) -> str:
    if c.previous_run is None:
        return "No earlier run of this model on these benchmarks in this precision: nothing to compare.\n"
    lines = [f"Compared with run {c.previous_run} (tolerance {tolerance:g}): "
             f"{len(c.regressions)} regression(s).", "",
             "| benchmark | subset | metric | previous | current | delta | |", "|---|---|---|---|---|---|---|"]
    for d in sorted(c.deltas, key=lambda d: (not d["regression"], d["benchmark"], d["subset"], d["metric"])):
        flag = "REGRESSION" if d["regression"] else ""
        lines.append(f"| {d['benchmark']} | {d['subset']} | {d['metric']} | {d['previous']:.4f} | {d['current']:.4f} "
                     f"| {d['delta']:+.4f} | {flag} |")
    return "\n".join(lines) + "\n"
