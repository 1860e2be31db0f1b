"""A folder's listing streamed in sorted order (local and a real S3 protocol server), and a
folder input planned from it in bounded memory with the units a whole listing gives."""
import hashlib
import os
import random
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import boto3
import fsspec
import pytest
from conftest import write_image

from pipeline.scan import listing, sources, store
from pipeline.scan.listing import iter_files, key_between
from pipeline.scan.schema import VERSION
from pipeline.scan.sources import SourceOptions, inline_units, list_images, plan_source
from pipeline.scan.store import PlanRecordsWriter, ScanStore

# names whose sorted order is not a directory walk's naive one: '-' and '.' sort before '/'
TRICKY = ["A", "a-b", "a.b", "a/b-c", "a/b.c.d", "a/b.c/d", "a/b/c", "a/b/c0", "a0", "b-c.jpg",
          "b/c/d/e.jpg", "é/x", "z z/1", "z z/10", "z z/2"]


def test_a_local_folder_streams_in_the_order_of_a_sorted_find(tmp_path):
    for name in TRICKY:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    fs, base = fsspec.core.url_to_fs(str(tmp_path))
    assert list(iter_files(str(tmp_path))) == sorted(fs.find(base)) == [f"{base}/{n}" for n in sorted(TRICKY)]


def test_linked_folders_are_walked_and_a_link_back_up_is_a_loop_walked_once(tmp_path, caplog):
    """A link to a folder is walked as the folder (datasets link their parts in); a link
    to a folder above it would be walked without end, the same images listed again under
    ever longer names, until the system refused the path."""
    for name in ("data/0_real/a.jpg", "data/1_fake/b.png", "elsewhere/c.jpg"):
        write_image(tmp_path / name)
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "extra")  # walked: another folder
    os.symlink("..", tmp_path / "data" / "0_real" / "up")  # a loop back to data/
    os.symlink(tmp_path / "data", tmp_path / "data" / "1_fake" / "root")  # another, by an absolute link
    os.symlink("self.jpg", tmp_path / "data" / "self.jpg")  # a link to itself: a file whose read fails
    root = str(tmp_path / "data")
    with caplog.at_level("WARNING", logger="mirror"):
        files = list(iter_files(root, versions=True))
    assert [p for p, _ in files] == [f"{root}/{n}" for n in ("0_real/a.jpg", "1_fake/b.png", "extra/c.jpg",
                                                             "self.jpg")]
    assert [v is None for _, v in files] == [False, False, False, True]
    assert sorted(m for m in caplog.messages if "loop" in m) == [
        f"{root}/0_real/up links back to a folder above it (a loop): not walked again",
        f"{root}/1_fake/root links back to a folder above it (a loop): not walked again"]
    plan = plan_source(root, SourceOptions())
    assert plan.records.num_rows == 4 and plan.records["label"].to_pylist() == [0, 1, None, None]
    # a benchmark's folders are listed alike (its sub-datasets are often links to where they live)
    assert list_images(root)["uri"].to_pylist() == plan.records["uri"].to_pylist()


def test_any_other_filesystem_streams_in_the_order_of_a_sorted_find():
    fs = fsspec.filesystem("memory")  # fsspec's own in-memory filesystem: the walk by fs.ls
    for name in TRICKY:
        fs.pipe_file(f"/listing-test/{name}", b"")
    try:
        assert list(iter_files("memory://listing-test")) == sorted(fs.find("/listing-test"))
        assert len(sorted(fs.find("/listing-test"))) == len(TRICKY)
    finally:
        fs.rm("/listing-test", recursive=True)


@pytest.fixture
def s3_tree(s3_server, s3_bucket, monkeypatch):
    """TRICKY plus prefixes of many keys, under 'root/', in pages of 3 keys, 2 prefixes at a
    time: every page and look-ahead edge is crossed."""
    client = boto3.client("s3", endpoint_url=s3_server)
    keys = [f"root/{n}" for n in TRICKY] + [f"root/p{i:02d}/k{j:02d}.jpg" for i in range(6) for j in range(i * 3)]
    keys += ["root/nested/x/", "root/marker-only/"]  # directory markers (consoles make them): not files
    for key in keys:
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"")
    client.put_object(Bucket=s3_bucket, Key="rootless.jpg", Body=b"")  # beside the root, not below it
    monkeypatch.setattr(listing, "S3_PAGE_KEYS", 3)
    monkeypatch.setattr(listing, "PREFIXES_AHEAD", 2)
    monkeypatch.setattr(listing, "ENTRIES_AHEAD", 4)
    return sorted(f"{s3_bucket}/{k}" for k in keys if not k.endswith("/"))


