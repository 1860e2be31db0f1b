"""`mirror ingest` at scale: shard tasks a window at a time, finishing in any order; a
shard that cannot be written is named while the rest are written; progress on the console."""
import json
import os
import re
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, own_ray_env, write_image
from s3_faults import FaultProxy

from pipeline.cluster import completed_tasks
from pipeline.commands.cli import main


def test_completed_tasks_keep_a_window_submitted_and_come_as_they_finish(ray_local):
    import ray

    @ray.remote(num_cpus=0)
    def wait(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    finished: list[float] = []
    unfinished_when_submitted: list[int] = []

    def submit(seconds: float):
        unfinished_when_submitted.append(len(submitted) - len(finished))
        submitted.append(seconds)
        return wait.remote(seconds)

    submitted: list[float] = []
    durations = [3.0] + [0.0] * 6
    for seconds, ref in completed_tasks(submit, durations, window=2):
        assert ray.get(ref) == seconds
        finished.append(seconds)
    assert sorted(finished) == sorted(durations) and max(unfinished_when_submitted) == 1  # never more than 2 at once
    assert finished[-1] == 3.0  # the slow first task held one slot; the others went through the other


@pytest.mark.slow
def test_a_shard_that_cannot_be_written_is_named_the_rest_are_written_and_a_rerun_completes(s3_server, s3_bucket,
                                                                                           tmp_path, capsys):
    import fsspec

    for i in range(11):
        write_image(tmp_path / "in" / f"{i:02d}.png", seed=i)
    (tmp_path / "in" / "list.csv").write_text("uri\n" + "".join(f"{i:02d}.png\n" for i in range(11)) + "gone.png\n")
    output = f"s3://{s3_bucket}/shards"
    ingest = [sys.executable, "-m", "pipeline.commands.cli", "ingest", "--input", str(tmp_path / "in" / "list.csv"),
              "--output", output, "--rows-per-shard", "2", "--progress-every-s", "0.001"]
    with FaultProxy(s3_server, deny_prefixes=(f"/{s3_bucket}/shards/shard-000002",)) as proxy:  # refuses its PUT
        first = subprocess.run(ingest, env=own_ray_env(AWS_ENDPOINT_URL=proxy.url), capture_output=True, text=True,
                               timeout=300)
        assert proxy.denied > 0
    assert first.returncode == 1, first.stderr[-3000:]
    assert (f"1 of 6 shards could not be written (first: shard-000002.parquet: PermissionError: access denied "
            f"writing {output}/shard-000002.parquet") in first.stdout
    assert "run the same command again to write the rest" in first.stdout
    # the other shards were written, one of them holding the unreadable file's row
    assert "(0 already there, 1 unreadable kept as rows with read_error: read failed: FileNotFoundError 1)" \
        in first.stdout
    assert "WARNING mirror -- shard shard-000002.parquet could not be written: PermissionError" in first.stderr
    assert re.search(r"INFO mirror -- ingest: \d+ / 12 rows \(\d+\.\d%\)", first.stderr), first.stderr[-3000:]
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    written = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/shards"))
    assert written == ["_ingest.json"] + [f"shard-{i:06d}.parquet" for i in (0, 1, 3, 4, 5)]  # its plan removed
    # `mirror status` of an ingest's output: the shards written and left, the read errors they hold
    assert main(["status", "--output", output, "--count", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["shards"] == {"total": 6, "written": 5, "left": 1} and status["complete"] is False
    assert status["read_errors"] == {"read failed: FileNotFoundError": 1} and not status["listing_kept"]
    assert main(["status", "--output", output]) == 0
    assert "written: 5 shards (83.3%); left: 1 (run the same ingest again" in capsys.readouterr().out

    rerun = subprocess.run(ingest, env=own_ray_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "into 6 shards (5 already there, 0 unreadable kept as rows with read_error)" in rerun.stdout
    fs.invalidate_cache()
    rows = pq.read_table(f"{s3_bucket}/shards", filesystem=fs, columns=["uri", "read_error"]).to_pylist()
    uris = [r["uri"] for r in rows]
    assert len(rows) == 12 and len(set(uris)) == 12 and sorted(uris) == uris  # each once, in the manifest's order
    assert [r["read_error"] is not None for r in rows] == [u.endswith("gone.png") for u in uris]
    assert main(["status", "--output", output]) == 0
    assert "written: 6 shards (100.0%); complete" in capsys.readouterr().out



BOUNDED_WRITE = """
import sys
import pyarrow as pa
from pipeline.commands.ingest import write_shard
from pipeline.scan.sources import SourceOptions, plan_source
from pipeline.scan.store import PlanRecordsWriter, ScanStore
work = ScanStore(sys.argv[2])
with PlanRecordsWriter(work) as sink:
    unit = plan_source(sys.argv[1], SourceOptions(unit_size=10_000), sink=sink).units[0]
write_shard(work.uri_of(unit.file), unit.row_group, sys.argv[3], "shard-000000.parquet", 4, 2)
print(pa.default_memory_pool().max_memory())  # the most Arrow held at once, in this process
"""


def test_a_shard_is_written_a_row_group_at_a_time_in_bounded_memory(tmp_path):
    """A shard task holds a row group's images and the reads ahead, not the whole shard's
    (4,096 phone photos would be gigabytes in one task): the most Arrow memory it holds is
    a small part of the shard's size. The files are random bytes (ingest decodes nothing)."""
    (tmp_path / "in").mkdir()
    for i in range(96):
        (tmp_path / "in" / f"{i:03d}.jpg").write_bytes(os.urandom(2 * 2**20))
    grown = subprocess.run([sys.executable, "-c", BOUNDED_WRITE, str(tmp_path / "in"), str(tmp_path / "work"),
                            str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert grown.returncode == 0, grown.stderr[-2000:]
    shard = pq.ParquetFile(tmp_path / "out" / "shard-000000.parquet")
    assert shard.metadata.num_rows == 96 and shard.metadata.num_row_groups == 24
    assert shard.read_row_group(22)["bytes"][3].as_py() == (tmp_path / "in" / "091.jpg").read_bytes()
    assert int(grown.stdout) < 96 * 2 * 2**20 / 3, int(grown.stdout) / 2**20  # MB at most, of a 192 MB shard


def test_a_folder_of_manifests_is_ingested_as_a_scan_reads_it_and_packed_shards_are_refused(ray_local, tmp_path):
    """LAION's metadata: a folder of Parquet files of URLs and captions (a folder of images
    is ingested as ever; tar or Parquet shards hold their images already)."""
    from pipeline.commands.ingest import ingest

    images = {f"{p}-{i}.png": write_image(tmp_path / "images" / f"{p}-{i}.png", seed=3 * p + i)
              for p in range(2) for i in range(3)}
    (tmp_path / "meta").mkdir()
    for p in range(2):
        pq.write_table(pa.table({"URL": [str(tmp_path / "images" / f"{p}-{i}.png") for i in range(3)],
                                 "caption": [f"c{p}{i}" for i in range(3)]}), tmp_path / "meta" / f"part-{p:05d}.parquet")
    result = ingest(str(tmp_path / "meta"), str(tmp_path / "shards"), rows_per_shard=4, rows_per_row_group=2)
    assert (result.files, result.shards, result.failed_shards) == (6, 2, {})
    rows = pq.read_table(tmp_path / "shards").to_pylist()
    assert [r["uri"].rsplit("/", 1)[1] for r in rows] == list(images)  # in the manifests' order
    assert [r["bytes"] for r in rows] == list(images.values()) and rows[4]["caption"] == "c11"
    with pytest.raises(ValueError, match="holds parquet shards, images packed already: scan it as it is"):
        ingest(str(tmp_path / "shards"), str(tmp_path / "again"))


def test_a_sample_of_a_manifest_is_packed_as_a_scan_draws_it(ray_local, tmp_path):
    """`mirror ingest --sample 0.3`: the records a scan's --sample 0.3 would score, and no other."""
    from pipeline.commands.ingest import ingest
    from pipeline.scan.sample import in_sample

    uris = [str(tmp_path / "images" / f"{i:02d}.png") for i in range(30)]
    for i, uri in enumerate(uris):
        write_image(tmp_path / "images" / f"{i:02d}.png", seed=i)
    (tmp_path / "list.csv").write_text("url\n" + "".join(f"{u}\n" for u in uris))
    result = ingest(str(tmp_path / "list.csv"), str(tmp_path / "shards"), rows_per_shard=4, sample=0.3)
    drawn = [u for u, keep in zip(uris, in_sample(uris, 0.3)) if keep]
    assert result.files == len(drawn) < 20 and pq.read_table(tmp_path / "shards")["uri"].to_pylist() == drawn
    assert json.loads((tmp_path / "shards" / "_ingest.json").read_text())["sample"] == 0.3
    with pytest.raises(ValueError, match="holds shards of another ingest"):  # another fraction: another ingest
        ingest(str(tmp_path / "list.csv"), str(tmp_path / "shards"), rows_per_shard=4, sample=0.5)
    with pytest.raises(ValueError, match=r"--sample must be a fraction within \(0, 1\], got 2"):
        ingest(str(tmp_path / "list.csv"), str(tmp_path / "other"), sample=2.0)
    # a tree labelled by its own folder names keeps its labels in the shards
    for i in range(4):
        write_image(tmp_path / "cifake" / ("FAKE" if i % 2 else "REAL") / f"{i}.png", seed=i)
    ingest(str(tmp_path / "cifake"), str(tmp_path / "cifake-shards"), label_folders={"REAL": "real", "FAKE": "fake"})
    assert pq.read_table(tmp_path / "cifake-shards")["label"].to_pylist() == [1, 1, 0, 0]
    ingest(str(tmp_path / "cifake"), str(tmp_path / "cifake-shards"), label_folders={"FAKE": 1, "REAL": "0"})  # same
    assert pq.read_table(tmp_path / "cifake-shards")["label"].to_pylist() == [1, 1, 0, 0]


def test_a_file_whose_name_is_not_utf8_is_kept_as_a_row_naming_it(tmp_path):
    """As a scan does (`_record_error`): the plan knows the name cannot be a text column."""
    from pipeline.commands.ingest import write_shard
    from pipeline.scan.sources import SourceOptions, plan_source
    from pipeline.scan.store import PlanRecordsWriter, ScanStore

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "ok.jpg").write_bytes(b"jpeg bytes")
    with open(os.fsencode(str(tmp_path / "in")) + b"/caf\xe9.jpg", "wb") as f:  # a Latin-1 archive's name
        f.write(b"more bytes")
    work = ScanStore(str(tmp_path / "work"))
    with PlanRecordsWriter(work) as sink:
        unit = plan_source(str(tmp_path / "in"), SourceOptions(), sink=sink).units[0]
    kinds = write_shard(work.uri_of(unit.file), unit.row_group, str(tmp_path / "out"), "shard-000000.parquet", 4, 2)
    rows = pq.read_table(tmp_path / "out" / "shard-000000.parquet").to_pylist()
    assert [r["uri"].rsplit("/", 1)[1] for r in rows] == ["caf\\xe9.jpg", "ok.jpg"]
    assert rows[0]["bytes"] is None and rows[0]["read_error"].startswith("file name not UTF-8: the disk names this file")
    assert rows[1]["bytes"] == b"jpeg bytes" and kinds == {"file name not UTF-8": 1}
    assert "_record_error" not in rows[0]
