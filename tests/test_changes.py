"""--update finds a folder's files changed in place or removed (by the versions its listing
gives: a disk's mtime and size, an S3 ETag), scores their units again, and records what
it found so that the next update finds nothing."""
import os
import time

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_image

from pipeline.scan.changes import VERSIONS_DIR
from pipeline.scan.config import ScanConfig
from pipeline.scan.listing import iter_files
from pipeline.scan.run import run_scan
from pipeline.scan.schema import VERSION
from pipeline.scan.sources import SourceOptions, plan_source
from pipeline.scan.store import PlanRecordsWriter, ScanStore


def rows_by_uri(out) -> dict:
    return {r["uri"]: r for r in pq.read_table(out / "scores").to_pylist()}


def part_times(out) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (out / "scores").glob("part-*.parquet")}


def rewrite(path, seed):
    """New content in place, its modification time moved on (a coarse clock could keep it)."""
    before = path.stat().st_mtime_ns
    write_image(path, seed=seed)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_an_update_scores_files_changed_in_place_again_and_reports_removed_ones(ray_local, parity_bundle,
                                                                                 tmp_path):
    src, out, fresh = tmp_path / "in", tmp_path / "out", tmp_path / "fresh"
    for i in range(6):
        write_image(src / f"{i}.png", seed=i)
    cfg = ScanConfig(unit_size=2)
    run_scan(str(parity_bundle), str(src), str(out), cfg)
    before, first = part_times(out), rows_by_uri(out)
    rewrite(src / "1.png", seed=100)
    (src / "4.png").unlink()
    write_image(src / "6.png", seed=6)

    updated = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(unit_size=2, update=True))
    assert updated["update"] == {"files_changed": 1, "files_removed": 1, "files_versioned": 0, "units_changed": 2}
    assert updated["units"]["new"] == 1 and updated["units"]["changed"] == 2 and updated["units"]["total"] == 4
    assert updated["this_run"]["rows"] == 5 and updated["rows_in"] == updated["rows_out"] == 7
    after = part_times(out)
    kept = [name for name in before if after[name] == before[name]]
    assert len(kept) == 1  # the unit of 2.png and 3.png was left as it was
    rows = rows_by_uri(out)
    assert VERSION not in pq.read_schema(next((out / "scores").glob("part-*.parquet"))).names
    run_scan(str(parity_bundle), str(src), str(fresh), cfg)  # the folder as it is now, scanned afresh
    now = rows_by_uri(fresh)
    changed = str(src / "1.png")
    assert rows[changed]["prob_fake"] == now[changed]["prob_fake"] != first[changed]["prob_fake"]
    assert rows[changed]["id"] == now[changed]["id"] != first[changed]["id"]  # the new content's sha256
    for uri in now:
        assert rows[uri]["prob_fake"] == now[uri]["prob_fake"]
    gone = rows[str(src / "4.png")]
    assert gone["prob_fake"] is None and gone["error"].startswith("read failed: FileNotFoundError")
    assert updated["errors_by_kind"] == {"read failed: FileNotFoundError": 1}

    again = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(unit_size=2, update=True))
    assert again["update"]["units_changed"] == again["units"]["changed"] == again["this_run"]["rows"] == 0
    # a removed file's read failure is not tried again: its unit is not scored again at every retry
    retry = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(unit_size=2, retry_errors=True))
    assert retry["units"]["retried"] == retry["this_run"]["rows"] == 0 and retry["errors"] == 1

    write_image(src / "4.png", seed=4)  # put back: changed again, and scored
    back = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(unit_size=2, update=True))
    assert back["update"] == {"files_changed": 1, "files_removed": 0, "files_versioned": 0, "units_changed": 1}
    assert rows_by_uri(out)[str(src / "4.png")]["prob_fake"] == first[str(src / "4.png")]["prob_fake"]
    assert back["errors"] == 0 and back["rows_out"] == 7


