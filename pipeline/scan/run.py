"""The scan: plan -> decode (CPU tasks) -> score (actor pool) -> per-unit commits -> summary.

scan, benchmark and audit all call `run_scan`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from mirror_core.bundle import Bundle, load_bundle
from mirror_core.config import MirrorConfig
from mirror_core.errors import most_frequent_kinds
from pipeline.cluster import ensure_ray, require_placeable, require_shared_paths, resources_line
from pipeline.progress import RowProgress, pace_ray_data_log, stall_reports, step
from pipeline.scan.changes import FileChanges, removed_shard_units
from pipeline.scan.commit import add_commit_stage
from pipeline.scan.config import ScanConfig
from pipeline.scan.decode import decode_units
from pipeline.scan.isolation import decode_attempts
from pipeline.scan.labels import label_folders_identity
from pipeline.scan.sample import sample_figures, sample_line
from pipeline.scan.scorer import DEVICE_DECODE_KEY, Scorer
from pipeline.scan.sources import canonical_input, input_root, plan_source, refuse_output_in_input
from pipeline.scan.store import PlanRecordsWriter, ScanStore
from pipeline.scan.summary import TALLY_SCHEMA, summarize
from pipeline.scan.units import RECORD_KINDS, Plan, Unit

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
    return bundle.config.with_overrides(alignment=cfg.alignment, fast_decode=cfg.fast_decode, threshold=cfg.threshold,
                                        gpu_decode=cfg.gpu_decode)


def unit_descriptors(units: list[Unit], out: ScanStore, run: dict[str, Any], perturbation: str | None,
                     job: int = 0) -> list[dict]:
    """One item per unit for the pipeline: the unit, where a folder/manifest/tar-sample
    unit's records are (`records`: a records file of the plan, read by the decode task; a
    shard unit reads its row group), where its part goes, and its perturbation. `key` names
    the unit within a pipeline that may serve several scans. Items stay small: the driver
    never holds a unit's records."""
    return [{"key": f"{job}/{u.unit_id}", "unit": json.dumps(vars(u)),
             "records": out.uri_of(u.file) if u.kind in RECORD_KINDS else None,
             "target": json.dumps({"store": out.uri, "unit_id": u.unit_id, "run": run}),
             "perturbation": perturbation or ""} for u in units]


# GPU decode mode ships encoded JPEGs between stages: a generous bound on one's size.
ENCODED_ROW_BYTES = 4 * 2**20


def whole_unit_block_bytes(units: list[Unit], crop: int, encoded: bool = False) -> int:
    """A block size that holds the largest unit's decoded rows, so no unit is split."""
    largest = max((u.rows for u in units), default=1)
    return int(largest * (crop * crop * 3 + 4096 + (ENCODED_ROW_BYTES if encoded else 0)) * 1.25)


MAX_UNITS_PER_BLOCK = 4  # a block of 4 units of 224x224 crops is ~150 MB


