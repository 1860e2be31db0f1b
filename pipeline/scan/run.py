"""The scan: plan -> decode (CPU tasks) -> score (actor pool) -> per-unit commits -> summary.

scan, benchmark and audit all call `run_scan`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mirror_core.bundle import Bundle, load_bundle
from mirror_core.config import MirrorConfig
from mirror_core.metrics import binary_metrics
from pipeline.cluster import ensure_ray
from pipeline.progress import step
from pipeline.scan.config import ScanConfig
from pipeline.scan.decode import decode_units
from pipeline.scan.schema import (
    DECODE_SECONDS,
    INDEX,
    OUTPUT_COLUMNS,
    READOUT,
    SCORE_SECONDS,
    SHA256,
    STAGE_RESULT_FIELDS,
    UNIT,
    conform,
)
from pipeline.scan.scorer import Scorer
from pipeline.scan.sources import Plan, Unit, plan_source, read_shard_unit
from pipeline.scan.store import ScanStore

DECODE_CPUS_KEPT = 2  # CPUs a one-node cluster keeps for decode tasks when sizing CPU scorers


def scoring_cpus(cfg: ScanConfig) -> float:
    """CPUs per scoring actor, which Ray also makes its torch thread count.

    As set, if set. Unset: 1 for GPU scoring; for CPU scoring on a one-node Ray (the local
    one `mirror scan` starts, say) the node's CPUs less DECODE_CPUS_KEPT, shared by the
    actors (max_actors if set) and capped at the machine's cores: one thread per replica left most of a
    machine idle. On a multi-node cluster 1, as nodes may differ: set it there.
    """
    if cfg.cpus_per_actor is not None:
        return cfg.cpus_per_actor
    if cfg.gpus_per_actor:
        return 1.0
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) != 1:
        return 1.0
    node_cpus = int(nodes[0]["Resources"].get("CPU", 1))
    usable = min(node_cpus - DECODE_CPUS_KEPT, os.cpu_count() or 1)
    return float(max(1, usable // (cfg.max_actors or cfg.actors)))  # room for the largest pool


def effective_config(bundle: Bundle, cfg: ScanConfig) -> MirrorConfig:
    return bundle.config.with_overrides(alignment=cfg.alignment, fast_decode=cfg.fast_decode, threshold=cfg.threshold)


def unit_offsets(plan: Plan) -> dict[str, tuple[int, int]]:
    """Inline units' rows are contiguous in plan.records: unit_id -> (start, rows)."""
    offsets, start = {}, 0
    for unit in plan.units:
        if unit.kind == "inline":
            offsets[unit.unit_id] = (start, unit.rows)
            start += unit.rows
    return offsets


def unit_records(unit: Unit, plan: Plan, offsets, columns) -> pa.Table:
    if unit.kind == "inline":
        start, rows = offsets[unit.unit_id]
        return plan.records.slice(start, rows).drop_columns([UNIT, INDEX])
    return read_shard_unit(unit, columns, with_bytes=False)


def assemble_rows(records: pa.Table, scored: pa.Table, run: dict[str, Any]) -> pa.Table:
    """Input record columns + stage results -> output rows in the documented schema."""
    if records.num_rows != scored.num_rows:
        raise RuntimeError(f"unit has {records.num_rows} records but {scored.num_rows} scored rows")
    table = records.drop_columns([c for c in records.column_names if c == "bytes"])
    # carried input columns that collide with output names keep their data under input_<name>
    clashes = [c for c in table.column_names if c in OUTPUT_COLUMNS and c not in ("uri", "id", "label", "subset")]
    table = table.rename_columns([f"input_{c}" if c in clashes else c for c in table.column_names])
    given_id = table["id"] if "id" in table.column_names else pa.nulls(table.num_rows, pa.string())
    ids = pc.coalesce(pc.cast(given_id, pa.string()), scored[SHA256])
    table = table.drop_columns([c for c in ("id",) if c in table.column_names]).append_column("id", ids)
    for field in STAGE_RESULT_FIELDS:
        table = table.append_column(field.name, scored[field.name])
    for name, value in run.items():
        table = table.append_column(name, pa.array([value] * table.num_rows))
    return conform(table)