def plan_folder(src, out: ScanStore):
    with PlanRecordsWriter(out) as sink:
        plan = plan_source(str(src), SourceOptions(unit_size=2), sink=sink)
    out.save_plan(plan)
    return plan


def find_changes(out: ScanStore, commit: bool):
    _, added, found, versions = out.relist(out.load_plan(), SourceOptions(unit_size=2))
    if commit:
        versions.commit()
    return found, added


def test_an_update_interrupted_before_its_run_ended_finds_the_same_changes_again(tmp_path):
    src, out = tmp_path / "in", ScanStore(str(tmp_path / "out"))
    for i in range(5):
        write_image(src / f"{i}.png", seed=i)
    plan = plan_folder(src, out)
    rewrite(src / "3.png", seed=30)
    (src / "0.png").unlink()
    found, _ = find_changes(out, commit=False)  # as a run that dies before every unit is scored
    expected = {plan.units[0].unit_id, plan.units[1].unit_id}
    assert (found.changed, found.removed, found.units) == (1, 1, expected)
    assert os.listdir(tmp_path / "out" / VERSIONS_DIR) == ["000001-000000.parquet"]
    found, _ = find_changes(out, commit=True)
    assert (found.changed, found.removed, found.units) == (1, 1, expected)
    committed = ["000001-000000.parquet", "000001.committed"]
    assert sorted(os.listdir(tmp_path / "out" / VERSIONS_DIR)) == committed  # the uncommitted one was dropped
    found, added = find_changes(out, commit=True)
    assert (found.changed, found.removed, found.units, added) == (0, 0, frozenset(), [])
    assert sorted(os.listdir(tmp_path / "out" / VERSIONS_DIR)) == committed  # nothing found: no new generation


def test_a_plan_made_without_versions_gets_them_from_its_first_update_and_changes_after(tmp_path):
    src, out = tmp_path / "in", ScanStore(str(tmp_path / "out"))
    for i in range(4):
        write_image(src / f"{i}.png", seed=i)
    plan = plan_folder(src, out)
    for name in {u.file for u in plan.units}:  # as versions of this product before versions were recorded
        path = tmp_path / "out" / name
        pq.write_table(pq.read_table(path).drop_columns([VERSION]), path, row_group_size=2)
    rewrite(src / "2.png", seed=20)  # changed before any version was known: not detectable
    found, _ = find_changes(out, commit=True)
    assert (found.changed, found.removed, found.versioned, found.units) == (0, 0, 4, frozenset())
    rewrite(src / "1.png", seed=10)
    (src / "2.png").unlink()
    found, _ = find_changes(out, commit=True)
    assert (found.changed, found.removed, found.versioned) == (1, 1, 0)
    assert found.units == {plan.units[0].unit_id, plan.units[1].unit_id}


def test_listings_give_versions_that_change_with_a_files_content(tmp_path, s3_server, s3_bucket, monkeypatch):
    import s3fs

    from pipeline.scan import listing

    write_image(tmp_path / "a" / "x.png", seed=1)
    write_image(tmp_path / "y.png", seed=2)
    for i in range(5):
        (tmp_path / f"z{i}.txt").write_bytes(b"z" * i)
    local = dict(iter_files(str(tmp_path), versions=True))
    assert list(local) == list(iter_files(str(tmp_path))) and all(local.values())
    monkeypatch.setattr(listing, "STAT_CHUNK", 2)  # a directory's files stat'ed by the threads, in chunks,
    monkeypatch.setattr(listing, "SLOW_STAT_S", 0.0)  # as on a network filesystem
    assert list(iter_files(str(tmp_path), versions=True)) == list(local.items())
    rewrite(tmp_path / "y.png", seed=3)
    now = dict(iter_files(str(tmp_path), versions=True))
    assert now[f"{tmp_path}/y.png"] != local[f"{tmp_path}/y.png"] and now[f"{tmp_path}/a/x.png"] == local[
        f"{tmp_path}/a/x.png"]

    client = boto3.client("s3", endpoint_url=s3_server)
    for key, body in [("v/a.jpg", b"one"), ("v/sub/b.jpg", b"two")]:
        client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    s3fs.S3FileSystem.clear_instance_cache()
    first = dict(iter_files(f"s3://{s3_bucket}/v", versions=True))
    client.put_object(Bucket=s3_bucket, Key="v/a.jpg", Body=b"ONE")
    client.put_object(Bucket=s3_bucket, Key="v/sub/b.jpg", Body=b"two")  # written again, the same bytes
    second = dict(iter_files(f"s3://{s3_bucket}/v", versions=True))
    assert list(first) == [f"{s3_bucket}/v/a.jpg", f"{s3_bucket}/v/sub/b.jpg"]
    assert second[f"{s3_bucket}/v/a.jpg"] != first[f"{s3_bucket}/v/a.jpg"]
    assert second[f"{s3_bucket}/v/sub/b.jpg"] == first[f"{s3_bucket}/v/sub/b.jpg"]  # an ETag is the content's


