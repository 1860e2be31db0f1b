"""`mirror audit` on a generated corpus with a `source` column, locally and on S3 (moto)."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_image
from PIL import Image

from pipeline.audit.audit import threshold_for_fpr
from pipeline.commands.cli import main

pytestmark = pytest.mark.slow
SOURCES = ("siteA", "siteB", "siteC")


def corpus_shards(tmp_path, n=30):
    images = [write_image(tmp_path / "raw" / f"{i}.png", size=(80 + i, 70), seed=i) for i in range(n)]
    table = pa.table({
        "bytes": images,
        "id": [f"img-{i:03d}" for i in range(n)],
        "uri": [f"https://example.org/{SOURCES[i % 3]}/{i}.png" for i in range(n)],
        "source": [SOURCES[i % 3] for i in range(n)],
        "caption": [f"a photo number {i}" for i in range(n)],
    })
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):
        pq.write_table(table.slice(10 * k, 10), shards / f"part-{k}.parquet", row_group_size=4)
    return shards, table


def calibration_folder(tmp_path, n=20):
    for i in range(n):
        write_image(tmp_path / "calib" / "0_real" / f"r{i}.jpg", size=(90, 90), seed=500 + i)
    return tmp_path / "calib"


def test_threshold_for_fpr_is_exact():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    t = threshold_for_fpr(scores, 0.2)
    assert (scores > t).sum() == 2
    assert (scores > threshold_for_fpr(scores, 0.01)).sum() == 0


def test_audit_local_shards_with_calibration(ray_local, parity_bundle, tmp_path):
    shards, corpus = corpus_shards(tmp_path)
    calib = calibration_folder(tmp_path)
    out = tmp_path / "audit"
    assert main(["audit", "--model", str(parity_bundle), "--input", str(shards), "--output", str(out),
                 "--target-fpr", "0.1", "--calibration", str(calib), "--group-by", "source", "--top-n", "4"]) == 0
    summary = json.loads((out / "audit_summary.json").read_text())
    t = summary["threshold"]
    # calibration: floor(0.1 * 20) = 2 real images above the threshold, within one sample
    calib_scores = pq.read_table(out / "calibration" / "scores")["prob_fake"].to_numpy()
    assert abs(int((calib_scores > t).sum()) - 0.1 * len(calib_scores)) <= 1
    assert "target FPR 0.1" in summary["threshold_method"]

    scored = pq.read_table(out / "scan" / "scores").to_pylist()
    assert len(scored) == 30 and {r["caption"] for r in scored} == set(corpus["caption"].to_pylist())
    expected_flagged = sorted(r["id"] for r in scored if r["error"] is None and r["prob_fake"] > t)
    flagged = pq.read_table(out / "flagged.parquet")
    assert expected_flagged and sorted(flagged["id"].to_pylist()) == expected_flagged
    assert summary["flagged"] == len(expected_flagged)
    assert set(flagged.column_names) >= {"uri", "id", "prob_fake", "source", "threshold", "threshold_method"}
    assert flagged.schema.metadata[b"mirror_threshold"] == repr(t).encode()

    # group summary against numbers computed here by hand
    groups = {g["source"]: g for g in pq.read_table(out / "groups.parquet").to_pylist()}
    for source in SOURCES:
        probs = [r["prob_fake"] for r in scored if r["source"] == source]
        hits = sum(p > t for p in probs)
        assert groups[source]["count"] == len(probs) == 10 and groups[source]["errors"] == 0
        assert groups[source]["flagged"] == hits and groups[source]["flagged_fraction"] == pytest.approx(hits / 10)
        assert groups[source]["p50"] == pytest.approx(sorted(probs)[4] / 2 + sorted(probs)[5] / 2)
        assert groups[source]["max"] == pytest.approx(max(probs))

    # filtered shards: same files, same columns, flagged rows gone
    kept = 0
    for k in range(3):
        part = pq.read_table(out / "filtered" / f"part-{k}.parquet")
        assert part.column_names == corpus.column_names
        assert not set(part["id"].to_pylist()) & set(expected_flagged)
        assert part.schema.metadata[b"mirror_threshold_method"].decode() == summary["threshold_method"]
        kept += part.num_rows
    assert kept == 30 - len(expected_flagged) == summary["filtered_rows"]

    # explanations: top flagged images, grids in Parquet, heatmaps of the crop's size
    expl = pq.read_table(out / "explanations.parquet").to_pylist()
    assert len(expl) == min(4, len(expected_flagged)) > 0
    assert [e["prob_fake"] for e in expl] == sorted((e["prob_fake"] for e in expl), reverse=True)
    for e in expl:
        assert (e["grid_h"], e["grid_w"]) == (14, 14) and len(e["grid"]) == 196
        for key in ("heatmap", "crop"):
            assert Image.open(out / e[key]).size == (224, 224)
    report = (out / "audit_report.md").read_text()
    assert "## By source" in report and "siteB" in report and expl[0]["heatmap"] in report


def test_audit_on_s3_by_prefix_with_keep_column(ray_local, parity_bundle, s3_bucket, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3")
    for i in range(9):
        write_image(tmp_path / "folder" / SOURCES[i % 3] / "batch1" / f"{i}.png", seed=40 + i)
    fs.put(str(tmp_path / "folder"), f"{s3_bucket}/corpus", recursive=True)
    fs.pipe(f"{s3_bucket}/corpus/{SOURCES[0]}/batch1/broken.png", b"not an image")
    out = f"s3://{s3_bucket}/audit"
    assert main(["audit", "--model", str(parity_bundle), "--input", f"s3://{s3_bucket}/corpus", "--output", out,
                 "--threshold", "0.5", "--prefix-depth", "1", "--filter", "mark", "--top-n", "2"]) == 0
    summary = json.loads(fs.cat(f"{s3_bucket}/audit/audit_summary.json"))
    assert summary["threshold"] == 0.5 and summary["threshold_method"] == "explicit --threshold"
    groups = {g["uri_prefix_1"]: g for g in summary["groups"]}
    assert set(groups) == set(SOURCES) and [groups[s]["count"] for s in SOURCES] == [4, 3, 3]
    assert summary["errors"] == groups[SOURCES[0]]["errors"] == 1
    assert summary["errors_by_kind"] == {"decode failed: UnidentifiedImageError": 1}
    assert "- rows: 10, scored: 9, errors: 1\n  - decode failed: UnidentifiedImageError: 1\n" in fs.cat(
        f"{s3_bucket}/audit/audit_report.md").decode()
    manifest = pq.read_table(io.BytesIO(fs.cat(f"{s3_bucket}/audit/filtered/manifest.parquet")))
    assert manifest.num_rows == 10 and "mirror_keep" in manifest.column_names
    flagged = pq.read_table(io.BytesIO(fs.cat(f"{s3_bucket}/audit/flagged.parquet")))
    assert manifest["mirror_keep"].to_pylist().count(False) == flagged.num_rows == summary["flagged"]
    assert len(fs.glob(f"{s3_bucket}/audit/heatmaps/*_heatmap.png")) == min(2, flagged.num_rows)


def test_group_summary_is_exact_with_errors_and_a_null_group():
    from pipeline.audit.audit import group_summary

    rng = np.random.default_rng(1)
    n = 60
    keys = [None if i % 17 == 0 else f"g{i % 4}" for i in range(n)]
    prob = rng.random(n)
    err = ["e" if i % 7 == 0 else None for i in range(n)]
    keys.append("only-errors")
    prob = np.append(prob, 0.0)
    err.append("e")
    names = list(dict.fromkeys(keys))
    codes = np.array([names.index(k) for k in keys])
    is_err = np.array([e is not None for e in err])
    got = group_summary(names, np.bincount(codes), codes[~is_err], prob[~is_err], 0.5).to_pylist()
    assert [g["group"] for g in got] == ["g0", "g1", "g2", "g3", "only-errors", None]
    for g in got:
        sel = np.array([k == g["group"] for k in keys])
        scored = prob[sel & ~is_err]
        assert (g["count"], g["scored"], g["errors"]) == (sel.sum(), scored.size, (sel & is_err).sum())
        assert g["flagged"] == (scored > 0.5).sum()
        if scored.size:
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                assert g[name] == pytest.approx(np.quantile(scored, q), abs=1e-12)
            assert g["max"] == scored.max() and g["flagged_fraction"] == pytest.approx((scored > 0.5).mean())
        else:
            assert np.isnan(g["p50"]) and np.isnan(g["max"]) and np.isnan(g["flagged_fraction"])


@pytest.mark.parametrize("mode", ["drop", "mark"])
def test_the_filtered_manifest_streams_every_records_file_with_its_flags(tmp_path, monkeypatch, mode):
    """Records files of two plan generations (the second with a column the first lacks),
    written a file at a time into one manifest: each record with its own unit's flag."""
    from pipeline.audit.filtered import KEEP_COLUMN, write_filtered
    from pipeline.scan import store as store_module
    from pipeline.scan.sources import SourceOptions, plan_source, update_plan
    from pipeline.scan.store import PlanRecordsWriter, ScanStore

    monkeypatch.setattr(store_module, "UNITS_PER_RECORDS_FILE", 2)
    manifest = tmp_path / "list.csv"
    manifest.write_text("uri,label\n" + "".join(f"s3://b/{i:02d}.jpg,{i % 2}\n" for i in range(10)))
    out, options = ScanStore(str(tmp_path / "scan")), SourceOptions(unit_size=3)
    with PlanRecordsWriter(out) as sink:
        out.save_plan(plan_source(str(manifest), options, sink=sink))
    manifest.write_text("uri,label,caption\n" + "".join(f"s3://b/{i:02d}.jpg,{i % 2},c{i}\n" for i in range(14)))
    with PlanRecordsWriter(out) as sink:
        plan, added, _ = update_plan(out.load_plan(), options, out.known_uris(out.load_plan()), sink)
    out.save_plan(plan)
    assert len(plan.units) == 6 and len(added) == 2 and len({u.file for u in plan.units}) == 3

    def number(uri):
        return int(uri.rsplit("/", 1)[-1][:2])

    keep = {u.unit_id: np.array([number(r["uri"]) % 3 != 0 for r in out.unit_records(u).to_pylist()])
            for u in plan.units}
    written = write_filtered(out, out, keep, mode, 0.5, "explicit --threshold")  # the copy goes beside the scan
    got = pq.read_table(tmp_path / "scan" / "filtered" / "manifest.parquet")
    assert got.schema.metadata[b"mirror_threshold_method"] == b"explicit --threshold"
    assert written == got.num_rows and "_unit" not in got.column_names
    rows = got.to_pylist()
    if mode == "drop":
        assert [number(r["uri"]) for r in rows] == [i for i in range(14) if i % 3]
    else:
        assert [number(r["uri"]) for r in rows] == list(range(14))
        assert [r[KEEP_COLUMN] for r in rows] == [i % 3 != 0 for i in range(14)]
    assert [r["caption"] for r in rows] == [None if number(r["uri"]) < 10 else f"c{number(r['uri'])}" for r in rows]


