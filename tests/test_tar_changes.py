"""--update of WebDataset tar shards: a shard written again (other bytes at the planned
offsets) is indexed again and its units scored again from the new index; a removed one's
rows become read errors; decode tasks never read a changed shard by the old offsets."""
import io
import os
import tarfile

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import write_image

from pipeline.scan import webdataset
from pipeline.scan.config import ScanConfig
from pipeline.scan.run import run_scan
from pipeline.scan.sources import SourceOptions, plan_source
from pipeline.scan.store import RECORDS_DIR, PlanRecordsWriter, ScanStore, stored_records


def tar_bytes(samples: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, image in samples:
            for name, data in ((f"{key}.png", image), (f"{key}.txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(path, samples: dict[str, int], images) -> None:
    """A shard of `samples` (key -> seed) in that order; each image also in `images`/key.png.
    Its modification time moves on (a coarse clock could keep it)."""
    before = path.stat().st_mtime_ns if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes([(k, write_image(images / f"{k}.png", size=(64 + 8 * s, 64), seed=s))
                                for k, s in samples.items()]))
    if before is not None:
        os.utime(path, ns=(before + 10**9, before + 10**9))


def rows_by_key(out) -> dict:
    return {r["uri"].rsplit("#", 1)[1]: r for r in pq.read_table(out / "scores").to_pylist()}


def records_files(store: ScanStore) -> set[str]:
    return {f"{RECORDS_DIR}/{name}" for name in store.names(RECORDS_DIR)}


def part_times(out) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (out / "scores").glob("part-*.parquet")}


def test_a_shard_written_again_is_never_read_by_old_offsets_and_an_update_scores_it_again(ray_local, parity_bundle,
                                                                                          tmp_path):
    src, out, images = tmp_path / "wds", tmp_path / "out", tmp_path / "images"
    write_tar(src / "a.tar", {"a0": 0, "a1": 1, "a2": 2, "a3": 3}, images)
    write_tar(src / "b.tar", {"b0": 4, "b1": 5}, images)
    cfg = ScanConfig(unit_size=2)
    first = run_scan(str(parity_bundle), str(src), str(out), cfg)
    assert first["rows_out"] == 6 and first["errors"] == 0
    before = part_times(out)
    plan = ScanStore(str(out)).load_plan()
    a_units = [u for u in plan.units if ScanStore(str(out)).unit_records(u)["uri"][0].as_py().endswith(("a0", "a2"))]
    assert len(a_units) == 2 and all(u.version for u in plan.units)
    # a run interrupted before a0's unit was committed; the shard is then downloaded again:
    # other images, in another order, a3 gone and a4 new
    (out / "scores" / f"part-{a_units[0].unit_id}.parquet").unlink()
    write_tar(src / "a.tar", {"a4": 14, "a2": 12, "a1": 11, "a0": 10}, images)

    resumed = run_scan(str(parity_bundle), str(src), str(out), cfg)
    rows = rows_by_key(out)
    assert resumed["this_run"]["rows"] == 2
    for key in ("a0", "a1"):  # never the image now at the planned offsets
        assert rows[key]["error"].startswith("shard changed: ") and "a.tar was written again" in rows[key]["error"]
        assert rows[key]["prob_fake"] is None
    assert resumed["errors_by_kind"] == {"shard changed": 2}

    updated = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(unit_size=2, update=True))
    assert updated["update"] == {"files_changed": 1, "files_removed": 0, "files_versioned": 0, "units_changed": 2}
    assert updated["units"]["new"] == 1 and updated["units"]["changed"] == 2
    assert updated["rows_in"] == updated["rows_out"] == 7 and updated["this_run"]["rows"] == 5
    after = part_times(out)
    assert [n for n in before if after.get(n) == before[n]] == [f"part-{u.unit_id}.parquet" for u in plan.units
                                                                  if u not in a_units]  # b.tar's unit untouched
    fresh = tmp_path / "fresh"
    run_scan(str(parity_bundle), str(images), str(fresh), ScanConfig())  # the images the shards hold now
    reference = {r["uri"].rsplit("/", 1)[1][:-4]: r for r in pq.read_table(fresh / "scores").to_pylist()}
    rows = rows_by_key(out)
    for key in ("a0", "a1", "a2", "a4", "b0", "b1"):
        assert rows[key]["error"] is None and rows[key]["prob_fake"] == reference[key]["prob_fake"], key
        assert rows[key]["txt"] == f"caption {key}"
    assert rows["a3"]["error"] == f"sample removed: {src / 'a.tar'}#a3 is no longer in its shard"
    shards = ScanStore(str(out)).load_plan().shards.to_pylist()
    assert {r["uri"]: r["version"] for r in shards} == {str(src / s): webdataset.index_shard(str(src / s))[2]
                                                        for s in ("a.tar", "b.tar")}

    (src / "b.tar").unlink()
    removed = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(unit_size=2, update=True))
    assert removed["update"] == {"files_changed": 0, "files_removed": 1, "files_versioned": 0, "units_changed": 1}
    rows = rows_by_key(out)
    assert all(rows[k]["error"].startswith("read failed: FileNotFoundError") for k in ("b0", "b1"))
    again = run_scan(str(parity_bundle), str(src), str(out), ScanConfig(unit_size=2, update=True))
    assert again["update"]["units_changed"] == again["this_run"]["rows"] == 0 and again["rows_out"] == 7