def units_per_block(n_units: int, decode_slots: float) -> int:
    """Units that travel together in one block: Ray Data's cost is per block, so as many
    as leave every decode slot four blocks to work on, at most MAX_UNITS_PER_BLOCK. A
    unit is still committed, and resumed, on its own."""
    return int(max(1, min(MAX_UNITS_PER_BLOCK, n_units // max(1, 4 * decode_slots))))


def build_dataset(items, bundle: Bundle, model_cfg: MirrorConfig, cfg: ScanConfig, unit_block_bytes: int,
                  per_block: int = 1, attempts=None):
    """decode (CPU tasks) -> score (actor pool) -> commit (writer actors): one completion
    record per unit comes out. One pool of replicas serves every item; `per_block` units
    (items) share a block, never splitting one. `attempts`: a DecodeAttempts actor."""
    import ray

    ctx = ray.data.DataContext.get_current()
    largest_block_bytes = unit_block_bytes * per_block
    if ctx.target_max_block_size is not None and ctx.target_max_block_size < largest_block_bytes:
        ctx.target_max_block_size = largest_block_bytes  # a unit's block must never be split
    gpu = cfg.gpus_per_actor > 0
    weights_ref = ray.put(bundle.weights.to_numpy())
    ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // per_block))
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
                   "max_file_bytes": cfg.max_file_mb * 2**20, "attempts": attempts,
                   "timeout_s": cfg.decode_timeout_s},
    )
    # GPU replicas (and GPU decode): two calls at once, so that one block is uploaded or
    # decoded while another scores
    overlap = {"max_concurrent_calls_per_actor": 2, "enable_true_multi_threading": True} if (
        (gpu or cfg.gpu_decode) and cfg.replica_overlap) else {}
    pool = (ray.data.ActorPoolStrategy(min_size=cfg.actors, max_size=cfg.max_actors, **overlap) if cfg.max_actors
            else ray.data.ActorPoolStrategy(size=cfg.actors, **overlap))
    # Ray's public map_batches refuses whole blocks (batch_size=None) to a GPU stage; Ray's own
    # map_groups needs whole blocks on GPUs too and calls map_batches_internal, as we do.
    map_whole_blocks = ds.map_batches_internal if gpu else ds.map_batches
    ds = map_whole_blocks(
        Scorer,
        batch_size=None,  # whole blocks: a unit stays in one piece; the scorer batches the model itself
        batch_format="numpy",
        compute=pool,
        num_gpus=cfg.gpus_per_actor,
        num_cpus=cfg.cpus_per_actor,
        fn_constructor_kwargs={
            "weights": weights_ref,
            "config": model_cfg.to_dict(),
            "model_id": bundle.model_id,
            "device": "cuda" if gpu else "cpu",
            "precision": cfg.scoring_precision(gpu),
            "compile": cfg.compile,
            "batch_size": cfg.batch_size,
            "attempts": attempts,
            "decode_timeout_s": cfg.decode_timeout_s,
        },
    )
    return add_commit_stage(ds, cfg.commit_writers)


# TALLY_SCHEMA's columns from a completion record's fields
TALLY_FROM_RECORD = {"unit_id": "unit_id", "bytes": "part_bytes", "version": "part_version", "rows": "rows",
                     "errors": "errors", "labeled": "labeled", "flagged": "flagged", "error_kinds": "error_kinds"}


@dataclass
class ScanFigures:
    """One scan's completion records, summed as they arrive."""

    committed: int = 0
    rows: int = 0
    cpu_decoded_in_gpu_mode: int = 0
    jpeg_region_decoded: int = 0
    decode_s: float = 0.0
    score_s: float = 0.0
    readouts: set = dataclasses.field(default_factory=set)
    writer_pids: set = dataclasses.field(default_factory=set)
    writer_nodes: dict = dataclasses.field(default_factory=dict)
    units: set = dataclasses.field(default_factory=set)  # committed unit ids
    # each committed part's counts, size and version (TALLY_SCHEMA columns), for the summary
    tallies: dict = dataclasses.field(default_factory=lambda: {name: [] for name in TALLY_FROM_RECORD})

    def add(self, rec: dict) -> None:
        self.units.add(rec["unit_id"])
        for name, field in TALLY_FROM_RECORD.items():
            self.tallies[name].append(rec[field])
        self.committed += 1
        self.rows += rec["rows"]
        self.cpu_decoded_in_gpu_mode += rec["cpu_decoded_in_gpu_mode"]
        self.jpeg_region_decoded += rec["jpeg_region_decoded"]
        self.decode_s += rec["decode_s"]
        self.score_s += rec["score_s"]
        self.readouts.update(x for x in rec["readout"].split(",") if x)
        self.writer_pids.add(rec["writer_pid"])
        self.writer_nodes[rec["writer_node"]] = self.writer_nodes.get(rec["writer_node"], 0) + 1


class Completions:
    """What the driver learns of a pipeline: one record per committed unit (never rows),
    summed per scan as it arrives (of a record, only its unit's id and part counts are kept)."""

    def __init__(self):
        self.scans: dict[str, ScanFigures] = {}
        self.replicas: set[str] = set()
        self.rows = 0

    def add(self, batch: pa.Table) -> int:
        """The batch's completion records; returns the rows of the units new among them."""
        new = 0
        for rec in batch.to_pylist():
            scan = self.scans.setdefault(rec["store"], ScanFigures())
            if rec["unit_id"] in scan.units:  # a re-executed task reports again
                continue
            scan.add(rec)
            self.replicas.update(x for x in rec["replicas"].split(",") if x)
            new += rec["rows"]
        self.rows += new
        return new

    def figures(self, store: str) -> dict[str, Any]:
        """One scan's figures; `replicas` counts the scoring replicas of the whole pipeline."""
        scan = self.scans.get(store, ScanFigures())
        return {
            "committed": scan.committed,
            "rows": scan.rows,
            "units": scan.units,
            "tallies": pa.table(scan.tallies, schema=TALLY_SCHEMA),
            "cpu_decoded_in_gpu_mode": scan.cpu_decoded_in_gpu_mode,
            "jpeg_region_decoded": scan.jpeg_region_decoded,
            "busy": {"decode": scan.decode_s, "score": scan.score_s},
            "readouts": sorted(scan.readouts),
            "writer_pids": sorted(scan.writer_pids),
            "writer_nodes": scan.writer_nodes,
            "replicas": len(self.replicas),
        }


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM: ru_maxrss can carry a parent's peak
    over fork + exec)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class ScanJob:
    """One scan: an input, its output, and the perturbation its images get (sweeps)."""

    input_uri: str
    output_uri: str
    perturbation: str | None = None


