"""A finished scan's parts read back: the summary, --retry-errors' search and read_scores
read each part with one request, several at once; the summary keeps each part's counts
so that a later run reads only the parts it has not counted (and those with labels)."""
import collections

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import s3fs
from s3_faults import FaultProxy

from mirror_core.metrics import binary_metrics
from pipeline.scan.schema import conform
from pipeline.scan.store import ScanStore
from pipeline.scan.summary import LABELED_DIR, LABELED_ROWS, PART_TALLIES, TALLY_SCHEMA, summarize

LABELED_PARTS = 18  # parts 0..17 carry labels, 18..23 none (an unlabeled corpus's parts)


def make_part(i: int, rng, heal: bool = False) -> pa.Table:
    """Output rows of unit i: some undecodable, every fifth unit a read failure (healed:
    scored instead), labels on the first LABELED_PARTS units, a carried column from 12 on."""
    n = 5 + i % 4
    prob = rng.random(n)
    error = [None] * n
    error[0] = "cannot identify image file" if i % 3 == 0 else None
    if i % 5 == 0 and not heal:
        error[-1] = "read failed: timeout"
    bad = np.array([e is not None for e in error])
    label = rng.integers(0, 2, n)
    part = {"uri": [f"s3://c/{i}/{j}.jpg" for j in range(n)], "prob_fake": pa.array(prob, mask=bad),
            "pred": pa.array((prob > 0.5).astype(np.int64), mask=bad), "error": error,
            "label": pa.array(label, mask=np.full(n, i >= LABELED_PARTS) | (np.arange(n) == 1)),
            "subset": ["genA" if i % 2 else "genB"] * n}
    if i >= 12:  # a later --update generation carries a column the first did not
        part["source"] = [f"web{i}"] * n
    return conform(pa.table(part))


@pytest.fixture
def through_proxy(s3_server, monkeypatch):
    """S3 requests pass a proxy (10 ms each) that records them."""
    with FaultProxy(s3_server, delay_s=0.01) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        yield proxy
    s3fs.S3FileSystem.clear_instance_cache()


def part_reads(proxy) -> list[str]:
    reads = sorted(path.rsplit("part-", 1)[1][:5] for method, path in proxy.requests if "/scores/part-" in path)
    proxy.requests.clear()
    return reads


def expected_summary(parts: dict[str, pa.Table]) -> dict:
    rows = pa.concat_tables(list(parts.values()), promote_options="default")
    errors = rows.num_rows - rows["error"].null_count
    labeled = rows.filter(pc.and_(rows["error"].is_null(), rows["label"].is_valid()))
    metrics = binary_metrics(labeled["label"].to_numpy(), labeled["prob_fake"].to_numpy(), labeled["pred"].to_numpy())
    kinds = collections.Counter(e.split(":")[0] for e in rows["error"].drop_null().to_pylist())
    return {"rows_out": rows.num_rows, "errors": errors, "scored": rows.num_rows - errors,
            "flagged": int(np.sum(rows["pred"].to_numpy(zero_copy_only=False) == 1)),
            "ALL": {**metrics, "n": labeled.num_rows}, "errors_by_kind": dict(kinds.most_common())}


def committed(bucket: str, n: int, seed: int) -> tuple[ScanStore, dict[str, pa.Table]]:
    """A scan output on S3 holding the parts of n units."""
    rng = np.random.default_rng(seed)
    out = ScanStore(f"s3://{bucket}/scan")
    parts = {f"{i:05d}": make_part(i, rng) for i in range(n)}
    for unit, table in parts.items():
        out.write_parquet(out.part_name(unit), table)
    return out, parts


def figures(summary: dict) -> dict:
    return {**{k: summary[k] for k in ("rows_out", "errors", "scored", "flagged", "errors_by_kind")},
            "ALL": summary["metrics"]["ALL"]}


