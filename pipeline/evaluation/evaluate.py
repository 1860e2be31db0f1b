"""`mirror benchmark`: scan benchmark folders and write the official metrics CSV, plus more.

Per benchmark, under --output:
    {name}_{YYYYmmdd_HHMMSS}.csv      official header and semantics, one row per sub-dataset + MEAN
    {name}_{YYYYmmdd_HHMMSS}.json     counts, errors, threshold, EER, TPR@1%/5% FPR, ECE, policy,
                                      and the robustness sweep when --perturb is given
    scans/{name}/clean/...            the per-image scored Parquet (a resumable scan)
    scans/{name}/{perturbation}/...   one scan per perturbation
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mirror_core.bundle import Bundle
from mirror_core.metrics import OFFICIAL_COLUMNS, binary_metrics, eer, expected_calibration_error, tpr_at_fpr
from mirror_core.uri import join_uri
from pipeline.evaluation.registry import BenchmarkSpec
from pipeline.scan.config import ScanConfig
from pipeline.scan.labels import LABEL_FOLDERS
from pipeline.scan.run import ScanJob, run_scans
from pipeline.scan.sources import list_images
from pipeline.scan.store import ScanStore
from pipeline.storage import Location

log = logging.getLogger("mirror.benchmark")
OFFICIAL_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "webp")  # what the official evaluation collects
ALL = "ALL"


@dataclass
class BenchmarkResult:
    name: str
    csv_uri: str
    json_uri: str
    rows: list[dict[str, Any]]  # the official CSV rows
    detail: dict[str, Any]
    missing_subsets: list[str] = field(default_factory=list)


def with_subset(records: pa.Table, subset: str) -> pa.Table:
    """Records with every `subset` set to this benchmark sub-dataset's name."""
    return records.set_column(records.column_names.index("subset"), "subset",
                              pa.array([subset] * records.num_rows, pa.string()))


def benchmark_records(data_root: str, spec: BenchmarkSpec, label_folders: dict[str, int] = LABEL_FOLDERS
                      ) -> tuple[pa.Table | None, list[str], list[str]]:
    """Folder benchmarks -> (labeled records with subset, found, missing). None when the
    benchmark root holds Parquet shards instead (scanned directly). `label_folders`: the
    folder names that label (the official ones, and a corpus's own)."""
    root = join_uri(data_root, spec.folder)
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.isdir(path):
        raise FileNotFoundError(f"benchmark {spec.name}: its folder {root} does not exist")
    if any(p.endswith(".parquet") for p in fs.ls(path, detail=False)):
        return None, [], []
    if not spec.subsets:
        t = list_images(root, OFFICIAL_EXTENSIONS, label_folders=label_folders)
        t = t.filter(pc.is_valid(t["label"]))
        return with_subset(t, ALL), [ALL], []
    tables, found, missing = [], [], []
    for subset in spec.subsets:
        try:
            t = list_images(join_uri(root, subset), OFFICIAL_EXTENSIONS, label_folders=label_folders)
        except FileNotFoundError:
            missing.append(subset)
            continue
        t = t.filter(pc.is_valid(t["label"]))
        tables.append(with_subset(t, subset))
        found.append(subset)
    if not tables:
        raise FileNotFoundError(f"benchmark {spec.name}: none of its sub-datasets exist under {root}")
    return pa.concat_tables(tables), found, missing


def subset_metrics(rows: pa.Table) -> dict[str, Any]:
    """Official metrics + extras for one set of scanned rows (errors excluded, counted)."""
    errors = int(pc.sum(pc.is_valid(rows["error"])).as_py() or 0)
    ok = rows.filter(pc.and_(pc.is_null(rows["error"]), pc.is_valid(rows["label"])))
    labels, probs = ok["label"].to_numpy(), ok["prob_fake"].to_numpy()
    out: dict[str, Any] = binary_metrics(labels, probs, ok["pred"].to_numpy()) if ok.num_rows else {
        k: float("nan") for k in OFFICIAL_COLUMNS}
    out.update({"n": ok.num_rows, "n_real": int((labels == 0).sum()), "n_fake": int((labels == 1).sum()),
                "errors": errors})
    if ok.num_rows:
        out.update({"EER": eer(labels, probs), "TPR@1%FPR": tpr_at_fpr(labels, probs, 0.01),
                    "TPR@5%FPR": tpr_at_fpr(labels, probs, 0.05), "ECE": expected_calibration_error(labels, probs)})
    return out


