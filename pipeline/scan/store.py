"""The scan's store: output layout, plan persistence and exactly-once unit commits.

    OUTPUT/scores/part-<unit_id>.parquet   one file per finished unit (the scored rows)
    OUTPUT/summary.json                    counts, throughput, metrics, effective config
    OUTPUT/_scan.json                      what this output belongs to (model, input, policy)
    OUTPUT/_plan/units.parquet             the units of the input (extended by --update)
    OUTPUT/_plan/records.parquet           records of folder/manifest units

A unit's file appears only once all of its rows are scored, written to a
temporary name and renamed (a single PUT on object stores), so its presence
means "done" and a rerun skips it. `--retry-errors` scores a unit again and
replaces its part the same way.
"""
from __future__ import annotations

from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.scan.sources import Plan, Unit
from pipeline.storage import Location

SCORES_DIR = "scores"
PART_PREFIX = "part-"


class OutputMismatchError(ValueError):
    pass


class ScanStore(Location):
    """A scan's output: its identity, its plan, and one committed part per finished unit."""

    # --- units --------------------------------------------------------------
    def part_name(self, unit_id: str) -> str:
        return f"{SCORES_DIR}/{PART_PREFIX}{unit_id}.parquet"

    def done_units(self) -> set[str]:
        names = self.names(SCORES_DIR)
        return {n[len(PART_PREFIX) : -len(".parquet")] for n in names if n.startswith(PART_PREFIX) and n.endswith(".parquet")}

    def units_with_transient_errors(self, units: set[str]) -> set[str]:
        """Finished units holding a row whose error another try may heal (read failures)."""
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow.compute as pc

        from pipeline.scan.sources import TRANSIENT_ERROR_PREFIXES

        def transient(unit: str) -> bool:
            errors = self.read_parquet(self.part_name(unit), ["error"])["error"]
            hits = [pc.any(pc.starts_with(errors, p)).as_py() for p in TRANSIENT_ERROR_PREFIXES]
            return any(bool(h) for h in hits)

        ordered = sorted(units)
        with ThreadPoolExecutor(max_workers=32) as pool:  # object-store latency, not bandwidth
            return {u for u, bad in zip(ordered, pool.map(transient, ordered)) if bad}

    def read_scores_with_position(self, columns=None) -> pa.Table:
        """All scored rows plus `_unit` and `_index` (position in its unit; parts are
        written whole and in order), so a row can be traced back to its input."""
        tables = []
        for unit in sorted(self.done_units()):
            t = self.read_parquet(self.part_name(unit), columns)
            t = t.append_column("_unit", pa.array([unit] * t.num_rows, pa.string()))
            tables.append(t.append_column("_index", pa.array(range(t.num_rows), pa.int64())))
        return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})

    def read_scores(self, columns=None) -> pa.Table:
        """Every committed row (all parts read concurrently by pyarrow's dataset reader)."""
        paths = [self.path(self.part_name(u)) for u in sorted(self.done_units())]
        if not paths:
            return pa.table({})
        return pq.read_table(paths, filesystem=self.fs, columns=columns)

    # --- scan identity and plan --------------------------------------------
    def claim(self, identity: dict) -> None:
        """Tie this output to one model/input/policy; a different scan is refused."""
        existing = self.read_json("_scan.json")
        if existing is None:
            self.write_json("_scan.json", identity)
            return
        diffs = [k for k in identity if existing.get(k) != identity[k]]
        if diffs:
            details = "; ".join(f"{k}: {existing.get(k)!r} there, {identity[k]!r} now" for k in diffs)
            raise OutputMismatchError(f"{self.uri} holds another scan ({details}); choose a new --output")

    def save_plan(self, plan: Plan) -> None:
        units = pa.Table.from_pylist([asdict(u) for u in plan.units], schema=pa.schema([
            ("unit_id", pa.string()), ("kind", pa.string()), ("rows", pa.int64()),
            ("file", pa.string()), ("row_group", pa.int64())]))
        units = units.replace_schema_metadata({"input": plan.input, "input_format": plan.input_format,
                                               "skipped_by_extension": str(plan.skipped_by_extension)})
        if plan.records.num_columns:
            self.write_parquet("_plan/records.parquet", plan.records)
        if plan.shards is not None:
            self.write_parquet("_plan/shards.parquet", plan.shards)
        self.write_parquet("_plan/units.parquet", units)  # written last: its presence means "plan complete"

    def load_plan(self) -> Plan | None:
        units = self.read_parquet("_plan/units.parquet")
        if units is None:
            return None
        meta = {k.decode(): v.decode() for k, v in (units.schema.metadata or {}).items()}
        records = self.read_parquet("_plan/records.parquet")
        plan_units = [Unit(**row) for row in units.to_pylist()]
        return Plan(meta["input"], meta["input_format"], plan_units, records if records is not None else pa.table({}),
                    int(meta.get("skipped_by_extension", 0)), self.read_parquet("_plan/shards.parquet"))