def test_a_hugging_face_repository_files_version_is_its_blob_id():
    """HfFileSystem's listing entries (as the library builds them from the Hub's tree API)
    carry no ETag or time: a file's git blob id is its version, an LFS file's too (its
    pointer names the content's sha256), so a rewrite of the same size is seen."""
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.hf_file_system import _cache_info_from_path_info

    from pipeline.storage import listed_version

    def entry(oid: str, lfs_sha: str | None = None) -> dict:
        lfs = {"oid": lfs_sha, "size": 1234, "pointerSize": 134} if lfs_sha else None
        return _cache_info_from_path_info(RepoFile(path="data/train-00000.tar", size=1234, oid=oid, lfs=lfs),
                                          "datasets/org/set/data/train-00000.tar")

    assert listed_version(entry("a" * 40)) == f"{'a' * 40}:1234"
    assert listed_version(entry("b" * 40, "c" * 64)) != listed_version(entry("d" * 40, "e" * 64))


def test_versions_are_planning_bookkeeping_never_output_columns(tmp_path):
    src, out = tmp_path / "in", ScanStore(str(tmp_path / "out"))
    write_image(src / "0.png")
    plan = plan_folder(src, out)
    assert VERSION in out.unit_records(plan.units[0]).column_names
    from pipeline.scan.store import records_schema

    assert VERSION not in records_schema(out, plan).names


def test_an_s3_folders_objects_rewritten_or_deleted_are_found_by_their_etags(tmp_path, s3_server, s3_bucket):
    import s3fs

    client = boto3.client("s3", endpoint_url=s3_server)
    for i in range(4):
        client.put_object(Bucket=s3_bucket, Key=f"changes/0_real/{i}.jpg", Body=write_image(tmp_path / f"{i}.jpg",
                                                                                            seed=i))
    s3fs.S3FileSystem.clear_instance_cache()
    out = ScanStore(f"s3://{s3_bucket}/changes-out")  # the output on S3 too: versions kept there
    plan = plan_folder(f"s3://{s3_bucket}/changes", out)
    client.put_object(Bucket=s3_bucket, Key="changes/0_real/1.jpg", Body=write_image(tmp_path / "x.jpg", seed=9))
    client.put_object(Bucket=s3_bucket, Key="changes/0_real/2.jpg", Body=(tmp_path / "2.jpg").read_bytes())
    client.delete_object(Bucket=s3_bucket, Key="changes/0_real/3.jpg")
    found, added = find_changes(out, commit=True)
    assert (found.changed, found.removed, added) == (1, 1, [])  # 2.jpg written again with the same bytes
    assert found.units == {plan.units[0].unit_id, plan.units[1].unit_id}
    assert out.names(VERSIONS_DIR) == ["000001-000000.parquet", "000001.committed"]
    found, _ = find_changes(out, commit=True)
    assert (found.changed, found.removed, found.units) == (0, 0, frozenset())


