"""A scan's plan in its store: records planned unit by unit into records files (one row
group per unit), manifests read in bounded memory, decode tasks reading their unit's
records from the store, and plans stored in the first layout still resumed."""
import shutil

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import write_image

from pipeline.scan import sources, store
from pipeline.scan.config import ScanConfig
from pipeline.scan.run import run_scan
from pipeline.scan.sources import SourceOptions, Unit, plan_source
from pipeline.scan.store import OutputMismatchError, PlanRecordsWriter, ScanStore


def test_a_streamed_manifest_plans_the_units_and_records_of_one_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "STREAM_CHUNK_UNITS", 3)  # chunks cross the files' edges
    monkeypatch.setattr(sources, "STREAM_BATCH_ROWS", 7)
    monkeypatch.setattr(store, "UNITS_PER_RECORDS_FILE", 4)
    root = tmp_path / "manifests"
    root.mkdir()
    pq.write_table(pa.table({"uri": [f"s3://b/a/{i}.jpg" for i in range(50)], "label": ["real"] * 50}),
                   root / "a.parquet", row_group_size=11)
    pq.write_table(pa.table({"uri": [f"s3://b/b/{i}.jpg" for i in range(41)], "label": [1] * 41,
                             "source": ["web"] * 41}), root / "b.parquet")
    options = SourceOptions(unit_size=5)
    whole = plan_source(str(root), options)
    out = ScanStore(str(tmp_path / "scan"))
    with PlanRecordsWriter(out) as sink:
        streamed = plan_source(str(root), options, sink=sink)
    assert streamed.records.num_rows == 0 and whole.records.num_rows == 91
    assert [(u.unit_id, u.rows) for u in streamed.units] == [(u.unit_id, u.rows) for u in whole.units]
    files = sorted({u.file for u in streamed.units})
    # 4 units a file, and a new file where the columns change (unit 10 spans both manifests)
    assert len(files) == 6 and all(f.startswith("_plan/records/") for f in files)
    start = 0
    for u in streamed.units:  # a unit's stored columns are its manifest's (whole: the union, null elsewhere)
        given = [{k: v for k, v in r.items() if v is not None} for r in out.unit_records(u).to_pylist()]
        assert given == [{k: v for k, v in r.items() if v is not None}
                         for r in whole.records.slice(start, u.rows).to_pylist()]
        start += u.rows
    stored = out.plan_records(streamed)
    assert stored.select(whole.records.column_names).to_pylist() == whole.records.to_pylist()
    out.save_plan(streamed)
    again = out.load_plan()
    assert again.units == streamed.units and out.plan_records(again, ["uri"])["uri"].to_pylist() == whole.records["uri"].to_pylist()
    pacsv.write_csv(pa.table({"uri": [f"s3://b/c/{i}.jpg" for i in range(23)], "label": ["fake"] * 23}),
                    str(tmp_path / "manifest.csv"))
    with PlanRecordsWriter(ScanStore(str(tmp_path / "csv-scan"))) as sink:
        csv = plan_source(str(tmp_path / "manifest.csv"), options, sink=sink)
    assert [u.rows for u in csv.units] == [5, 5, 5, 5, 3] and csv.input_format == "manifest"
    assert ScanStore(str(tmp_path / "csv-scan")).unit_records(csv.units[-1])["label"].to_pylist() == [1, 1, 1]


