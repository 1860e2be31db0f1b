"""`mirror scan --sample`: a stable fraction of the records of any input, and what it tells."""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import mirror_log_lines, write_image

from pipeline.scan.config import ConfigError, ScanConfig
from pipeline.scan.reads import read_shard_unit
from pipeline.scan.run import run_scan, summary_line
from pipeline.scan.sample import in_sample, sample_figures, shard_row_key, share_interval
from pipeline.scan.sources import ColumnMap, SourceOptions, plan_source, update_plan
from pipeline.scan.status import scan_status, status_lines
from pipeline.scan.store import OutputMismatchError, ScanStore
from pipeline.scan.uri_set import UriSet


def test_the_draw_is_stable_nested_and_near_its_fraction():
    keys = [f"s3://corpus/{i:06d}.jpg" for i in range(20_000)]
    five, one = in_sample(keys, 0.05), in_sample(keys, 0.01)
    assert np.array_equal(five, in_sample(keys, 0.05))  # the same records on every call
    assert not np.any(one & ~five)  # a smaller fraction's sample lies within a larger one's
    sigma = np.sqrt(20_000 * 0.05 * 0.95)
    assert abs(int(five.sum()) - 1_000) < 4 * sigma and 0 < one.sum() < five.sum()
    assert in_sample(keys[:50], 1.0).all() and in_sample([None, ""], 0.5)[0] == in_sample([""], 0.5)[0]


def test_the_flagged_share_interval_is_wilsons():
    low, high = share_interval(5, 100)
    assert low == pytest.approx(0.02154, abs=1e-5) and high == pytest.approx(0.11175, abs=1e-5)
    assert share_interval(0, 40)[0] == 0.0 and 0 < share_interval(0, 40)[1] < 0.1  # no fakes seen: not "0%"
    assert share_interval(0, 0) is None
    figures = sample_figures(0.01, 123_456, 200, 10)
    assert figures["flagged_share"] == 0.05 and figures["drawn_from"] == 123_456
    assert figures["flagged_share_95"][0] < 0.05 < figures["flagged_share_95"][1]


def test_settings_refuse_a_fraction_outside_zero_to_one_and_audits_refuse_any():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"sample must be a fraction within \(0, 1\]"):
            ScanConfig(sample=bad)
    with pytest.raises(ConfigError, match="sample .* is for mirror scan: an audit reads every image"):
        ScanConfig(sample=0.1).whole_input("an audit")
    ScanConfig().whole_input("an audit")