def test_an_s3_prefix_streams_in_key_order_by_pages_and_prefixes_listed_ahead(s3_bucket, s3_tree):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs, base = fsspec.core.url_to_fs(f"s3://{s3_bucket}/root")
    assert [p for p in sorted(fs.find(base)) if not p.endswith("/")] == s3_tree  # find lists markers as files
    fs.invalidate_cache()
    before = threading.active_count()
    assert list(iter_files(f"s3://{s3_bucket}/root/")) == list(iter_files(f"s3://{s3_bucket}/root")) == s3_tree
    assert not fs.dircache  # nothing of the listing stays cached
    files = iter_files(f"s3://{s3_bucket}/root")
    assert [next(files) for _ in range(3)] == s3_tree[:3]
    files.close()  # abandoned after a few: its listing threads end
    for _ in range(50):
        if threading.active_count() <= before:
            break
        threading.Event().wait(0.1)
    assert threading.active_count() <= before


def test_a_listing_refused_below_the_root_fails_the_listing_naming_it(s3_server, s3_bucket, s3_tree):
    import s3fs
    from s3_faults import FaultProxy

    with FaultProxy(s3_server, deny_listings=("root/p03/",)) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            seen = []
            with pytest.raises(PermissionError, match=f"access denied listing s3://{s3_bucket}/root/p03/"):
                for path in iter_files(f"s3://{s3_bucket}/root"):
                    seen.append(path)
            assert seen == [p for p in s3_tree if p < f"{s3_bucket}/root/p03/"]  # nothing skipped silently
            assert proxy.denied >= 1
        finally:
            os.environ["AWS_ENDPOINT_URL"] = s3_server
            s3fs.S3FileSystem.clear_instance_cache()


def test_a_split_key_lies_between_its_bounds_and_keeps_the_prefix():
    rng = random.Random(0)
    alphabet = "aZ09-_./ ~!\x7fé中"
    found = 0
    for _ in range(20_000):
        low, high = ("p/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5))) for _ in range(2))
        if rng.random() < 0.3:
            high = None
        elif low == high:
            continue
        elif low > high:
            low, high = high, low
        split = key_between(low, high, keep=2)
        if split is None:  # only when no printable character fits: 'p/a' and 'p/a!'
            assert high is not None
            continue
        found += 1
        assert low < split and (high is None or split < high) and split.startswith("p/"), (low, high, split)
        assert all(0x21 <= ord(c) <= 0x7E for c in split[len(os.path.commonprefix([low, split])):])
    assert found > 15_000
    assert key_between("p/a", "p/a!", keep=2) is None
    assert key_between("img/000999.jpg", None, keep=4) == "img/W"  # bisects where the keys differ
    assert key_between("img/000999.jpg", "img/4", keep=4) == "img/2"


def test_a_flat_prefix_of_many_keys_lists_many_ranges_at_once_in_key_order(s3_server, s3_bucket, monkeypatch):
    """Files directly below the root (numbered, hashed, odd names) and in a subdirectory, in
    pages of 7 keys behind a store answering in 20 ms: the listing splits into key ranges
    listed at once (StartAfter requests, several in flight), within its page buffers, and
    yields exactly the sorted keys."""
    import s3fs
    from s3_faults import FaultProxy

    client = boto3.client("s3", endpoint_url=s3_server)
    names = ([f"{i:06d}.jpg" for i in range(150)] + [hashlib.sha1(str(i).encode()).hexdigest() for i in range(100)]
             + [f"z z/{i}" for i in range(20)] + ["~tilde", "é.jpg", "中.png", "a b.jpg", "sub/", "sub/x/"]
             + [f"sub/{i:03d}.webp" for i in range(60)])
    keys = [f"flat/{n}" for n in names]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=s3_bucket, Key=k, Body=b""), keys))
    expected = sorted(f"{s3_bucket}/{k}" for k in keys if not k.endswith("/"))
    monkeypatch.setattr(listing, "S3_PAGE_KEYS", 7)
    monkeypatch.setattr(listing, "PAGES_AHEAD", 12)
    with FaultProxy(s3_server, delay_s=0.02) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            assert list(iter_files(f"s3://{s3_bucket}/flat")) == expected
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
    assert proxy.max_in_flight > 4
    assert sum("start-after" in q for q in proxy.listings) > 10
    serial_pages = -(-len(keys) // 7)
    assert len(proxy.listings) < 2 * serial_pages, (len(proxy.listings), serial_pages)  # splits cost little


def test_an_s3_client_configured_with_more_connections_lists_more_pages_at_once(s3_server, s3_bucket, monkeypatch):
    """A user who raises the s3fs client's pool (fsspec's configuration, as FSSPEC_S3 sets
    it) gets that many list requests at once, not botocore's default 10."""
    import s3fs
    from s3_faults import FaultProxy

    client = boto3.client("s3", endpoint_url=s3_server)
    keys = [f"wide/{hashlib.sha1(str(i).encode()).hexdigest()}" for i in range(400)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=s3_bucket, Key=k, Body=b""), keys))
    monkeypatch.setattr(listing, "S3_PAGE_KEYS", 4)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {"max_pool_connections": 24}})
    with FaultProxy(s3_server, delay_s=0.05) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            assert list(iter_files(f"s3://{s3_bucket}/wide")) == sorted(f"{s3_bucket}/{k}" for k in keys)
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
    assert proxy.max_in_flight > 16, proxy.max_in_flight

