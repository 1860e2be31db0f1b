"""Pipeline pieces that need no cluster: sources, config validation, decode, scorer."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import inline_unit_batch, write_image

from mirror_core.bundle import load_bundle
from pipeline.scan.commit import commit_units
from pipeline.scan.config import ConfigError, ScanConfig, load_scan_config
from pipeline.scan.decode import decode_units, numpy_batch
from pipeline.scan.labels import label_and_subset, normalize_labels
from pipeline.scan.schema import INDEX, OUTPUT_COLUMNS, UNIT, UNIT_RECORDS, UNIT_TARGET, pack_records
from pipeline.scan.scorer import Scorer
from pipeline.scan.sources import SourceOptions, list_images, plan_source


def test_labels_are_inherited_and_subset_is_first_level(tmp_path):
    assert label_and_subset(("genA", "train", "1_fake", "deep")) == (1, "genA")
    assert label_and_subset(("0_real",)) == (0, None)
    assert label_and_subset(("ai", "x", "nature")) == (0, None)  # the deepest label folder wins
    assert label_and_subset(("misc",)) == (None, None)
    write_image(tmp_path / "gen" / "1_fake" / "a" / "x.JPG")
    write_image(tmp_path / "gen" / "0_real" / "y.png")
    write_image(tmp_path / "loose.webp")
    (tmp_path / "notes.txt").write_text("not an image")
    table = list_images(str(tmp_path))
    assert table.to_pylist() == [
        {"uri": str(tmp_path / "gen/0_real/y.png"), "label": 0, "subset": "gen"},
        {"uri": str(tmp_path / "gen/1_fake/a/x.JPG"), "label": 1, "subset": "gen"},
        {"uri": str(tmp_path / "loose.webp"), "label": None, "subset": None},
    ]
    assert list_images(str(tmp_path), extensions=("png",)).num_rows == 1


def test_label_values_normalised_or_refused():
    assert normalize_labels(pa.array(["real", "1_fake", "AI", None])).to_pylist() == [0, 1, 1, None]
    assert normalize_labels(pa.array([True, False])).to_pylist() == [1, 0]
    with pytest.raises(ValueError, match="'maybe'"):
        normalize_labels(pa.array(["maybe"]))
    with pytest.raises(ValueError, match="not 0 or 1"):
        normalize_labels(pa.array([0, 2]))


def test_plan_units_are_stable_and_cover_every_record(tmp_path):
    for i in range(7):
        write_image(tmp_path / "0_real" / f"{i}.jpg", seed=i)
    a = plan_source(str(tmp_path), SourceOptions(unit_size=3))
    b = plan_source(str(tmp_path), SourceOptions(unit_size=3))
    assert [u.rows for u in a.units] == [3, 3, 1] and a.total_rows == 7
    assert [u.unit_id for u in a.units] == [u.unit_id for u in b.units]
    assert a.input_format == "folder"


def test_yaml_config_errors_name_the_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 8\nbatch_sise: 16\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key\(s\): batch_sise"):
        load_scan_config(bad, {})
    bad.write_text("batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: batch_size must be int, got str 'lots'"):
        load_scan_config(bad, {})
    bad.write_text("columns: {bytes: img, colour: x}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key\(s\) under columns: \['colour'\]"):
        load_scan_config(bad, {})
    bad.write_text("precision: int4\n")
    with pytest.raises(ConfigError, match="precision must be one of"):
        load_scan_config(bad, {})
    good = tmp_path / "good.yaml"
    good.write_text("batch_size: 8\ncolumns: {bytes: img}\n")
    cfg = load_scan_config(good, {"actors": 2, "threshold": None})
    assert (cfg.batch_size, cfg.actors, cfg.columns["bytes"], cfg.columns["uri"]) == (8, 2, "img", "uri")


@pytest.mark.parametrize("name", ["local.yaml", "s3-cluster.yaml"])
def test_shipped_configs_are_valid(name):
    from conftest import REPO

    load_scan_config(REPO / "configs" / name, {})


def test_decode_and_scorer_yield_one_row_per_record(tmp_path, parity_bundle):
    good = write_image(tmp_path / "a.png", size=(300, 260))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "page.jpg").write_bytes(b"<html>nope</html>")
    uris = [str(tmp_path / n) for n in ("a.png", "empty.jpg", "page.jpg", "missing.jpg")]
    records = pa.table({"uri": uris, "label": [1, 0, 0, None]})
    batches = list(decode_units(inline_unit_batch(tmp_path / "scan", "u1", records), rows_per_batch=3,
                                preprocess={"alignment": "by-extension"}, columns={}))
    assert [b.num_rows for b in batches] == [3, 1]
    decoded = pa.concat_tables(batches)
    errors = decoded["error"].to_pylist()
    assert errors[0] is None and errors[1] == "empty file (0 bytes)"
    assert errors[2].startswith("decode failed: UnidentifiedImageError")
    assert errors[3].startswith("read failed: FileNotFoundError")
    assert decoded["aligned"].to_pylist()[0] is True and decoded["width"].to_pylist()[0] == 300
    bundle = load_bundle(str(parity_bundle))
    scorer = Scorer(bundle.weights.to_numpy(), bundle.config.to_dict(), bundle.model_id)
    out = scorer(numpy_batch(decoded))
    assert out.num_rows == 4
    assert out["pred"].null_count == 3 and out["prob_fake"].to_pylist()[0] is not None
    direct = scorer.detector.score([good], names=["a.png"])[0]
    assert out["prob_fake"].to_pylist()[0] == pytest.approx(direct["prob_fake"], abs=1e-6)
    # the commit stage, by hand: one part with one output row per record, in order
    done = commit_units(out)
    record = done.to_pylist()[0]
    assert record["writer_node"] and record["writer_pid"] == os.getpid()  # a Ray node id, or the host outside Ray
    part_file = tmp_path / "scan" / "scores" / "part-u1.parquet"
    assert record | {"decode_s": 0, "score_s": 0, "writer_pid": 0, "writer_node": ""} == {
        "store": str(tmp_path / "scan"), "unit_id": "u1", "rows": 4, "errors": 3, "decode_s": 0, "score_s": 0,
        "labeled": 1, "flagged": int(out["pred"].to_pylist()[0]), "part_bytes": part_file.stat().st_size, "part_version": str(part_file.stat().st_mtime),
        "error_kinds": json.dumps({"decode failed: UnidentifiedImageError": 1, "empty file (0 bytes)": 1,
                                   "read failed: FileNotFoundError": 1}),
        "readout": scorer.detector.readout, "replicas": scorer.replica, "writer_node": "", "writer_pid": 0,
        "cpu_decoded_in_gpu_mode": 0, "jpeg_region_decoded": 0}  # a PNG, and three rows without an image
    part = pq.read_table(part_file)
    assert part["uri"].to_pylist() == uris and part["label"].to_pylist() == [1, 0, 0, None]
    assert part["prob_fake"].to_pylist()[0] == out["prob_fake"].to_pylist()[0]
    assert part.column_names[: len(OUTPUT_COLUMNS)] == OUTPUT_COLUMNS and part["model_id"].to_pylist() == ["m"] * 4


def test_the_commit_stage_refuses_a_split_unit(tmp_path):
    records = pa.table({"uri": ["a", "b", "c"]})
    target = json.dumps({"store": str(tmp_path), "unit_id": "u", "run": {}})
    scored = pa.table({UNIT: ["u"] * 2, INDEX: [0, 1], UNIT_RECORDS: [pack_records(records), None],
                       UNIT_TARGET: [target, None]})
    with pytest.raises(RuntimeError, match="reached the commit stage split: 2 of 3 rows"):
        commit_units(scored)
    assert not (tmp_path / "scores").exists()


def test_parquet_shard_units_follow_row_groups(tmp_path):
    table = pa.table({"bytes": [b"x"] * 10, "uri": [f"u{i}" for i in range(10)]})
    pq.write_table(table, tmp_path / "s.parquet", row_group_size=4)
    plan = plan_source(str(tmp_path), SourceOptions())
    assert plan.input_format == "parquet" and [u.rows for u in plan.units] == [4, 4, 2]


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_a_plan_lists_its_input_once(tmp_path, monkeypatch, kind):
    from pipeline.scan import parquet_shards, sources

    if kind == "folder":
        for i in range(3):
            write_image(tmp_path / "in" / "0_real" / f"{i}.png", seed=i)
    else:
        (tmp_path / "in").mkdir()
        for i in range(3):  # several shards: footers are read concurrently, units stay in order
            pq.write_table(pa.table({"bytes": [b"x"] * 5, "uri": [f"s{i}-{j}" for j in range(5)]}),
                           tmp_path / "in" / f"s{i}.parquet", row_group_size=2)
    calls = []
    real = sources.iter_files
    monkeypatch.setattr(sources, "iter_files", lambda root, **kw: calls.append(root) or real(root, **kw))
    for module in (sources, parquet_shards):
        monkeypatch.setattr(module, "list_files", lambda root: pytest.fail("listed twice"))
    plan = plan_source(str(tmp_path / "in"), SourceOptions())
    assert calls == [str(tmp_path / "in")]
    if kind == "folder":
        assert plan.input_format == "folder" and plan.total_rows == 3
    else:
        assert plan.input_format == "parquet"
        assert [(u.file.rsplit("/", 1)[-1], u.row_group, u.rows) for u in plan.units] == [
            (f"s{i}.parquet", rg, rows) for i in range(3) for rg, rows in enumerate((2, 2, 1))]


def test_avif_and_heic_are_default_extensions_and_skipped_files_are_counted(tmp_path):
    from mirror_core.config import PreprocessConfig
    from mirror_core.preprocess import official_preprocess
    from pipeline.commands import cli
    from pipeline.scan.store import ScanStore

    avif = write_image(tmp_path / "in" / "0_real" / "a.avif", fmt="AVIF")
    write_image(tmp_path / "in" / "0_real" / "b.png")
    write_image(tmp_path / "in" / "0_real" / "c.HEIC", fmt="HEIF")
    (tmp_path / "in" / "0_real" / "notes.txt").write_text("not an image")
    plan = plan_source(str(tmp_path / "in"), SourceOptions())
    assert plan.total_rows == 3 and plan.skipped_by_extension == 1
    assert official_preprocess(avif, PreprocessConfig(), name="a.avif").format == "AVIF"
    store = ScanStore(str(tmp_path / "out"))
    store.save_plan(plan)
    assert store.load_plan().skipped_by_extension == 1  # kept with the plan, for every rerun's summary
    args = cli.build_parser().parse_args(["scan", "--model", "m", "--input", "i", "--output", "o",
                                          "--extensions", "png, .jpg"])
    only = cli.scan_config_from_args(args)
    assert only.extensions == ["png", "jpg"]
    assert plan_source(str(tmp_path / "in"), only.source_options()).skipped_by_extension == 3


def test_an_object_store_write_is_one_put_and_makes_a_missing_bucket(s3_server, s3_bucket):
    """Part files are latency-bound on object stores: one request each (no directory or
    bucket checks), and a bucket that does not exist yet is made on the first write."""
    import s3fs
    from s3_faults import FaultProxy

    from pipeline.storage import Location

    with FaultProxy(s3_server) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            Location(f"s3://{s3_bucket}/scan").write_bytes("parts/u1.parquet", b"one")
            assert proxy.requests == [("PUT", f"/{s3_bucket}/scan/parts/u1.parquet")]
            fresh = Location("s3://mirror-made-on-write/scan")
            fresh.write_bytes("parts/u2.parquet", b"two")
            assert fresh.read_bytes("parts/u2.parquet") == b"two"
        finally:
            os.environ["AWS_ENDPOINT_URL"] = s3_server
            s3fs.S3FileSystem.clear_instance_cache()


def test_folders_named_like_labels_but_not_label_folders_are_named_in_a_warning(tmp_path, caplog):
    from pipeline.scan.labels import label_folders
    from pipeline.scan.sources import SourceOptions, plan_source

    for name in ("cifake/train/FAKE/a.png", "cifake/train/REAL/b.png", "official/1_fake/c.png",
                 "official/0_real/d.png"):
        write_image(tmp_path / name)
    with caplog.at_level("WARNING", logger="mirror"):
        plan = plan_source(str(tmp_path / "cifake"), SourceOptions())
    assert plan.records["label"].to_pylist() == [None, None]  # as the official evaluation reads them
    assert [m for m in caplog.messages if "unlabeled" in m] == [
        f"{tmp_path}/cifake: images below a folder named 'FAKE' are unlabeled: label folders are named exactly "
        "0_real / 1_fake (or nature / ai), as the official evaluation reads them; name yours, e.g. --label-folders "
        "FAKE=fake (each such folder), for metrics"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="mirror"):
        assert plan_source(str(tmp_path / "official"), SourceOptions()).records["label"].to_pylist() == [0, 1]
    assert not caplog.messages
    # named as the corpus names them (`--label-folders FAKE=fake,REAL=0`): labeled, subset as for official folders
    named = SourceOptions(label_folders=label_folders({"FAKE": "fake", "REAL": 0}))
    with caplog.at_level("WARNING", logger="mirror"):
        plan = plan_source(str(tmp_path / "cifake"), named)
    assert plan.records["label"].to_pylist() == [1, 0] and plan.records["subset"].to_pylist() == ["train", "train"]
    assert not caplog.messages
    with pytest.raises(ValueError, match=r"label folder 'REAL': label value 'maybe' is not one of"):
        label_folders({"REAL": "maybe"})

    # the same tree as it is downloaded, in a zip: the folders inside are looked at too
    import zipfile

    with zipfile.ZipFile(tmp_path / "cifake.zip", "w") as archive:
        for name in ("train/FAKE/a.png", "train/REAL/b.png"):
            archive.write(tmp_path / "cifake" / name, name)
    with caplog.at_level("WARNING", logger="mirror"):
        plan = plan_source(str(tmp_path / "cifake.zip"), SourceOptions())
    assert plan.records["label"].to_pylist() == [None, None]
    assert [m for m in caplog.messages if "unlabeled" in m] == [
        f"{tmp_path}/cifake.zip: images below a folder named 'FAKE' are unlabeled: label folders are named exactly "
        "0_real / 1_fake (or nature / ai), as the official evaluation reads them; name yours, e.g. --label-folders "
        "FAKE=fake (each such folder), for metrics"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="mirror"):
        plan = plan_source(str(tmp_path / "cifake.zip"), named)  # inside an archive alike
    assert plan.records["label"].to_pylist() == [1, 0] and not caplog.messages


def test_every_file_is_an_image_with_extensions_star_names_without_one_too(tmp_path):
    """A store naming its images by their hash (no extension): '*' plans every file."""
    from pipeline.scan.sources import SourceOptions, plan_source

    for name in ("ab/abf00d", "cd/cd0042", "cd/cd0042.json"):
        (tmp_path / "store" / name).parent.mkdir(parents=True, exist_ok=True)
    write_image(tmp_path / "store" / "ab" / "abf00d", fmt="JPEG")
    write_image(tmp_path / "store" / "cd" / "cd0042", fmt="PNG")
    (tmp_path / "store" / "cd" / "cd0042.json").write_text("{}")  # a sidecar: an error row, as asked
    with pytest.raises(ValueError, match=r"holds no images .*; it holds 2 files without an extension, 1 \.json file "
                                         r"\(--extensions '\*' reads every file as an image\)$"):
        plan_source(str(tmp_path / "store"), SourceOptions())
    plan = plan_source(str(tmp_path / "store"), SourceOptions(extensions=("*",)))
    assert [u.rsplit("/", 2)[-2:] for u in plan.records["uri"].to_pylist()] == [
        ["ab", "abf00d"], ["cd", "cd0042"], ["cd", "cd0042.json"]]
    assert plan.skipped_by_extension == 0


def test_what_an_operating_system_leaves_beside_images_is_left_out(tmp_path):
    """macOS's AppleDouble twins ('._a.jpg', in zips below '__MACOSX/'), folder settings and
    thumbnail caches are never images: left out (counted), even with --extensions '*'."""
    import zipfile

    from pipeline.scan.sources import SourceOptions, plan_source

    image = write_image(tmp_path / "corpus" / "0_real" / "a.jpg")
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)
    for name, data in (("0_real/._a.jpg", apple_double), (".DS_Store", b"\x00\x00\x00\x01Bud1"),
                       ("0_real/Thumbs.db", bytes(16)), ("0_real/desktop.ini", b"[.ShellClassInfo]")):
        (tmp_path / "corpus" / name).write_bytes(data)
    for extensions in (SourceOptions().extensions, ("*",)):
        plan = plan_source(str(tmp_path / "corpus"), SourceOptions(extensions=extensions))
        assert plan.records["uri"].to_pylist() == [str(tmp_path / "corpus" / "0_real" / "a.jpg")], extensions
        assert plan.skipped_by_extension == 4
    with zipfile.ZipFile(tmp_path / "from-a-mac.zip", "w") as archive:  # as macOS's Finder zips a folder
        archive.writestr("corpus/0_real/a.jpg", image)
        archive.writestr("__MACOSX/corpus/0_real/._a.jpg", apple_double)
        archive.writestr("corpus/.DS_Store", b"\x00\x00\x00\x01Bud1")
    plan = plan_source(str(tmp_path / "from-a-mac.zip"), SourceOptions())
    assert plan.records["uri"].to_pylist() == [f"{tmp_path}/from-a-mac.zip#corpus/0_real/a"]
    assert plan.skipped_by_extension == 2
    # what an OS leaves is judged below the input: a corpus whose own path passes through a
    # folder named __MACOSX (unzipped there by hand) is a corpus like any other
    inside = tmp_path / "__MACOSX" / "corpus"
    write_image(inside / "0_real" / "b.jpg")
    (inside / "0_real" / "._b.jpg").write_bytes(apple_double)
    plan = plan_source(str(inside), SourceOptions())
    assert plan.input_format == "folder" and plan.skipped_by_extension == 1
    assert plan.records["uri"].to_pylist() == [str(inside / "0_real" / "b.jpg")]
    # a file named as the input is scanned whatever its name: the user asked for it
    named = inside / "0_real" / "._b.jpg"
    write_image(named)
    assert plan_source(str(named), SourceOptions()).records["uri"].to_pylist() == [str(named)]


def test_an_input_pattern_of_stars_says_what_to_give_instead(tmp_path):
    from pipeline.scan.sources import SourceOptions, plan_source

    write_image(tmp_path / "imgs" / "a.png")
    with pytest.raises(FileNotFoundError, match=r"imgs/\*\.png does not exist: a pattern of \* or \? is no input; give "
                                                r"its folder \(--extensions keeps some kinds of image\), or name shards "
                                                r"by a brace pattern"):
        plan_source(str(tmp_path / "imgs" / "*.png"), SourceOptions())
    (tmp_path / "odd" / "*").mkdir(parents=True)  # a folder so named is an input like any other
    write_image(tmp_path / "odd" / "*" / "b.png")
    assert plan_source(str(tmp_path / "odd" / "*"), SourceOptions()).total_rows == 1


def test_a_corpus_labelled_by_its_own_folder_names_scans_with_metrics_and_trains(ray_local, parity_bundle, tmp_path):
    """CIFAKE's train/REAL, train/FAKE: `label_folders` reads them as labels, in a scan (its
    metrics) and in training's plan; the output is tied to that choice."""
    from pipeline.commands.cli import parse_label_folders
    from pipeline.scan.run import run_scan
    from pipeline.scan.store import OutputMismatchError, ScanStore
    from pipeline.train.data import plan_training_data

    for i in range(8):
        write_image(tmp_path / "cifake" / "train" / ("FAKE" if i % 2 else "REAL") / f"{i}.png", seed=i)
    named = parse_label_folders("REAL=real, FAKE=1")
    assert named == {"REAL": "real", "FAKE": "1"}
    summary = run_scan(str(parity_bundle), str(tmp_path / "cifake"), str(tmp_path / "out"),
                       ScanConfig(label_folders=named))
    assert summary["metrics"]["ALL"]["n"] == 8 and summary["metrics"]["train"]["n"] == 8
    with pytest.raises(OutputMismatchError, match=r"label_folders: \{'FAKE': 1, 'REAL': 0\} there, None now"):
        run_scan(str(parity_bundle), str(tmp_path / "cifake"), str(tmp_path / "out"), ScanConfig())
    # the same setting spelt otherwise resumes the output (an earlier version's spelling too)
    store = ScanStore(str(tmp_path / "out"))
    store.write_json("_scan.json", {**store.read_json("_scan.json"), "label_folders": named})
    again = run_scan(str(parity_bundle), str(tmp_path / "cifake"), str(tmp_path / "out"),
                     ScanConfig(label_folders=parse_label_folders("FAKE=fake,REAL=0")))
    assert again["metrics"]["ALL"]["n"] == 8
    with pytest.raises(ValueError, match="phase 2 needs a label for every image; 8 in "):
        plan_training_data(str(tmp_path / "cifake"), 2, 0.25, str(tmp_path / "run-a"))
    data = plan_training_data(str(tmp_path / "cifake"), 2, 0.25, str(tmp_path / "run-b"), label_folders=named)
    assert data.n_train + data.n_val == 8
    with pytest.raises(ConfigError, match=r"--label-folders 'REAL': expected NAME=LABEL pairs"):
        parse_label_folders("REAL")
    with pytest.raises(ConfigError, match=r"label_folders: label folder 'FAKE': label value 'x' is not one of"):
        ScanConfig(label_folders={"FAKE": "x"})