def official_rows(per_subset: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [{"Dataset": name, **{k: m[k] for k in OFFICIAL_COLUMNS}} for name, m in per_subset.items()]
    if len(rows) > 1:
        rows.append({"Dataset": "MEAN", **{k: float(np.mean([r[k] for r in rows])) for k in OFFICIAL_COLUMNS}})
    return rows


def official_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["Dataset", *OFFICIAL_COLUMNS])
    for row in rows:
        writer.writerow([row["Dataset"], *(repr(float(row[k])) for k in OFFICIAL_COLUMNS)])
    return buf.getvalue()


def scan_metrics(scan_out: str, spec: BenchmarkSpec, found: list[str] | None) -> tuple[dict[str, dict], list[str]]:
    """Per sub-dataset metrics of a finished scan -> (metrics, sub-datasets missing).
    found=None (Parquet shards): the registry's sub-datasets present in the `subset` column."""
    rows = ScanStore(scan_out).read_scores(columns=["label", "subset", "prob_fake", "pred", "error"])
    missing: list[str] = []
    if found is None:
        present = set(rows["subset"].to_pylist())
        found = [s for s in spec.subsets if s in present] if spec.subsets else [ALL]
        missing = [s for s in spec.subsets if s not in present]
        if not found:
            raise ValueError(f"benchmark {spec.name}: none of its sub-datasets appear in the shards' subset column")
    per = {s: subset_metrics(rows if s == ALL else rows.filter(pc.equal(rows["subset"], s))) for s in found}
    return per, missing


@dataclass
class PreparedBenchmark:
    """A benchmark's scans (clean + one per perturbation), before they run."""

    spec: BenchmarkSpec
    found: list[str] | None  # sub-datasets present; None for Parquet shards (known after the scan)
    missing: list[str]
    scans: dict[str, ScanJob]  # "clean" / perturbation -> its scan


def prepare_benchmark(data_root: str, spec: BenchmarkSpec, output: str, perturbations: list[str] = (),
                      label_folders: dict[str, int] = LABEL_FOLDERS) -> PreparedBenchmark:
    out = Location(output)
    records, found, missing = benchmark_records(data_root, spec, label_folders)
    if records is None:  # Parquet shards made by `mirror ingest`
        source, found = join_uri(data_root, spec.folder), None
    else:
        out.write_parquet(f"scans/{spec.name}/input.parquet", records)
        source = out.uri_of("scans", spec.name, "input.parquet")
    scans = {(p or "clean"): ScanJob(source, out.uri_of("scans", spec.name, p.replace(":", "-") if p else "clean"), p)
             for p in [None, *perturbations]}
    return PreparedBenchmark(spec, found, missing, scans)


def finish_benchmark(model: Bundle, data_root: str, prepared: PreparedBenchmark, output: str, stamp: str,
                     summaries: dict[str, dict]) -> BenchmarkResult:
    """Metrics, the official CSV and the JSON detail of a benchmark whose scans are done."""
    spec, out, missing = prepared.spec, Location(output), prepared.missing
    sets: dict[str, dict[str, dict]] = {}
    for name, job in prepared.scans.items():
        sets[name], shard_missing = scan_metrics(job.output_uri, spec, prepared.found)
        missing = missing or shard_missing
    for subset in missing:
        log.warning("benchmark %s: sub-dataset %s not found under %s; skipped", spec.name, subset,
                    join_uri(data_root, spec.folder))
    clean, summary = sets["clean"], summaries["clean"]
    rows = official_rows(clean)
    csv_name, json_name = f"{spec.name}_{stamp}.csv", f"{spec.name}_{stamp}.json"
    out.write_bytes(csv_name, official_csv(rows).encode())
    detail = {"benchmark": spec.name, "folder": spec.folder, "run": stamp, "model_id": model.model_id,
              "preprocess": summary["preprocess"].split("+")[0], "threshold": summary["threshold"],
              "precision": summary["this_run"]["precision"],
              "subsets": clean, "missing_subsets": missing, "official_csv": csv_name,
              "perturbations": {k: v for k, v in sets.items() if k != "clean"},
              "scan": prepared.scans["clean"].output_uri,
              # the pipeline this run's scans shared: how many scans, how many replicas it built
              "pipeline": summary["this_run"]["pipeline"]}
    out.write_json(json_name, detail)
    return BenchmarkResult(spec.name, out.uri_of(csv_name), out.uri_of(json_name), rows, detail, missing)


