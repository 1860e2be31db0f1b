"""Scale-out harness (not a test): what the driver costs as a scan grows.

    python benchmarks/scale.py [--quick] [--images N] [--no-record]

Starts a local multi-node Ray cluster (a head that schedules nothing and two worker
nodes), a moto S3 server, writes a synthetic corpus of small images as Parquet shards
to it, scans it with a demo-size model and prints one JSON object:

- rows, nodes, rows_exactly_once (every input id once in the output), images_per_s;
- driver_rows_received: scored rows whose data reached the driver's own code (counted
  on what the scan loop consumes from the pipeline);
- driver_ceiling_rows_per_s: rows per second the driver's part of a scan sustains, fed
  the completion records of a synthetic 1M-row scan as fast as it takes them;
- driver_cpu_s, bare_pipeline_driver_cpu_s: the driver's CPU for the scan, and for a bare
  Ray Data pipeline of the same shape (same blocks and stages, stages that only sleep for
  the scan's measured stage times, write_parquet to the store); driver_cpu_over_bare: the
  driver CPU per second of pipeline wall time, scan over bare (Ray Data's executor costs
  the driver CPU per second it runs, and the scan's pipeline runs longer: replica builds,
  contention); driver_cpu_total_over_bare_total: the plain ratio;
- plan_s, plan_peak_rss_mb, plan_imports_rss_mb: planning a generated 1M-record manifest
  (not scanned) in a fresh process as a scan does (records into the scan's store, unit
  descriptors made), peak RSS and the imports' share of it; plan_in_memory_*: the same
  plan held in memory (training's index); `--plan-only N`
  measures only these, for N records, and the next;
- folder_plan_s, folder_plan_peak_rss_mb: planning a local folder of 100,000 empty images
  (with --plan-only N: N, at most 1M) as a scan does (its listing streamed);
  folder_update_*: `--update` over it with nothing new (listed again, checked against the
  stored URIs and versions); folder_whole_listing_*: the folder listed whole, then planned;
  folder_listing_s, folder_listing_with_versions_s(_threaded): its walk alone, and with
  each file's version (a stat per file; by threads, as for a network filesystem);
- completion_records_mb_per_100k_units: what the driver holds of the completion records
  of 100,000 units (25.6M rows at 256 a unit);
- sink_rows_per_s_at_50ms, serial_bound_rows_per_s: the commit stage alone (the scan's
  code, fed pre-scored blocks through Ray) writing to S3 behind a proxy that delays every
  request by 50 ms, sustained once its writers run (and with their start-up:
  sink_wall_rows_per_s_at_50ms), against one unit per 50 ms (and without the delay);
- benchmarks_3x16_over_1x48: one evaluation run over 3 benchmarks of 16 images against
  one over a benchmark of 48 (one scoring pool per run keeps it near 1);
- wds_plan_s, wds_update_plan_s, wds_reindex_all_s: planning WebDataset tar shards on S3
  (small JPEG + JSON samples), then `--update`'s planning after one more shard arrives,
  against indexing every shard again; wds_update_shards_indexed; wds_plan_ray_tasks_s: the
  same shards indexed by Ray tasks over the cluster (as a scan plans more than 64 shards);
  wds_update_changed_s: `--update`'s planning once wds_update_shards_changed shards were
  written again (indexed again, wds_update_changed_units units' records refreshed).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

PERF_LOG = REPO / "benchmarks" / "results" / "perf-log.md"
UNIT_ROWS = 256


def small_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n distinct small JPEGs (64x48 noise): decode cost stays small, rows many."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def write_corpus(fs, bucket: str, n: int, rows_per_shard: int = 2048) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = small_jpegs(min(n, 512))
    for s, start in enumerate(range(0, n, rows_per_shard)):
        rows = range(start, min(n, start + rows_per_shard))
        table = pa.table({"id": [f"img-{i:07d}" for i in rows], "bytes": [images[i % len(images)] for i in rows]})
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=UNIT_ROWS)
        fs.pipe(f"{bucket}/corpus/shard-{s:05d}.parquet", buf.getvalue())


def webdataset_update_figures(fs, bucket: str, shards: int, samples: int = 512, changed: int = 4) -> dict:
    """--update of a WebDataset corpus: one new shard indexed, against all of them again;
    then `changed` shards written again (their samples in reverse order) and updated."""
    import tarfile

    import pyarrow.compute as pc

    from pipeline.scan import webdataset
    from pipeline.scan.schema import UNIT
    from pipeline.scan.sources import plan_source, update_plan
    from pipeline.scan.tar_changes import KnownSamples
    from pipeline.scan.units import SourceOptions

    images = small_jpegs(64, seed=1)

    class HeldRecords:  # where an update's refreshed records go: counted, as a plan held in memory
        def __init__(self):
            self.units = 0

        def add(self, unit, records) -> None:
            unit.file, unit.row_group, self.units = "held", self.units, self.units + 1

    def known(plan) -> KnownSamples:
        return KnownSamples([plan.records], lambda u: plan.records.filter(pc.equal(plan.records[UNIT], u.unit_id)),
                            HeldRecords())

    def write_shard(s: int, reverse: bool = False) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in (reversed(range(samples)) if reverse else range(samples)):
                for name, data in ((f"{s:05d}{i:05d}.jpg", images[i % len(images)]),
                                   (f"{s:05d}{i:05d}.json", json.dumps({"i": i}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        fs.pipe(f"{bucket}/wds/shard-{s:05d}.tar", buf.getvalue())

    for s in range(shards):
        write_shard(s)
    uri = f"s3://{bucket}/wds"
    t = time.perf_counter()
    plan = plan_source(uri, SourceOptions())
    plan_s = time.perf_counter() - t
    write_shard(shards)
    fs.invalidate_cache()
    indexed, original = [], webdataset.index_shard
    webdataset.index_shard = lambda u, *a, **kw: indexed.append(u) or original(u, *a, **kw)
    try:
        t = time.perf_counter()
        update, added, _ = update_plan(plan, SourceOptions(), known(plan))
        update_s = time.perf_counter() - t
    finally:
        webdataset.index_shard = original
    for s in range(changed):
        write_shard(s, reverse=True)
    fs.invalidate_cache()
    t = time.perf_counter()
    _, _, found = update_plan(update, SourceOptions(), known(update))
    changed_s = time.perf_counter() - t
    assert found.changed == changed and len(found.unit_records) == len(found.units)
    t = time.perf_counter()
    plan_source(uri, SourceOptions())
    reindex_s = time.perf_counter() - t
    least, webdataset.CLUSTER_INDEX_MIN_SHARDS = webdataset.CLUSTER_INDEX_MIN_SHARDS, 0
    try:  # every shard by Ray tasks, however few
        t = time.perf_counter()
        on_cluster = plan_source(uri, SourceOptions(index_on_cluster=True))
        cluster_s = time.perf_counter() - t
    finally:
        webdataset.CLUSTER_INDEX_MIN_SHARDS = least
    assert sum(u.rows for u in added) == samples and on_cluster.total_rows == (shards + 1) * samples
    return {"wds_shards": shards + 1, "wds_samples_per_shard": samples, "wds_plan_s": round(plan_s, 2),
            "wds_update_plan_s": round(update_s, 3), "wds_reindex_all_s": round(reindex_s, 2),
            "wds_update_shards_indexed": len(indexed), "wds_plan_ray_tasks_s": round(cluster_s, 2),
            "wds_update_shards_changed": changed, "wds_update_changed_units": len(found.units),
            "wds_update_changed_s": round(changed_s, 3)}


class CountingCompletions:
    """The scan loop's consumer, counting rows that carry score data (there should be none)."""

    def __init__(self, inner):
        self.inner, self.scored_rows = inner, 0

    def add(self, batch) -> int:
        if "prob_fake" in batch.column_names:
            self.scored_rows += batch.num_rows
        return self.inner.add(batch)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def completion_batches(units: int) -> list:
    """The completion records of `units` units, one batch each, as the scan loop gets them."""
    import pyarrow as pa

    from pipeline.scan.commit import COMPLETION_SCHEMA

    return [pa.Table.from_pylist([{"store": "s3://b/out", "unit_id": f"{i:020x}", "rows": UNIT_ROWS, "errors": 0,
                                   "decode_s": 0.1, "score_s": 0.2, "readout": "extension (avx2)",
                                   "replicas": "r1", "cpu_decoded_in_gpu_mode": 0, "jpeg_region_decoded": 0,
                                   "writer_node": "n1", "writer_pid": 1}],
                                 schema=COMPLETION_SCHEMA) for i in range(units)]


