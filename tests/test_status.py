"""`mirror status`: how far a scan's output has got, read from its store alone."""
import json
import shutil

import pyarrow.parquet as pq
from conftest import write_image

from pipeline.commands.cli import main
from pipeline.scan.config import ScanConfig
from pipeline.scan.run import run_scan, summary_line


def test_status_says_how_far_a_scan_has_got_without_ray(ray_local, parity_bundle, tmp_path, capsys):
    """`mirror status`: planned, committed and left, errors of the counted parts; while a
    scan is unfinished (a part missing, as after an interruption) and once it is complete."""
    for i in range(5):
        write_image(tmp_path / "in" / f"{i}.png", seed=i)
    (tmp_path / "in" / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["status", "--output", str(out)]) == 2
    assert "holds no scan (no _scan.json, nor an audit's scan/" in capsys.readouterr().err

    (tmp_path / "in" / "notes.md").write_text("not an image by its name")
    # planned only: what a scan will score, before anything is
    assert main(["scan", "--model", str(parity_bundle), "--input", str(tmp_path / "in"), "--output", str(out),
                 "--unit-size", "2", "--plan-only"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "  folder input: 6 records in 3 units (1 file left out for their extension)",
        "  committed: 0 records (0.0%) in 0 units; left: 6 records in 3 units (rerun the scan to finish)"]
    assert not (out / "scores").exists() and not (out / "summary.json").exists()
    assert main(["status", "--output", str(out), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["records"] == {"total": 6, "committed": 0, "left": 6} and planned["complete"] is False
    assert planned["units"] == {"total": 3, "committed": 0, "left": 3} and planned["input"] == str(tmp_path / "in")

    summary = run_scan(str(parity_bundle), str(tmp_path / "in"), str(out), ScanConfig(unit_size=2))
    assert main(["status", "--output", str(out), "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["complete"] is True and done["records"]["left"] == 0 and done["parts_not_in_plan"] == 0
    flagged = pq.read_table(out / "scores")["pred"].to_pylist().count(1)  # scored fake
    assert done["counted"] == {"parts": 3, "rows": 6, "errors": 1, "flagged": flagged,
                               "errors_by_kind": {"decode failed: UnidentifiedImageError": 1}}
    assert json.loads((out / "summary.json").read_text())["flagged"] == flagged
    assert f"5 scored, 1 errors (decode failed: UnidentifiedImageError 1); {flagged} flagged fake " \
           f"({100 * flagged / 5:.1f}% of scored); this run" in summary_line(summary)
    # parts committed since the last summary: counted on request, read and nothing written
    tallies = out / "_summary" / "part_tallies.parquet"
    kept = tallies.read_bytes()
    tallies.unlink()
    assert main(["status", "--output", str(out)]) == 0
    assert "3 committed parts are counted by the next summary (a run's end), or now with --count" in \
        capsys.readouterr().out
    assert main(["status", "--output", str(out), "--json", "--count"]) == 0
    assert json.loads(capsys.readouterr().out)["counted"] == done["counted"] and not tallies.exists()
    tallies.write_bytes(kept)
    first = sorted((out / "scores").glob("part-*.parquet"))[0]
    first.unlink()  # as a run interrupted before that unit committed
    assert main(["status", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "committed: 4 records (66.7%) in 2 units; left: 2 records in 1 units (rerun the scan to finish)" in text
    assert "counted parts: 4 rows" in text and " flagged fake" in text

    # an audit's output, a benchmark run's: each scan below it
    shutil.copytree(out, tmp_path / "audit" / "scan")
    for kind in ("clean", "jpeg-75"):
        shutil.copytree(out, tmp_path / "bench" / "scans" / "WildRF" / kind)
    assert main(["status", "--output", str(tmp_path / "audit"), "--json"]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert [s["output"] for s in audit["scans"]] == [str(tmp_path / "audit" / "scan")]
    assert main(["status", "--output", str(tmp_path / "bench")]) == 0
    text = capsys.readouterr().out
    assert text.count("scan of ") == 2 and f"{tmp_path / 'bench' / 'scans' / 'WildRF' / 'jpeg-75'}: scan of" in text