def run_benchmark_set(model: Bundle, data_root: str, specs: list[BenchmarkSpec], output: str, cfg: ScanConfig,
                      stamp: str, perturbations: list[str] = ()) -> list[BenchmarkResult]:
    """Every benchmark x perturbation scan through one pipeline: the replicas are built
    (and compiled) once for the whole run; outputs per benchmark as for one."""
    folders = cfg.source_options().label_folders
    prepared = [prepare_benchmark(data_root, spec, output, perturbations, folders) for spec in specs]
    jobs = [job for p in prepared for job in p.scans.values()]
    summaries = iter(run_scans(model, jobs, dataclasses.replace(cfg, perturbation=None, input_format="auto")))
    by_benchmark = [{name: next(summaries) for name in p.scans} for p in prepared]
    return [finish_benchmark(model, data_root, p, output, stamp, s) for p, s in zip(prepared, by_benchmark)]


def run_stamp(now: datetime | None = None) -> str:
    return (now or datetime.now()).strftime("%Y%m%d_%H%M%S")


@dataclass
class BenchmarkRun:
    results: list[BenchmarkResult]
    report: str
    comparison: Any = None  # history.Comparison in nightly mode

    @property
    def exit_code(self) -> int:
        """0, or 3 when nightly mode found a regression beyond the tolerance."""
        return 3 if self.comparison is not None and self.comparison.regressions else 0


def resolve_model(output: str, model: str | None = None, model_path: str | None = None,
                  memory_path: str | None = None, backbone_path: str | None = None) -> Bundle:
    """A bundle, or the official script's files imported on the fly into OUTPUT/_bundle."""
    from mirror_core.bundle import load_bundle
    from mirror_core.official import import_official_bundle

    if model:
        return load_bundle(model)
    if not (model_path and backbone_path):
        raise ValueError("give --model BUNDLE, or the official --model_path CKPT --backbone_path DIR [--memory_path MEM]")
    target = Location(output).uri_of("_bundle")
    import_official_bundle(model_path, backbone_path, target, memory=memory_path)
    return load_bundle(target)


def run_benchmarks(model: Bundle, data_root: str, names: list[str], output: str, cfg: ScanConfig,
                   registry: dict[str, BenchmarkSpec], perturbations: list[str] = (), history: str | None = None,
                   tolerance: float = 0.01, now: datetime | None = None) -> BenchmarkRun:
    import pipeline.evaluation.history as hist
    from pipeline.evaluation.registry import resolve
    from pipeline.evaluation.report import write_report
    from pipeline.progress import step

    cfg.whole_input("a benchmark run")
    now = now or datetime.now()
    stamp = run_stamp(now)
    results = run_benchmark_set(model, data_root, [resolve(n, registry) for n in names], output, cfg, stamp,
                                perturbations)
    comparison, comparison_md = None, None
    if history:
        run_id = now.isoformat(timespec="microseconds")
        rows = pa.concat_tables([hist.history_rows(run_id, model.model_id, r.name, r.detail["subsets"], r.rows,
                                                   r.detail["precision"]) for r in results])
        comparison = hist.compare(hist.read_history(history), rows, tolerance)
        hist.append_history(history, rows)
        comparison_md = hist.comparison_markdown(comparison, tolerance)
        Location(output).write_json(f"comparison_{stamp}.json", {
            "previous_run": comparison.previous_run, "tolerance": tolerance, "deltas": comparison.deltas,
            "regressions": comparison.regressions})
    with step("benchmark report"):
        report = write_report(output, stamp, results, comparison_md)
    return BenchmarkRun(results, report, comparison)