def test_a_parquet_writer_publishes_whole_or_nothing(tmp_path):
    from pipeline.storage import Location

    out = Location(str(tmp_path / "out"))
    schema = pa.schema([("n", pa.int64())])
    with out.parquet_writer("a/t.parquet", schema) as writer:
        for k in range(3):
            writer.write_table(pa.table({"n": [k, k]}, schema=schema))
        assert not (tmp_path / "out" / "a" / "t.parquet").exists()  # not before the block ends
    assert pq.read_table(tmp_path / "out" / "a" / "t.parquet")["n"].to_pylist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(RuntimeError, match="stop"):
        with out.parquet_writer("a/u.parquet", schema) as writer:
            writer.write_table(pa.table({"n": [1]}, schema=schema))
            raise RuntimeError("stop")
    assert sorted(p.name for p in (tmp_path / "out" / "a").iterdir()) == ["t.parquet"]  # no file, no spool


def test_the_summary_lists_the_most_flagged_groups_of_many():
    from pipeline.audit.audit import SUMMARY_GROUPS, group_summary, summary_groups

    names = [f"g{i:04d}" for i in range(3 * SUMMARY_GROUPS)]
    codes = np.repeat(np.arange(len(names)), 4)
    prob = np.tile([0.1, 0.2, 0.9, 0.3], len(names))
    prob[codes % 7 == 0] = 0.95  # every 7th group: all four flagged
    groups = group_summary(names, np.bincount(codes), codes, prob, 0.5)
    listed = summary_groups(groups)
    assert len(listed) == SUMMARY_GROUPS and [g["group"] for g in listed] == sorted(g["group"] for g in listed)
    most = [f"g{i:04d}" for i in range(0, len(names), 7)]
    assert {g["group"] for g in listed} >= set(most) and all(g["flagged"] >= 1 for g in listed)