def completion_records_mb(units: int = 100_000) -> float:
    """Python memory the driver holds for the completion records of `units` units."""
    import tracemalloc

    from pipeline.scan.run import Completions

    batches = completion_batches(units)
    tracemalloc.start()
    completions = Completions()
    for b in batches:
        completions.add(b)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return held / 2**20


def driver_ceiling(rows: int = 1_000_000) -> float:
    """Rows/s of the driver's per-unit work on a 1M-row scan: its completion records."""
    from pipeline.scan.run import Completions

    units = rows // UNIT_ROWS
    batches = completion_batches(units)
    completions = Completions()
    t = time.perf_counter()
    for b in batches:
        completions.add(b)
    completions.figures("s3://b/out")
    return units * UNIT_ROWS / (time.perf_counter() - t)


def bare_pipeline_cpu(blocks: int, decode_s: float, score_s: float, out_uri: str) -> tuple[float, float]:
    """Driver CPU and wall seconds of a Ray Data pipeline of the scan's shape whose stages
    only sleep."""
    import pyarrow as pa
    import ray

    def decode(batch):
        time.sleep(decode_s / blocks)
        return pa.table({"x": np.zeros(UNIT_ROWS)})

    class Score:
        def __call__(self, batch):
            time.sleep(score_s / blocks)
            return batch

    def commit(batch):
        return batch

    from pipeline.scan.config import ScanConfig

    t, wall = time.process_time(), time.perf_counter()
    ds = ray.data.from_items([{"i": i} for i in range(blocks)], override_num_blocks=blocks)
    ds = ds.map_batches(decode, batch_size=1, batch_format="pyarrow", num_cpus=1,
                        memory=ScanConfig().decode_task_memory_mb * 2**20)  # as the scan's decode tasks
    ds = ds.map_batches(Score, batch_size=None, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1)
    # through s3fs, as the scan's commits go (pyarrow's own S3 client streams chunked uploads)
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(out_uri)
    ds.map_batches(commit, batch_size=None, batch_format="pyarrow", num_cpus=0.25).write_parquet(
        path, filesystem=PyFileSystem(FSSpecHandler(fs)))
    return time.process_time() - t, time.perf_counter() - wall


