"""`mirror audit`: how much of a training corpus is AI-generated, where it comes from,
and a clean copy without it.

Outputs under --output (every one records the threshold and how it was chosen):
    scan/                    the scan (scored Parquet, scan schema + original columns)
    calibration/             the scan of the calibration set (with --target-fpr)
    flagged.parquet          rows above the threshold: uri, id, prob_fake, grouping column
    groups.parquet           per group: counts, flagged fraction, score quantiles, errors
    filtered/                the corpus without flagged rows (or with a keep column)
    explanations.parquet     top-N flagged: residual-norm grid; heatmaps/*.png overlays
    audit_report.md          totals, groups, histogram, thumbnails with heatmaps
    audit_summary.json
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from mirror_core.bundle import Bundle, load_bundle
from mirror_core.detector import Detector
from pipeline.audit.explain import heatmap_overlay, png_bytes
from pipeline.audit.filtered import with_threshold_info, write_filtered
from pipeline.progress import progress, step
from pipeline.scan import webdataset
from pipeline.scan.config import ScanConfig
from pipeline.scan.run import run_scan
from pipeline.scan.sources import DEFAULT_MAX_FILE_BYTES, fetch_all, read_shard_unit, record_names
from pipeline.scan.store import ScanStore
from pipeline.storage import Location

FILTER_MODES = ("drop", "mark")


@dataclass
class AuditConfig:
    threshold: float | None = None
    target_fpr: float | None = None
    calibration: str | None = None
    group_by: str | None = None  # a column of the input
    prefix_depth: int | None = None  # or: the first N folders of the uri
    filter_mode: str = "drop"
    top_n: int = 16

    def __post_init__(self):
        if (self.target_fpr is None) != (self.calibration is None):
            raise ValueError("--target-fpr and --calibration go together")
        if self.target_fpr is not None and self.threshold is not None:
            raise ValueError("give either --threshold or --target-fpr/--calibration, not both")
        if self.target_fpr is not None and not 0 < self.target_fpr < 1:
            raise ValueError(f"--target-fpr must be in (0, 1), got {self.target_fpr}")
        if self.group_by and self.prefix_depth:
            raise ValueError("give either --group-by or --prefix-depth, not both")
        if self.filter_mode not in FILTER_MODES:
            raise ValueError(f"--filter must be one of {FILTER_MODES}")


def threshold_for_fpr(real_scores: np.ndarray, target_fpr: float) -> float:
    """Largest-FPR threshold not above the target: exactly floor(target * n) real
    scores lie strictly above it (fewer only when scores tie at the boundary)."""
    scores = np.sort(np.asarray(real_scores, np.float64))[::-1]
    if scores.size == 0:
        raise ValueError("the calibration set has no scored real images")
    k = int(np.floor(target_fpr * scores.size))
    return float(scores[min(k, scores.size - 1)])


def choose_threshold(bundle: Bundle, cfg: AuditConfig, scan_cfg: ScanConfig, out: Location) -> tuple[float, str]:
    if cfg.threshold is not None:
        return cfg.threshold, "explicit --threshold"
    if cfg.calibration is None:
        return bundle.config.threshold, "model default"
    run_scan(bundle, cfg.calibration, out.uri_of("calibration"), scan_cfg)
    rows = ScanStore(out.uri_of("calibration")).read_scores(columns=["label", "prob_fake", "error"])
    rows = rows.filter(pc.and_(pc.is_null(rows["error"]), pc.invert(pc.fill_null(pc.equal(rows["label"], 1), False))))
    scores = rows["prob_fake"].to_numpy()
    t = threshold_for_fpr(scores, cfg.target_fpr)
    fpr = float((scores > t).mean())
    return t, (f"target FPR {cfg.target_fpr:g} on {cfg.calibration}: {scores.size} real images, "
               f"FPR at threshold {fpr:.4f} ({int((scores > t).sum())} above)")


def group_keys(rows: pa.Table, cfg: AuditConfig, root: str) -> list[str]:
    """Group of each row: a column's value, or the first N folders of its uri below the
    input root (of the whole uri when it lies elsewhere, e.g. shards' original uris)."""
    if cfg.group_by:
        if cfg.group_by not in rows.column_names:
            raise ValueError(f"--group-by {cfg.group_by!r}: no such column in the scan's rows")
        return [None if v is None else str(v) for v in rows[cfg.group_by].to_pylist()]
    depth = cfg.prefix_depth or 1
    root = root.rstrip("/") + "/"
    keys = []
    for uri in rows["uri"].to_pylist():
        rel = uri[len(root):] if uri.startswith(root) else uri.split("://", 1)[-1]
        keys.append("/".join(rel.strip("/").split("/")[:-1][:depth]) or ".")
    return keys


QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
# What the audit reads of each scored row (and the --group-by column): not the whole row
AUDIT_COLUMNS = ("uri", "id", "prob_fake", "error")


def group_summary(rows: pa.Table, keys: list[str], threshold: float) -> pa.Table:
    """Per group: counts, flagged fraction, exact score quantiles (numpy's linear rule) and
    maximum, from Arrow's group_by and one sort; no loop over groups."""
    prob = pc.if_else(pc.is_null(rows["error"]), rows["prob_fake"], pa.scalar(None, pa.float64()))
    table = pa.table({"group": pa.array(keys, pa.string()), "prob": prob,
                      "error": pc.cast(pc.is_valid(rows["error"]), pa.int64()),
                      "flagged": pc.cast(pc.fill_null(pc.greater(prob, threshold), False), pa.int64())})
    out = table.group_by("group").aggregate([
        ("group", "count", pc.CountOptions(mode="all")), ("prob", "count"), ("error", "sum"), ("flagged", "sum"),
        ("prob", "max")]).sort_by([("group", "ascending")])  # a null group (no key) sorts last
    counts = out["prob_count"].to_numpy()
    # Exact quantiles: scored values sorted within their group, then linear interpolation
    # at q * (n - 1) from each group's start, for all groups at once.
    scored = table.filter(pc.is_valid(table["prob"])).sort_by([("group", "ascending"), ("prob", "ascending")])
    values = scored["prob"].to_numpy()
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    quantiles = {}
    for name, q in QUANTILES.items():
        pos = starts + q * np.maximum(counts - 1, 0)
        lo, hi = np.floor(pos).astype(np.int64), np.ceil(pos).astype(np.int64)
        safe = counts > 0
        lo, hi = np.where(safe, lo, 0), np.where(safe, hi, 0)
        v = values[lo] + (values[hi] - values[lo]) * (pos - np.floor(pos)) if values.size else np.zeros(len(counts))
        quantiles[name] = np.where(safe, v, np.nan)
    flagged = out["flagged_sum"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(counts > 0, flagged / np.maximum(counts, 1), np.nan)
    return pa.table({
        "group": out["group"], "count": out["group_count"], "scored": out["prob_count"], "errors": out["error_sum"],
        "flagged": out["flagged_sum"], "flagged_fraction": pa.array(fraction, pa.float64()),
        **{name: pa.array(v, pa.float64()) for name, v in quantiles.items()},
        "max": pc.fill_null(out["prob_max"], float("nan")),
    })


def record_bytes(scan: ScanStore, plan, unit_id: str, index: int, columns) -> tuple[bytes | None, str | None]:
    unit = next(u for u in plan.units if u.unit_id == unit_id)
    if unit.kind == "shard":
        t = read_shard_unit(unit, columns, with_bytes=True)
        return t["bytes"][index].as_py(), record_names(t)[index]
    rec = scan.unit_records(unit).slice(index, 1)
    if unit.kind == "samples":  # a tar sample: its image member, named as in the tar
        _, names, payloads = webdataset.read_samples(rec, 1, DEFAULT_MAX_FILE_BYTES)
        return payloads[0][0], names[0]
    uri = rec["uri"][0].as_py()
    data, _ = next(fetch_all([uri], 1))
    return data, uri


def explain_top(out: Location, scan: ScanStore, bundle: Bundle, flagged: pa.Table, top_n: int, threshold: float,
                method: str, columns, alignment: str | None) -> pa.Table:
    detector = Detector.from_bundle(bundle, alignment=alignment)
    top = flagged.sort_by([("prob_fake", "descending")]).slice(0, top_n)
    plan = scan.load_plan()
    rows = []
    for rank, r in enumerate(progress(top.to_pylist(), "explaining", unit="image"), start=1):
        data, name = record_bytes(scan, plan, r["_unit"], r["_index"], columns)
        pre = detector.preprocess(data, name=name)
        grid = detector.score_pixels(pre.pixels[None], token_residuals=True)["token_residual"][0]
        stem = f"heatmaps/{rank:03d}_{(r['id'] or 'noid')[:12]}"
        out.write_bytes(f"{stem}_heatmap.png", png_bytes(heatmap_overlay(pre.pixels, grid)))
        out.write_bytes(f"{stem}_crop.png", png_bytes(Image.fromarray(pre.pixels)))
        rows.append({"rank": rank, "uri": r["uri"], "id": r["id"], "prob_fake": r["prob_fake"],
                     "grid": grid.astype(np.float32).ravel().tolist(), "grid_h": grid.shape[0], "grid_w": grid.shape[1],
                     "heatmap": f"{stem}_heatmap.png", "crop": f"{stem}_crop.png"})
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("rank", pa.int64()), ("uri", pa.string()), ("id", pa.string()), ("prob_fake", pa.float64()),
        ("grid", pa.list_(pa.float32())), ("grid_h", pa.int64()), ("grid_w", pa.int64()),
        ("heatmap", pa.string()), ("crop", pa.string())]))
    out.write_parquet("explanations.parquet", with_threshold_info(table, threshold, method))
    return table