def plan_tars(src: str, out: ScanStore):
    with PlanRecordsWriter(out) as sink:
        plan = plan_source(src, SourceOptions(unit_size=2), sink=sink)
    out.save_plan(plan)
    return plan


def test_a_tar_update_is_found_again_until_scored_and_old_plans_get_versions(tmp_path):
    src, out, images = tmp_path / "wds", ScanStore(str(tmp_path / "out")), tmp_path / "images"
    write_tar(src / "a.tar", {"a0": 0, "a1": 1, "a2": 2}, images)
    write_tar(src / "b.tar", {"b0": 3}, images)
    plan = plan_tars(str(src), out)
    old_records = [out.unit_records(u) for u in plan.units]
    write_tar(src / "a.tar", {"a1": 7, "a0": 6, "a2": 8}, images)  # the same samples, at other offsets
    a_units = {u.unit_id for u in plan.units[:2]}
    for commit in (False, True):  # not committed (a run that died): found again, the stored plan as it was
        stored = out.load_plan()
        scored, added, found, pending = out.relist(stored, SourceOptions(unit_size=2))
        assert (found.changed, found.removed, added, found.units) == (1, 0, [], a_units)
        fresh = [out.unit_records(u) for u in scored.units]  # what the run reads
        members = {r["uri"]: r[webdataset.MEMBERS] for t in fresh for r in t.to_pylist()}
        assert members == {r["uri"]: r[webdataset.MEMBERS] for r in webdataset.index_shard(str(src / "a.tar"))[0]
                           + webdataset.index_shard(str(src / "b.tar"))[0]}
        assert all(u.version == webdataset.index_shard(str(src / "a.tar"))[2] for u in scored.units[:2])
        if commit:  # the refreshed records of the run that died are removed, the first file kept (b.tar's unit)
            pending.commit()
            assert records_files(out) == {u.file for u in out.load_plan().units} == {plan.units[0].file,
                                                                                     scored.units[0].file}
        else:  # the stored plan still points at the records as first planned
            assert [out.unit_records(u) for u in out.load_plan().units] == old_records
            assert len(records_files(out)) == 2
    _, _, found, pending = out.relist(out.load_plan(), SourceOptions(unit_size=2))
    assert (found.changed, found.removed, found.units, pending) == (0, 0, frozenset(), None)
    # the records streamed (audits, training, the next update) are the refreshed ones, once
    # each: the first records file still holds the replaced ones
    streamed = pa.concat_tables(stored_records(out, out.load_plan()))
    assert streamed.num_rows == 4 and streamed.to_pylist() == pa.concat_tables(fresh).to_pylist()

    stored = out.load_plan()  # as planned by a version of MIRROR that recorded no versions
    for u in stored.units:
        u.version = None
    stored.shards = stored.shards.drop_columns(["version"])
    damaged = [uri.endswith("a.tar") for uri in stored.shards["uri"].to_pylist()]  # a.tar: still being written
    stored.shards = stored.shards.set_column(3, "damaged", pa.array(damaged))
    out.save_plan(stored)
    _, _, found, pending = out.relist(out.load_plan(), SourceOptions(unit_size=2))
    # b.tar gets its version; a.tar, damaged when indexed, is indexed again (its rest planned)
    assert (found.versioned, found.changed, found.units) == (1, 1, a_units)
    pending.commit()
    assert records_files(out) == {u.file for u in out.load_plan().units}  # the replaced refreshed file: removed
    assert all(u.version for u in out.load_plan().units)
    write_tar(src / "b.tar", {"b0": 9}, images)
    _, _, found, _ = out.relist(out.load_plan(), SourceOptions(unit_size=2))
    assert (found.changed, found.units) == (1, {plan.units[2].unit_id})


