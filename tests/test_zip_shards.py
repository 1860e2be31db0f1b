"""Zip archives read as shards of samples: the images inside score as the same files in a
folder, labels come from the folders inside the archive, and damage is error rows."""
import json
import zipfile

import pyarrow.parquet as pq
import pytest
from conftest import write_image

from pipeline.scan.config import ScanConfig
from pipeline.scan.run import run_scan
from pipeline.scan.sources import SourceOptions, plan_source
from pipeline.scan.zip_shards import HEADER_SLACK


def write_archives(root, folder):
    """corpus.zip: a labeled image tree (deflated and stored members, a name with '#', one whose local header
    holds more than HEADER_SLACK, a sample with a .json member, a member whose bytes fail
    its CRC, one compressed by a method not read); cut.zip: a truncated archive. The good
    images also go to `folder`, in the same tree, for reference."""
    root.mkdir(parents=True)
    expected = {}  # sample key -> error (None: scored) and label
    with zipfile.ZipFile(root / "corpus.zip", "w") as archive:
        members = [("0_real/a.jpg", zipfile.ZIP_DEFLATED), ("0_real/b.png", zipfile.ZIP_STORED),
                   ("genB/1_fake/c.jpg", zipfile.ZIP_STORED), ("0_real/photo #12.jpg", zipfile.ZIP_DEFLATED)]
        for i, (name, method) in enumerate(members):  # '#' in a member's name: in its uri too
            archive.writestr(zipfile.ZipInfo(name), write_image(folder / name, size=(70 + 6 * i, 60), seed=i),
                             compress_type=method)
            expected[name.rsplit(".", 1)[0]] = (None, 0 if "0_real" in name else 1)
        padded = zipfile.ZipInfo("1_fake/padded.jpg")
        padded.extra = b"\xca\xfe" + (3 * HEADER_SLACK).to_bytes(2, "little") + b"\0" * (3 * HEADER_SLACK)
        archive.writestr(padded, write_image(folder / "1_fake/padded.jpg", seed=7))
        expected["1_fake/padded"] = (None, 1)
        archive.writestr("sample.jpg", write_image(folder / "sample.jpg", seed=8))
        archive.writestr("sample.json", json.dumps({"label": "fake", "caption": "a sample"}))
        expected["sample"] = (None, 1)
        archive.writestr("1_fake/bzip.jpg", write_image(root.parent / "unused.jpg", seed=9),
                         compress_type=zipfile.ZIP_BZIP2)
        expected["1_fake/bzip"] = ("zip member compressed with method 12", 1)
        archive.writestr(zipfile.ZipInfo("0_real/flipped.jpg"), write_image(root.parent / "unused.jpg", seed=10))
        expected["0_real/flipped"] = ("zip member corrupt", 0)
        archive.writestr(zipfile.ZipInfo("0_real/secret.jpg"), write_image(root.parent / "unused.jpg", seed=12))
        expected["0_real/secret"] = ("zip member encrypted", 0)
    data = bytearray((root / "corpus.zip").read_bytes())
    at = data.index(b"0_real/flipped.jpg") + len("0_real/flipped.jpg") + 100  # inside its stored bytes
    data[at] ^= 0xFF
    secret = b"0_real/secret.jpg"  # marked encrypted in its local header and its directory entry
    for signature, flags_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        header = next(i - name_at for i in range(len(data)) if data.startswith(secret, i)
                      and data.startswith(signature, i - name_at))
        data[header + flags_at] |= 0x1
    (root / "corpus.zip").write_bytes(bytes(data))
    with zipfile.ZipFile(root / "cut.zip", "w") as archive:
        archive.writestr("0_real/lost.jpg", write_image(root.parent / "unused.jpg", seed=11))
    (root / "cut.zip").write_bytes((root / "cut.zip").read_bytes()[:-30])  # its central directory's end is gone
    return expected


def check(rows, folder_rows, expected, zip_uri):
    by_key = {r["uri"][len(zip_uri) + 1 :]: r for r in rows if r["uri"].startswith(zip_uri + "#")}
    assert set(by_key) == set(expected)
    for key, (error, label) in expected.items():
        row = by_key[key]
        assert row["label"] == label, key
        if error is None:
            ref = folder_rows[key]
            assert row["error"] is None and row["prob_fake"] == pytest.approx(ref["prob_fake"], abs=1e-6), key
            assert row["aligned"] == ref["aligned"]  # a .png member is aligned as a .png file is
        else:
            assert row["error"].startswith(error) and row["prob_fake"] is None, (key, row["error"])
    assert by_key["sample"]["json"] == json.dumps({"label": "fake", "caption": "a sample"})
    assert by_key["genB/1_fake/c"]["subset"] == "genB"


