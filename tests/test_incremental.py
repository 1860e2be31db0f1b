"""Incremental scans: --update adds what is new to the plan and scores only that;
--retry-errors heals rows whose read failed, replacing their units' parts."""
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import write_image
from s3_faults import FaultProxy

from pipeline.scan.config import ScanConfig
from pipeline.scan.run import run_scan
from pipeline.scan.sources import SourceOptions, extend_plan, plan_source


def parts(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "scores").glob("part-*.parquet")}


def test_update_scores_exactly_the_new_files(ray_local, parity_bundle, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(6):
        write_image(src / f"{i}.png", seed=i)
    first = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(unit_size=2))
    before = parts(out)
    for i in range(6, 9):
        write_image(src / f"{i}.png", seed=i)
    plain = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(unit_size=2))
    assert plain["this_run"]["rows"] == 0 and plain["rows_out"] == 6  # the plan is fixed without --update
    updated = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(unit_size=2, update=True))
    assert first["units"]["total"] == 3 and updated["units"]["new"] == 2 and updated["units"]["total"] == 5
    assert updated["this_run"]["rows"] == 3 and updated["rows_in"] == updated["rows_out"] == 9
    after = parts(out)
    assert {k: after[k] for k in before} == before  # finished units are never rewritten
    uris = pq.read_table(out / "scores")["uri"].to_pylist()
    assert sorted(uris) == sorted(str(src / f"{i}.png") for i in range(9))
    again = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(unit_size=2, update=True))
    assert again["units"]["new"] == 0 and again["this_run"]["rows"] == 0 and again["rows_out"] == 9


def test_extend_plan_keeps_units_and_adds_new_shard_row_groups(tmp_path):
    import pyarrow as pa

    data = write_image(tmp_path / "x.png")
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"bytes": [data] * 4}), tmp_path / "shards" / "a.parquet", row_group_size=2)
    plan = plan_source(str(tmp_path / "shards"), SourceOptions())
    pq.write_table(pa.table({"bytes": [data] * 3}), tmp_path / "shards" / "b.parquet", row_group_size=2)
    extended, added = extend_plan(plan, plan_source(str(tmp_path / "shards"), SourceOptions()), 256)
    assert extended.units[:2] == plan.units and [u.rows for u in added] == [2, 1]
    assert all(u.file.endswith("b.parquet") for u in added)
    write_image(tmp_path / "shards" / "now-a-folder.png")
    with pytest.raises(ValueError, match="planned as parquet, now looks like folder"):
        extend_plan(plan, plan_source(str(tmp_path / "shards"), SourceOptions()), 256)


def _scan(bucket, endpoint, *extra):
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipeline.commands.cli", "scan", "--model", f"s3://{bucket}/model",
           "--input", f"s3://{bucket}/images", "--output", f"s3://{bucket}/out", "--unit-size", "3", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_retry_errors_heals_exactly_the_rows_a_transient_s3_fault_broke(s3_server, s3_corpus):
    import fsspec

    s3_bucket = s3_corpus
    fs = fsspec.filesystem("s3")
    with FaultProxy(s3_server, deny_prefixes=(f"/{s3_bucket}/images/1_fake",)) as proxy:
        broken = _scan(s3_bucket, proxy.url)
        assert proxy.denied >= 6
    assert broken.returncode == 0, broken.stderr[-3000:]
    fs.invalidate_cache()
    rows = pq.read_table(f"{s3_bucket}/out/scores", filesystem=fs)
    errors = [e for e in rows["error"].to_pylist() if e]
    assert len(errors) == 6 and all(e.startswith("read failed: ") for e in errors)  # 403s through the proxy
    names = sorted(fs.ls(f"{s3_bucket}/out/scores"))
    before = {p: fs.info(p)["ETag"] for p in names}
    healed = _scan(s3_bucket, s3_server, "--retry-errors")
    assert healed.returncode == 0, healed.stderr[-3000:]
    assert "12/12 rows: 12 scored, 0 errors" in healed.stdout
    fs.invalidate_cache()
    after = {p: fs.info(p)["ETag"] for p in sorted(fs.ls(f"{s3_bucket}/out/scores"))}
    changed = {p for p in after if after[p] != before.get(p)}
    assert set(after) == set(before) and len(changed) == 2  # the two units of 1_fake, replaced in place
    rows = pq.read_table(f"{s3_bucket}/out/scores", filesystem=fs)
    assert rows.num_rows == 12 and len(set(rows["uri"].to_pylist())) == 12 and rows["error"].null_count == 12
    summary = fsspec.filesystem("s3").cat(f"{s3_bucket}/out/summary.json")
    assert b'"retried": 2' in summary