def task_paths(prepared) -> tuple[dict[str, str], dict[str, str]]:
    """The local paths a scan's tasks read (each input whose files they read: a manifest is
    read while planning) and write in (each output), with their options."""
    inputs, outputs = {}, {}
    for job, out, plan, *_ in prepared:
        if out.local:
            outputs[out.root] = "--output"
        if plan.input_format != "manifest" and "://" not in job.input_uri:
            inputs[os.path.abspath(input_root(job.input_uri))] = "--input"
    return inputs, outputs


def run_scan(model: str | Bundle, input_uri: str, output_uri: str, cfg: ScanConfig,
             check_plan: Callable[[ScanStore, Plan], None] | None = None) -> dict[str, Any]:
    """Score every record of `input_uri` into `output_uri`; resumes a previous run there.
    `check_plan(store, plan)` runs once the input is planned, before anything is scored: a
    caller's check that raises ends the scan there (its plan is kept for the next run)."""
    return run_scans(model, [ScanJob(input_uri, output_uri, cfg.perturbation)], cfg, check_plan)[0]


class _Planned(Exception):
    """Ends a scan once its input is planned (`plan_scan`)."""


def plan_scan(model: str | Bundle, input_uri: str, output_uri: str, cfg: ScanConfig) -> dict[str, Any]:
    """Plan the input into `output_uri` as `run_scan` would (with `cfg.update`: re-list it),
    score nothing, and return the output's status (`status.scan_status`): what a scan of it
    will score, before any machine is spent on it. Ray is not started; the scan run later
    finds the plan stored."""
    from pipeline.scan.status import scan_status

    def stop(store: ScanStore, plan: Plan) -> None:
        raise _Planned(store.uri)

    try:
        run_scan(model, input_uri, output_uri, cfg, check_plan=stop)
    except _Planned as planned:
        return scan_status(str(planned))
    raise RuntimeError("the scan did not stop once planned")


def run_scans(model: str | Bundle, jobs: list[ScanJob], cfg: ScanConfig,
              check_plan: Callable[[ScanStore, Plan], None] | None = None) -> list[dict[str, Any]]:
    """Several scans through one pipeline: one pool of replicas (built, and compiled, once)
    scores every job's units; each job gets its own output and summary, as `run_scan` does.
    Each output is held by this run while it lasts (`ScanStore.running`): a second run
    into it is refused."""
    jobs = [dataclasses.replace(job, input_uri=canonical_input(job.input_uri)) for job in jobs]
    for job in jobs:
        refuse_output_in_input(job.input_uri, ScanStore(job.output_uri).uri)
    with contextlib.ExitStack() as held:
        for job in jobs:
            held.enter_context(ScanStore(job.output_uri).running())
        return _scan_jobs(model, jobs, cfg, check_plan)


