"""End to end on a real local Ray: the scan plan, sources, outputs, exactly-once."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import mirror_log_lines, write_image

from pipeline.scan.config import ScanConfig
from pipeline.scan.run import run_scan

pytestmark = pytest.mark.slow


def read_scores(out):
    return pq.read_table(os.path.join(out, "scores")).sort_by("uri")


def test_parity_fixture_through_ray_matches_official_scores(ray_local, parity_bundle, parity_dir, tmp_path):
    summary = run_scan(str(parity_bundle), str(parity_dir / "data" / "WildRF" / "test"), str(tmp_path / "out"),
                       ScanConfig(unit_size=7, batch_size=5, actors=2))
    expected = {r["path"]: r for r in csv.DictReader(open(parity_dir / "expected_scores.csv"))}
    rows = read_scores(tmp_path / "out").to_pylist()
    assert len(rows) == 48 == summary["rows_in"] == summary["scored"]
    for row in rows:
        exp = expected[os.path.relpath(row["uri"], parity_dir / "data")]
        assert abs(row["logit_real"] - float(exp["logit_real"])) < 1e-3
        assert abs(row["logit_fake"] - float(exp["logit_fake"])) < 1e-3
        assert row["pred"] == int(exp["pred"]) and row["label"] == int(exp["label"]) and row["subset"] == exp["subset"]
        assert row["error"] is None and row["preprocess"] == "official/align=by-extension"
        assert row["precision"] == "fp32" == summary["this_run"]["precision"]  # resolved: a CPU scan's default
        assert len(row["id"]) == 64  # content sha256 when no id is given
    official = {r["Dataset"]: r for r in csv.DictReader(open(parity_dir / "official_results" / "WildRF_official.csv"))}
    for subset in ("facebook", "reddit", "twitter"):
        for metric in ("Acc", "Real_Acc", "Fake_Acc", "Bal_Acc", "AUC", "AP"):
            assert summary["metrics"][subset][metric] == pytest.approx(float(official[subset][metric]), abs=1e-6)
    assert summary["this_run"]["stage_busy_s"]["decode"] > 0 and summary["this_run"]["stage_busy_s"]["score"] > 0
    # the fixture's 19 RGB JPEGs (of 48 files: PNG, WebP, BMP besides) decoded only where their crops read
    assert summary["this_run"]["jpeg_region_decoded"] == 19
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["model_id"] == summary["model_id"] and on_disk["config"]["unit_size"] == 7
    assert on_disk["config"]["cpus_per_actor"] == 1.0  # resolved and recorded: 4 CPUs - 2 for decode, 2 actors


def test_units_share_blocks_and_still_commit_one_part_each(ray_local, parity_bundle, parity_dir, tmp_path):
    """48 one-record units on 4 decode slots travel 3 to a block (Ray Data's cost is per
    block); each is still its own part with its own record, scored as the official script."""
    from pipeline.scan.run import MAX_UNITS_PER_BLOCK, units_per_block

    assert units_per_block(48, 4) == 3 and units_per_block(10, 4) == 1
    assert units_per_block(10**6, 4) == MAX_UNITS_PER_BLOCK
    with mirror_log_lines() as said:  # a progress line at every completion but the last
        summary = run_scan(str(parity_bundle), str(parity_dir / "data" / "WildRF" / "test"), str(tmp_path / "out"),
                           ScanConfig(unit_size=1, batch_size=8, progress_every_s=1e-9))
    done = [int(m.group(1)) for m in map(re.compile(r"^scoring: (\d+) / 48 rows \(\d+\.\d%\)").match, said) if m]
    assert done and done == sorted(done) and done[-1] < 48, said
    assert "rows/s, about" in said[-1]
    assert summary["this_run"]["pipeline"]["units_per_block"] == 3
    assert len(list((tmp_path / "out" / "scores").glob("*.parquet"))) == 48 == summary["units"]["committed_now"]
    expected = {r["path"]: float(r["logit_fake"]) for r in csv.DictReader(open(parity_dir / "expected_scores.csv"))}
    rows = read_scores(tmp_path / "out").to_pylist()
    assert sorted(os.path.relpath(r["uri"], parity_dir / "data") for r in rows) == sorted(expected)
    assert all(abs(r["logit_fake"] - expected[os.path.relpath(r["uri"], parity_dir / "data")]) < 1e-3 for r in rows)


def test_cpu_scorers_get_the_node_less_decode_cpus_unless_set(ray_local, monkeypatch):
    from pipeline.cluster import resources_line
    from pipeline.scan.run import scoring_cpus

    assert re.fullmatch(r"nodes: 1 alive; CPU [\d.]+ of 4 free", resources_line())  # what a stall report says

    # The ray_local node has 4 logical CPUs; 2 stay for decoding.
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert scoring_cpus(ScanConfig()) == 2.0
    assert scoring_cpus(ScanConfig(actors=2)) == 1.0
    assert scoring_cpus(ScanConfig(actors=1, max_actors=2)) == 1.0  # room to scale up
    assert scoring_cpus(ScanConfig(actors=9)) == 1.0  # never 0
    assert scoring_cpus(ScanConfig(cpus_per_actor=0.5)) == 0.5  # set: as set
    assert scoring_cpus(ScanConfig(gpus_per_actor=1)) == 1.0
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert scoring_cpus(ScanConfig()) == 1.0  # capped at the machine's cores


def test_work_no_node_could_run_is_refused_on_a_local_ray_and_named_on_a_cluster(ray_local, parity_bundle, tmp_path,
                                                                                 monkeypatch):
    """A local Ray never grows: a scoring actor asking for a GPU it lacks (or a decode task
    for more memory than it has) would wait forever. A cluster's autoscaler may add one:
    there a warning says what the scan waits for."""
    from pipeline.cluster import ResourcesError, require_placeable

    write_image(tmp_path / "in" / "a.png")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ResourcesError, match=r"a scoring actor .* asks for 1 CPU, 1 GPU, and no node has as much "
                                             r"\(the most a node has: 4 CPU, 0 GPU\) on this machine's Ray"):
        run_scan(str(parity_bundle), str(tmp_path / "in"), str(tmp_path / "out"), ScanConfig(gpus_per_actor=1))
    with pytest.raises(ResourcesError, match=r"a decode task .* asks for 1 CPU, 4\.88e\+03 GiB memory"):
        run_scan(str(parity_bundle), str(tmp_path / "in"), str(tmp_path / "out"),
                 ScanConfig(decode_task_memory_mb=5_000_000))
    assert run_scan(str(parity_bundle), str(tmp_path / "in"), str(tmp_path / "out"), ScanConfig())["scored"] == 1
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # a cluster, as a job joins one
    with mirror_log_lines() as said:
        require_placeable({"a scoring actor": {"CPU": 1, "GPU": 2}}, None, "hint")
    assert said == ["a scoring actor asks for 1 CPU, 2 GPU, and no node has as much (the most a node has: 4 CPU, 0 "
                    "GPU): it waits for the cluster to add nodes (hint)"]


def make_mixed_folder(root):
    for i in range(5):
        write_image(root / "genX" / "1_fake" / f"f{i}.png", seed=i)
        write_image(root / "genX" / "0_real" / f"r{i}.JPG", seed=10 + i, size=(700, 600))
    (root / "genX" / "0_real" / "zero.jpg").write_bytes(b"")
    (root / "genX" / "1_fake" / "html.png").write_text("<html><body>404</body></html>")
    good = write_image(root / "genX" / "1_fake" / "cut.jpg", seed=99, size=(320, 320))
    (root / "genX" / "1_fake" / "cut.jpg").write_bytes(good[:200])  # truncated inside the entropy data
    return 13


def test_unreadable_files_still_give_one_row_each(ray_local, parity_bundle, tmp_path):
    n = make_mixed_folder(tmp_path / "in")
    summary = run_scan(str(parity_bundle), str(tmp_path / "in"), str(tmp_path / "out"), ScanConfig(unit_size=4))
    rows = read_scores(tmp_path / "out")
    assert rows.num_rows == n == summary["rows_in"] == summary["rows_out"]
    by_name = {os.path.basename(r["uri"]): r for r in rows.to_pylist()}
    assert by_name["zero.jpg"]["error"] == "empty file (0 bytes)" and by_name["zero.jpg"]["pred"] is None
    assert by_name["html.png"]["error"].startswith("decode failed") and by_name["html.png"]["prob_fake"] is None
    assert len(set(r["uri"] for r in rows.to_pylist())) == n
    assert summary["errors"] == sum(r["error"] is not None for r in rows.to_pylist()) >= 2
    assert all(r["pred"] is not None for r in rows.to_pylist() if r["error"] is None)


def test_parquet_shards_carry_extra_columns_with_custom_names(ray_local, parity_bundle, tmp_path):
    images = [write_image(tmp_path / "src" / f"{i}.png", seed=i) for i in range(6)]
    table = pa.table({
        "img": images + [b"garbage"],
        "key": [f"k{i}" for i in range(7)],
        "truth": ["real", "fake", "real", "fake", "real", "fake", "fake"],
        "caption": [f"caption {i}" for i in range(7)],
        "meta": [{"w": i} for i in range(7)],
        "width": [-1] * 7,  # clashes with an output column: kept as input_width
    })
    (tmp_path / "shards").mkdir()
    pq.write_table(table.slice(0, 4), tmp_path / "shards" / "a.parquet", row_group_size=3)
    pq.write_table(table.slice(4), tmp_path / "shards" / "b.parquet")
    cfg = ScanConfig(columns={"bytes": "img", "id": "key", "label": "truth"})
    summary = run_scan(str(parity_bundle), str(tmp_path / "shards"), str(tmp_path / "out"), cfg)
    assert summary["input_format"] == "parquet" and summary["units"]["total"] == 3
    rows = sorted(read_scores(tmp_path / "out").to_pylist(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == [f"k{i}" for i in range(7)]
    assert [r["label"] for r in rows] == [0, 1, 0, 1, 0, 1, 1]
    assert [r["caption"] for r in rows] == [f"caption {i}" for i in range(7)]
    assert [r["meta"] for r in rows] == [{"w": i} for i in range(7)]
    assert all(r["input_width"] == -1 for r in rows) and rows[0]["width"] == 64
    assert rows[6]["error"].startswith("decode failed") and all(r["error"] is None for r in rows[:6])
    assert "img" not in read_scores(tmp_path / "out").column_names


def test_manifest_csv_with_missing_file_and_unlabeled_input(ray_local, parity_bundle, tmp_path):
    uris = [str(tmp_path / "imgs" / f"{i}.jpg") for i in range(4)]
    for i, uri in enumerate(uris):
        write_image(tmp_path / "imgs" / f"{i}.jpg", seed=i)
    uris.append(str(tmp_path / "imgs" / "gone.jpg"))
    manifest = tmp_path / "list.csv"
    manifest.write_text("uri,source\n" + "".join(f"{u},site{i % 2}\n" for i, u in enumerate(uris)))
    summary = run_scan(str(parity_bundle), str(manifest), str(tmp_path / "out"), ScanConfig(unit_size=2))
    rows = read_scores(tmp_path / "out").to_pylist()
    assert len(rows) == 5 and summary["input_format"] == "manifest" and "metrics" not in summary
    assert [r["source"] for r in rows] == ["site0", "site1", "site0", "site1", "site0"]
    assert rows[4]["error"].startswith("read failed: FileNotFoundError") and rows[4]["id"] is None
    assert all(r["label"] is None for r in rows)


def test_rerun_skips_finished_units_and_refuses_another_model(ray_local, parity_bundle, tmp_path):
    from mirror_core.bundle import load_bundle, save_bundle
    from pipeline.scan.store import OutputMismatchError

    for i in range(6):
        write_image(tmp_path / "in" / f"{i}.png", seed=i)
    first = run_scan(str(parity_bundle), str(tmp_path / "in"), str(tmp_path / "out"), ScanConfig(unit_size=2))
    again = run_scan(str(parity_bundle), str(tmp_path / "in"), str(tmp_path / "out"), ScanConfig(unit_size=2))
    assert first["units"]["committed_now"] == 3 and again["units"]["skipped_done"] == 3
    assert again["this_run"]["rows"] == 0 and again["rows_out"] == 6
    bundle = load_bundle(str(parity_bundle))
    other = tmp_path / "other"
    save_bundle(str(other), bundle.config.__class__.from_dict({**bundle.config.to_dict(), "threshold": 0.7}), bundle.weights)
    with pytest.raises(OutputMismatchError, match="threshold"):
        run_scan(str(other), str(tmp_path / "in"), str(tmp_path / "out"), ScanConfig())


def test_killed_scan_resumes_without_duplicates(parity_bundle, tmp_path):
    """Real interruptions: SIGKILL the `mirror scan` process mid-way, then Ctrl-C (SIGINT)
    its rerun, then rerun it to the end."""
    for i in range(24):
        write_image(tmp_path / "in" / ("0_real" if i % 2 else "1_fake") / f"{i:02d}.png", seed=i)
    cmd = [sys.executable, "-m", "pipeline.commands.cli", "scan", "--model", str(parity_bundle), "--input",
           str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--unit-size", "3", "--batch-size", "3"]
    env = {**os.environ, "MIRROR_FAULT_SCORE_DELAY_S": "0.7"}
    (tmp_path / "stalls.yaml").write_text("stall_report_s: 1\n")  # start-up alone commits nothing for seconds
    proc = subprocess.Popen(cmd + ["--config", str(tmp_path / "stalls.yaml")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, text=True)
    console: list[str] = []  # read as it comes: a full pipe would stall the scan
    reader = threading.Thread(target=lambda: console.extend(proc.stdout), daemon=True)
    reader.start()
    scores = tmp_path / "out" / "scores"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(scores.glob("part-*.parquet")) if scores.exists() else []) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join(timeout=30)
    stalls = [line for line in console if "WARNING mirror -- no rows done for" in line]
    assert stalls and re.search(r"\(0 of 24 so far\): nodes: 1 alive; CPU [\d.]+ of [\d.]+ free$", stalls[0]), console[-40:]
    killed = len(list(scores.glob("part-*.parquet")))
    assert 2 <= killed < 7, "the scan was not interrupted mid-way"
    # Ctrl-C: one line, no traceback, what was committed stays
    with open(tmp_path / "interrupted.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, text=True)
        while time.time() < deadline and len(list(scores.glob("part-*.parquet"))) < killed + 1:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    text = (tmp_path / "interrupted.log").read_text()
    assert text.rstrip().endswith("mirror scan: interrupted; what was committed is kept: the same command resumes")
    assert "Traceback" not in text
    done_before = {p.name: p.stat().st_mtime_ns for p in scores.glob("part-*.parquet")}
    assert killed < len(done_before) < 8, "the scan was not interrupted mid-way"
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "24/24 rows: 24 scored, 0 errors" in rerun.stdout
    for name, mtime in done_before.items():
        assert (scores / name).stat().st_mtime_ns == mtime  # finished units were not redone
    rows = read_scores(tmp_path / "out")
    assert rows.num_rows == 24 and len(set(rows["uri"].to_pylist())) == 24
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["units"]["skipped_done"] == len(done_before)


def test_decode_tasks_scoring_actors_and_writers_are_separate_stages(ray_local, parity_bundle, capsys, tmp_path):
    from mirror_core.bundle import load_bundle
    from pipeline.scan.run import build_dataset

    bundle = load_bundle(str(parity_bundle))
    build_dataset([{"key": "0/u", "unit": "{}", "records": None, "target": "{}", "perturbation": ""}], bundle,
                  bundle.config, ScanConfig(), 2**20).explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[MapBatches(decode_units)]" in optimized
    assert "ActorPoolMapOperator[MapBatches(Scorer)]" in optimized
    assert "ActorPoolMapOperator[MapBatches(CommitWriter)]" in optimized  # writes never block a replica


def test_s3_ingest_then_scan_from_s3_to_s3(ray_local, parity_bundle, parity_dir, s3_bucket, tmp_path):
    import fsspec

    from pipeline.commands.cli import main

    fs = fsspec.filesystem("s3")
    fs.put(str(parity_dir / "data" / "WildRF" / "test"), f"{s3_bucket}/raw", recursive=True)
    fs.put(str(parity_bundle), f"{s3_bucket}/models/parity", recursive=True)
    assert main(["ingest", "--input", f"s3://{s3_bucket}/raw", "--output", f"s3://{s3_bucket}/shards",
                 "--rows-per-shard", "20", "--rows-per-row-group", "8"]) == 0
    fs.invalidate_cache()  # Ray workers wrote the shards: this process's cached listings are stale
    shards = sorted(p for p in fs.ls(f"{s3_bucket}/shards") if "/shard-" in p)
    assert [s.rsplit("/", 1)[1] for s in shards] == ["shard-000000.parquet", "shard-000001.parquet", "shard-000002.parquet"]
    first = pq.read_table(fs.open(shards[0], "rb"))
    assert first.column_names == ["uri", "label", "subset", "bytes", "sha256", "original_format", "read_error"]
    assert first["uri"][0].as_py().startswith(f"s3://{s3_bucket}/raw/") and first["subset"][0].as_py() == "facebook"

    assert main(["scan", "--model", f"s3://{s3_bucket}/models/parity", "--input", f"s3://{s3_bucket}/shards",
                 "--output", f"s3://{s3_bucket}/results", "--batch-size", "8"]) == 0
    summary = json.loads(fs.cat(f"{s3_bucket}/results/summary.json"))
    assert summary["rows_in"] == summary["scored"] == 48 and summary["input_format"] == "parquet"
    fs.invalidate_cache()
    rows = pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in fs.ls(f"{s3_bucket}/results/scores")])
    expected = {r["path"]: r for r in csv.DictReader(open(parity_dir / "expected_scores.csv"))}
    assert rows.num_rows == 48
    for row in rows.to_pylist():
        rel = "WildRF/test/" + row["uri"].split("/raw/", 1)[1]
        assert abs(row["logit_fake"] - float(expected[rel]["logit_fake"])) < 1e-3  # alignment kept the file name
        assert row["original_format"] is not None and row["sha256"] == row["id"]


def test_demo_is_deterministic(ray_local, tmp_path):
    from pipeline.commands.demo import run_demo

    a = run_demo(tmp_path / "a", log=lambda *_: None)
    b = run_demo(tmp_path / "b", log=lambda *_: None)
    assert a["model_id"] == b["model_id"] and a["rows_in"] == a["scored"] == 24
    scores_a = read_scores(tmp_path / "a" / "scan")["prob_fake"].to_pylist()
    scores_b = read_scores(tmp_path / "b" / "scan")["prob_fake"].to_pylist()
    assert scores_a == pytest.approx(scores_b, abs=1e-6)
    assert set(a["metrics"]) == {"ALL", "portraits", "landscapes"}


def test_relative_paths_are_the_commands_own_whatever_the_workers_directory(ray_local, parity_bundle, tmp_path,
                                                                             monkeypatch):
    """Ray started elsewhere (as a cluster's workers, or a job's, run in their own
    directory): a relative --input and --output still mean the driver's."""
    for i in range(6):
        write_image(tmp_path / "src" / f"{i}.png", seed=i)
    monkeypatch.chdir(tmp_path)
    assert os.getcwd() != ray_get_cwd()
    summary = run_scan(str(parity_bundle), "src", "out/scan", ScanConfig(unit_size=4, actors=1))
    assert summary["output"] == str(tmp_path / "out" / "scan") and summary["scored"] == 6
    assert len(os.listdir(tmp_path / "out" / "scan" / "scores")) == 2
    # one input however it is written, and from wherever the command runs: the rerun resumes
    # (and an update finds the files it planned) instead of refusing "another scan"
    assert summary["input"] == json.loads((tmp_path / "out" / "scan" / "_scan.json").read_text())["input"] \
        == str(tmp_path / "src")
    monkeypatch.chdir(tmp_path / "out")
    for given in ("../src/", "./../src", str(tmp_path / "src") + "/"):
        again = run_scan(str(parity_bundle), given, "scan", ScanConfig(unit_size=4, actors=1, update=True))
        assert again["this_run"]["rows"] == 0 and again["rows_out"] == 6 and again["units"]["new"] == 0
    identity = tmp_path / "out" / "scan" / "_scan.json"  # as earlier versions recorded it: as given
    identity.write_text(json.dumps({**json.loads(identity.read_text()), "input": "src/"}))
    monkeypatch.chdir(tmp_path)
    assert run_scan(str(parity_bundle), "src", "out/scan", ScanConfig(unit_size=4, actors=1))["rows_out"] == 6


def ray_get_cwd() -> str:
    import ray

    return ray.get(ray.remote(lambda: os.getcwd()).remote())