def unit_descriptors(units: list[Unit], plan: Plan, offsets) -> list[dict]:
    uris = plan.records["uri"].to_pylist() if plan.records.num_columns else []
    items = []
    for u in units:
        unit_uris = []
        if u.kind == "inline":
            start, rows = offsets[u.unit_id]
            unit_uris = uris[start : start + rows]
        items.append({"unit": json.dumps(dataclasses.asdict(u)), "uris": unit_uris})
    return items


def build_dataset(items, bundle: Bundle, model_cfg: MirrorConfig, cfg: ScanConfig):
    import ray

    gpu = cfg.gpus_per_actor > 0
    weights_ref = ray.put(bundle.weights.to_numpy())
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        decode_units,
        batch_size=1,
        num_cpus=cfg.cpus_per_decode_task,
        # A memory reservation the actors don't have also keeps Ray from fusing decode
        # into the scoring actors: decoding must scale over CPU tasks, not run inside
        # the (GPU) replicas.
        memory=cfg.decode_task_memory_mb * 2**20,
        fn_kwargs={"preprocess": dataclasses.asdict(model_cfg.preprocess), "columns": cfg.columns,
                   "fetch_threads": cfg.fetch_threads, "rows_per_batch": cfg.decode_rows_per_batch,
                   "perturbation": cfg.perturbation, "max_file_bytes": cfg.max_file_mb * 2**20},
    )
    pool = (ray.data.ActorPoolStrategy(min_size=cfg.actors, max_size=cfg.max_actors) if cfg.max_actors
            else ray.data.ActorPoolStrategy(size=cfg.actors))
    return ds.map_batches(
        Scorer,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=pool,
        num_gpus=cfg.gpus_per_actor,
        num_cpus=cfg.cpus_per_actor,
        fn_constructor_kwargs={
            "weights": weights_ref,
            "config": model_cfg.to_dict(),
            "model_id": bundle.model_id,
            "device": "cuda" if gpu else "cpu",
            "precision": cfg.precision or ("bf16" if gpu else "fp32"),
            "compile": cfg.compile,
        },
    )


class UnitCommitter:
    """Collects scored rows per unit and writes each unit once, when it is whole."""

    def __init__(self, plan: Plan, out: ScanStore, cfg: ScanConfig, run: dict[str, Any]):
        self.plan, self.out, self.cfg, self.run = plan, out, cfg, run
        self.units = {u.unit_id: u for u in plan.units}
        self.offsets = unit_offsets(plan)
        self.pending: dict[str, list[pa.Table]] = {}
        self.counts: dict[str, set[int]] = {}
        self.committed = 0
        self.rows = 0
        self.busy = {"decode": 0.0, "score": 0.0}
        self.readouts: set[str] = set()

    def add(self, batch: pa.Table) -> None:
        self.busy["decode"] += float(pc.sum(batch[DECODE_SECONDS]).as_py() or 0)
        self.busy["score"] += float(pc.sum(batch[SCORE_SECONDS]).as_py() or 0)
        self.readouts.update(pc.unique(batch[READOUT]).to_pylist())
        units = batch[UNIT].to_pylist()
        for unit_id in dict.fromkeys(units):
            part = batch.filter(pc.equal(batch[UNIT], unit_id))
            self.pending.setdefault(unit_id, []).append(part)
            seen = self.counts.setdefault(unit_id, set())
            seen.update(part[INDEX].to_pylist())
            if len(seen) >= self.units[unit_id].rows:
                self.commit(unit_id)

    def commit(self, unit_id: str) -> None:
        unit = self.units[unit_id]
        scored = pa.concat_tables(self.pending.pop(unit_id))
        del self.counts[unit_id]
        # Ray may re-run a batch after a failure: keep the first row per index.
        _, first = np.unique(scored[INDEX].to_numpy(), return_index=True)
        scored = scored.take(pa.array(first)).sort_by(INDEX)
        records = unit_records(unit, self.plan, self.offsets, self.cfg.source_options().columns)
        self.out.write_parquet(self.out.part_name(unit_id), assemble_rows(records, scored, self.run))
        self.committed += 1
        self.rows += scored.num_rows


