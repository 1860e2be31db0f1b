"""Corpus formats: Hugging Face image Parquet (struct image column + `huggingface` metadata)."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_image

from pipeline.commands.cli import main
from pipeline.scan.config import ScanConfig
from pipeline.scan.run import run_scan

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def corpus(root):
    """A labelled folder and the same images as the records of an HF dataset."""
    records = []
    for i in range(6):
        label = "0_real" if i % 2 else "1_fake"
        name = f"{i:02d}.{'png' if i % 3 == 0 else 'jpg'}"
        data = write_image(root / "folder" / label / name, size=(96 + 8 * i, 80), seed=i)
        records.append({"image": {"bytes": data, "path": name}, "label": 1 if label == "0_real" else 0, "n": i})
    return records


def hf_table(records, metadata=True):
    table = pa.table({"image": pa.array([r["image"] for r in records], IMAGE),
                      "label": pa.array([r["label"] for r in records], pa.int64()),
                      "n": pa.array([r["n"] for r in records], pa.int64())})
    if metadata:  # as `datasets` writes it: ClassLabel names in index order
        features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": ["fake", "real"]},
                    "n": {"dtype": "int64", "_type": "Value"}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    return table


@pytest.mark.parametrize("metadata", [True, False])
def test_hf_image_parquet_scans_with_no_config_and_matches_the_folder_scan(ray_local, parity_bundle, tmp_path, metadata):
    records = corpus(tmp_path)
    (tmp_path / "hf").mkdir()
    pq.write_table(hf_table(records, metadata), tmp_path / "hf" / "train-00000-of-00001.parquet", row_group_size=4)
    run_scan(str(parity_bundle), str(tmp_path / "folder"), str(tmp_path / "out-folder"), ScanConfig())
    hf = run_scan(str(parity_bundle), str(tmp_path / "hf"), str(tmp_path / "out-hf"), ScanConfig())
    assert hf["input_format"] == "parquet" and hf["rows_out"] == 6 and hf["errors"] == 0
    by_name = {r["uri"].rsplit("/", 1)[-1]: r for r in pq.read_table(tmp_path / "out-folder" / "scores").to_pylist()}
    rows = pq.read_table(tmp_path / "out-hf" / "scores").to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(by_name)  # the struct's path is the uri
    for r in rows:
        ref = by_name[r["uri"]]
        assert r["prob_fake"] == pytest.approx(ref["prob_fake"], abs=1e-6)
        assert r["aligned"] == ref["aligned"] == r["uri"].endswith(".png")  # the path drives alignment
        assert r["image_path"] == r["uri"] and "n" in r
        if metadata:  # ClassLabel names map to labels (index 0 is 'fake' here)
            assert r["label"] == ref["label"]


def test_a_nested_bytes_column_in_yaml_and_a_wrongly_typed_one(ray_local, parity_bundle, tmp_path, capsys, monkeypatch):
    records = corpus(tmp_path)
    (tmp_path / "hf").mkdir()
    table = hf_table(records).rename_columns(["picture", "label", "n"])
    pq.write_table(table, tmp_path / "hf" / "part.parquet")
    (tmp_path / "nested.yaml").write_text("columns:\n  bytes: picture.bytes\n")
    args = ["scan", "--model", str(parity_bundle), "--input", str(tmp_path / "hf")]
    assert main([*args, "--output", str(tmp_path / "o1"), "--config", str(tmp_path / "nested.yaml")]) == 0
    assert pq.read_table(tmp_path / "o1" / "scores")["error"].null_count == 6

    import pipeline.scan.run as scan_run

    def no_ray(*_, **__):
        raise AssertionError("Ray was started for a scan that must be refused first")

    monkeypatch.setattr(scan_run, "ensure_ray", no_ray)
    (tmp_path / "wrong.yaml").write_text("columns:\n  bytes: n\n")
    assert main([*args, "--output", str(tmp_path / "o2"), "--config", str(tmp_path / "wrong.yaml")]) == 2
    err = capsys.readouterr().err
    assert "column 'n' is int64; expected binary image bytes, or a struct with a binary 'bytes' field" in err


def test_hf_images_kept_as_files_are_read_from_their_paths(tmp_path):
    """A dataset written with its images as files (`save_to_disk`, older `to_parquet`):
    null bytes and a path, absolute or below the shard's folder, are read from that file."""
    from pipeline.scan.decode import unit_inputs
    from pipeline.scan.sources import ColumnMap, SourceOptions, plan_source

    records = corpus(tmp_path)
    (tmp_path / "hf" / "images").mkdir(parents=True)
    for i, r in enumerate(records):
        (tmp_path / "hf" / "images" / r["image"]["path"]).write_bytes(r["image"]["bytes"])
        path = f"images/{r['image']['path']}" if i % 2 else str(tmp_path / "hf" / "images" / r["image"]["path"])
        r["image"] = {"bytes": None, "path": path}
    records[4]["image"]["path"] = "images/gone.jpg"
    records[5]["image"]["path"] = None
    pq.write_table(hf_table(records), tmp_path / "hf" / "train.parquet")
    (unit,) = plan_source(str(tmp_path / "hf" / "train.parquet"), SourceOptions()).units  # the shard itself
    read, names, payloads = unit_inputs(unit, None, ColumnMap(), fetch_threads=2)
    payloads = list(payloads)
    originals = corpus(tmp_path / "again")  # the same images, bytes again
    for i in range(4):
        assert payloads[i] == (originals[i]["image"]["bytes"], None), i
    assert payloads[4][0] is None and payloads[4][1].startswith("read failed: FileNotFoundError")
    assert payloads[5] == (None, "no image bytes (null)")
    assert names[:2] == [str(tmp_path / "hf" / "images" / "00.png"), "images/01.jpg"]  # alignment reads the name