def run_audit(model: str | Bundle, input_uri: str, output_uri: str, scan_cfg: ScanConfig,
              cfg: AuditConfig) -> dict[str, Any]:
    from pipeline.audit.report import write_audit_report

    bundle = model if isinstance(model, Bundle) else load_bundle(model)
    out = Location(output_uri)
    threshold, method = choose_threshold(bundle, cfg, scan_cfg, out)
    scan_cfg = dataclasses.replace(scan_cfg, threshold=threshold)
    summary = run_scan(bundle, input_uri, out.uri_of("scan"), scan_cfg)
    scan = ScanStore(out.uri_of("scan"))
    rows = scan.read_scores_with_position(list(AUDIT_COLUMNS) + ([cfg.group_by] if cfg.group_by else []))
    scored = pc.is_null(rows["error"])
    is_flagged = pc.and_(scored, pc.greater(pc.fill_null(rows["prob_fake"], 0.0), threshold))
    keys = group_keys(rows, cfg, input_uri)
    group_col = cfg.group_by or f"uri_prefix_{cfg.prefix_depth or 1}"
    rows = rows.append_column("_group", pa.array(keys, pa.string()))
    flagged = rows.filter(is_flagged)
    manifest = pa.table({"uri": flagged["uri"], "id": flagged["id"], "prob_fake": flagged["prob_fake"],
                         group_col: flagged["_group"], "threshold": pa.array([threshold] * flagged.num_rows),
                         "threshold_method": pa.array([method] * flagged.num_rows, pa.string())})
    with step("flagged manifest and group summary") as info:
        out.write_parquet("flagged.parquet", with_threshold_info(manifest, threshold, method))
        groups = group_summary(rows, keys, threshold)
        groups = groups.rename_columns([group_col if c == "group" else c for c in groups.column_names])
        out.write_parquet("groups.parquet", with_threshold_info(groups, threshold, method))
        info.update(items=groups.num_rows, unit="groups")
    with step(f"filtered copy ({cfg.filter_mode})") as info:
        keep = (~np.asarray(is_flagged.to_numpy(zero_copy_only=False), bool)).tolist()
        kept = write_filtered(out, scan, rows, keep, cfg.filter_mode, threshold, method, scan_cfg.address)
        info.update(items=kept, unit="rows written")
    with step(f"heatmaps of the top {cfg.top_n} flagged"):
        explanations = explain_top(out, scan, bundle, flagged, cfg.top_n, threshold, method,
                                   scan_cfg.source_options().columns, scan_cfg.alignment)
    result = {
        "model_id": bundle.model_id, "input": input_uri, "output": out.uri,
        "threshold": threshold, "threshold_method": method,
        "rows": rows.num_rows, "scored": int(pc.sum(scored).as_py() or 0), "errors": summary["errors"],
        "flagged": flagged.num_rows, "flagged_fraction": flagged.num_rows / max(1, int(pc.sum(scored).as_py() or 0)),
        "group_column": group_col, "groups": groups.to_pylist(), "filter_mode": cfg.filter_mode,
        "filtered_rows": kept, "explained": explanations.num_rows,
    }
    with step("audit report"):
        result["report"] = write_audit_report(out, result, rows, explanations)
    out.write_json("audit_summary.json", result)
    return result
