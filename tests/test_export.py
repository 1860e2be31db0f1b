"""`mirror export`: a scan's committed parts as a few large Parquet files in the input's
order, on real scans (real Ray) of a manifest that an --update extends with a column."""
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_image

from pipeline.commands.cli import main
from pipeline.scan import export
from pipeline.scan.config import ScanConfig
from pipeline.scan.run import run_scan


def read_export(folder) -> pa.Table:
    names = json.loads((folder / "_export.json").read_text())["files"]
    return pa.concat_tables([pq.read_table(folder / n) for n in names], promote_options="permissive")


@pytest.mark.slow
def test_an_export_holds_the_rows_asked_for_in_the_inputs_order_in_files_of_bounded_size(
        ray_local, parity_bundle, tmp_path, s3_bucket, monkeypatch, capsys):
    names = [f"{i}.png" for i in range(6)]
    for i, name in enumerate(names):
        write_image(tmp_path / "imgs" / name, size=(120, 100), seed=i)
    (tmp_path / "imgs" / "page.png").write_text("<html>not an image</html>")
    listed = [*names[:3], "gone.png", "page.png", *names[3:5]]  # a manifest's order, not a sorted one
    manifest = tmp_path / "list.csv"
    manifest.write_text("uri,source\n" + "".join(f"imgs/{n},site{i % 2}\n" for i, n in enumerate(listed)))
    out = tmp_path / "scan"
    run_scan(str(parity_bundle), str(manifest), str(out), ScanConfig(unit_size=2))
    # an update adds a row, and a column the first parts lack
    manifest.write_text("uri,source,caption\n" + "".join(f"imgs/{n},site{i % 2},c{i}\n"
                                                         for i, n in enumerate(listed + [names[5]])))
    run_scan(str(parity_bundle), str(manifest), str(out), ScanConfig(unit_size=2, update=True))
    scored = pa.concat_tables([pq.read_table(p) for p in sorted((out / "scores").glob("part-*.parquet"))],
                              promote_options="permissive")
    by_uri = {r["uri"]: r for r in scored.to_pylist()}

    monkeypatch.setattr(export, "ROW_GROUP_ROWS", 2)
    assert main(["export", "--scan", str(out), "--output", str(tmp_path / "all"), "--rows-per-file", "3"]) == 0
    assert capsys.readouterr().out.strip() == (f"exported 8 rows (all) of 5 parts of {out} into 4 files under "
                                               f"{tmp_path / 'all'}")
    files = sorted((tmp_path / "all").glob("scores-*.parquet"))
    assert [f.name for f in files] == [f"scores-0000{i}.parquet" for i in range(4)]
    # files of 3 rows in row groups of 2; the update's part has a column the others lack: a file of its own
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [3, 3, 1, 1]
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [2, 2, 1, 1]
    assert "caption" not in pq.read_schema(files[2]).names and pq.read_schema(files[3]).names[-2:] == ["source",
                                                                                                        "caption"]
    rows = read_export(tmp_path / "all")
    assert rows["uri"].to_pylist() == [str(tmp_path / "imgs" / n) for n in listed + [names[5]]]  # the input's order
    assert rows.to_pylist() == [{**{c: None for c in rows.column_names}, **by_uri[u]} for u in rows["uri"].to_pylist()]
    assert rows["caption"].to_pylist() == [None] * 7 + ["c7"]  # the update's column, null where its parts lack it
    assert main(["status", "--output", str(tmp_path / "all")]) == 0  # what an export holds
    model = rows["model_id"][0].as_py()
    assert capsys.readouterr().out.splitlines() == [
        f"{tmp_path / 'all'}: export of the scan {out} of {manifest} by model {model} (threshold 0.5)",
        "  8 rows (all) of 5 parts in 4 files of at most 3 rows"]

    for only, keep in (("errors", lambda r: r["error"] is not None), ("flagged", lambda r: r["pred"] == 1),
                       ("scored", lambda r: r["error"] is None)):
        dest = f"s3://{s3_bucket}/exports/{only}"
        result = export.export_scores(str(out), dest, only=only)
        want = [r["uri"] for r in rows.to_pylist() if keep(r)]
        assert result.rows == len(want) and result.parts == 5
        got = []
        for name in result.files:
            with fsspec.open(f"{dest}/{name}", "rb") as f:
                got += pq.read_table(f)["uri"].to_pylist()
        assert got == want
    assert [r["error"].split(":")[0] for r in rows.to_pylist() if r["error"]] == ["read failed", "decode failed"]

    # a rerun into the same folder writes the export again, and removes what it no longer names
    monkeypatch.setattr(export, "ROW_GROUP_ROWS", 65_536)
    two = ["scores-00000.parquet", "scores-00001.parquet"]
    assert export.export_scores(str(out), str(tmp_path / "all")).files == two
    assert sorted(f.name for f in (tmp_path / "all").glob("scores-*")) == two
    assert read_export(tmp_path / "all").to_pylist() == rows.to_pylist()

    with pytest.raises(FileNotFoundError, match=rf"holds no scan \(no _scan.json\); it holds 1 below it: give one "
                                                rf"as --scan \({out}\)"):
        export.export_scores(str(tmp_path), str(tmp_path / "elsewhere"))  # as an audit's output holds its scan

    first = sorted((out / "scores").glob("part-*.parquet"))[0]
    lost = pq.read_metadata(first).num_rows
    first.unlink()  # an unfinished scan
    with pytest.raises(ValueError, match=r"is not complete \(4 of 5 units committed\): rerun it to finish, or .* "
                                         r"--partial"):
        export.export_scores(str(out), str(tmp_path / "partial"))
    partial = export.export_scores(str(out), str(tmp_path / "partial"), partial=True)
    assert partial.units_left == 1 and partial.rows == 8 - lost and partial.parts == 4
    assert partial.line().endswith("; 1 units not committed yet were left out")
    assert json.loads((tmp_path / "partial" / "_export.json").read_text())["units_left"] == 1