def test_tar_shards_on_s3_keep_their_etags_by_listing_and_by_brace_pattern(tmp_path, s3_server, s3_bucket):
    import s3fs

    client = boto3.client("s3", endpoint_url=s3_server)
    images = tmp_path / "images"
    for name, samples in (("a", {"a0": 0, "a1": 1}), ("b", {"b0": 2})):
        write_tar(tmp_path / f"{name}.tar", samples, images)
        client.put_object(Bucket=s3_bucket, Key=f"wds/{name}.tar", Body=(tmp_path / f"{name}.tar").read_bytes())
    s3fs.S3FileSystem.clear_instance_cache()
    for n, src in enumerate((f"s3://{s3_bucket}/wds", f"s3://{s3_bucket}/wds/{{a,b}}.tar")):
        out = ScanStore(str(tmp_path / f"out{n}"))
        plan = plan_tars(src, out)
        _, _, found, _ = out.relist(out.load_plan(), SourceOptions(unit_size=2))
        assert (found.changed, found.removed, found.versioned, found.units) == (0, 0, 0, frozenset())
        # a decode task finds the version it was planned with: the samples read
        records = out.unit_records(plan.units[0])
        _, _, payloads = webdataset.read_samples(records, 2, 2**20, plan.units[0].version)
        assert all(error is None for _, error in payloads)
        client.put_object(Bucket=s3_bucket, Key="wds/a.tar", Body=tar_bytes([("a1", b"x" * 600), ("a0", b"y")]))
        _, _, payloads = webdataset.read_samples(records, 2, 2**20, plan.units[0].version)
        assert all(error.startswith("shard changed: ") for _, error in payloads)
        _, _, found, _ = out.relist(out.load_plan(), SourceOptions(unit_size=2))
        assert (found.changed, found.units) == (1, {plan.units[0].unit_id})
        client.put_object(Bucket=s3_bucket, Key="wds/a.tar", Body=(tmp_path / "a.tar").read_bytes())
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_shard_of_no_images_that_gains_some_is_indexed_once_and_one_removed_is_counted_once(tmp_path,
                                                                                                monkeypatch):
    src, out, images = tmp_path / "wds", ScanStore(str(tmp_path / "out")), tmp_path / "images"
    write_tar(src / "a.tar", {"a0": 0}, images)
    (src / "empty.tar").write_bytes(tar_bytes([]))  # no sample with an image: no unit
    (src / "gone.tar").write_bytes(tar_bytes([]))
    plan_tars(str(src), out)
    write_tar(src / "empty.tar", {"e0": 1, "e1": 2}, images)
    (src / "gone.tar").unlink()
    _, added, found, pending = out.relist(out.load_plan(), SourceOptions(unit_size=2))
    assert (found.changed, found.removed, [u.rows for u in added], found.units) == (1, 1, [2], frozenset())
    pending.commit()  # as a run does once it has scored the new unit
    indexed = []
    original = webdataset.index_shard
    monkeypatch.setattr(webdataset, "index_shard", lambda uri, *a, **kw: indexed.append(uri) or original(uri, *a, **kw))
    _, added, found, pending = out.relist(out.load_plan(), SourceOptions(unit_size=2))
    assert (indexed, added, found.changed, found.removed, found.units, pending) == ([], [], 0, 0, frozenset(), None)


def test_tar_shards_served_over_http_keep_their_etags_scan_and_update(ray_local, parity_bundle, tmp_path):
    """A brace pattern of links (a dataset's shards on a web server or a hub): the version
    indexed is the one a later HEAD tells (ETag and size), so every row scores; a shard
    written again on the server is `shard changed` until an update indexes it again."""
    from web_server import ImageServer

    src, out, images = tmp_path / "wds", tmp_path / "out", tmp_path / "images"
    write_tar(src / "000.tar", {"a0": 0, "a1": 1, "a2": 2}, images)
    write_tar(src / "001.tar", {"b0": 3}, images)
    with ImageServer(str(src)) as server:
        shards = f"{server.url}/files/{{000..001}}.tar"
        first = run_scan(str(parity_bundle), shards, str(out), ScanConfig(unit_size=2))
        assert (first["rows_out"], first["errors"]) == (4, 0), first["errors_by_kind"]
        plan = ScanStore(str(out)).load_plan()
        assert all(v.startswith('"') for v in plan.shards["version"].to_pylist())  # the server's ETag
        again = run_scan(str(parity_bundle), shards, str(out), ScanConfig(unit_size=2, update=True))
        assert again["update"]["units_changed"] == again["this_run"]["rows"] == 0  # nothing changed: nothing found

        write_tar(src / "000.tar", {"a1": 7, "a0": 6, "a2": 8}, images)  # on the server: other images, other offsets
        unit = plan.units[0]
        records = ScanStore(str(out)).unit_records(unit)
        _, _, payloads = webdataset.read_samples(records, 2, 2**20, unit.version)
        assert all(e.startswith(f"shard changed: {server.url}/files/000.tar was written again") for _, e in payloads)
        updated = run_scan(str(parity_bundle), shards, str(out), ScanConfig(unit_size=2, update=True))
        assert updated["update"]["files_changed"] == 1 and updated["this_run"]["rows"] == 3
        assert updated["errors"] == 0 and updated["rows_out"] == 4

        # links that redirect to the file (a hub's resolve/ links to its CDN): the same versions
        for name in ("000", "001"):
            server.redirects[f"/resolve/{name}.tar"] = f"{server.url}/files/{name}.tar"
        redirected = plan_tars(f"{server.url}/resolve/{{000..001}}.tar", ScanStore(str(tmp_path / "redirected")))
        def versions(plan) -> dict:
            return {r["uri"].rsplit("/", 1)[1]: r["version"] for r in plan.shards.to_pylist()}

        assert versions(redirected) == versions(ScanStore(str(out)).load_plan())
        unit = redirected.units[0]
        _, _, payloads = webdataset.read_samples(ScanStore(str(tmp_path / "redirected")).unit_records(unit), 2, 2**20,
                                                 unit.version)
        assert [e for _, e in payloads] == [None, None]