def write_tar(path, names_and_bytes):
    with tarfile.open(path, "w") as tar:
        for name, data in names_and_bytes:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_every_input_form_plans_the_records_whose_uri_is_drawn(tmp_path):
    data = write_image(tmp_path / "one.png")
    folder = tmp_path / "folder"
    for i in range(120):
        write_image(folder / f"{i:03d}.png", seed=i)
    (tmp_path / "list.csv").write_text("uri\n" + "".join(f"{folder}/{i:03d}.png\n" for i in range(120)))
    (tmp_path / "tars").mkdir()
    write_tar(tmp_path / "tars" / "a.tar", [(f"{i:03d}.png", data) for i in range(60)])
    write_tar(tmp_path / "tars" / "b.tar", [(f"{i:03d}.png", data) for i in range(60, 120)])
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"bytes": [data] * 120, "n": list(range(120))}), tmp_path / "shards" / "a.parquet",
                   row_group_size=50)
    options = SourceOptions(unit_size=8, sample=0.25)
    for source in (folder, tmp_path / "list.csv", tmp_path / "tars"):
        plan = plan_source(str(source), options)
        uris = plan.records["uri"].to_pylist()
        listed = plan_source(str(source), SourceOptions(unit_size=8)).records["uri"].to_pylist()
        assert uris == [u for u, keep in zip(listed, in_sample(listed, 0.25)) if keep], source
        assert plan.sample == 0.25 and plan.drawn_from == 120 and plan.total_rows == len(uris) < 60, source
    shard = str(tmp_path / "shards" / "a.parquet")
    plan = plan_source(str(tmp_path / "shards"), options)
    assert plan.drawn_from == 120 and [u.group_rows for u in plan.units] == [50, 50, 20]
    rows = [read_shard_unit(u, ColumnMap(), with_bytes=False) for u in plan.units]
    assert [r.num_rows for r in rows] == [u.rows for u in plan.units]
    kept = [int(n) for r in rows for n in r["n"].to_pylist()]
    keys = [shard_row_key(shard, i // 50, i % 50) for i in range(120)]
    assert kept == [i for i in range(120) if in_sample([keys[i]], 0.25)[0]]
    assert [u for r in rows for u in r["uri"].to_pylist()] == [keys[i] for i in kept]  # a row's place names it


def test_an_update_draws_from_what_is_new_and_keeps_the_fraction(tmp_path):
    folder = tmp_path / "in"
    for i in range(40):
        write_image(folder / f"{i:03d}.png", seed=i)
    options = SourceOptions(unit_size=4, sample=0.5)
    plan = plan_source(str(folder), options)
    for i in range(40, 80):
        write_image(folder / f"{i:03d}.png", seed=i)
    known = UriSet([plan.records["uri"]])
    extended, added, _ = update_plan(plan, options, known)
    new = extended.records["uri"].to_pylist()[plan.records.num_rows:]
    listed = [str(folder / f"{i:03d}.png") for i in range(40, 80)]
    assert new == [u for u, keep in zip(listed, in_sample(listed, 0.5)) if keep]
    assert extended.drawn_from == 80 and extended.sample == 0.5
    with pytest.raises(ValueError, match="planned as a sample of 0.5, now 0.1"):
        update_plan(plan, SourceOptions(unit_size=4, sample=0.1), known)


@pytest.mark.slow
def test_a_sampled_scan_scores_the_sample_and_says_what_it_tells(ray_local, parity_bundle, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(48):
        write_image(src / f"{i:03d}.png", seed=i)
    cfg = ScanConfig(unit_size=4, sample=0.25)
    summary = run_scan(str(parity_bundle), str(src), str(out), cfg)
    listed = [str(src / f"{i:03d}.png") for i in range(48)]
    drawn = [u for u, keep in zip(listed, in_sample(listed, 0.25)) if keep]
    scored = pq.read_table(out / "scores")
    assert sorted(scored["uri"].to_pylist()) == drawn and summary["rows_out"] == summary["rows_in"] == len(drawn)
    figures = json.loads((out / "summary.json").read_text())["sample"]
    assert figures["fraction"] == 0.25 and figures["drawn_from"] == 48
    low, high = figures["flagged_share_95"]
    assert low <= summary["flagged"] / summary["scored"] <= high
    assert summary_line(summary).startswith("a 25% sample of 48 records (flagged share in the whole input: ")
    assert "a 25% sample of 48" in status_lines(scan_status(str(out)))[1]

    for i in range(48, 72):
        write_image(src / f"{i:03d}.png", seed=i)
    updated = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(unit_size=4, sample=0.25, update=True))
    listed = [str(src / f"{i:03d}.png") for i in range(72)]
    drawn = [u for u, keep in zip(listed, in_sample(listed, 0.25)) if keep]
    assert sorted(pq.read_table(out / "scores")["uri"].to_pylist()) == drawn
    assert updated["sample"]["drawn_from"] == 72 and updated["rows_out"] == len(drawn)
    # a file the draw leaves out (which names are drawn depends on the folder: found, not assumed)
    candidates = [src / f"zz-{k}.png" for k in range(100)]
    left_out = next(c for c, drawn in zip(candidates, in_sample(map(str, candidates), 0.25)) if not drawn)
    left_out.write_bytes((src / "000.png").read_bytes())
    again = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(unit_size=4, sample=0.25, update=True))
    assert again["this_run"]["rows"] == 0 and again["sample"]["drawn_from"] == 73
    assert ScanStore(str(out)).read_plan().drawn_from == 73 and "of 73" in status_lines(scan_status(str(out)))[1]
    with pytest.raises(OutputMismatchError, match=r"sample: 0.25 there, 0.1 now"):  # not within the output's
        run_scan(str(parity_bundle), str(src), str(out), ScanConfig(unit_size=4, sample=0.1))
    assert ScanStore(str(out)).read_plan().sample == 0.25
    # a larger draw grows the output in place: what it adds is scored, the rows scored stay
    parts = {p.name: p.stat().st_mtime_ns for p in (out / "scores").glob("part-*.parquet")}
    with mirror_log_lines() as said:
        grown = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(unit_size=4, sample=0.5))
    listed = sorted(map(str, src.iterdir()))
    drawn = [u for u, keep in zip(listed, in_sample(listed, 0.5)) if keep]
    added = len(drawn) - updated["rows_out"]
    assert any(line.startswith(f"re-listing {src} for a sample of 0.5 (a sample of 0.25 so far): done")
               and f"{added} new records in" in line for line in said), said
    assert sorted(pq.read_table(out / "scores")["uri"].to_pylist()) == drawn and grown["rows_out"] == len(drawn)
    assert grown["this_run"]["rows"] == len(drawn) - updated["rows_out"]
    assert all((out / "scores" / name).stat().st_mtime_ns == t for name, t in parts.items())
    assert grown["sample"]["fraction"] == 0.5 and ScanStore(str(out)).read_plan().sample == 0.5
    assert json.loads((out / "_scan.json").read_text())["sample"] == 0.5
    whole = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(unit_size=4))  # no --sample: all of it
    assert whole["rows_out"] == 73 and "sample" not in whole and ScanStore(str(out)).read_plan().sample is None

    shards, out2 = tmp_path / "shards", tmp_path / "out2"
    shards.mkdir()
    data = (src / "000.png").read_bytes()
    pq.write_table(pa.table({"bytes": [data] * 30}), shards / "a.parquet", row_group_size=10)
    run_scan(str(parity_bundle), str(shards), str(out2), ScanConfig(sample=0.3))
    keys = [shard_row_key(str(shards / "a.parquet"), i // 10, i % 10) for i in range(30)]
    rows = pq.read_table(out2 / "scores")
    assert sorted(rows["uri"].to_pylist()) == sorted(k for k, keep in zip(keys, in_sample(keys, 0.3)) if keep)
    assert rows["error"].null_count == rows.num_rows
    with pytest.raises(OutputMismatchError, match=r"holds a sample of 0.3 of parquet input: a larger draw grows in "
                                                  r"place for folders and manifests only; choose a new --output"):
        run_scan(str(parity_bundle), str(shards), str(out2), ScanConfig(sample=0.6))