def test_the_tally_gives_the_same_outputs_in_batches_of_any_size(tmp_path):
    """Parts streamed in batches of a few rows or all at once: the same flagged rows (in
    part order), keep flags per unit, top rows (ties: the earlier first) and group figures."""
    from pipeline.audit.audit import AuditConfig, AuditTally, flagged_schema, group_keys, part_batches
    from pipeline.storage import Location

    rng = np.random.default_rng(3)
    parts = []
    for u in range(12):
        n = int(rng.integers(1, 9))
        err = rng.random(n) < 0.2
        prob = np.round(rng.random(n), 1)  # ties across parts
        parts.append((f"unit{u:02d}", pa.table({
            "uri": [f"s3://b/{SOURCES[u % 3]}/{u}-{i}.jpg" for i in range(n)], "id": [f"{u}-{i}" for i in range(n)],
            "prob_fake": pa.array([None if e else p for p, e in zip(prob, err)], pa.float64()),
            "error": pa.array(["decode failed" if e else None for e in err], pa.string())})))
    cfg, out = AuditConfig(prefix_depth=1), Location(str(tmp_path))

    def tally(batch_rows):
        with out.parquet_writer(f"flagged-{batch_rows}.parquet", flagged_schema("g", 0.5, "m")) as writer:
            t = AuditTally(0.5, 5, writer, "g", "m")
            for batch in part_batches(parts, batch_rows):
                t.add(batch, lambda rows: group_keys(rows, cfg, "s3://b"))
            t.flush()
        return t, pq.read_table(tmp_path / f"flagged-{batch_rows}.parquet")

    small, flagged_small = tally(5)
    whole, flagged_whole = tally(10**6)
    rows = pa.concat_tables([t for _, t in parts]).to_pylist()
    want = [r for r in rows if r["error"] is None and r["prob_fake"] > 0.5]
    for t, flagged in ((small, flagged_small), (whole, flagged_whole)):
        assert flagged["id"].to_pylist() == [r["id"] for r in want] and t.n_flagged == len(want)
        assert flagged["g"].to_pylist() == [r["uri"].split("/")[3] for r in want]
        assert set(flagged["threshold_method"].to_pylist()) == {"m"} and t.rows == len(rows)
        assert {u: k.tolist() for u, k in t.keep.items()} == {
            u: [not (e is None and (p or 0) > 0.5) for p, e in zip(p_["prob_fake"].to_pylist(), p_["error"].to_pylist())]
            for u, p_ in parts}
        top = sorted(want, key=lambda r: -r["prob_fake"])[:5]  # Python's sort is stable too
        assert t.top["id"].to_pylist() == [r["id"] for r in top]
        assert [parts[int(u[4:])][1]["id"][i].as_py() for u, i in zip(t.top["_unit"].to_pylist(),
                                                                     t.top["_index"].to_pylist())] == [r["id"] for r in top]
    assert small.groups().to_pylist() == whole.groups().to_pylist()
    assert [g["group"] for g in whole.groups().to_pylist()] == list(SOURCES)