def test_planning_a_manifest_into_the_store_holds_what_a_chunk_needs_at_any_length(tmp_path, monkeypatch):
    """Arrow memory held while records reach the store, for a manifest and one over three
    times as long: about the same (a row group, a chunk, a few files' worth of units), a
    small part of the longer one (planned in memory, it would hold all of it)."""
    monkeypatch.setattr(sources, "STREAM_CHUNK_UNITS", 8)
    monkeypatch.setattr(sources, "STREAM_BATCH_ROWS", 4096)
    monkeypatch.setattr(store, "UNITS_PER_RECORDS_FILE", 8)

    def held_while_planning(n: int) -> tuple[int, int]:
        manifest = pa.table({"uri": [f"s3://corpus/images/part-{i // 1000:05d}/image-{i:09d}.jpg" for i in range(n)],
                             "label": [i % 2 for i in range(n)]})
        pq.write_table(manifest, tmp_path / f"{n}.parquet", row_group_size=20_000)
        size = manifest.nbytes
        del manifest
        baseline, held = pa.total_allocated_bytes(), []

        class Watched(PlanRecordsWriter):
            def add(self, unit, records):
                held.append(pa.total_allocated_bytes() - baseline)
                super().add(unit, records)

        with Watched(ScanStore(str(tmp_path / f"scan-{n}"))) as sink:
            plan = plan_source(str(tmp_path / f"{n}.parquet"), SourceOptions(unit_size=256), sink=sink)
        assert plan.total_rows == n and len(held) == len(plan.units) == -(-n // 256)
        return max(held), size

    short, _ = held_while_planning(120_000)
    long, size = held_while_planning(400_000)
    assert long < 1.5 * short and long < size / 4, (short, long, size)


def test_decode_tasks_read_their_records_from_the_store_and_the_driver_sends_none(ray_local, parity_bundle,
                                                                                   tmp_path, monkeypatch):
    monkeypatch.setattr(store, "UNITS_PER_RECORDS_FILE", 2)
    for i in range(7):
        write_image(tmp_path / "in" / "0_real" / f"{i}.png", seed=i)
    summary = run_scan(str(parity_bundle), str(tmp_path / "in"), str(tmp_path / "out"), ScanConfig(unit_size=2))
    assert summary["rows_out"] == summary["scored"] == 7
    plan = ScanStore(str(tmp_path / "out")).load_plan()
    assert sorted({u.file for u in plan.units}) == sorted(f"_plan/records/{p.name}"
                                                          for p in (tmp_path / "out/_plan/records").iterdir())
    assert len({u.file for u in plan.units}) == 2  # 4 units, 2 a file
    rows = pq.read_table(tmp_path / "out" / "scores")
    assert sorted(rows["uri"].to_pylist()) == sorted(str(tmp_path / "in/0_real" / f"{i}.png") for i in range(7))
    assert set(rows["label"].to_pylist()) == {0}
    lost = tmp_path / "out" / plan.units[-1].file
    lost.unlink()  # a damaged output: refused before any work, naming what is missing
    with pytest.raises(OutputMismatchError, match=f"records files are missing .1, such as {plan.units[-1].file}"):
        run_scan(str(parity_bundle), str(tmp_path / "in"), str(tmp_path / "out"), ScanConfig(unit_size=2))


def test_a_plan_stored_in_the_first_layout_resumes(ray_local, parity_bundle, tmp_path):
    """Outputs of scans planned before records files existed (every record in
    _plan/records.parquet, units without a file) resume: the plan moves to the current
    layout and only the unfinished units are scored."""
    for i in range(6):
        write_image(tmp_path / "in" / f"{i}.png", seed=i)
    cfg = ScanConfig(unit_size=2)
    run_scan(str(parity_bundle), str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    out = ScanStore(str(tmp_path / "out"))
    plan = out.load_plan()
    records = out.plan_records(plan)
    # the first layout: one records file, units without a file
    out.write_parquet(store.LEGACY_RECORDS, records)
    shutil.rmtree(tmp_path / "out" / store.RECORDS_DIR)
    units = pa.table({name: pa.array([None if name in ("file", "row_group") else getattr(u, name) for u in plan.units],
                                     kind) for name, kind in store.UNIT_FIELDS})
    out.write_parquet("_plan/units.parquet", units.replace_schema_metadata(
        {"input": str(tmp_path / "in"), "input_format": "folder", "skipped_by_extension": "0"}))
    (tmp_path / "out" / out.part_name(plan.units[1].unit_id)).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out/scores").iterdir()}
    summary = run_scan(str(parity_bundle), str(tmp_path / "in"), str(tmp_path / "out"), cfg)
    assert summary["units"]["total"] == 3 and summary["units"]["skipped_done"] == 2
    assert summary["this_run"]["rows"] == 2 and summary["rows_out"] == summary["scored"] == 6
    assert {name: (tmp_path / "out/scores" / name).stat().st_mtime_ns for name in kept} == kept
    moved = out.load_plan()
    assert [u.unit_id for u in moved.units] == [u.unit_id for u in plan.units]
    assert all(u.file.startswith(store.RECORDS_DIR) and u.row_group is not None for u in moved.units)
    assert out.plan_records(moved).to_pylist() == records.to_pylist()


def test_a_records_file_that_cannot_be_written_fails_the_planning(tmp_path):
    (tmp_path / "scan").mkdir()
    (tmp_path / "scan" / "_plan").write_text("a file where the plan's folder goes")
    with pytest.raises(OSError):
        with PlanRecordsWriter(ScanStore(str(tmp_path / "scan"))) as sink:
            sink.add(Unit("u", "inline", 1), pa.table({"uri": ["x"]}))


def test_a_csv_manifest_whose_values_change_kind_after_its_first_block_plans_as_text(tmp_path):
    """A CSV is read in blocks: a type guessed from the first block would fail on 'real'
    below 60,000 '0'/'1' labels, or on 'n/a' below numbers. Columns come as text."""
    n = 60_000
    lines = ["uri,label,width"] + [f"s3://b/{i}.jpg,{i % 2},{i}" for i in range(n)] + [f"s3://b/{n}.jpg,real,n/a",
                                                                                    f"s3://b/{n + 1}.jpg,,7"]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    assert (tmp_path / "list.csv").stat().st_size > 1 << 20  # past the reader's first block
    with PlanRecordsWriter(ScanStore(str(tmp_path / "scan"))) as sink:
        plan = plan_source(str(tmp_path / "list.csv"), SourceOptions(), sink=sink)
    assert plan.total_rows == n + 2
    records = ScanStore(str(tmp_path / "scan")).unit_records(plan.units[-1])
    last = records.slice(records.num_rows - 3).to_pylist()
    assert [(r["label"], r["width"]) for r in last] == [(1, str(n - 1)), (0, "n/a"), (None, "7")]



def test_plan_records_missing_on_a_node_name_the_node_and_the_remedy(tmp_path):
    """A decode task on a node that joined after the start's shared-path check, without the
    output's mount: its error says what is wrong, not only which file is missing."""
    out = ScanStore(str(tmp_path / "scan"))
    with PlanRecordsWriter(out) as sink:
        sink.add(Unit("u1", "inline", 1), pa.table({"uri": ["a.png"]}))
    (records,) = list((tmp_path / "scan").rglob("*.parquet"))
    assert store.read_unit_records(str(records), 0)["uri"].to_pylist() == ["a.png"]
    records.unlink()  # as a node without the mount sees it
    with pytest.raises(FileNotFoundError, match="plan records are not on node .*every node mounts"):
        store.read_unit_records(str(records), 0)


def test_a_run_holding_its_output_removes_what_killed_writers_left_half_written(tmp_path):
    """A spool is a file some writer was killed writing: once a run holds the output, no
    other writer is alive, so the spools below it are removed; a refused run removes none."""
    import os
    import socket
    import time

    from pipeline.storage import local_spool

    out = ScanStore(str(tmp_path / "scan"))
    kept = ["_scan.json", f"{store.SCORES_DIR}/part-u1.parquet", f"{store.SCORES_DIR}/.keep"]
    spools = [local_spool(out.path(rel)) for rel in ("_summary.json", "_plan/units.parquet",
                                                    f"{store.SCORES_DIR}/part-u2.parquet",
                                                    f"{store.RECORDS_DIR}/u2.parquet")]
    for path in [*map(out.path, kept), *spools]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"half")
    out.write_json(store.RUNNING_FILE, {"host": f"not-{socket.gethostname()}", "pid": 1, "run": "x", "since": 0,
                                        "beat": time.time()})  # a run alive on another host
    with pytest.raises(store.OutputBusyError):
        with out.running():
            pass
    assert all(os.path.exists(p) for p in spools)  # that run's own, maybe
    out.remove_files([store.RUNNING_FILE])
    with out.running():
        assert not any(os.path.exists(p) for p in spools)
    assert all(os.path.exists(out.path(rel)) for rel in kept)