def write_shard(path, seeds, tmp_path):
    """A Parquet shard of images, two a row group."""
    images = [write_image(tmp_path / "shard-src" / f"{s}.png", seed=s) for s in seeds]
    pq.write_table(pa.table({"bytes": images, "uri": [f"{path.name}#{s}" for s in seeds]}), path, row_group_size=2)


def test_parquet_shards_written_again_or_removed_are_scored_again(ray_local, parity_bundle, tmp_path):
    src, out = tmp_path / "shards", tmp_path / "out"
    src.mkdir()
    write_shard(src / "a.parquet", [0, 1, 2, 3], tmp_path)
    write_shard(src / "b.parquet", [4, 5], tmp_path)
    first = run_scan(str(parity_bundle), str(src), str(out), ScanConfig())
    assert first["units"]["total"] == 3
    before = part_times(out)
    write_shard(src / "a.parquet", [10, 11, 12, 13], tmp_path)  # new images, the same row groups
    (src / "b.parquet").unlink()
    updated = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(update=True))
    assert updated["update"] == {"files_changed": 1, "files_removed": 1, "files_versioned": 0, "units_changed": 3}
    assert updated["units"]["changed"] == 3 and updated["this_run"]["rows"] == 6 and updated["rows_out"] == 6
    assert all(part_times(out)[name] != t for name, t in before.items())
    rows = rows_by_uri(out)
    fresh = run_scan(str(parity_bundle), str(src), str(tmp_path / "fresh"), ScanConfig())
    assert fresh["rows_out"] == 4
    for uri, row in rows_by_uri(tmp_path / "fresh").items():
        assert rows[uri]["prob_fake"] == row["prob_fake"] and rows[uri]["id"] == row["id"]
    errors = [e for e in pq.read_table(out / "scores")["error"].to_pylist() if e]
    assert len(errors) == 2 and all(e.startswith("shard read failed: FileNotFoundError") for e in errors)
    assert "b.parquet" in errors[0]
    again = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(update=True, retry_errors=True))
    assert again["update"]["units_changed"] == again["this_run"]["rows"] == again["units"]["retried"] == 0


def test_a_shard_update_is_found_again_until_scored_and_other_row_groups_are_refused(tmp_path):
    src, out = tmp_path / "shards", ScanStore(str(tmp_path / "out"))
    src.mkdir()
    write_shard(src / "a.parquet", [0, 1, 2], tmp_path)
    write_shard(src / "b.parquet", [3, 4], tmp_path)
    with PlanRecordsWriter(out) as sink:
        plan = plan_source(str(src), SourceOptions(), sink=sink)
    out.save_plan(plan)
    assert all(u.version for u in plan.units)
    time.sleep(0.01)
    write_shard(src / "b.parquet", [5, 6], tmp_path)
    for commit in (False, True):  # not committed (a run that died): found again
        _, added, found, pending = out.relist(out.load_plan(), SourceOptions())
        assert (found.changed, found.removed, added) == (1, 0, []) and found.units == {plan.units[2].unit_id}
        if commit:
            pending.commit()
    _, _, found, pending = out.relist(out.load_plan(), SourceOptions())
    assert (found.changed, found.removed, found.units, pending) == (0, 0, frozenset(), None)

    stored = out.load_plan()  # as planned by a version of MIRROR that recorded no versions
    for u in stored.units:
        u.version = None
    out.save_plan(stored)
    _, _, found, _ = out.relist(out.load_plan(), SourceOptions())
    assert (found.versioned, found.changed, found.units) == (2, 0, frozenset())
    assert all(u.version for u in out.load_plan().units)

    write_shard(src / "a.parquet", [0, 1, 2, 7], tmp_path)  # another row group's worth of rows
    with pytest.raises(ValueError, match="written again with other row groups.*a.parquet"):
        out.relist(out.load_plan(), SourceOptions())