def test_a_group_by_column_no_record_has_fails_before_anything_is_scored(parity_bundle, tmp_path, capsys):
    """Parquet shards and a CSV manifest: the column is looked for in the planned input's
    columns (footers), so a misspelt one fails in seconds, not after the whole scan; the
    plan stays for the corrected rerun."""
    shards, _ = corpus_shards(tmp_path)
    write_image(tmp_path / "m" / "a.jpg", seed=1)
    (tmp_path / "list.csv").write_text(f"uri,site\n{tmp_path / 'm' / 'a.jpg'},siteA\n")
    for source, typo, carried in ((shards, "sorce", "caption, source"), (tmp_path / "list.csv", "region", "site")):
        out = tmp_path / f"audit-{typo}"
        assert main(["audit", "--model", str(parity_bundle), "--input", str(source), "--output", str(out),
                     "--threshold", "0.5", "--group-by", typo]) == 2
        err = capsys.readouterr().err
        assert f"--group-by '{typo}': no such column in {source}" in err and f"its own columns: {carried};" in err, err
        assert (out / "scan" / "_plan").is_dir()  # planned, kept for the rerun
        assert not list((out / "scan").glob("scores/*.parquet"))  # nothing scored


def test_an_image_gone_or_changed_since_the_scan_keeps_its_explanation_row_with_the_reason(parity_bundle, tmp_path):
    """The heatmaps read the flagged images again after the scan: one removed or rewritten
    since must not end the audit (nor be explained as another image)."""
    from mirror_core.bundle import load_bundle
    from pipeline.audit.audit import explain_top
    from pipeline.audit.report import write_audit_report
    from pipeline.scan.sources import ColumnMap, SourceOptions, plan_source
    from pipeline.scan.store import PlanRecordsWriter, ScanStore
    from pipeline.storage import Location

    for i in range(3):
        write_image(tmp_path / "in" / f"{i}.png", seed=i)
    scan = ScanStore(str(tmp_path / "scan"))
    with PlanRecordsWriter(scan) as sink:
        plan = plan_source(str(tmp_path / "in"), SourceOptions(), sink=sink)
    scan.save_plan(plan)
    (tmp_path / "in" / "0.png").unlink()
    (tmp_path / "in" / "1.png").write_bytes(b"no longer an image")
    top = pa.table({"uri": [str(tmp_path / "in" / f"{i}.png") for i in range(3)], "id": ["a", "b", "c"],
                    "prob_fake": [0.9, 0.8, 0.7], "_unit": [plan.units[0].unit_id] * 3, "_index": [0, 1, 2]})
    out = Location(str(tmp_path / "audit"))
    table = explain_top(out, scan, load_bundle(str(parity_bundle)), top, 0.5, "explicit --threshold", ColumnMap(),
                        None)
    rows = table.to_pylist()
    assert rows[0]["error"].startswith("read failed: FileNotFoundError") and rows[0]["grid"] is None
    assert rows[1]["error"].startswith("decode failed: ") and rows[1]["heatmap"] is None
    assert rows[2]["error"] is None and len(rows[2]["grid"]) == 196
    assert pq.read_table(tmp_path / "audit" / "explanations.parquet").num_rows == 3
    result = {"input": "in", "model_id": "m", "rows": 3, "scored": 3, "errors": 0, "errors_by_kind": {},
              "flagged": 3, "flagged_fraction": 1.0, "filter_mode": "drop", "filtered_rows": 0, "threshold": 0.5,
              "threshold_method": "explicit --threshold", "group_column": "g", "groups": [], "groups_total": 0}
    write_audit_report(out, result, np.array([0.9, 0.8, 0.7]), table)
    report = (tmp_path / "audit" / "audit_report.md").read_text()
    assert "not explained: read failed: FileNotFoundError" in report and rows[2]["heatmap"] in report