def _folder(root, subsets: int, per_folder: int) -> None:
    for s in range(subsets):
        for label in ("0_real", "1_fake"):
            folder = root / f"set{s}" / label
            folder.mkdir(parents=True)
            for i in range(per_folder):
                (folder / f"{i:05d}.jpg").write_bytes(b"")
            (folder / "notes.txt").write_bytes(b"")


def test_a_streamed_folder_plans_the_units_and_records_of_a_whole_listing(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "STREAM_BATCH_ROWS", 7)  # batches and chunks cross the folders' edges
    monkeypatch.setattr(sources, "STREAM_CHUNK_UNITS", 3)
    monkeypatch.setattr(store, "UNITS_PER_RECORDS_FILE", 4)
    root = tmp_path / "in"
    _folder(root, 3, 11)
    write_image(root / "top.png")  # an image beside the subsets
    whole = list_images(str(root))
    units, records = inline_units(whole, 5, str(root))
    in_memory = plan_source(str(root), SourceOptions(unit_size=5))
    out = ScanStore(str(tmp_path / "scan"))
    with PlanRecordsWriter(out) as sink:
        streamed = plan_source(str(root), SourceOptions(unit_size=5), sink=sink)
    assert [(u.unit_id, u.rows) for u in streamed.units] == [(u.unit_id, u.rows) for u in units]
    stored = out.plan_records(streamed)
    assert all(in_memory.records[VERSION].to_pylist()) and stored[VERSION] == in_memory.records[VERSION]
    assert in_memory.records.drop_columns([VERSION]).to_pylist() == records.to_pylist()
    assert stored.drop_columns([VERSION]).to_pylist() == records.to_pylist()
    assert streamed.skipped_by_extension == in_memory.skipped_by_extension == 6
    assert streamed.total_rows == 67 and set(records["subset"].to_pylist()) == {"set0", "set1", "set2", None}


def test_planning_a_folder_into_the_store_holds_what_a_chunk_needs_at_any_size(tmp_path, monkeypatch):
    """Python memory at its peak while a folder plans into the store, for a folder and one
    four times as large: about the same (a directory's names, a chunk of records), where a
    whole listing (what planning held before it streamed) grows with the folder."""
    monkeypatch.setattr(sources, "STREAM_BATCH_ROWS", 512)
    monkeypatch.setattr(sources, "STREAM_CHUNK_UNITS", 4)
    monkeypatch.setattr(store, "UNITS_PER_RECORDS_FILE", 4)

    def peak(subsets: int, streamed: bool) -> int:
        root = tmp_path / f"in-{subsets}"
        if not root.exists():
            _folder(root, subsets, 400)
        tracemalloc.start()
        try:
            if streamed:
                with PlanRecordsWriter(ScanStore(str(tmp_path / f"scan-{subsets}"))) as sink:
                    assert plan_source(str(root), SourceOptions(unit_size=64), sink=sink).total_rows == subsets * 800
            else:
                assert list_images(str(root)).num_rows == subsets * 800
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(4, False)  # imports and first-use caches, not counted below
    small, large = peak(4, True), peak(16, True)
    whole = peak(16, False)
    assert large < 1.5 * small and large < whole / 2, (small, large, whole)