def test_many_updates_generations_are_merged_into_one_holding_each_files_latest_version(tmp_path, monkeypatch):
    from pipeline.scan import changes

    monkeypatch.setattr(changes, "MAX_GENERATIONS", 2)
    src, out = tmp_path / "in", ScanStore(str(tmp_path / "out"))
    for i in range(4):
        write_image(src / f"{i}.png", seed=i)
    plan_folder(src, out)
    for n in range(5):  # file n % 2 written again before each update
        rewrite(src / f"{n % 2}.png", seed=10 + n)
        found, _ = find_changes(out, commit=True)
        assert found.changed == 1
        generations = {name.split("-")[0].split(".")[0] for name in out.names(VERSIONS_DIR)}
        assert len(generations) <= 2 and all(f"{g}.committed" in out.names(VERSIONS_DIR) for g in generations)
    assert generations == {"000007"}  # 1-3 merged into 4; 4-6 into 7
    found, _ = find_changes(out, commit=True)
    assert (found.changed, found.removed, found.units) == (0, 0, frozenset())
    rewrite(src / "1.png", seed=99)
    found, _ = find_changes(out, commit=True)
    assert found.changed == 1


def test_removed_files_are_those_the_latest_update_to_list_each_found_gone(tmp_path):
    from pipeline.scan.changes import GONE, VersionsWriter, removed_files
    from pipeline.scan.uri_set import uri_digests

    store = ScanStore(str(tmp_path / "out"))
    uris = pa.array(["/in/a.png", "/in/b.png", "/in/c.png", "/in/d.png"])
    a, b, c, d = uri_digests(uris)
    for digests, versions in (([a, b], [GONE, 7]), ([a, c], [9, GONE]), ([d], [GONE])):
        writer = VersionsWriter(store)
        writer.add(np.array(digests), np.array(versions, np.uint64))
        if digests[0] != d:  # the last update's run never ended: what it found does not count
            writer.commit()
    assert removed_files(store).contains(uris).tolist() == [False, False, True, False]  # a was put back


def test_a_file_listed_without_a_version_is_neither_changed_nor_removed():
    from pipeline.scan.changes import KnownFiles

    class Versions:  # what the check hands on: nothing, here
        def add(self, digests, versions):
            assert not len(digests)

        def flush(self):
            pass

    planned = pa.table({"uri": ["/in/a.png", "/in/b.png"], "_unit": ["u0", "u0"], VERSION: ["1:5", "1:6"]})
    known = KnownFiles([planned], 2, ["u0"], [], Versions())
    assert known.check_listed(pa.table({"uri": ["/in/a.png", "/in/c.png"]})).tolist() == [True, False]
    assert known.check_listed(pa.table({"uri": ["/in/b.png"], VERSION: pa.array([None], pa.string())})).tolist() == [
        True]
    found = known.finish()
    assert (found.changed, found.removed, found.units) == (0, 0, frozenset())


def write_manifest(path, rows: list[tuple[str, str]]) -> None:
    path.write_text("uri,etag\n" + "".join(f"{uri},{etag}\n" for uri, etag in rows))


