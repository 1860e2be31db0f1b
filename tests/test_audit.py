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
    out = f"s3://{s3_bucket}/audit"
    assert main(["audit", "--model", str(parity_bundle), "--input", f"s3://{s3_bucket}/corpus", "--output", out,
                 "--threshold", "0.5", "--prefix-depth", "1", "--filter", "mark", "--top-n", "2"]) == 0
    summary = json.loads(fs.cat(f"{s3_bucket}/audit/audit_summary.json"))
    assert summary["threshold"] == 0.5 and summary["threshold_method"] == "explicit --threshold"
    groups = {g["uri_prefix_1"]: g for g in summary["groups"]}
    assert set(groups) == set(SOURCES) and all(g["count"] == 3 for g in groups.values())
    manifest = pq.read_table(io.BytesIO(fs.cat(f"{s3_bucket}/audit/filtered/manifest.parquet")))
    assert manifest.num_rows == 9 and "mirror_keep" in manifest.column_names
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
    rows = pa.table({"prob_fake": pa.array([None if e else p for p, e in zip(prob, err)], pa.float64()),
                     "error": pa.array(err, pa.string())})
    got = group_summary(rows, keys, 0.5).to_pylist()
    assert [g["group"] for g in got] == ["g0", "g1", "g2", "g3", "only-errors", None]
    is_err = np.array([e is not None for e in err])
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