def test_a_finished_scans_parts_are_read_once_each(s3_bucket, through_proxy):
    out, parts = committed(s3_bucket, 24, seed=0)
    through_proxy.requests.clear()
    summary = summarize(ScanStore(out.uri), 999, 0, {}, written=None)  # no counts kept, none reported
    assert part_reads(through_proxy) == sorted(parts)  # one GET a part
    assert through_proxy.max_in_flight > 1
    assert figures(summary) == expected_summary(parts)
    assert sorted(summary["metrics"]) == ["ALL", "genA", "genB"]
    assert sum(m["n"] for s, m in summary["metrics"].items() if s != "ALL") == summary["metrics"]["ALL"]["n"]

    store = ScanStore(out.uri)
    assert store.units_with_transient_errors(store.done_units()) == {u for u in parts if int(u) % 5 == 0}
    assert part_reads(through_proxy) == sorted(parts)
    read_back = ScanStore(out.uri).read_scores()
    rows = pa.concat_tables(list(parts.values()), promote_options="default")
    assert read_back["uri"].to_pylist() == rows["uri"].to_pylist()
    assert read_back["source"].null_count == sum(t.num_rows for u, t in parts.items() if int(u) < 12)


def test_a_later_summary_reads_only_the_parts_it_has_not_counted_or_kept_the_labeled_rows_of(s3_bucket, through_proxy,
                                                                                           monkeypatch):
    from pipeline.scan import summary as summary_module

    out, parts = committed(s3_bucket, 24, seed=1)
    rng = np.random.default_rng(11)
    summarize(ScanStore(out.uri), 999, 0, {}, written=None)
    labeled = sorted(u for u in parts if int(u) < LABELED_PARTS)
    part_reads(through_proxy)

    # nothing new: no part read, the labeled ones' rows (the metrics need their scores) kept in one file
    assert figures(summarize(ScanStore(out.uri), 999, 0, {}, written=None)) == expected_summary(parts)
    assert part_reads(through_proxy) == []
    assert len(out.names(LABELED_DIR)) == 1

    # --update adds units, --retry-errors rewrites one (same unit id, its read failure healed),
    # both through a store that tells no version; two parts change behind the scan's back
    # (one in size, one not), one is removed: the counts follow each
    parts["00024"] = make_part(24, rng)
    parts["00020"] = make_part(20, rng, heal=True)
    parts["00021"] = make_part(21, np.random.default_rng(7)).slice(0, 3)
    size = out.fs.size(out.path(out.part_name("00019")))
    uris = parts["00019"]["uri"].to_pylist()
    parts["00019"] = parts["00019"].set_column(0, "uri", pa.array([u.replace(".jpg", ".png") for u in uris]))
    for unit in ("00024", "00020", "00021", "00019"):
        out.write_parquet(out.part_name(unit), parts[unit])
    assert out.fs.size(out.path(out.part_name("00019"))) == size  # changed, at the same size: its ETag tells
    del parts["00022"]
    out.fs.rm(out.path(out.part_name("00022")))
    part_reads(through_proxy)
    unknown = pa.table({"unit_id": ["00020", "00024"], "bytes": [1, 1], "version": [None, None], "rows": [0, 0],
                        "errors": [0, 0], "labeled": [0, 0], "flagged": [0, 0], "error_kinds": [None, None]},
                       schema=TALLY_SCHEMA)
    summary = summarize(ScanStore(out.uri), 999, 0, {}, written=unknown)
    assert figures(summary) == expected_summary(parts)
    assert part_reads(through_proxy) == ["00019", "00020", "00021", "00024"]  # labeled or not: changed or new
    kept = ScanStore(out.uri).read_parquet(PART_TALLIES)
    assert kept["unit_id"].to_pylist() == sorted(parts)
    assert kept["rows"].to_pylist() == [parts[u].num_rows for u in sorted(parts)]
    unlabeled = kept.filter(pc.equal(kept["labeled"], 0))
    assert unlabeled.num_rows == 6 and unlabeled[LABELED_ROWS].null_count == 6

    # a labeled part written again: its rows read and kept in a second file; past
    # MAX_LABELED_FILES, the kept rows are merged into one file and the others removed
    for unit, most, files in (("00003", 8, 2), ("00005", 2, 1)):
        monkeypatch.setattr(summary_module, "MAX_LABELED_FILES", most)
        parts[unit] = make_part(int(unit), np.random.default_rng(5))
        out.write_parquet(out.part_name(unit), parts[unit])
        part_reads(through_proxy)
        assert figures(summarize(ScanStore(out.uri), 999, 0, {}, written=None)) == expected_summary(parts)
        assert part_reads(through_proxy) == [unit]
        kept = ScanStore(out.uri).read_parquet(PART_TALLIES)
        assert len(out.names(LABELED_DIR)) == files == len(set(kept[LABELED_ROWS].drop_null().to_pylist()))
    # a kept file lost: its parts are read again
    out.fs.rm(out.path(LABELED_DIR), recursive=True)
    assert figures(summarize(ScanStore(out.uri), 999, 0, {}, written=None)) == expected_summary(parts)
    assert part_reads(through_proxy) == labeled