def test_zip_archives_score_as_their_images_in_a_folder(ray_local, parity_bundle, s3_bucket, tmp_path):
    import fsspec

    expected = write_archives(tmp_path / "zips", tmp_path / "folder")
    run_scan(str(parity_bundle), str(tmp_path / "folder"), str(tmp_path / "folder-out"), ScanConfig())
    folder_rows = {r["uri"][len(str(tmp_path / "folder")) + 1 :].rsplit(".", 1)[0]: r
                   for r in pq.read_table(tmp_path / "folder-out" / "scores").to_pylist()}
    summary = run_scan(str(parity_bundle), str(tmp_path / "zips"), str(tmp_path / "out"), ScanConfig(unit_size=3))
    assert summary["input_format"] == "webdataset"
    rows = pq.read_table(tmp_path / "out" / "scores").to_pylist()
    check(rows, folder_rows, expected, str(tmp_path / "zips" / "corpus.zip"))
    cut = [r for r in rows if r["uri"].startswith(str(tmp_path / "zips" / "cut.zip"))]
    assert len(cut) == 1 and cut[0]["error"].startswith("zip archive unreadable: BadZipFile")
    assert summary["rows_out"] == len(rows) == len(expected) + 1

    # the same archive in a bucket, given as the input itself: members by range reads
    fsspec.filesystem("s3").put(str(tmp_path / "zips" / "corpus.zip"), f"{s3_bucket}/corpus.zip")
    uri = f"s3://{s3_bucket}/corpus.zip"
    run_scan(str(parity_bundle), uri, str(tmp_path / "s3-out"), ScanConfig(unit_size=3))
    check(pq.read_table(tmp_path / "s3-out" / "scores").to_pylist(), folder_rows, expected, uri)


def test_a_zip_is_planned_from_its_directory_alone(tmp_path, monkeypatch):
    """Planning reads the central directory (and .json members), never the images."""
    import zipfile as zipmodule

    write_archives(tmp_path / "zips", tmp_path / "folder")
    read = []
    original = zipmodule.ZipFile.read
    monkeypatch.setattr(zipmodule.ZipFile, "read", lambda self, name, *a: read.append(getattr(name, "filename", name))
                        or original(self, name, *a))
    plan = plan_source(str(tmp_path / "zips" / "corpus.zip"), SourceOptions())
    assert plan.input_format == "webdataset" and read == ["sample.json"]
    assert plan.records.num_rows == 9


def test_a_zip_on_s3_is_planned_in_a_few_requests_whatever_its_members(monkeypatch):
    """The harness's own check, small: every member planned (labels from its folders),
    with a few ranged reads of the central directory, not a request per member."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, "")  # the harness points them at its own server: restored after
    from benchmarks.zip_index import zip_figures

    figures = zip_figures(3000, delay_s=0.0)
    assert figures["members"] == 3000 and figures["get_requests"] <= 4, figures


def test_a_zip_downloaded_again_with_other_images_is_scored_again_by_update(ray_local, parity_bundle, tmp_path):
    """A zip written again holds other bytes at the planned offsets: never read by them
    (`shard changed`), and `--update` indexes it again, scoring what it holds now."""
    def write_zip(seeds: dict[str, int]):
        with zipfile.ZipFile(tmp_path / "zips" / "corpus.zip", "w", zipfile.ZIP_DEFLATED) as archive:
            for name, seed in seeds.items():
                archive.writestr(name, write_image(tmp_path / "now" / name, seed=seed))

    (tmp_path / "zips").mkdir()
    write_zip({"0_real/a.jpg": 1, "1_fake/b.jpg": 2})
    out, cfg = tmp_path / "out", ScanConfig(unit_size=2)
    assert run_scan(str(parity_bundle), str(tmp_path / "zips"), str(out), cfg)["rows_out"] == 2
    for stale in (tmp_path / "now").rglob("*.jpg"):
        stale.unlink()
    write_zip({"1_fake/b.jpg": 12, "0_real/c.jpg": 13, "0_real/a.jpg": 11})  # changed, reordered, one new
    (part,) = (out / "scores").glob("part-*.parquet")
    part.unlink()  # a run interrupted before its unit was committed
    resumed = run_scan(str(parity_bundle), str(tmp_path / "zips"), str(out), cfg)
    assert resumed["errors_by_kind"] == {"shard changed": 2}
    updated = run_scan(str(parity_bundle), str(tmp_path / "zips"), str(out), ScanConfig(unit_size=2, update=True))
    assert updated["update"]["files_changed"] == 1 and updated["rows_out"] == 3 and updated["errors"] == 0
    run_scan(str(parity_bundle), str(tmp_path / "now"), str(tmp_path / "reference"), ScanConfig())
    reference = {r["uri"][len(str(tmp_path / "now")) + 1 : -4]: r["prob_fake"]
                 for r in pq.read_table(tmp_path / "reference" / "scores").to_pylist()}
    rows = {r["uri"].split("#", 1)[1]: r["prob_fake"] for r in pq.read_table(out / "scores").to_pylist()}
    assert rows == pytest.approx(reference, abs=1e-6) and len(rows) == 3
