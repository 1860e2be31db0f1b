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
from pipeline.scan.schema import VERSION
from pipeline.scan.sources import SourceOptions, plan_source, update_plan
from pipeline.scan.uri_set import UriSet


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


def test_an_update_keeps_units_and_adds_new_shard_row_groups(tmp_path):
    import pyarrow as pa

    data = write_image(tmp_path / "x.png")
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"bytes": [data] * 4}), tmp_path / "shards" / "a.parquet", row_group_size=2)
    plan = plan_source(str(tmp_path / "shards"), SourceOptions())
    pq.write_table(pa.table({"bytes": [data] * 3}), tmp_path / "shards" / "b.parquet", row_group_size=2)
    extended, added, _ = update_plan(plan, SourceOptions(), UriSet())
    assert extended.units[:2] == plan.units and [u.rows for u in added] == [2, 1]
    assert all(u.file.endswith("b.parquet") for u in added)
    write_image(tmp_path / "shards" / "now-a-folder.png")
    with pytest.raises(ValueError, match="planned as parquet, now looks like folder"):
        update_plan(plan, SourceOptions(), UriSet())


def test_a_uri_set_holds_digests_and_answers_membership():
    import pyarrow as pa

    known = UriSet([pa.array(["s3://b/a.jpg", "s3://b/b.jpg"]), pa.chunked_array([["s3://b/c.jpg", None]])])
    assert len(known) == 4 and known.digests.nbytes == 4 * 16
    asked = pa.array(["s3://b/c.jpg", "s3://b/d.jpg", "s3://b/a.jpg", "s3://b/a.jpg ", None, "s3://b/b.jpg"])
    assert known.contains(asked).tolist() == [True, False, True, False, True, True]
    assert UriSet().contains(asked).tolist() == [False] * 6


@pytest.mark.parametrize("kind", ["folder", "manifest"])
def test_an_update_streams_the_new_listing_and_plans_what_a_whole_one_would(tmp_path, monkeypatch, kind):
    """New files between and after the planned ones (a folder), or rows added to a manifest:
    streamed in batches and chunks smaller than a unit, the new units and their records are
    those of the new records planned whole; the stored ones are known by their digests."""
    import pyarrow as pa

    from pipeline.scan import sources, store
    from pipeline.scan.sources import inline_units, list_images
    from pipeline.scan.store import PlanRecordsWriter, ScanStore

    monkeypatch.setattr(sources, "STREAM_BATCH_ROWS", 5)
    monkeypatch.setattr(sources, "STREAM_CHUNK_UNITS", 2)
    monkeypatch.setattr(store, "UNITS_PER_RECORDS_FILE", 3)
    root = tmp_path / "in"
    names = [f"{d}/{i:03d}.jpg" for d in ("a", "c") for i in range(0, 40, 2)]
    later = [f"{d}/{i:03d}.jpg" for d in ("a", "b", "c", "d") for i in range(1, 12, 2)]

    def write(files):
        if kind == "folder":
            for n in files:
                (root / n).parent.mkdir(parents=True, exist_ok=True)
                (root / n).write_bytes(b"")
        else:  # a manifest, its rows in the order given
            pq.write_table(pa.table({"uri": [f"s3://b/{n}" for n in files], "label": [n[0] == "c" for n in files]}),
                           tmp_path / "list.parquet")

    write(names)
    uri = str(root if kind == "folder" else tmp_path / "list.parquet")
    out = ScanStore(str(tmp_path / "out"))
    options = SourceOptions(unit_size=4)
    with PlanRecordsWriter(out) as sink:
        plan = plan_source(uri, options, sink=sink)
    out.save_plan(plan)
    write(names + later)
    known = out.known_uris(plan)
    assert len(known) == len(names)
    with PlanRecordsWriter(out) as sink:
        updated, added, _ = update_plan(out.load_plan(), options, known, sink)
    everything = list_images(uri) if kind == "folder" else pq.read_table(uri).set_column(
        1, "label", pa.array([int(v) for v in pq.read_table(uri)["label"].to_pylist()]))
    new = everything.filter(pa.array([u not in set(out.plan_records(plan, ["uri"])["uri"].to_pylist())
                                      for u in everything["uri"].to_pylist()]))
    assert new.num_rows == len(later)
    units, records = inline_units(new, 4, f"{uri}@{len(plan.units)}")
    assert [(u.unit_id, u.rows) for u in added] == [(u.unit_id, u.rows) for u in units]
    assert updated.units[:len(plan.units)] == plan.units and updated.records.num_rows == 0
    out.save_plan(updated)
    stored = pa.concat_tables([out.unit_records(u) for u in out.load_plan().units[len(plan.units):]])
    if kind == "folder":  # listed with each file's version
        assert all(stored[VERSION].to_pylist())
        stored = stored.drop_columns([VERSION])
    assert stored.to_pylist() == records.to_pylist()
    with PlanRecordsWriter(out) as sink:
        _, none, _ = update_plan(out.load_plan(), options, out.known_uris(out.load_plan()), sink)
    assert none == []


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