def test_parts_are_read_over_as_many_connections_as_the_s3_client_holds(s3_bucket, s3_server, monkeypatch):
    import fsspec

    out, _ = committed(s3_bucket, 60, seed=2)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {"max_pool_connections": 32}})
    with FaultProxy(s3_server, delay_s=0.1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            assert ScanStore(out.uri).read_scores(["uri"]).num_rows == sum(5 + i % 4 for i in range(60))
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
    assert proxy.max_in_flight > 16, proxy.max_in_flight  # more than PARTS_READ_AT_ONCE


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_run_counts_the_parts_it_commits_without_reading_them(where, tmp_path, parity_bundle, request, monkeypatch):
    """The commit stage reports each part's counts, size and version; the run's summary
    reads none of the parts it wrote but those with labels, until a part is changed."""
    from conftest import inline_unit_batch, write_image

    from mirror_core.bundle import load_bundle
    from pipeline.scan.commit import commit_units
    from pipeline.scan.decode import decode_units, numpy_batch
    from pipeline.scan.run import Completions
    from pipeline.scan.scorer import Scorer

    out = ScanStore(str(tmp_path / "scan") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/scan")
    bundle = load_bundle(str(parity_bundle))
    scorer = Scorer(bundle.weights.to_numpy(), bundle.config.to_dict(), bundle.model_id)
    (tmp_path / "page.jpg").write_bytes(b"<html>not an image</html>")
    completions = Completions()
    for u, labels in (("u1", [1, 0, None]), ("u2", [None] * 3), ("u3", [None] * 3)):
        uris = [str(tmp_path / f"{u}-{i}.png") for i in range(2)] + [str(tmp_path / "page.jpg")]
        for i, uri in enumerate(uris[:2]):
            write_image(tmp_path / uri, seed=i)
        decoded = pa.concat_tables(decode_units(inline_unit_batch(out.uri, u, pa.table({"uri": uris, "label": labels})),
                                                rows_per_batch=8, preprocess={}, columns={}))
        batch = numpy_batch(decoded)
        completions.add(commit_units(scorer(batch)))
    written = completions.figures(out.uri)["tallies"]
    assert written.schema == TALLY_SCHEMA and written["version"].null_count == 0

    reads = []
    read_bytes = ScanStore.read_bytes
    monkeypatch.setattr(ScanStore, "read_bytes", lambda self, rel: reads.append(rel) or read_bytes(self, rel))

    def part_reads() -> list[str]:
        units = [rel.rsplit("part-", 1)[1].removesuffix(".parquet") for rel in reads if "/part-" in rel]
        reads.clear()
        return sorted(units)

    summary = summarize(ScanStore(out.uri), 9, 0, {}, written=written)
    assert part_reads() == ["u1"]  # the labeled part only: the metrics need its scores
    assert (summary["rows_out"], summary["errors"], summary["metrics"]["ALL"]["n"]) == (9, 3, 2)
    assert summary["errors_by_kind"] == {"decode failed: UnidentifiedImageError": 3}  # 2 of them counted unread
    kept = ScanStore(out.uri).read_parquet(PART_TALLIES)
    assert kept.select(["unit_id", "rows", "errors", "labeled"]).to_pylist() == [
        {"unit_id": u, "rows": 3, "errors": 1, "labeled": 2 if u == "u1" else 0} for u in ("u1", "u2", "u3")]

    # a part written again behind the run's back (other rows, same unit): its reported
    # version no longer matches the listing, so it is read and counted as it is now
    out.write_parquet(out.part_name("u3"), make_part(3, np.random.default_rng(0)))
    summary = summarize(ScanStore(out.uri), 9, 0, {}, written=written)
    assert part_reads() == ["u1", "u3"]
    assert summary["rows_out"] == 6 + make_part(3, np.random.default_rng(0)).num_rows
