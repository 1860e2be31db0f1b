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
from itertools import chain
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from mirror_core.bundle import Bundle, load_bundle
from mirror_core.detector import Detector
from mirror_core.errors import error_text
from pipeline.audit.explain import heatmap_overlay, png_bytes
from pipeline.audit.filtered import with_threshold_info, write_filtered
from pipeline.progress import progress, step
from pipeline.scan import webdataset
from pipeline.scan.config import ScanConfig
from pipeline.scan.reads import (
    DEFAULT_MAX_FILE_BYTES,
    ShardChangedError,
    fetch_all,
    read_shard_unit,
    record_names,
    shard_payloads,
)
from pipeline.scan.run import run_scan
from pipeline.scan.schema import OUTPUT_COLUMNS, RESERVED
from pipeline.scan.store import ScanStore, records_schemas
from pipeline.scan.units import Plan
from pipeline.storage import Location, parquet_schema, read_ahead, relative_paths

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


def group_keys(rows: pa.Table, cfg: AuditConfig, root: str) -> pa.Array:
    """Group of each row (strings): a column's value (null where it has none), or the first N
    folders of its uri below the input root (of the whole uri, less its scheme, when it lies
    elsewhere, e.g. shards' original uris); '.' for a file directly below it."""
    if cfg.group_by:
        if cfg.group_by not in rows.column_names:
            raise ValueError(f"--group-by {cfg.group_by!r}: no such column in the scan's rows")
        values = rows[cfg.group_by].combine_chunks()
        if pa.types.is_string(values.type):
            return values
        # other types as Python spells them ('True', '1.0'), as groups were always named
        return pa.array([None if v is None else str(v) for v in values.to_pylist()], pa.string())
    uris = rows["uri"].combine_chunks()
    rel = pc.coalesce(relative_paths(uris, root), pc.replace_substring_regex(uris, "^.*?://", "", max_replacements=1))
    # up to N folders, each with the '/' after it (the file's name has none), then less the last '/'
    pattern = f"^(?P<f>(?:[^/]*/){{1,{cfg.prefix_depth or 1}}})"
    folders = pc.struct_field(pc.extract_regex(pc.utf8_trim(rel, "/"), pattern), [0])
    keys = pc.utf8_slice_codeunits(folders, 0, -1)
    return pc.if_else(pc.fill_null(pc.equal(keys, ""), True), ".", keys)


def check_group_by(column: str | None, scan: ScanStore, plan: Plan) -> None:
    """A --group-by column that no record can carry fails the audit once its input is
    planned, before any image is scored. The input's columns are read from footers (records
    files', Parquet shards'), stopping at the first that has it; left to the check after the
    scan where columns are known only as records are read (tar samples carry their members,
    an image struct its file's path)."""
    if not column or column in OUTPUT_COLUMNS or any(u.kind == "samples" for u in plan.units):
        return
    shards = list(dict.fromkeys(u.file for u in plan.units if u.kind == "shard"))
    carried: set[str] = set()  # bytes and bookkeeping are never carried
    for schema in chain(records_schemas(scan, plan), read_ahead(parquet_schema, shards, SHARD_FOOTERS_READ_AT_ONCE)):
        if any(pa.types.is_struct(f.type) for f in schema) or (column in schema.names and column not in RESERVED):
            return
        carried |= set(schema.names) - RESERVED
    raise ValueError(f"--group-by {column!r}: no such column in {plan.input} (its own columns: "
                     f"{', '.join(sorted(carried)) or 'none'}; the output's: {', '.join(OUTPUT_COLUMNS)})")


QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
# What the audit reads of each scored row (and the --group-by column): not the whole row
AUDIT_COLUMNS = ("uri", "id", "prob_fake", "error")
SUMMARY_GROUPS = 100  # groups in audit_summary.json and the report (most flagged); all in groups.parquet
FLAGGED_ROWS_PER_WRITE = 65_536  # flagged rows per row group of flagged.parquet (each adds footer metadata)
AUDIT_BATCH_ROWS = 65_536  # scored rows the tally takes at once
SHARD_FOOTERS_READ_AT_ONCE = 16  # Parquet footers read concurrently (object-store latency)


