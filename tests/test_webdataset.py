"""WebDataset tar shards: one row per sample with an image, error rows for damaged ones,
json / txt carried, scores equal to a folder scan of the same image files."""
import io
import json
import os
import tarfile

import pyarrow.parquet as pq
import pytest
from conftest import write_image

from pipeline.scan.config import ScanConfig
from pipeline.scan.run import run_scan
from pipeline.scan.webdataset import expand_braces, index_shard


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root, folder):
    """shard 0: three good samples + one without an image; shard 1: a corrupt image member;
    shard 2: cut inside its second sample. Good images also go to `folder` for reference."""
    root.mkdir(parents=True)
    expected = {}

    def sample(tar, shard, i, ext="jpg", data=None):
        key = f"{shard:05d}{i:04d}"
        if data is None:
            data = write_image(folder / f"{key}.{ext}", size=(72 + 8 * i, 64), seed=shard * 10 + i)
            expected[key] = None
        add(tar, f"{key}.{ext}", data)
        add(tar, f"{key}.json", json.dumps({"key": key, "shard": shard, "label": ["real", "fake"][i % 2]}).encode())
        add(tar, f"{key}.txt", f"caption {key}".encode())
        return key

    with tarfile.open(root / "shard-00000.tar", "w") as tar:
        for i, ext in enumerate(["jpg", "png", "jpeg"]):
            sample(tar, 0, i, ext)
        add(tar, "000000099.json", b'{"no": "image"}')  # a sample without an image: no row
    with tarfile.open(root / "shard-00001.tar", "w") as tar:
        sample(tar, 1, 0)
        corrupt = sample(tar, 1, 1, data=b"\xff\xd8\xff" + b"\x13" * 500)  # JPEG magic, garbage after
        expected[corrupt] = "decode failed"
        sample(tar, 1, 2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        sample(tar, 2, 0)
        cut = sample(tar, 2, 1, data=write_image(root.parent / "unused.jpg", size=(300, 300), seed=99))
    data = buf.getvalue()
    (root / "shard-00002.tar").write_bytes(data[: len(data) // 2 + 700])
    expected[cut] = "tar member cut short"
    return expected


def check(out, folder_out, expected):
    rows = {r["uri"].rsplit("#", 1)[-1]: r for r in pq.read_table(out / "scores" if not isinstance(out, str) else out).to_pylist()}
    ref = {r["uri"].rsplit("/", 1)[-1].split(".")[0]: r for r in pq.read_table(folder_out / "scores").to_pylist()}
    samples = {k: v for k, v in rows.items() if k != "<unreadable>"}
    assert set(samples) == set(expected)
    for key, error in expected.items():
        row = samples[key]
        if error is None:
            assert row["error"] is None and row["prob_fake"] == pytest.approx(ref[key]["prob_fake"], abs=1e-6)
            assert row["aligned"] == ref[key]["aligned"]  # .png members are aligned, as .png files are
            assert json.loads(row["json"])["key"] == key and row["txt"] == f"caption {key}"
            assert row["label"] == int(key[-4:]) % 2  # the .json member's "label" field
        else:
            assert row["error"].startswith(error) and row["prob_fake"] is None
    return rows


def test_local_webdataset_shards(ray_local, parity_bundle, tmp_path):
    expected = write_shards(tmp_path / "wds", tmp_path / "folder")
    run_scan(str(parity_bundle), str(tmp_path / "folder"), str(tmp_path / "folder-out"), ScanConfig())
    summary = run_scan(str(parity_bundle), str(tmp_path / "wds"), str(tmp_path / "out"), ScanConfig(unit_size=2))
    assert summary["input_format"] == "webdataset" and summary["skipped_by_extension"] == 1
    rows = check(tmp_path / "out", tmp_path / "folder-out", expected)
    assert summary["rows_out"] == len(rows) and summary["rows_in"] == len(rows)
    assert summary["metrics"]["ALL"]["n"] == sum(e is None for e in expected.values())  # labeled rows scored


def test_sample_labels_from_a_member_the_json_or_the_shard_folder(tmp_path):
    """Own label first (the `label` member, else the .json field), else the label folder of
    the sample: below the input down to the shard, then inside it; subset from the folders;
    a value that is no label fails the plan."""
    from pipeline.scan.sources import ColumnMap, SourceOptions, plan_source

    image = write_image(tmp_path / "x.jpg")

    def shard(path, *samples):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tar:
            for key, members in samples:
                add(tar, f"{key}.jpg", image)
                for ext, data in members.items():
                    add(tar, f"{key}.{ext}", data)

    root = tmp_path / "wds"
    shard(root / "genA" / "0_real" / "000.tar", ("a", {"json": b'{"label": "fake"}'}), ("b", {}))
    shard(root / "genA" / "1_fake" / "000.tar", ("c", {"cls": b"0\n", "json": b'{"caption": "c"}'}))
    shard(root / "misc.tar", ("d", {"json": b'{"label": 0}'}), ("e", {"json": b"not json"}), ("f", {"cls": b"1"}))
    shard(root / "tree.tar", ("0_real/g", {}), ("genC/1_fake/h", {}))  # a tar of a labeled folder tree

    def labels(uri, label="label"):
        plan = plan_source(uri, SourceOptions(columns=ColumnMap(label=label)))
        return {r["uri"].rsplit("#", 1)[-1]: (r["label"], r["subset"]) for r in plan.records.to_pylist()}

    tree = {"0_real/g": (0, None), "genC/1_fake/h": (1, "genC")}  # folders inside the shard count too
    assert labels(str(root)) == {"a": (1, "genA"), "b": (0, "genA"), "c": (1, "genA"),
                                 "d": (0, None), "e": (None, None), "f": (None, None), **tree}
    assert labels(str(root), "cls") == {"a": (0, "genA"), "b": (0, "genA"), "c": (0, "genA"),
                                        "d": (None, None), "e": (None, None), "f": (1, None), **tree}
    assert labels(str(root / "genA" / "{0_real,1_fake}" / "000.tar")) == {"a": (1, None), "b": (0, None),
                                                                          "c": (1, None)}
    shard(tmp_path / "bad" / "000.tar", ("ok", {"cls": b"1"}), ("k9", {"cls": b"7"}))
    with pytest.raises(ValueError, match=r"000\.tar#k9: label value '7' is not one of 0/1/real/fake"):
        plan_source(str(tmp_path / "bad"), SourceOptions(columns=ColumnMap(label="cls")))


def test_webdataset_on_s3_by_brace_pattern(ray_local, s3_bucket, parity_bundle, tmp_path):
    import fsspec

    expected = write_shards(tmp_path / "wds", tmp_path / "folder")
    fs = fsspec.filesystem("s3")
    fs.put(str(tmp_path / "wds"), f"{s3_bucket}/wds", recursive=True)
    run_scan(str(parity_bundle), str(tmp_path / "folder"), str(tmp_path / "folder-out"), ScanConfig())
    summary = run_scan(str(parity_bundle), f"s3://{s3_bucket}/wds/shard-{{00000..00002}}.tar",
                       str(tmp_path / "out"), ScanConfig(unit_size=2))
    assert summary["input_format"] == "webdataset"
    rows = check(tmp_path / "out", tmp_path / "folder-out", expected)
    assert all(uri.startswith(f"s3://{s3_bucket}/wds/shard-") for uri in (r["uri"] for r in rows.values()))


def test_brace_patterns_and_a_truncated_index(tmp_path):
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    expected = write_shards(tmp_path / "wds", tmp_path / "folder")
    records, no_image, _ = index_shard(str(tmp_path / "wds" / "shard-00002.tar"))
    errors = {r["uri"].rsplit("#", 1)[-1]: r["_wds_error"] for r in records}
    assert no_image == 0 and sum(e is None for e in errors.values()) == 1
    assert [k for k, e in expected.items() if e == "tar member cut short"][0] in errors


def test_update_indexes_only_new_shards_and_those_that_were_damaged(ray_local, parity_bundle, tmp_path, monkeypatch):
    """A nightly --update of a growing WebDataset corpus must not read every shard again: it
    indexes the shards the plan lacks, and again those it found damaged (a shard still being
    written), and keeps the count of samples without an image exact."""
    from pipeline.scan import webdataset

    write_shards(tmp_path / "wds", tmp_path / "folder")
    first = run_scan(str(parity_bundle), str(tmp_path / "wds"), str(tmp_path / "out"), ScanConfig(unit_size=2))
    assert first["skipped_by_extension"] == 1
    for shard in (2, 3):  # shard 2 was cut (being written) and is whole now; shard 3 is new
        with tarfile.open(tmp_path / "wds" / f"shard-{shard:05d}.tar", "w") as tar:
            for i in range(3):
                add(tar, f"{shard:05d}{i:04d}.jpg", write_image(tmp_path / "new" / f"{shard}{i}.jpg", seed=50 + i))
            add(tar, f"{shard:05d}0099.txt", b"a sample without an image")
    indexed = []
    original = webdataset.index_shard
    monkeypatch.setattr(webdataset, "index_shard", lambda uri, *a, **kw: indexed.append(uri.rsplit("/", 1)[-1]) or original(uri, *a, **kw))
    updated = run_scan(str(parity_bundle), str(tmp_path / "wds"), str(tmp_path / "out"),
                       ScanConfig(unit_size=2, update=True))
    assert sorted(indexed) == ["shard-00002.tar", "shard-00003.tar"]
    assert updated["skipped_by_extension"] == 3  # shard 0's, and one in each of shards 2 and 3
    keys = {r["uri"].rsplit("#", 1)[-1]: r["error"] for r in pq.read_table(tmp_path / "out" / "scores").to_pylist()}
    # shard 2's third sample and all of shard 3 are new; its cut sample stays the error row it was
    assert {"000020002", "000030000", "000030001", "000030002"} <= set(keys)
    assert all(keys[k] is None for k in ("000020002", "000030000", "000030001", "000030002"))
    assert updated["rows_in"] == updated["rows_out"] == first["rows_out"] + 4
    indexed.clear()
    again = run_scan(str(parity_bundle), str(tmp_path / "wds"), str(tmp_path / "out"),
                     ScanConfig(unit_size=2, update=True))
    assert indexed == [] and again["units"]["new"] == 0 and again["skipped_by_extension"] == 3


def test_many_shards_are_indexed_by_ray_tasks_as_by_the_drivers_threads(ray_local, tmp_path, monkeypatch):
    """A scan indexes many shards (here over 16) in Ray tasks over the cluster: the same plan
    (records, units, shards, skipped samples) as the driver's threads."""
    from pipeline.scan import webdataset
    from pipeline.scan.sources import SourceOptions, plan_source

    monkeypatch.setattr(webdataset, "CLUSTER_INDEX_MIN_SHARDS", 16)

    image = write_image(tmp_path / "one.jpg", seed=3)
    for shard in range(webdataset.INDEX_THREADS + 4):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(3):
                add(tar, f"{shard:05d}{i:04d}.jpg", image)
            if shard == 5:
                add(tar, f"{shard:05d}0099.json", b"{}")  # a sample without an image
        data = buf.getvalue()
        (tmp_path / "wds").mkdir(exist_ok=True)
        (tmp_path / "wds" / f"shard-{shard:05d}.tar").write_bytes(data[: len(data) // 2] if shard == 7 else data)
    threads = plan_source(str(tmp_path / "wds"), SourceOptions(unit_size=2))
    pids, original = tmp_path / "pids", webdataset.index_shard
    pids.mkdir()
    monkeypatch.setattr(webdataset, "index_shard", lambda uri, *a, **kw: (pids / str(os.getpid())).touch() or original(uri, *a, **kw))
    cluster = plan_source(str(tmp_path / "wds"), SourceOptions(unit_size=2, index_on_cluster=True))
    indexed_by = {int(p.name) for p in pids.iterdir()}
    assert indexed_by and os.getpid() not in indexed_by  # Ray workers indexed, not the driver
    assert cluster.records.equals(threads.records) and cluster.units == threads.units
    assert cluster.shards.equals(threads.shards) and cluster.skipped_by_extension == threads.skipped_by_extension == 1
    assert cluster.shards["damaged"].to_pylist() == [i == 7 for i in range(webdataset.INDEX_THREADS + 4)]


def test_shards_plan_a_group_at_a_time_as_all_at_once(tmp_path, monkeypatch):
    """Samples planned a group of whole shards at a time into the store: the units and
    records of every shard planned at once; shards of a few samples each, so groups, units
    and records files all end at different shards."""
    import pyarrow as pa

    from pipeline.scan import sources, store, webdataset
    from pipeline.scan.sources import SourceOptions, plan_source
    from pipeline.scan.store import PlanRecordsWriter, ScanStore

    monkeypatch.setattr(webdataset, "INDEX_THREADS", 2)  # indexing runs 8 shards ahead
    monkeypatch.setattr(store, "UNITS_PER_RECORDS_FILE", 3)
    image = write_image(tmp_path / "one.jpg", seed=3)
    (tmp_path / "wds").mkdir()
    for shard in range(12):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(shard % 5):  # 0 to 4 samples: an empty shard too
                add(tar, f"{shard:05d}{i:04d}.jpg", image)
        (tmp_path / "wds" / f"shard-{shard:05d}.tar").write_bytes(buf.getvalue())
    whole = plan_source(str(tmp_path / "wds"), SourceOptions(unit_size=3))
    monkeypatch.setattr(sources, "STREAM_CHUNK_UNITS", 2)  # groups of at least 6 samples
    out = ScanStore(str(tmp_path / "out"))
    with PlanRecordsWriter(out) as sink:
        grouped = plan_source(str(tmp_path / "wds"), SourceOptions(unit_size=3), sink=sink)
    assert [(u.unit_id, u.rows) for u in grouped.units] == [(u.unit_id, u.rows) for u in whole.units]
    assert [u.rows for u in whole.units] == [1, 2, 3, 3, 1, 1, 2, 3, 3, 1, 1]  # never across shards
    assert pa.concat_tables(out.unit_records(u) for u in grouped.units).equals(whole.records)
    assert grouped.shards.equals(whole.shards) and grouped.records.num_rows == 0


def test_a_member_name_that_is_not_utf8_is_escaped_and_its_sample_read(tmp_path):
    """Old archives name members in Latin-1: no text column holds such a name, so it is
    escaped (as a folder's file name is), and the sample is read by its offsets as any.
    Hidden members plan as samples without an image."""
    from pipeline.scan.sources import SourceOptions, plan_source
    from pipeline.scan.webdataset import read_samples

    image = write_image(tmp_path / "x.jpg")
    with tarfile.open(tmp_path / "old.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        add(tar, "1_fake/caf\xe9.jpg", image)
        add(tar, "1_fake/ok.jpg", image)
        add(tar, ".keep", b"")  # hidden names (an empty key): no sample with an image, no crash
        add(tar, "1_fake/._ok.jpg", b"\x00\x05\x16\x07")  # macOS's AppleDouble twin: left out
    plan = plan_source(str(tmp_path / "old.tar"), SourceOptions())
    assert plan.records["uri"].to_pylist() == [f"{tmp_path}/old.tar#1_fake/caf\\xe9", f"{tmp_path}/old.tar#1_fake/ok"]
    assert plan.records["label"].to_pylist() == [1, 1] and plan.skipped_by_extension == 2
    _, names, payloads = read_samples(plan.records, 2, 2**20)
    assert names == ["1_fake/caf\\xe9.jpg", "1_fake/ok.jpg"] and payloads == [(image, None), (image, None)]


def test_a_member_name_splits_into_key_and_extension_as_its_normalized_path_says():
    """split_key's string operations agree with PurePosixPath's normalization on every form
    of name ('./a//b.jpg', '/x', 'a/.', hidden names, several dots)."""
    import random
    from pathlib import PurePosixPath

    from pipeline.scan.webdataset import split_key

    def by_path(name):
        path = PurePosixPath(name)
        stem, _, ext = path.name.partition(".")
        return (stem if str(path.parent) == "." else f"{path.parent}/{stem}"), ext.lower()

    pieces, rng = ["a", "b.JPG", "/", ".", "..", "c.seg.png", "._x", "#", " "], random.Random(0)
    names = {"".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))) for _ in range(5000)}
    assert all(split_key(n) == by_path(n) for n in names)
    assert split_key("dir/000123.seg.PNG") == ("dir/000123", "seg.png") and split_key("./a//b.jpg") == ("a/b", "jpg")