PLAN_CHILD = """
import json, sys, time
from pipeline.scan.run import peak_rss_mb, unit_descriptors
from pipeline.scan.sources import inline_units, list_images, plan_source
from pipeline.scan.units import SourceOptions
from pipeline.scan.store import PlanRecordsWriter, ScanStore
source, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
imports_mb, t = peak_rss_mb(), time.perf_counter()
if mode == "store":  # as a scan plans: records to the store unit by unit, the driver keeps the units
    store = ScanStore(out)
    with PlanRecordsWriter(store) as sink:
        plan = plan_source(source, SourceOptions(), sink=sink)
    store.save_plan(plan)
    units = plan.units
    items = unit_descriptors(units, store, {}, None)
elif mode == "memory":  # in memory (every record held by the driver)
    units = items = plan_source(source, SourceOptions()).units
elif mode == "train":  # as training plans (into its run's folder) and counts its splits, phase 1
    from pipeline.train.data import plan_training_data
    units = items = plan_training_data(source, 1, 0.2, out).units
elif mode == "update":  # --update over the plan "store" made: the input listed again, checked against it
    store = ScanStore(out)
    plan, added, found, versions = store.relist(store.load_plan(), SourceOptions())
    assert not found.units, found
    units = items = added
elif mode in ("audit", "audit_whole"):  # an audit's pass over the scored "store" plan (parts made by audit_figures)
    from pipeline.audit.audit import AuditConfig, AuditTally, flagged_schema, group_keys, part_batches
    from pipeline.audit.filtered import write_filtered
    from pipeline.storage import Location
    scan, cfg, out_loc = ScanStore(out), AuditConfig(prefix_depth=1), Location(out + "-audit")
    units = items = scan.load_plan().units
    if mode == "audit":  # streamed, as `mirror audit` does
        with out_loc.parquet_writer("flagged.parquet", flagged_schema("g", 0.5, "x")) as writer:
            tally = AuditTally(0.5, 16, writer, "g", "x")
            for parts in part_batches(scan.scores_by_unit(["uri", "id", "prob_fake", "error"])):
                tally.add(parts, lambda rows: group_keys(rows, cfg, source))
            tally.flush()
            tally.groups()
        write_filtered(out_loc, scan, tally.keep, "drop", 0.5, "x")
    else:  # every row held at once with its group key (a whole-table audit)
        import pyarrow as pa
        rows = pa.concat_tables([t for _, t in scan.scores_by_unit(["uri", "id", "prob_fake", "error"])])
        keys = group_keys(rows, cfg, source)
        records = scan.plan_records(scan.load_plan())
else:  # a folder listed whole, then planned (as folders were planned before listings streamed)
    units, records = inline_units(list_images(source), SourceOptions().unit_size, source)
    items = units
print(json.dumps({"s": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb(), "imports_mb": imports_mb,
                  "units": len(units), "items": len(items)}))
"""