def test_a_manifest_with_a_version_column_has_its_changed_records_scored_again(ray_local, parity_bundle, tmp_path):
    """`columns.version`: a manifest that says each file's version (a catalog's ETag or hash)
    has the records whose version changed scored again by --update; a record the manifest
    no longer names keeps its row; a file named twice is checked in both rows."""
    images, out = tmp_path / "images", tmp_path / "out"
    for i in range(4):
        write_image(images / f"{i}.png", seed=i)
    uris = [str(images / f"{i}.png") for i in range(4)]
    manifest = tmp_path / "list.csv"
    write_manifest(manifest, [(uris[0], "e0"), (uris[1], "e1"), (uris[2], "e2"), (uris[3], "e3"), (uris[1], "e1")])
    cfg = ScanConfig(unit_size=2, columns={**ScanConfig().columns, "version": "etag"})
    first = run_scan(str(parity_bundle), str(manifest), str(out), cfg)
    assert first["rows_out"] == 5 and first["errors"] == 0
    before = part_times(out)
    write_image(images / "1.png", seed=11)  # the catalog records its new version
    write_manifest(manifest, [(uris[0], "e0"), (uris[1], "e1b"), (uris[2], "e2"), (uris[1], "e1b")])  # 3.png gone
    updated = run_scan(str(parity_bundle), str(manifest), str(out), ScanConfig(unit_size=2, update=True,
                                                                                columns=cfg.columns))
    assert updated["update"] == {"files_changed": 1, "files_removed": 1, "files_versioned": 0, "units_changed": 2}
    assert updated["this_run"]["rows"] == 3 and updated["rows_out"] == 5  # units of rows 0-1 and 4; 3.png's kept
    after = part_times(out)
    assert len([n for n in before if after[n] == before[n]]) == 1
    rows = pq.read_table(out / "scores").to_pylist()
    fresh = run_scan(str(parity_bundle), str(images), str(tmp_path / "fresh"), ScanConfig())
    assert fresh["rows_out"] == 4
    now = {r["uri"]: r for r in pq.read_table(tmp_path / "fresh" / "scores").to_pylist()}
    for row in rows:  # every row, the one of 3.png too, holds the score of the file as it is now
        assert row["prob_fake"] == now[row["uri"]]["prob_fake"] and row["etag"] is not None
    assert VERSION not in pq.read_schema(next((out / "scores").glob("part-*.parquet"))).names
    again = run_scan(str(parity_bundle), str(manifest), str(out), ScanConfig(unit_size=2, update=True,
                                                                              columns=cfg.columns))
    assert again["update"] == {"files_changed": 0, "files_removed": 0, "files_versioned": 0, "units_changed": 0}


def test_a_manifest_version_column_must_be_there_and_bytes_are_hex(tmp_path):
    from pipeline.scan.sources import ColumnMap

    write_manifest(tmp_path / "list.csv", [("a.png", "e0")])
    with pytest.raises(ValueError, match="columns.version names 'md5', which manifest .*list.csv lacks"):
        plan_source(str(tmp_path / "list.csv"), SourceOptions(columns=ColumnMap(version="md5")))
    pq.write_table(pa.table({"uri": ["a.png", "b.png"], "md5": [b"\x01\xff", None]}), tmp_path / "list.parquet")
    plan = plan_source(str(tmp_path / "list.parquet"), SourceOptions(columns=ColumnMap(version="md5")))
    assert plan.records[VERSION].to_pylist() == ["01ff", None] and "md5" in plan.records.column_names
    pq.write_table(pa.table({"uri": ["a.png"], "meta": [{"etag": "x"}]}), tmp_path / "nested.parquet")
    with pytest.raises(ValueError, match="names 'meta' of manifest .*nested.parquet, of type struct"):
        plan_source(str(tmp_path / "nested.parquet"), SourceOptions(columns=ColumnMap(version="meta")))


