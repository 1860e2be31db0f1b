"""`mirror benchmark` end to end on a local Ray: official CSV parity, nightly regressions, sweeps."""
import csv
import glob
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
from conftest import write_image

from pipeline.commands.cli import main

pytestmark = pytest.mark.slow
METRICS = ("Acc", "Real_Acc", "Fake_Acc", "Bal_Acc", "AUC", "AP")


def read_csv(path):
    return list(csv.DictReader(open(path)))


def assert_official_csv(ours_path, official_path):
    ours, official = read_csv(ours_path), read_csv(official_path)
    assert [r["Dataset"] for r in ours] == [r["Dataset"] for r in official]
    for a, b in zip(ours, official):
        for m in METRICS:
            tol = 1e-6 if m in ("AUC", "AP") else 1e-9
            assert float(a[m]) == pytest.approx(float(b[m]), abs=tol), (a["Dataset"], m)


def test_benchmark_csv_equals_official(ray_local, parity_bundle, parity_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["benchmark", "--model", str(parity_bundle), "--data-root", str(parity_dir / "data"),
                 "--benchmarks", "WildRF", "--output", str(out)]) == 0
    (csv_path,) = glob.glob(str(out / "WildRF_*.csv"))
    assert os.path.basename(csv_path)[len("WildRF_"):-4].replace("_", "").isdigit()
    assert open(csv_path).readline().strip() == "Dataset,Acc,Real_Acc,Fake_Acc,Bal_Acc,AUC,AP"
    assert_official_csv(csv_path, parity_dir / "official_results" / "WildRF_official.csv")
    detail = json.loads(open(csv_path[:-4] + ".json").read())
    assert detail["subsets"]["facebook"]["n"] == 16 and detail["subsets"]["facebook"]["errors"] == 0
    assert detail["preprocess"] == "official/align=by-extension" and detail["threshold"] == 0.5
    for key in ("EER", "TPR@1%FPR", "TPR@5%FPR", "ECE"):
        assert 0 <= detail["subsets"]["reddit"][key] <= 1
    assert pq.read_table(out / "scans" / "WildRF" / "clean" / "scores").num_rows == 48
    report = glob.glob(str(out / "report_*.md"))[0]
    assert "## WildRF" in open(report).read()
    assert os.path.getsize(glob.glob(str(out / "report_*" / "WildRF_roc.png"))[0]) > 1000


def test_official_flags_import_on_the_fly(ray_local, parity_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["benchmark", "--model_path", str(parity_dir / "checkpoint.pth"),
                 "--memory_path", str(parity_dir / "mirror_phase1.pth"), "--backbone_path", str(parity_dir / "backbone"),
                 "--base_data_path", str(parity_dir / "data"), "--benchmarks", "WildRF", "--batch_size", "8",
                 "--device", "cpu", "--output_dir", str(out)]) == 0
    (csv_path,) = glob.glob(str(out / "WildRF_*.csv"))
    assert_official_csv(csv_path, parity_dir / "official_results" / "WildRF_official.csv")
    assert (out / "_bundle" / "mirror.json").is_file()


def make_benchmark(root, per_class=4):
    seed = 0  # one image per seed, the same data in every run
    for subset in ("genA", "genB"):
        for label in ("0_real", "1_fake"):
            for i in range(per_class):
                write_image(root / "MyBench" / subset / label / f"{i}.png", seed=seed)
                seed += 1


def test_missing_subdataset_is_skipped_and_missing_root_is_an_error(ray_local, parity_bundle, tmp_path, capsys):
    make_benchmark(tmp_path / "data")
    registry = tmp_path / "bench.yaml"
    registry.write_text("MyBench: {folder: MyBench, subsets: [genA, genC, genB]}\n")
    out = tmp_path / "out"
    assert main(["benchmark", "--model", str(parity_bundle), "--data-root", str(tmp_path / "data"),
                 "--benchmarks", "MyBench", "--registry", str(registry), "--output", str(out)]) == 0
    (csv_path,) = glob.glob(str(out / "MyBench_*.csv"))
    assert [r["Dataset"] for r in read_csv(csv_path)] == ["genA", "genB", "MEAN"]
    assert json.loads(open(csv_path[:-4] + ".json").read())["missing_subsets"] == ["genC"]
    assert main(["benchmark", "--model", str(parity_bundle), "--data-root", str(tmp_path / "data"),
                 "--benchmarks", "Genimage", "--output", str(out)]) == 2
    assert "benchmark Genimage: its folder" in capsys.readouterr().err