def _plan_child(source: Path, out: Path, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PLAN_CHILD, str(source), str(out), mode],
                          capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan_figures(tmp: Path, records: int = 1_000_000) -> dict:
    """Planning a generated manifest of `records` URIs in a fresh process, as a scan does
    (records into the store, unit descriptors made: plan_s, plan_peak_rss_mb over
    plan_imports_rss_mb), in memory (plan_in_memory_s, plan_in_memory_peak_rss_mb) and as
    training plans and counts its splits (training_plan_s, training_plan_peak_rss_mb)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tmp / f"manifest-{records}.parquet"
    with pq.ParquetWriter(manifest, pa.schema([("uri", pa.string())])) as writer:  # in pieces: bounded here too
        for start in range(0, records, 1_000_000):
            writer.write_table(pa.table({"uri": [f"s3://corpus/images/{i // 10_000:05d}/{i:09d}.jpg"
                                                 for i in range(start, min(records, start + 1_000_000))]}))
    figures = {"plan_records": records}
    for mode, prefix in (("store", "plan"), ("memory", "plan_in_memory"), ("train", "training_plan")):
        got = _plan_child(manifest, tmp / f"plan-{records}-{mode}", mode)
        figures.update({f"{prefix}_s": round(got["s"], 2), f"{prefix}_peak_rss_mb": round(got["peak_rss_mb"]),
                        "plan_imports_rss_mb": round(got["imports_mb"]), "plan_units": got["units"]})
    return figures


def audit_figures(tmp: Path, records: int) -> dict:
    """An audit's pass over a scan of the `records`-URI manifest plan_figures planned (its
    parts written here: uri, id, prob_fake, 1% errors), in a fresh process: streamed as
    `mirror audit` does (audit_s, audit_peak_rss_mb: the tally, flagged manifest, group
    figures and filtered manifest) and with every row held at once (audit_whole_*)."""
    import numpy as np
    import pyarrow as pa

    from pipeline.scan.store import ScanStore, stored_records

    store = ScanStore(str(tmp / f"plan-{records}-store"))
    plan = store.load_plan()
    rng, units = np.random.default_rng(0), iter(plan.units)
    for table in stored_records(store, plan, ["uri"]):  # records files hold whole units, in order
        at = 0
        while at < table.num_rows:
            unit = next(units)
            n, err = unit.rows, rng.random(unit.rows) < 0.01
            store.write_parquet(store.part_name(unit.unit_id), pa.table({
                "uri": table["uri"].slice(at, n), "id": pa.array([f"{x:064x}" for x in rng.integers(1 << 62, size=n)]),
                "prob_fake": pa.array(np.where(err, np.nan, rng.random(n)), from_pandas=True),
                "error": pa.array(np.where(err, "decode failed", None), pa.string())}))
            at += n
    figures = {}
    for mode in ("audit", "audit_whole"):
        got = _plan_child(tmp / f"manifest-{records}.parquet", tmp / f"plan-{records}-store", mode)
        figures.update({f"{mode}_s": round(got["s"], 2), f"{mode}_peak_rss_mb": round(got["peak_rss_mb"])})
    return figures


FOLDER_PLAN_MAX_FILES = 1_000_000  # files made on this disk for --plan-only's folder figures


def folder_plan_figures(tmp: Path, files: int) -> dict:
    """Planning a local folder of `files` (empty) images, 1,000 a directory, in a fresh
    process as a scan does (its listing streamed, records into the store:
    folder_plan_s, folder_plan_peak_rss_mb), `--update` over that plan with nothing new
    (folder_update_*: the listing again, checked against the stored URIs and versions) and from a whole listing
    (folder_whole_listing_s, folder_whole_listing_peak_rss_mb)."""
    root = tmp / f"folder-{files}"
    for d in range(0, files, 1000):
        folder = root / f"part-{d // 1000:05d}" / ("0_real" if d % 2000 else "1_fake")
        folder.mkdir(parents=True)
        for i in range(d, min(files, d + 1000)):
            (folder / f"{i:09d}.jpg").touch()
    figures = {"folder_files": files}
    for mode, prefix in (("store", "folder_plan"), ("update", "folder_update"), ("listing", "folder_whole_listing")):
        got = _plan_child(root, tmp / f"folder-plan-{files}", mode)
        assert got["units"] == (0 if mode == "update" else -(-files // 256)), got
        figures.update({f"{prefix}_s": round(got["s"], 2), f"{prefix}_peak_rss_mb": round(got["peak_rss_mb"])})
    from pipeline.scan import listing

    slow = listing.SLOW_STAT_S
    for versions, threads_from_s, key in ((False, slow, "folder_listing_s"), (True, slow, "folder_listing_with_versions_s"),
                                          (True, 0.0, "folder_listing_with_versions_threaded_s")):
        listing.SLOW_STAT_S = threads_from_s  # 0: stats by threads, as on a network filesystem
        try:
            t = time.perf_counter()
            assert sum(1 for _ in listing.iter_files(str(root), versions=versions)) == files
            figures[key] = round(time.perf_counter() - t, 2)  # the walk alone, and with a stat per file
        finally:
            listing.SLOW_STAT_S = slow
    return figures


def prescored_block(u: int, store: str):
    """One unit of UNIT_ROWS rows as the score stage hands it to the commit stage."""
    import pyarrow as pa

    from pipeline.scan.schema import DECODED_SCHEMA, READOUT, REPLICA, SCORE_FIELDS, SCORE_SECONDS, pack_records

    n = UNIT_ROWS
    cols = {f.name: pa.nulls(n, f.type) for f in DECODED_SCHEMA}
    cols.update({"_unit": pa.array([f"0/u{u}"] * n), "_index": pa.array(range(n), pa.int64()),
                 "sha256": pa.array([f"{u}-{i}" for i in range(n)]),
                 "_unit_records": pa.array([pack_records(pa.table({"uri": [f"x/{u}/{i}" for i in range(n)]}))]
                                           + [None] * (n - 1), pa.binary()),
                 "_unit_target": pa.array([json.dumps({"store": store, "unit_id": f"u{u}", "run": {}})]
                                          + [None] * (n - 1), pa.string()),
                 "_decode_s": pa.array(np.zeros(n)), SCORE_SECONDS: pa.array(np.zeros(n)),
                 READOUT: pa.array(["x"] * n), REPLICA: pa.array(["r"] * n)})
    cols.update({f.name: pa.array(np.zeros(n), f.type) if f.type == pa.float64() else pa.array(np.zeros(n, int))
                 for f in SCORE_FIELDS})
    return pa.table(cols)


def sink_figures(proxy, bucket: str, units: int, delay_s: float = 0.05) -> dict:
    """The commit stage alone (the scan's own, `add_commit_stage`), fed pre-scored
    blocks of as many units as a scan of `units` packs on this cluster through Ray, writing to S3 behind the proxy (every worker's S3
    endpoint), which now delays every request by `delay_s`. Sustained rate: rows after the
    first completion over their time (the writer pool's start-up overlaps a scan's own);
    the wall rate includes it."""
    import pyarrow as pa
    import ray

    from pipeline.scan.commit import add_commit_stage
    from pipeline.scan.run import units_per_block

    per_block = units_per_block(units, ray.cluster_resources()["CPU"])  # as a scan of `units` packs them here

    def commit_all(store: str) -> tuple[int, float, float]:
        blocks = [pa.concat_tables([prescored_block(u, store) for u in range(b, min(b + per_block, units))])
                  for b in range(0, units, per_block)]
        t = time.perf_counter()
        ds = add_commit_stage(ray.data.from_arrow(blocks), writers=2)
        rows, first = 0, None
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            first = first or (time.perf_counter(), int(b["rows"].sum()))
            rows += int(b["rows"].sum())
        end = time.perf_counter()
        return rows, rows / (end - t), (rows - first[1]) / (end - first[0])

    _, warm_wall, warm_sustained = commit_all(f"s3://{bucket}/sink-warm-up")
    proxy.delay_s = delay_s
    try:
        rows, wall, sustained = commit_all(f"s3://{bucket}/sink")
    finally:
        proxy.delay_s = 0.0
    return {"sink_rows_per_s_at_50ms": round(sustained), "sink_wall_rows_per_s_at_50ms": round(wall),
            "serial_bound_rows_per_s": UNIT_ROWS * 1000 / (delay_s * 1000), "sink_units": units, "sink_units_per_block": per_block, "sink_rows": rows,
            "sink_rows_per_s_no_delay": round(warm_sustained)}


def evaluation_figures(tmp: Path, bundle_uri: str) -> dict:
    """Wall time of one `mirror benchmark` run over 3 benchmarks of 16 images against one
    benchmark of 48: with one pool per run the ratio stays near 1."""
    from mirror_core.bundle import load_bundle
    from pipeline.evaluation.evaluate import run_benchmark_set
    from pipeline.evaluation.registry import BenchmarkSpec
    from pipeline.scan.config import ScanConfig

    images = small_jpegs(48, seed=3)
    for name, count in (("one48", 48), ("a16", 16), ("b16", 16), ("c16", 16)):
        for i in range(count):
            folder = tmp / "bench" / name / ("0_real" if i % 2 else "1_fake")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:02d}.jpg").write_bytes(images[i])
    bundle = load_bundle(bundle_uri)
    walls = {}
    for label, names in (("one", ["one48"]), ("three", ["a16", "b16", "c16"])):
        specs = [BenchmarkSpec(n, n) for n in names]
        t = time.perf_counter()
        run_benchmark_set(bundle, str(tmp / "bench"), specs, str(tmp / f"eval-{label}"), ScanConfig(actors=1), "x")
        walls[label] = time.perf_counter() - t
    return {"benchmark_1x48_s": round(walls["one"], 2), "benchmark_3x16_s": round(walls["three"], 2),
            "benchmarks_3x16_over_1x48": round(walls["three"] / walls["one"], 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10,000 images (a few minutes on 2 cores)")
    p.add_argument("--images", type=int, help="corpus size (default 10,000 quick, 50,000 otherwise)")
    p.add_argument("--no-record", action="store_true", help="do not append to the performance log")
    p.add_argument("--plan-only", type=int, metavar="RECORDS",
                   help="only the planning figures, for a manifest of RECORDS URIs (no cluster)")
    args = p.parse_args(argv)
    if args.plan_only:
        with tempfile.TemporaryDirectory() as tmp:
            result = {"date": datetime.now().strftime("%Y-%m-%d %H:%M"), **plan_figures(Path(tmp), args.plan_only),
                      **audit_figures(Path(tmp), args.plan_only),
                      **folder_plan_figures(Path(tmp), min(args.plan_only, FOLDER_PLAN_MAX_FILES)),
                      "completion_records_mb_per_100k_units": round(completion_records_mb(), 1)}
        print(json.dumps(result, indent=2))
        if not args.no_record:
            with open(PERF_LOG, "a") as log:
                log.write(f"\n### {result['date']}: planning a manifest of {args.plan_only:,} records, a folder of "
                          f"{result['folder_files']:,} files\n\n"
                          "```json\n" + json.dumps(result, indent=2) + "\n```\n")
        return 0
    n = args.images or (10_000 if args.quick else 50_000)

    import fsspec
    import pyarrow.parquet as pq
    import ray
    from conftest import _free_port
    from moto.server import ThreadedMotoServer
    from ray.cluster_utils import Cluster

    import pipeline.scan.run as scan_run
    from mirror_core.bundle import save_bundle
    from mirror_core.config import BackboneConfig, MirrorConfig
    from mirror_core.smoke import DEMO_BACKBONE, DEMO_MEMORY, random_mirror
    from pipeline.scan.config import ScanConfig

    port = _free_port()
    from s3_faults import FaultProxy

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    # Everyone reaches S3 through the proxy (no delay until the sink figures ask for it);
    # set before the cluster starts, so every node's workers inherit it.
    proxy = FaultProxy(f"http://127.0.0.1:{port}").__enter__()
    os.environ.update(AWS_ENDPOINT_URL=proxy.url, AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x",
                      AWS_DEFAULT_REGION="us-east-1")
    fs = fsspec.filesystem("s3")
    bucket = "mirror-scale"
    fs.mkdir(bucket)
    result = {"date": datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores", "rows": n}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address)
        result["nodes"] = len([x for x in ray.nodes() if x["Alive"]])
        t = time.perf_counter()
        write_corpus(fs, bucket, n)
        result["corpus_write_s"] = round(time.perf_counter() - t, 1)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            cfg = MirrorConfig(backbone=BackboneConfig(dict(DEMO_BACKBONE)), memory=DEMO_MEMORY)
            save_bundle(str(tmp / "bundle"), cfg, random_mirror(cfg)[1])
            counting = []
            real = scan_run.Completions
            scan_run.Completions = lambda: counting.append(CountingCompletions(real())) or counting[-1]
            cpu = time.process_time()
            summary = scan_run.run_scan(str(tmp / "bundle"), f"s3://{bucket}/corpus", f"s3://{bucket}/scan",
                                        ScanConfig(actors=2, batch_size=64, cpus_per_actor=1))
            result["driver_cpu_s"] = round(time.process_time() - cpu, 2)
            scan_run.Completions = real
            fs.invalidate_cache()
            ids = pq.read_table(f"{bucket}/scan/scores", filesystem=fs, columns=["id"])["id"].to_pylist()
            result.update({"rows_out": len(ids), "rows_exactly_once": len(ids) == len(set(ids)) == n,
                           "images_per_s": summary["this_run"]["images_per_s"],
                           "driver_rows_received": counting[0].scored_rows,
                           "writer_nodes": len(summary["this_run"]["writers"]["nodes"])})
            busy = summary["this_run"]["stage_busy_s"]
            units = summary["units"]["committed_now"]
            bare_cpu, bare_wall = bare_pipeline_cpu(units, busy["decode"], busy["score"], f"s3://{bucket}/bare")
            run = summary["this_run"]
            result.update({"bare_pipeline_driver_cpu_s": round(bare_cpu, 2),
                           "driver_cpu_by_phase_s": run["driver_cpu_s"], "pipeline_wall_s": run["pipeline_s"],
                           "bare_pipeline_wall_s": round(bare_wall, 1)})
            # Ray Data's executor costs the driver CPU per second it runs, whatever the rows; the
            # scan's pipeline outlasts the bare one (replica builds, contention on these cores), so
            # the rates are compared: new per-row or per-unit driver work would raise the scan's.
            scan_rate = run["driver_cpu_s"]["pipeline"] / run["pipeline_s"]
            result.update({"driver_cpu_per_pipeline_s": round(scan_rate, 4),
                           "bare_driver_cpu_per_pipeline_s": round(bare_cpu / bare_wall, 4),
                           "driver_cpu_over_bare": round(scan_rate / (bare_cpu / bare_wall), 2),
                           "driver_cpu_total_over_bare_total": round(result["driver_cpu_s"] / bare_cpu, 2)})
            result.update(plan_figures(tmp))
            result.update(folder_plan_figures(tmp, 100_000))
            result.update(webdataset_update_figures(fs, bucket, shards=16 if args.quick else 64))
            result.update(evaluation_figures(tmp, str(tmp / "bundle")))
        result["driver_ceiling_rows_per_s"] = round(driver_ceiling())
        result["completion_records_mb_per_100k_units"] = round(completion_records_mb(), 1)
        result.update(sink_figures(proxy, bucket, units=128 if args.quick else 512))
    finally:
        ray.shutdown()
        cluster.shutdown()
        proxy.__exit__(None, None, None)
        server.stop()
    print(json.dumps(result, indent=2, default=str))
    if not args.no_record:
        with open(PERF_LOG, "a") as log:
            log.write(f"\n### {result['date']}: scale harness ({n:,} images, {result['nodes']} nodes, moto S3)\n\n"
                      "```json\n" + json.dumps(result, indent=2, default=str) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