def group_summary(names: list[str | None], count: np.ndarray, codes: np.ndarray, prob: np.ndarray,
                  threshold: float) -> pa.Table:
    """Per group (`codes` index `names`): rows (`count`, errors included), scored rows
    (`codes`, `prob`: one per scored row), errors, flagged fraction, exact score quantiles
    (numpy's linear rule) and maximum, from bincounts and one sort, groups in name order (a
    null group last); no loop over rows."""
    n = len(names)
    scored = np.bincount(codes, minlength=n)
    flagged = np.bincount(codes, weights=prob > threshold, minlength=n).astype(np.int64)
    # Exact quantiles: scored values sorted within their group, then linear interpolation
    # at q * (n - 1) from each group's start, for all groups at once.
    values = prob[np.lexsort((prob, codes))]
    starts = np.concatenate([[0], np.cumsum(scored)[:-1]]).astype(np.int64)
    safe = scored > 0
    quantiles = {}
    for name, q in {**QUANTILES, "max": 1.0}.items():
        pos = starts + q * np.maximum(scored - 1, 0)
        lo, hi = np.where(safe, np.floor(pos), 0).astype(np.int64), np.where(safe, np.ceil(pos), 0).astype(np.int64)
        v = values[lo] + (values[hi] - values[lo]) * (pos - np.floor(pos)) if values.size else np.zeros(n)
        quantiles[name] = np.where(safe, v, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(safe, flagged / np.maximum(scored, 1), np.nan)
    order = sorted(range(n), key=lambda i: (names[i] is None, names[i] or ""))
    return pa.table({
        "group": pa.array([names[i] for i in order], pa.string()), "count": count[order].astype(np.int64),
        "scored": scored[order].astype(np.int64), "errors": (count - scored)[order].astype(np.int64),
        "flagged": flagged[order], "flagged_fraction": fraction[order],
        **{name: v[order] for name, v in quantiles.items()},
    })


TOP_SCHEMA = [("uri", pa.string()), ("id", pa.string()), ("prob_fake", pa.float64()), ("_unit", pa.string()),
              ("_index", pa.int64())]


def flagged_schema(group_col: str, threshold: float, method: str) -> pa.Schema:
    schema = pa.schema([("uri", pa.string()), ("id", pa.string()), ("prob_fake", pa.float64()), (group_col, pa.string()),
                        ("threshold", pa.float64()), ("threshold_method", pa.string())])
    return with_threshold_info(schema.empty_table(), threshold, method).schema


class AuditTally:
    """What an audit keeps of the scan's rows as they stream past, a batch of parts at a
    time: per scored row its group code and score (12 bytes, no strings), rows per group,
    each unit's keep flags, the `top_n` highest flagged rows; the flagged rows go to
    `flagged` a row group at a time."""

    def __init__(self, threshold: float, top_n: int, flagged: pq.ParquetWriter, group_col: str, method: str):
        self.threshold, self.top_n, self.flagged, self.group_col, self.method = threshold, top_n, flagged, group_col, method
        self.names: dict[str | None, int] = {}
        self.count = np.zeros(0, np.int64)  # rows per group code, errors included
        self.codes: list[np.ndarray] = []  # group code and score of each scored row
        self.probs: list[np.ndarray] = []
        self.keep: dict[str, np.ndarray] = {}  # unit id -> keep flag per row, in record order
        self.top = pa.table({c: pa.array([], t) for c, t in TOP_SCHEMA})
        self.n_flagged = 0
        self.pending: list[pa.Table] = []  # flagged rows not written yet (uri, id, prob_fake, group)
        self.pending_rows = 0

    def add(self, parts: list[tuple[str, pa.Table]], keys_of) -> None:
        """A batch of committed parts (unit id, rows); `keys_of(rows)`: each row's group."""
        units = [u for u, _ in parts]
        sizes = np.array([t.num_rows for _, t in parts])
        rows = pa.concat_tables([t for _, t in parts], promote_options="permissive")  # a --group-by column may be absent
        keys = keys_of(rows)
        error = np.asarray(rows["error"].is_valid().to_numpy(zero_copy_only=False), bool)
        prob = np.asarray(rows["prob_fake"].fill_null(np.nan).to_numpy(), np.float64)
        is_flagged = ~error & (np.nan_to_num(prob, nan=0.0) > self.threshold)
        encoded = pc.dictionary_encode(keys, null_encoding="encode")  # a code per distinct group of the batch
        ours = np.array([self.names.setdefault(k, len(self.names)) for k in encoded.dictionary.to_pylist()], np.int32)
        codes = ours[np.asarray(encoded.indices.to_numpy(zero_copy_only=False), np.int64)]
        self.count = np.bincount(codes, minlength=len(self.names)) + np.pad(self.count, (0, len(self.names) - len(self.count)))
        self.codes.append(codes[~error])
        self.probs.append(prob[~error])
        self.keep.update(zip(units, np.split(~is_flagged, np.cumsum(sizes)[:-1])))
        hit = np.flatnonzero(is_flagged)
        if not hit.size:
            return
        part_of = np.repeat(np.arange(len(units)), sizes)[hit]
        hits = rows.select(["uri", "id", "prob_fake"]).take(pa.array(hit))
        self.pending.append(hits.append_column(self.group_col, keys.take(pa.array(hit))))
        self.pending_rows += hit.size
        self.n_flagged += hit.size
        if self.pending_rows >= FLAGGED_ROWS_PER_WRITE:
            self.flush()
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        hits = hits.append_column("_unit", pa.array(units).take(pa.array(part_of)))
        hits = hits.append_column("_index", pa.array(hit - starts[part_of], pa.int64()))
        top = pa.concat_tables([self.top, hits.cast(self.top.schema)])  # a stable sort: earlier rows first on ties
        self.top = top.sort_by([("prob_fake", "descending")]).slice(0, self.top_n)

    def flush(self) -> None:
        """Write the flagged rows held back (call once more after the last batch)."""
        if self.pending:
            hits = pa.concat_tables(self.pending)
            n = hits.num_rows
            self.flagged.write_table(hits.append_column("threshold", pa.array(np.full(n, self.threshold)))
                                     .append_column("threshold_method", pa.repeat(self.method, n).cast(pa.string()))
                                     .cast(self.flagged.schema))
            self.pending, self.pending_rows = [], 0

    @property
    def rows(self) -> int:
        return int(self.count.sum())

    def scored(self) -> tuple[np.ndarray, np.ndarray]:
        """(group codes, scores) of the scored rows, joined into one array each (once)."""
        for name, dtype in (("codes", np.int32), ("probs", np.float64)):
            parts = getattr(self, name)
            if len(parts) != 1:
                setattr(self, name, [np.concatenate(parts) if parts else np.zeros(0, dtype)])
        return self.codes[0], self.probs[0]

    def groups(self) -> pa.Table:
        codes, probs = self.scored()
        return group_summary(list(self.names), self.count, codes, probs, self.threshold)


def part_batches(parts: Iterable[tuple[str, pa.Table]], rows: int = AUDIT_BATCH_ROWS) -> Iterator[list]:
    """Committed parts gathered into batches of about `rows` rows (Arrow's per-call cost is
    paid per batch, not per part)."""
    batch, n = [], 0
    for unit, table in parts:
        batch.append((unit, table))
        n += table.num_rows
        if n >= rows:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def summary_groups(groups: pa.Table) -> list[dict]:
    """The groups audit_summary.json and the report list: all of them up to SUMMARY_GROUPS,
    else the most flagged (then the largest), in name order."""
    if groups.num_rows <= SUMMARY_GROUPS:
        return groups.to_pylist()
    rank = np.lexsort((-groups["count"].to_numpy(), -groups["flagged"].to_numpy()))[:SUMMARY_GROUPS]
    return groups.take(pa.array(np.sort(rank))).to_pylist()


def record_bytes(scan: ScanStore, plan, unit_id: str, index: int, columns) -> tuple[bytes | None, str | None, str | None]:
    """A scanned record's bytes, name and why they cannot be read now (None when they can)."""
    unit = next(u for u in plan.units if u.unit_id == unit_id)
    if unit.kind == "shard":
        try:
            t = read_shard_unit(unit, columns, with_bytes=True)
        except ShardChangedError as err:
            return None, None, str(err)
        except Exception as err:  # recorded on its explanation row
            return None, None, f"shard read failed: {error_text(err)}"
        data, error = shard_payloads(t.slice(index, 1), unit.file, 1)[0]
        return data, record_names(t)[index], error
    rec = scan.unit_records(unit).slice(index, 1)
    if unit.kind == "samples":  # a tar sample: its image member, named as in the tar
        _, names, payloads = webdataset.read_samples(rec, 1, DEFAULT_MAX_FILE_BYTES, unit.version)
        return payloads[0][0], names[0], payloads[0][1]
    uri = rec["uri"][0].as_py()
    data, error = next(fetch_all([uri], 1))
    return data, uri, error


EXPLANATIONS_SCHEMA = pa.schema([
    ("rank", pa.int64()), ("uri", pa.string()), ("id", pa.string()), ("prob_fake", pa.float64()),
    ("grid", pa.list_(pa.float32())), ("grid_h", pa.int64()), ("grid_w", pa.int64()),
    ("heatmap", pa.string()), ("crop", pa.string()), ("error", pa.string())])


def explain_top(out: Location, scan: ScanStore, bundle: Bundle, top: pa.Table, threshold: float,
                method: str, columns, alignment: str | None) -> pa.Table:
    """Heatmaps and residual grids of the `top` flagged rows (uri, id, prob_fake, _unit, _index), in order.
    An image that cannot be read or decoded now (removed or changed since the scan) keeps
    its row, with `error` saying why and no grid."""
    detector = Detector.from_bundle(bundle, alignment=alignment)
    plan = scan.load_plan()
    rows = []
    for rank, r in enumerate(progress(top.to_pylist(), "explaining", unit="image"), start=1):
        row = {"rank": rank, "uri": r["uri"], "id": r["id"], "prob_fake": r["prob_fake"]}
        data, name, error = record_bytes(scan, plan, r["_unit"], r["_index"], columns)
        try:
            pre = detector.preprocess(data, name=name) if error is None else None
        except Exception as err:  # recorded on its row: the image is not what was scored
            error = f"decode failed: {error_text(err)}"
        if error is not None:
            rows.append({**row, "error": error})
            continue
        grid = detector.score_pixels(pre.pixels[None], token_residuals=True)["token_residual"][0]
        stem = f"heatmaps/{rank:03d}_{(r['id'] or 'noid')[:12]}"
        out.write_bytes(f"{stem}_heatmap.png", png_bytes(heatmap_overlay(pre.pixels, grid)))
        out.write_bytes(f"{stem}_crop.png", png_bytes(Image.fromarray(pre.pixels)))
        rows.append({**row, "grid": grid.astype(np.float32).ravel().tolist(), "grid_h": grid.shape[0],
                     "grid_w": grid.shape[1], "heatmap": f"{stem}_heatmap.png", "crop": f"{stem}_crop.png"})
    table = pa.Table.from_pylist(rows, schema=EXPLANATIONS_SCHEMA)
    out.write_parquet("explanations.parquet", with_threshold_info(table, threshold, method))
    return table


def run_audit(model: str | Bundle, input_uri: str, output_uri: str, scan_cfg: ScanConfig,
              cfg: AuditConfig) -> dict[str, Any]:
    """Scan the corpus, then stream its scores once (part by part, in bounded memory): the
    flagged manifest, per-group figures, the filtered copy, the top flagged explained."""
    from pipeline.audit.report import write_audit_report

    scan_cfg.whole_input("an audit")
    bundle = model if isinstance(model, Bundle) else load_bundle(model)
    out = Location(output_uri)
    threshold, method = choose_threshold(bundle, cfg, scan_cfg, out)
    scan_cfg = dataclasses.replace(scan_cfg, threshold=threshold)
    summary = run_scan(bundle, input_uri, out.uri_of("scan"), scan_cfg,
                       check_plan=lambda scan, plan: check_group_by(cfg.group_by, scan, plan))
    scan = ScanStore(out.uri_of("scan"))
    group_col = cfg.group_by or f"uri_prefix_{cfg.prefix_depth or 1}"
    with step("flagged manifest and group summary") as info, \
            out.parquet_writer("flagged.parquet", flagged_schema(group_col, threshold, method)) as writer:
        tally = AuditTally(threshold, cfg.top_n, writer, group_col, method)
        columns = list(AUDIT_COLUMNS) + ([cfg.group_by] if cfg.group_by else [])
        for parts in progress(part_batches(scan.scores_by_unit(columns)), "auditing scores", unit="batch"):
            tally.add(parts, lambda rows: group_keys(rows, cfg, input_uri))
        tally.flush()
        groups = tally.groups()
        groups = groups.rename_columns([group_col if c == "group" else c for c in groups.column_names])
        out.write_parquet("groups.parquet", with_threshold_info(groups, threshold, method))
        info.update(items=groups.num_rows, unit="groups")
    with step(f"filtered copy ({cfg.filter_mode})") as info:
        kept = write_filtered(out, scan, tally.keep, cfg.filter_mode, threshold, method, scan_cfg.address)
        info.update(items=kept, unit="rows written")
    with step(f"heatmaps of the top {cfg.top_n} flagged"):
        explanations = explain_top(out, scan, bundle, tally.top, threshold, method,
                                   scan_cfg.source_options().columns, scan_cfg.alignment)
    n_scored = int(groups["scored"].to_numpy().sum()) if groups.num_rows else 0
    result = {
        "model_id": bundle.model_id, "input": input_uri, "output": out.uri,
        "threshold": threshold, "threshold_method": method,
        "rows": tally.rows, "scored": n_scored, "errors": summary["errors"], "errors_by_kind": summary["errors_by_kind"],
        "flagged": tally.n_flagged, "flagged_fraction": tally.n_flagged / max(1, n_scored),
        "group_column": group_col, "groups": summary_groups(groups), "groups_total": groups.num_rows,
        "filter_mode": cfg.filter_mode, "filtered_rows": kept, "explained": explanations.num_rows,
    }
    with step("audit report"):
        result["report"] = write_audit_report(out, result, tally.scored()[1], explanations)
    out.write_json("audit_summary.json", result)
    return result