def test_unregistered_name_is_one_set_named_all(ray_local, parity_bundle, tmp_path):
    make_benchmark(tmp_path / "data", per_class=2)
    out = tmp_path / "out"
    assert main(["benchmark", "--model", str(parity_bundle), "--data-root", str(tmp_path / "data"),
                 "--benchmarks", "MyBench", "--output", str(out)]) == 0
    (csv_path,) = glob.glob(str(out / "MyBench_*.csv"))
    rows = read_csv(csv_path)
    assert [r["Dataset"] for r in rows] == ["ALL"]


def test_a_benchmark_folder_labelled_by_its_own_folder_names(ray_local, parity_bundle, tmp_path):
    """`--label-folders REAL=real,FAKE=fake`: CIFAKE's folders as labels, for the metrics."""
    for i in range(4):
        write_image(tmp_path / "data" / "cifake" / ("FAKE" if i % 2 else "REAL") / f"{i}.png", seed=i)
    out = tmp_path / "out"
    assert main(["benchmark", "--model", str(parity_bundle), "--data-root", str(tmp_path / "data"),
                 "--benchmarks", "cifake", "--output", str(out), "--label-folders", "REAL=real,FAKE=fake"]) == 0
    (csv_path,) = glob.glob(str(out / "cifake_*.csv"))
    (row,) = read_csv(csv_path)
    assert row["Dataset"] == "ALL" and 0.0 <= float(row["Bal_Acc"]) <= 1.0
    labels = pq.read_table(out / "scans" / "cifake" / "input.parquet")["label"].to_pylist()
    assert sorted(labels) == [0, 0, 1, 1]


def test_nightly_regression_is_flagged_with_nonzero_exit(ray_local, parity_bundle, tmp_path, capsys):
    make_benchmark(tmp_path / "data")
    registry = tmp_path / "bench.yaml"
    registry.write_text("MyBench: {folder: MyBench, subsets: [genA, genB]}\n")
    history = tmp_path / "history"
    args = ["benchmark", "--model", str(parity_bundle), "--data-root", str(tmp_path / "data"), "--benchmarks",
            "MyBench", "--registry", str(registry), "--history", str(history), "--tolerance", "0.01"]
    assert main([*args, "--output", str(tmp_path / "night1")]) == 0
    first = pq.read_table(tmp_path / "night1" / "scans" / "MyBench" / "clean" / "scores").to_pylist()
    # Plant a regression: every correctly classified genA image moves to the other label folder.
    moved = 0
    for row in first:
        if row["subset"] == "genA" and row["pred"] == row["label"]:
            src = row["uri"]
            dst = src.replace("/0_real/", "/tmp_fake/") if row["label"] == 0 else src.replace("/1_fake/", "/tmp_real/")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.move(src, dst)
            moved += 1
    assert moved > 0
    for tmp, final in (("tmp_fake", "1_fake"), ("tmp_real", "0_real")):
        src_dir = tmp_path / "data" / "MyBench" / "genA" / tmp
        for f in src_dir.glob("*") if src_dir.exists() else []:
            shutil.move(str(f), str(tmp_path / "data" / "MyBench" / "genA" / final / f"moved_{f.name}"))
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "night2")]) == 3
    printed = capsys.readouterr().out
    assert "REGRESSION MyBench/genA Acc" in printed
    (comparison,) = glob.glob(str(tmp_path / "night2" / "comparison_*.json"))
    doc = json.loads(open(comparison).read())
    acc = next(d for d in doc["regressions"] if d["subset"] == "genA" and d["metric"] == "Acc")
    before = read_csv(glob.glob(str(tmp_path / "night1" / "MyBench_*.csv"))[0])[0]
    after = read_csv(glob.glob(str(tmp_path / "night2" / "MyBench_*.csv"))[0])[0]
    assert acc["delta"] == pytest.approx(float(after["Acc"]) - float(before["Acc"])) and acc["delta"] < -0.01
    assert not any(d["regression"] for d in doc["deltas"] if d["subset"] == "genB")  # untouched
    history_rows = pq.read_table(history)
    assert set(history_rows.column_names) == {"run", "model_id", "benchmark", "subset", "metric", "value", "precision"}
    assert set(history_rows["precision"].to_pylist()) == {"fp32"}
    assert len(set(history_rows["run"].to_pylist())) == 2