def test_a_parquet_shard_written_again_after_planning_gives_shard_changed_rows_not_other_rows(tmp_path):
    """A resumed scan (or --retry-errors) reads a shard's row group by position: a shard
    written again since its plan holds other rows there, maybe another count of them."""
    import json

    from pipeline.scan.decode import decode_units

    src = tmp_path / "shards"
    src.mkdir()
    write_shard(src / "a.parquet", [0, 1, 2, 3], tmp_path)
    units = plan_source(str(src), SourceOptions()).units

    def errors_of(unit) -> list:
        batch = {"key": ["0/u"], "unit": [json.dumps(vars(unit))], "records": [None], "target": ["{}"],
                 "perturbation": [""]}
        return [e for t in decode_units(batch, preprocess={}, columns={}) for e in t["error"].to_pylist()]

    assert errors_of(units[0]) == [None, None]
    time.sleep(0.01)
    write_shard(src / "a.parquet", [5, 6, 7, 8], tmp_path)  # the same row groups, other images
    errors = errors_of(units[0])
    assert len(errors) == 2 and all(e.startswith(f"shard changed: {src / 'a.parquet'} was written again") and
                                    e.endswith("mirror scan --update plans it again") for e in errors)
    pq.write_table(pa.table({"bytes": [b"x"] * 3, "uri": ["a", "b", "c"]}), src / "a.parquet", row_group_size=3)
    units[1].version = None  # a plan without versions: the row group's size tells
    errors = errors_of(units[1])
    assert len(errors) == 2 and all("holds other row groups than planned (row group 1 of 2 rows)" in e for e in errors)


def test_a_parquet_shard_served_over_http_is_read_as_the_version_planned(tmp_path):
    """Its version planned is the one a later HEAD tells (the server's ETag and size)."""
    from web_server import ImageServer

    from pipeline.scan.reads import ShardChangedError, read_shard_unit
    from pipeline.scan.sources import ColumnMap

    src = tmp_path / "shards"
    src.mkdir()
    write_shard(src / "a.parquet", [0, 1, 2, 3], tmp_path)
    with ImageServer(str(src)) as server:
        plan = plan_source(f"{server.url}/files/a.parquet", SourceOptions())
        assert plan.input_format == "parquet" and plan.units[0].version.startswith('"')
        assert read_shard_unit(plan.units[0], ColumnMap(), with_bytes=True).num_rows == 2
        time.sleep(0.01)
        write_shard(src / "a.parquet", [5, 6, 7, 8], tmp_path)
        with pytest.raises(ShardChangedError):
            read_shard_unit(plan.units[0], ColumnMap(), with_bytes=True)


def test_parquet_shards_named_by_a_brace_pattern_of_links_scan_and_update(ray_local, parity_bundle, tmp_path):
    """A dataset's shards on a web server, named by a pattern as a hub names them
    (`data/train-{00000..00001}-of-00002.parquet`): scanned in place, row group by row
    group; a shard gone from the server is found removed by an update."""
    from web_server import ImageServer

    src, out = tmp_path / "shards", tmp_path / "out"
    src.mkdir()
    write_shard(src / "train-00000-of-00002.parquet", [0, 1, 2, 3], tmp_path)
    write_shard(src / "train-00001-of-00002.parquet", [4, 5], tmp_path)
    run_scan(str(parity_bundle), str(src), str(tmp_path / "local"), ScanConfig())  # the same shards, on disk
    with ImageServer(str(src)) as server:
        pattern = f"{server.url}/files/train-{{00000..00001}}-of-00002.parquet"
        first = run_scan(str(parity_bundle), pattern, str(out), ScanConfig())
        assert (first["input_format"], first["rows_out"], first["errors"]) == ("parquet", 6, 0)
        here = rows_by_uri(tmp_path / "local")
        assert {u: r["prob_fake"] for u, r in rows_by_uri(out).items()} == {u: r["prob_fake"] for u, r in here.items()}
        with pytest.raises(FileNotFoundError, match="Parquet shard .*train-00002-of-00002.parquet does not exist"):
            plan_source(f"{server.url}/files/train-{{00000..00002}}-of-00002.parquet", SourceOptions())

        (src / "train-00001-of-00002.parquet").unlink()
        updated = run_scan(str(parity_bundle), pattern, str(out), ScanConfig(update=True))
        assert updated["update"] == {"files_changed": 0, "files_removed": 1, "files_versioned": 0, "units_changed": 1}
        errors = [e for e in pq.read_table(out / "scores")["error"].to_pylist() if e]
        assert len(errors) == 2 and all(e.startswith("shard read failed: FileNotFoundError") for e in errors)