def summarize(out: ScanStore, plan: Plan, extra: dict[str, Any]) -> dict[str, Any]:
    rows = out.read_scores(columns=["label", "subset", "prob_fake", "pred", "error"])
    n = rows.num_rows
    errors = int(pc.sum(pc.is_valid(rows["error"])).as_py() or 0) if n else 0
    summary = {"rows_in": plan.total_rows, "rows_out": n, "scored": n - errors, "errors": errors, **extra}
    if n:
        scored = rows.filter(pc.is_null(rows["error"]))
        labeled = scored.filter(pc.is_valid(scored["label"]))
        if labeled.num_rows:
            summary["metrics"] = {"ALL": _metrics(labeled)}
            subsets = sorted(s for s in set(labeled["subset"].to_pylist()) if s is not None)
            for s in subsets:
                summary["metrics"][s] = _metrics(labeled.filter(pc.equal(labeled["subset"], s)))
    return summary


def _metrics(t: pa.Table) -> dict[str, float]:
    m = binary_metrics(t["label"].to_numpy(), t["prob_fake"].to_numpy(), t["pred"].to_numpy())
    return {**m, "n": t.num_rows}


def run_scan(model: str | Bundle, input_uri: str, output_uri: str, cfg: ScanConfig) -> dict[str, Any]:
    """Score every record of `input_uri` into `output_uri`; resumes a previous run there."""
    t_start = time.perf_counter()
    bundle = model if isinstance(model, Bundle) else load_bundle(model)
    model_cfg = effective_config(bundle, cfg)
    out = ScanStore(output_uri)
    policy = model_cfg.preprocess.name + (f"+{cfg.perturbation}" if cfg.perturbation else "")
    run = {"model_id": bundle.model_id, "preprocess": policy, "threshold": model_cfg.threshold}
    out.claim({**run, "input": input_uri})
    plan = out.load_plan()
    if plan is None:
        with step(f"planning {input_uri}") as info:
            plan = plan_source(input_uri, cfg.source_options())
            out.save_plan(plan)
            info.update(items=plan.total_rows, unit=f"records in {len(plan.units)} units")
    done = out.done_units()
    todo = [u for u in plan.units if u.unit_id not in done]
    committer = UnitCommitter(plan, out, cfg, run)
    t_plan = time.perf_counter()
    t_first = t_last = None
    first_rows = 0
    if todo:
        ensure_ray(cfg.address)
        cfg = replace(cfg, cpus_per_actor=scoring_cpus(cfg))  # resolved, and recorded so below
        ds = build_dataset(unit_descriptors(todo, plan, committer.offsets), bundle, model_cfg, cfg)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if t_first is None:  # start-up ends here: Ray, replica builds, first decodes
                t_first, first_rows = time.perf_counter(), batch.num_rows
            committer.add(batch)
        t_last = time.perf_counter()
        if committer.pending:
            raise RuntimeError(f"{len(committer.pending)} units did not receive all their rows: {sorted(committer.pending)[:5]}")
    wall = time.perf_counter() - t_start
    summary = summarize(out, plan, {
        "model_id": bundle.model_id,
        "preprocess": policy,
        "threshold": model_cfg.threshold,
        "input": input_uri,
        "input_format": plan.input_format,
        "output": out.uri,
        "scores": out.uri_of("scores"),
        "units": {"total": len(plan.units), "skipped_done": len(done), "committed_now": committer.committed},
        "this_run": {
            "rows": committer.rows,
            "wall_s": round(wall, 3),
            "plan_s": round(t_plan - t_start, 3),
            "images_per_s": round(committer.rows / wall, 2) if wall > 0 else None,
            "first_batch_s": round(t_first - t_start, 3) if t_first else None,
            # Throughput once running: rows after the first output over the time they took.
            "steady_images_per_s": round((committer.rows - first_rows) / (t_last - t_first), 2)
            if t_first and t_last > t_first else None,
            "stage_busy_s": {k: round(v, 3) for k, v in committer.busy.items()},
            "replica_readout": sorted(committer.readouts),  # as the scoring replicas reported it
        },
        "config": cfg.to_dict(),
    })
    out.write_json("summary.json", summary)
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    run = summary["this_run"]
    return (f"{summary['rows_out']}/{summary['rows_in']} rows: {summary['scored']} scored, {summary['errors']} errors; "
            f"this run {run['rows']} rows in {run['wall_s']:.1f}s ({run['images_per_s'] or 0:.1f} img/s); "
            f"scores: {summary['scores']}  summary: {summary['output']}/summary.json")