def test_shards_never_downloaded_or_cut_short_are_named_with_what_they_are(tmp_path):
    """A dataset repository cloned without `git lfs pull` holds pointers where its shards
    should be: planning names them, and says so, instead of a bare Arrow error."""
    from test_preprocess import LFS_POINTER

    from pipeline.scan.sources import SourceOptions, plan_source
    from pipeline.scan.webdataset import PLAN_ERROR

    (tmp_path / "data").mkdir()
    for i in range(3):
        (tmp_path / "data" / f"train-{i:05d}-of-00003.parquet").write_bytes(LFS_POINTER)
    with pytest.raises(ValueError, match=r"^3 of 3 Parquet shards cannot be read \(download them again, or move them "
                                         r"out of the input\), such as .*train-00000-of-00003\.parquet: it is a Git "
                                         r"LFS pointer: .* \(run `git lfs pull` in its repository\)$"):
        plan_source(str(tmp_path / "data"), SourceOptions())
    records = corpus(tmp_path)
    pq.write_table(hf_table(records), tmp_path / "data" / "train-00000-of-00003.parquet")
    whole = (tmp_path / "data" / "train-00000-of-00003.parquet").read_bytes()
    (tmp_path / "data" / "train-00001-of-00003.parquet").write_bytes(whole[: len(whole) // 2])  # cut short
    with pytest.raises(ValueError, match=r"^2 of 3 Parquet shards cannot be read .* such as .*train-00001-of-00003"
                                         r"\.parquet: ArrowInvalid: "):
        plan_source(str(tmp_path / "data"), SourceOptions())
    (tmp_path / "wds").mkdir()
    (tmp_path / "wds" / "000.tar").write_bytes(LFS_POINTER)
    (error,) = plan_source(str(tmp_path / "wds"), SourceOptions()).records[PLAN_ERROR].to_pylist()
    assert error.startswith("tar shard unreadable past this point: ") and error.endswith(
        "; the file is a Git LFS pointer: the file's content was never downloaded (run `git lfs pull` in its repository)")