def _scan_jobs(model: str | Bundle, jobs: list[ScanJob], cfg: ScanConfig,
               check_plan: Callable[[ScanStore, Plan], None] | None) -> list[dict[str, Any]]:
    t_start, cpu_start = time.perf_counter(), time.process_time()
    bundle = model if isinstance(model, Bundle) else load_bundle(model)
    model_cfg = effective_config(bundle, cfg)
    precision = cfg.scoring_precision(cfg.gpus_per_actor > 0)
    prepared, items = [], []
    for j, job in enumerate(jobs):
        out = ScanStore(job.output_uri)
        policy = model_cfg.preprocess.name + (f"+{job.perturbation}" if job.perturbation else "")
        run = {"model_id": bundle.model_id, "preprocess": policy, "threshold": model_cfg.threshold}
        identity = {**run, "input": job.input_uri, "sample": cfg.sample,
                    "label_folders": label_folders_identity(cfg.label_folders)}
        grown_from = out.grown_from(cfg.sample)  # a larger --sample than the output holds: what it adds is new
        out.claim(identity if grown_from is None else {**identity, "sample": grown_from})
        plan, added, versions, found = out.load_plan(), [], None, FileChanges()
        if plan is None:
            with step(f"planning {job.input_uri}") as info:
                with PlanRecordsWriter(out) as records:  # records go to the store unit by unit
                    plan = plan_source(job.input_uri, cfg.source_options(), sink=records)
                out.save_plan(plan)
                info.update(items=plan.total_rows, unit=f"records in {len(plan.units)} units")
        elif cfg.update or grown_from is not None:
            drawn = "the whole input" if cfg.sample is None else f"a sample of {cfg.sample}"
            with step(f"re-listing {job.input_uri}" + (f" for {drawn} (a sample of {grown_from} so far)"
                                                       if grown_from is not None else "")) as info:
                plan, added, found, versions = out.relist(plan, cfg.source_options(), grow_sample=grown_from is not None)
                info.update(items=sum(u.rows for u in added), unit=f"new records in {len(added)} new units"
                            + (f"; {found.changed} files changed and {found.removed} removed, in "
                               f"{len(found.units)} units to score again" if found.units else ""))
            if grown_from is not None:  # planned: the output holds the larger draw from now on
                out.write_json("_scan.json", identity)
        if check_plan is not None:
            check_plan(out, plan)
        done = out.done_units()
        retried = set()
        if cfg.retry_errors and done:
            with step("finding units with read failures") as info:
                retried = out.units_with_transient_errors(done - removed_shard_units(plan.units))
                info.update(items=len(retried), unit="units to score again")
        redo = retried | found.units
        todo = [u for u in plan.units if u.unit_id not in done or u.unit_id in redo]
        # rows say how the model computed them too; a resumed output may hold rows of several precisions
        items += unit_descriptors(todo, out, {**run, "precision": precision}, job.perturbation, j)
        changes = {"new": len(added), "retried": len(retried), "changed": len(found.units & done)}
        prepared.append((job, out, plan, policy, done - redo, todo, changes, versions, found))
    completions = Completions()
    isolated: list[str] = []  # keys of units decoded one record per child process (an attempt died)
    t_plan, cpu_plan = time.perf_counter(), time.process_time()
    t_first = t_last = None
    first_rows, per_block = 0, 0
    if items:
        import ray

        ensure_ray(cfg.address)
        pace_ray_data_log(cfg.progress_every_s)
        require_shared_paths(*task_paths(prepared))
        cfg = replace(cfg, cpus_per_actor=scoring_cpus(cfg))  # resolved, and recorded so below
        require_placeable({"a scoring actor (--gpus-per-actor, --cpus-per-actor)":
                           {"CPU": cfg.cpus_per_actor, "GPU": cfg.gpus_per_actor},
                           "a decode task (cpus_per_decode_task, decode_task_memory_mb)":
                           {"CPU": cfg.cpus_per_decode_task, "memory": cfg.decode_task_memory_mb * 2**20}},
                          cfg.address, "lower the setting (--gpus-per-actor 0 scores on CPUs), or give --address "
                                       "of a cluster that has such nodes")
        all_todo = [u for *_, todo, _, _, _ in prepared for u in todo]
        per_block = units_per_block(len(items), ray.cluster_resources().get("CPU", 1) / max(cfg.cpus_per_decode_task, 0.01))
        attempts = decode_attempts()
        ds = build_dataset(items, bundle, model_cfg, cfg, whole_unit_block_bytes(
            all_todo, model_cfg.preprocess.crop_size, model_cfg.preprocess.gpu_decode), per_block, attempts)
        meter = RowProgress("scoring", sum(u.rows for u in all_todo), cfg.progress_every_s)
        with stall_reports(meter, cfg.stall_report_s, resources_line):
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                if t_first is None:  # start-up ends here: Ray, replica builds, first decodes and writes
                    t_first, first_rows = time.perf_counter(), int(pc.sum(batch["rows"]).as_py() or 0)
                meter.add(completions.add(batch))
        t_last = time.perf_counter()
        isolated = ray.get(attempts.isolated_units.remote())
        ray.kill(attempts)
    cpu_pipeline = time.process_time()
    summaries = []
    for j, (job, out, plan, policy, done, todo, changes, versions, found) in enumerate(prepared):
        done_now = completions.figures(out.uri)
        missing = {u.unit_id for u in todo} - done_now["units"]
        if missing:
            raise RuntimeError(f"{out.uri}: {len(missing)} units were not committed: {sorted(missing)[:5]}")
        if versions is not None:  # every unit holding a changed file is scored again: its versions count
            versions.commit()
        wall = time.perf_counter() - t_start
        summary = summarize(out, plan.total_rows, plan.skipped_by_extension, {
            "model_id": bundle.model_id,
            "preprocess": policy,
            "threshold": model_cfg.threshold,
            "input": job.input_uri,
            "input_format": plan.input_format,
            "output": out.uri,
            "scores": out.uri_of("scores"),
            # new: added by --update; changed: finished units scored again by --update for a
            # file changed or removed; retried: finished units scored again by --retry-errors
            "units": {"total": len(plan.units), "skipped_done": len(done), "committed_now": done_now["committed"],
                      **changes},
            # --update of a folder or Parquet shards: files found changed in place, removed, or
            # versioned for the first time (a plan made before versions were recorded)
            **({"update": found.as_dict()} if found.checked else {}),
            "this_run": {
                "rows": done_now["rows"],
                "precision": precision,
                "wall_s": round(wall, 3),
                "plan_s": round(t_plan - t_start, 3),
                "images_per_s": round(done_now["rows"] / wall, 2) if wall > 0 else None,
                "first_batch_s": round(t_first - t_start, 3) if t_first else None,
                # Throughput once running (the whole pipeline): rows after the first commit over their time.
                "steady_images_per_s": round((completions.rows - first_rows)
                                             / (t_last - t_first), 2) if t_first and t_last > t_first else None,
                "stage_busy_s": {k: round(v, 3) for k, v in done_now["busy"].items()},
                "replica_readout": done_now["readouts"],  # as the scoring replicas reported it
                # GPU decode mode: rows that took the CPU path (other formats, refused JPEGs)
                "cpu_decoded_in_gpu_mode": done_now["cpu_decoded_in_gpu_mode"],
                # JPEGs the exact path decoded only where the crop reads; the rest of the
                # JPEGs were decoded whole (CMYK, damaged, or no region decoder on the node)
                "jpeg_region_decoded": done_now["jpeg_region_decoded"],
                # units whose decode task died (a file crashing its decoder, or a lost
                # worker): decoded again one record per child process, so that such a
                # record became an error row ("the decoding process died on this record")
                "units_decoded_in_isolation": sum(key.startswith(f"{j}/") and not key.endswith(DEVICE_DECODE_KEY)
                                                  for key in isolated),
                # GPU decode mode: blocks whose device decode killed their replica (a JPEG
                # crashing nvJPEG, or a CUDA error there): scored again with their JPEGs on
                # the exact CPU path, one per child process
                "blocks_device_decode_isolated": sum(key.startswith(f"{j}/") and key.endswith(DEVICE_DECODE_KEY)
                                                     for key in isolated),
                # Parts are written by Ray workers; the driver receives completion records only.
                "writers": {"nodes": done_now["writer_nodes"], "processes": len(done_now["writer_pids"])},
                "pipeline": {"scans": len(jobs), "scoring_replicas": done_now["replicas"], "units_per_block": per_block},
                "driver_peak_rss_mb": round(peak_rss_mb(), 1),
                # this process's CPU while planning and while the pipeline ran (Ray Data's
                # executor, the completion records), and the pipeline's wall time
                "driver_cpu_s": {"plan": round(cpu_plan - cpu_start, 3), "pipeline": round(cpu_pipeline - cpu_plan, 3)},
                "pipeline_s": round(t_last - t_plan, 3) if t_last else 0.0,
            },
            "config": replace(cfg, perturbation=job.perturbation).to_dict(),
        }, written=done_now["tallies"])
        if plan.sample is not None:
            summary["sample"] = sample_figures(plan.sample, plan.drawn_from, summary["scored"], summary["flagged"])
        out.write_json("summary.json", summary)
        summaries.append(summary)
    return summaries


def summary_line(summary: dict[str, Any]) -> str:
    run = summary["this_run"]
    why = most_frequent_kinds(summary.get("errors_by_kind", {}))
    flagged = summary["flagged"]
    share = f" ({100 * flagged / summary['scored']:.1f}% of scored)" if summary["scored"] else ""
    sample = f"{sample_line(summary['sample'])}: " if summary.get("sample") else ""
    return (f"{sample}{summary['rows_out']}/{summary['rows_in']} rows: {summary['scored']} scored, {summary['errors']} errors"
            f"{f' ({why})' if why else ''}; {flagged} flagged fake{share}; "
            f"this run {run['rows']} rows in {run['wall_s']:.1f}s ({run['images_per_s'] or 0:.1f} img/s); "
            f"scores: {summary['scores']}  summary: {summary['output']}/summary.json")