def test_robustness_sweep_reports_every_metric_per_perturbation(ray_local, parity_bundle, parity_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["benchmark", "--model", str(parity_bundle), "--data-root", str(parity_dir / "data"),
                 "--benchmarks", "WildRF", "--output", str(out), "--perturb", "jpeg:50", "blur:2"]) == 0
    (json_path,) = glob.glob(str(out / "WildRF_*.json"))
    detail = json.loads(open(json_path).read())
    assert set(detail["perturbations"]) == {"jpeg:50", "blur:2"}
    for per in detail["perturbations"].values():
        assert set(per) == {"facebook", "reddit", "twitter"} and set(METRICS) <= set(per["reddit"])
    clean = pq.read_table(out / "scans" / "WildRF" / "clean" / "scores").sort_by("uri")
    blurred = pq.read_table(out / "scans" / "WildRF" / "blur-2" / "scores").sort_by("uri")
    assert clean["uri"].to_pylist() == blurred["uri"].to_pylist()
    assert clean["prob_fake"].to_pylist() != blurred["prob_fake"].to_pylist()
    assert set(blurred["preprocess"].to_pylist()) == {"official/align=by-extension+blur:2"}
    assert "Robustness" in open(glob.glob(str(out / "report_*.md"))[0]).read()


def test_benchmark_from_ingested_shards(ray_local, parity_bundle, parity_dir, tmp_path):
    root = tmp_path / "data"
    assert main(["ingest", "--input", str(parity_dir / "data" / "WildRF" / "test"),
                 "--output", str(root / "WildRF" / "test"), "--rows-per-shard", "16"]) == 0
    out = tmp_path / "out"
    assert main(["benchmark", "--model", str(parity_bundle), "--data-root", str(root), "--benchmarks", "WildRF",
                 "--output", str(out)]) == 0
    (csv_path,) = glob.glob(str(out / "WildRF_*.csv"))
    assert_official_csv(csv_path, parity_dir / "official_results" / "WildRF_official.csv")


def test_all_benchmarks_and_perturbations_share_one_scoring_pool(ray_local, parity_bundle, tmp_path):
    for name in ("B1", "B2", "B3"):
        make_benchmark(tmp_path / "data", per_class=2)
        shutil.move(str(tmp_path / "data" / "MyBench"), str(tmp_path / "data" / name))
    registry = tmp_path / "bench.yaml"
    registry.write_text("".join(f"{n}: {{folder: {n}, subsets: [genA, genB]}}\n" for n in ("B1", "B2", "B3")))
    common = ["benchmark", "--model", str(parity_bundle), "--data-root", str(tmp_path / "data"), "--registry",
              str(registry), "--perturb", "jpeg:75"]
    assert main([*common, "--benchmarks", "B1", "B2", "B3", "--output", str(tmp_path / "together")]) == 0
    for name in ("B1", "B2", "B3"):
        (detail,) = glob.glob(str(tmp_path / "together" / f"{name}_*.json"))
        # 3 benchmarks x (clean + jpeg:75) in one pipeline, one replica (--actors 1) built once
        pipeline = json.loads(open(detail).read())["pipeline"]
        assert (pipeline["scans"], pipeline["scoring_replicas"]) == (6, 1)
        assert main([*common, "--benchmarks", name, "--output", str(tmp_path / f"alone-{name}")]) == 0
        (together,) = glob.glob(str(tmp_path / "together" / f"{name}_*.csv"))
        (alone,) = glob.glob(str(tmp_path / f"alone-{name}" / f"{name}_*.csv"))
        assert open(together).read() == open(alone).read()  # the same CSV as a run of its own


def test_a_nightly_run_is_compared_with_the_last_run_in_its_precision(tmp_path):
    """An fp8 night between two fp32 nights is no baseline for the second; a history file
    written before precisions were recorded still reads, and still compares."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.evaluation.history import HISTORY_SCHEMA, append_history, compare, history_rows, read_history

    def night(run: str, acc: float, precision: str | None) -> pa.Table:
        return history_rows(run, "m", "B", {"ALL": {"Acc": acc}}, [], precision)

    old = night("2026-01-01", 0.90, None).drop_columns(["precision"])  # an earlier version's file
    pq.write_table(old, tmp_path / "run-old.parquet")
    append_history(str(tmp_path), night("2026-01-02", 0.91, "fp32"))
    append_history(str(tmp_path), night("2026-01-03", 0.80, "fp8"))
    history = read_history(str(tmp_path))
    assert history.schema == HISTORY_SCHEMA and history.num_rows == 3
    assert set(history["precision"].to_pylist()) == {"fp32", "fp8", None}
    fp32 = compare(history, night("2026-01-04", 0.905, "fp32"), 0.01)
    assert fp32.previous_run == "2026-01-02" and not fp32.regressions
    fp8 = compare(history, night("2026-01-04", 0.79, "fp8"), 0.05)
    assert fp8.previous_run == "2026-01-03" and not fp8.regressions
    without_fp32 = history.filter(pc.field("run") != "2026-01-02")
    tanh = compare(without_fp32, night("2026-01-04", 0.85, "bf16-gelu-tanh"), 0.01)
    assert tanh.previous_run == "2026-01-01" and [d["metric"] for d in tanh.regressions] == ["Acc"]  # the null one
