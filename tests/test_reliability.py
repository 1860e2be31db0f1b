"""Hostile inputs, killed actors, flaky and failing storage, secrets, and writes outside --output."""
import hashlib
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO, kill_group_when, own_ray_env, write_image
from hostile import animated_gif, exif_rotated_jpeg, heic, hostile_files, png_with_header, write_hostile_corpus
from PIL import Image
from s3_faults import FaultProxy

from mirror_core.config import PreprocessConfig
from mirror_core.preprocess import ImageTooLargeError, center_crop, official_preprocess
from pipeline.commands.cli import main
from pipeline.scan.config import ScanConfig
from pipeline.scan.reads import fetch_all
from pipeline.scan.run import run_scan


def test_bomb_header_is_refused_before_decoding():
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(ImageTooLargeError, match="108,000,000 pixels exceeds the limit of 100,000,000"):
        official_preprocess(png_with_header(12_000, 9_000, b"x"), PreprocessConfig())
    assert tracemalloc.get_traced_memory()[1] < 20 * 2**20  # never allocated the 108M-pixel image
    tracemalloc.stop()


def test_large_images_leave_the_console_quiet():
    """Our max_pixels decides; Pillow's bomb warning (above 89M pixels) is not printed per image."""
    code = ("import sys; sys.path.insert(0, 'tests'); from hostile import png_with_header\n"
            "from mirror_core.config import PreprocessConfig\n"
            "from mirror_core.preprocess import official_preprocess\n"
            "try:\n    official_preprocess(png_with_header(12_000, 9_000, b'x'), PreprocessConfig())\n"
            "except ValueError as err:\n    print(type(err).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip() == "ImageTooLargeError" and out.stderr == "", out.stderr


def test_animated_gif_gives_its_first_frame():
    out = official_preprocess(animated_gif(), PreprocessConfig())
    assert tuple(out.pixels[112, 112]) == (255, 0, 0)


def test_exif_orientation_is_ignored_like_the_official_script():
    data = exif_rotated_jpeg()
    out = official_preprocess(data, PreprocessConfig())
    raw = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # stored orientation, 120 wide x 60 high
    assert (out.width, out.height) == (120, 60)
    np.testing.assert_array_equal(out.pixels, center_crop(raw, 224))


def test_heic_decodes_to_its_pixels_and_a_cut_short_one_is_an_error():
    rgb = np.random.default_rng(6).integers(0, 256, (260, 300, 3), dtype=np.uint8)
    data = heic(Image.fromarray(rgb), lossless=True)
    cfg = PreprocessConfig(alignment="by-format")
    out = official_preprocess(data, cfg, name="photo.heic")
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    as_png = official_preprocess(png.getvalue(), PreprocessConfig(alignment="off"))
    assert (out.format, out.width, out.height, out.aligned) == ("HEIF", 300, 260, False)
    np.testing.assert_array_equal(out.pixels, as_png.pixels)
    for fast in (False, True):  # the exact path and --fast-decode
        with pytest.raises(ValueError, match="Unexpected end of file"):
            official_preprocess(data[: len(data) // 2], PreprocessConfig(fast_decode=fast))


def test_fetch_reads_at_most_the_limit(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"\x00" * 5000)
    (tmp_path / "ok.bin").write_bytes(b"\x01" * 100)
    results = list(fetch_all([str(tmp_path / "big.bin"), str(tmp_path / "ok.bin")], threads=2, max_bytes=1000))
    assert results == [(None, "file too large: over 1,000 bytes"), (b"\x01" * 100, None)]


@pytest.mark.slow
def test_hostile_corpus_gives_exactly_one_row_each(ray_local, parity_bundle, tmp_path):
    limit = 2**20
    paths = write_hostile_corpus(tmp_path / "in", max_file_bytes=limit)
    latin1 = os.fsdecode(b"caf\xe9.png")  # a name from an old archive: not UTF-8, no text column holds it
    write_image(tmp_path / "in" / latin1)
    paths = [*paths, "caf\\xe9.png"]  # its row's uri: the name's bytes, escaped
    summary = run_scan(str(parity_bundle), str(tmp_path / "in"), str(tmp_path / "out"),
                       ScanConfig(unit_size=4, max_file_mb=1))
    rows = {os.path.basename(r["uri"]): r for r in pq.read_table(tmp_path / "out" / "scores").to_pylist()}
    assert sorted(rows) == sorted(paths) and summary["rows_out"] == summary["rows_in"] == len(paths)
    errors = {name: row["error"] for name, row in rows.items() if row["error"]}
    assert errors["caf\\xe9.png"] == (f"file name not UTF-8: the disk names this file "
                                       f"{os.fsencode(str(tmp_path / 'in' / latin1))!r}, which no text column holds: "
                                       "rename it (e.g. convmv -f latin1 -t utf8) to score it")
    assert summary["errors_by_kind"]["file name not UTF-8"] == 1
    assert errors["zero.jpg"] == "empty file (0 bytes)"
    assert errors["page.jpg"].startswith("decode failed: UnidentifiedImageError: not an image: an HTML page")
    assert errors["noise.png"].startswith("decode failed")
    assert "exceeds" in errors["bomb.png"] and "decompression bomb" in errors["bomb.png"].lower()
    assert "exceeds the limit of 100,000,000" in errors["too_many_pixels.png"]
    assert errors["oversized.jpg"] == f"file too large: over {limit:,} bytes"
    assert errors["truncated.heic"].startswith("decode failed: ValueError: Invalid input: Unexpected end of file")
    assert all("\n" not in e for e in errors.values())
    for name in ("truncated.jpg", "animated.gif", "deep16.png", "cmyk.jpg", "one_pixel.png", "strip_5000x3.png",
                 "exif_rotated.jpg", "phone.heic"):
        assert rows[name]["error"] is None and 0 <= rows[name]["prob_fake"] <= 1, name
    assert rows["strip_5000x3.png"]["width"] == 5000 and rows["animated.gif"]["format"] == "GIF"
    assert (rows["phone.heic"]["format"], rows["phone.heic"]["width"]) == ("HEIF", 320)
    for row in rows.values():
        assert (row["error"] is None) == (row["pred"] is not None)


def _scan_cmd(model, src, out, *extra):
    return [sys.executable, "-m", "pipeline.commands.cli", "scan", "--model", str(model), "--input", str(src),
            "--output", str(out), *extra]


def _tree(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.slow
def test_killed_actor_and_nothing_written_outside_output(parity_bundle, tmp_path):
    for i in range(20):
        write_image(tmp_path / "in" / f"{i:02d}.png", seed=i)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before_in, before_model = _tree(tmp_path / "in"), _tree(parity_bundle)
    env = {**os.environ, "MIRROR_FAULT_ACTOR_EXIT_AFTER": "2", "MIRROR_FAULT_MARKER": str(tmp_path / "died")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(_scan_cmd(parity_bundle, tmp_path / "in", tmp_path / "out", "--unit-size", "4",
                                    "--batch-size", "3"),
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "died").exists(), "the fault hook did not kill an actor"
    rows = pq.read_table(tmp_path / "out" / "scores")
    assert rows.num_rows == 20 and len(set(rows["uri"].to_pylist())) == 20 and rows["error"].null_count == 20
    assert list(cwd.iterdir()) == []
    assert _tree(tmp_path / "in") == before_in and _tree(parity_bundle) == before_model
    assert set(os.listdir(tmp_path)) == {"in", "cwd", "out", "died"}


@pytest.mark.slow
def test_killed_writer_is_retried_and_every_row_lands_once(parity_bundle, tmp_path):
    for i in range(12):
        write_image(tmp_path / "in" / f"{i:02d}.png", seed=i)
    env = {**os.environ, "MIRROR_FAULT_WRITER_EXIT": "1", "MIRROR_FAULT_MARKER": str(tmp_path / "died")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(_scan_cmd(parity_bundle, tmp_path / "in", tmp_path / "out", "--unit-size", "4"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "died").exists(), "the fault hook did not kill a writer"
    rows = pq.read_table(tmp_path / "out" / "scores")
    assert rows.num_rows == 12 and len(set(rows["uri"].to_pylist())) == 12
    assert len(list((tmp_path / "out" / "scores").iterdir())) == 3  # one part per unit, no temporaries left
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["units"]["committed_now"] == 3 and summary["rows_out"] == 12


@pytest.mark.slow
def test_a_file_that_crashes_its_decoder_becomes_an_error_row(parity_bundle, tmp_path):
    """A file that kills the decoding process (a codec segfault, injected by the fault hook
    on its name): Ray retries the dying decode task, whose second attempt decodes that unit
    one record per child process; the file becomes an error row saying so, every other row
    scores, and the scan ends (Ray Data alone would retry the task forever)."""
    for i in range(12):
        write_image(tmp_path / "in" / (f"{i:02d}.png" if i != 5 else "05-poison.png"), seed=i)
    env = {**os.environ, "MIRROR_FAULT_DECODE_CRASH": "poison"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(_scan_cmd(parity_bundle, tmp_path / "in", tmp_path / "out", "--unit-size", "4"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pq.read_table(tmp_path / "out" / "scores").sort_by("uri").to_pylist()
    assert len(rows) == 12 and len({r["uri"] for r in rows}) == 12
    (poison,) = [r for r in rows if "poison" in r["uri"]]
    assert poison["error"] == "decode failed: the decoding process died on this record (killed by SIGSEGV)"
    assert poison["prob_fake"] is None and all(r["error"] is None for r in rows if r is not poison)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["this_run"]["units_decoded_in_isolation"] == 1 and summary["errors"] == 1


def test_isolated_decoder_gives_the_in_process_results_and_survives_crashes(monkeypatch):
    """The child process decodes exactly as decode_record does (crop, size, format, flags; the
    same error text), and a record that kills it costs that record only."""
    from pipeline.scan.decode import decode_record
    from pipeline.scan.isolation import IsolatedCalls, RecordFailed

    monkeypatch.setenv("MIRROR_FAULT_DECODE_CRASH", "poison")
    cfg = PreprocessConfig()
    jpeg, png = io.BytesIO(), io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (700, 900, 3), dtype=np.uint8)
    Image.fromarray(noise).save(jpeg, "JPEG")
    Image.fromarray(noise[:300, :200]).save(png, "PNG")
    isolated = IsolatedCalls(decode_record)
    try:
        for data, name in ((jpeg.getvalue(), "a.jpg"), (png.getvalue(), "b.png")):
            want, got = decode_record(data, name, cfg), isolated(data, name, cfg, None)
            np.testing.assert_array_equal(got.pixels, want.pixels)
            assert (got.width, got.height, got.format, got.aligned, got.region_decoded) == (
                want.width, want.height, want.format, want.aligned, want.region_decoded)
        with pytest.raises(RecordFailed, match=r"died on this record \(killed by SIGSEGV\)"):
            isolated(png.getvalue(), "poison.png", cfg, None)
        assert isolated(png.getvalue(), "b.png", cfg, None).height == 300  # a new child took over
        with pytest.raises(RecordFailed) as failed:
            isolated(b"not an image", "c.png", cfg, None)
        with pytest.raises(Exception) as in_process:
            decode_record(b"not an image", "c.png", cfg)
        assert failed.value.text.split(" <")[0] == f"{type(in_process.value).__name__}: {in_process.value}".split(" <")[0]
    finally:
        isolated.close()


def test_isolated_decoder_gives_up_a_hung_record():
    from hostile import sleepy_decode

    from pipeline.scan.isolation import IsolatedCalls, RecordFailed

    isolated = IsolatedCalls(sleepy_decode, timeout_s=3)
    try:
        assert isolated(b"abc", "a", PreprocessConfig(), None) == (3, 1)  # the child is up
        with pytest.raises(RecordFailed, match="no result in 3 s: hung"):
            isolated(b"abc", "hang", PreprocessConfig(), None)
        assert isolated(b"abcd", "b", PreprocessConfig(), None) == (4, 1)
    finally:
        isolated.close()


@pytest.mark.slow
def test_flaky_s3_is_retried_and_secrets_never_written(s3_server, s3_corpus, tmp_path):
    import fsspec

    bucket = s3_corpus
    secret = "Sekr3t-" + os.urandom(8).hex()
    with FaultProxy(s3_server, fail_every=3) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "AWS_SECRET_ACCESS_KEY": secret,
               "AWS_ACCESS_KEY_ID": "AKIA" + os.urandom(6).hex().upper()}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run(_scan_cmd(f"s3://{bucket}/model", f"s3://{bucket}/images", f"s3://{bucket}/out",
                                        "--unit-size", "3", "--fetch-threads", "4"),
                              env=env, capture_output=True, text=True, timeout=400)
        injected = proxy.injected
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert injected >= 5, injected  # transient 503s really happened, and were retried
    assert "12/12 rows: 12 scored, 0 errors" in proc.stdout
    fs = fsspec.filesystem("s3")
    for path in fs.find(f"{bucket}/out"):
        data = fs.cat(path)
        assert secret.encode() not in data and env["AWS_ACCESS_KEY_ID"].encode() not in data, path
    assert secret not in proc.stdout + proc.stderr and env["AWS_ACCESS_KEY_ID"] not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_permanent_storage_errors_exit_nonzero_with_a_clear_message(s3_server, s3_corpus, monkeypatch, capsys):
    import s3fs

    bucket = s3_corpus
    args = ["--model", f"s3://{bucket}/model", "--input", f"s3://{bucket}/images"]
    assert main(["scan", "--model", f"s3://{bucket}/model", "--input", "s3://no-such-bucket-here/x",
                 "--output", f"s3://{bucket}/o1"]) == 2
    assert "s3://no-such-bucket-here/x does not exist" in capsys.readouterr().err
    assert main(["scan", "--model", f"s3://{bucket}/no-model", "--input", f"s3://{bucket}/images",
                 "--output", f"s3://{bucket}/o2"]) == 2
    assert "is not a MIRROR bundle" in capsys.readouterr().err
    with FaultProxy(s3_server, deny_prefixes=(f"/{bucket}/locked",)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        assert main(["scan", *args, "--output", f"s3://{bucket}/locked/out"]) == 2
        assert proxy.denied > 0
    err = capsys.readouterr().err
    # the output's first file read: whether another run holds it
    assert f"PermissionError: access denied reading s3://{bucket}/locked/out/_running.json" in err
    s3fs.S3FileSystem.clear_instance_cache()


def test_every_hostile_file_is_generated_small():
    sizes = {name: len(data) for name, data in hostile_files(2**20).items()}
    assert sizes["bomb.png"] < 1000 and sum(sizes.values()) < 4 * 2**20


def test_unreadable_shard_turns_its_rows_into_error_rows(tmp_path):
    import pyarrow as pa

    from pipeline.scan.decode import decode_units
    from pipeline.scan.sources import SourceOptions, plan_source

    data = write_image(tmp_path / "x.png")
    pq.write_table(pa.table({"bytes": [data] * 5, "uri": [f"u{i}" for i in range(5)]}), tmp_path / "shards.parquet",
                   row_group_size=5)
    (unit,) = plan_source(str(tmp_path / "shards.parquet"), SourceOptions()).units
    (tmp_path / "shards.parquet").write_bytes(b"PAR1 truncated")  # broken after planning

    def errors_of(unit) -> list[str]:
        batch = {"key": ["0/u"], "unit": [json.dumps(unit.__dict__)], "records": [None], "target": ["{}"],
                 "perturbation": [""]}
        return [e for t in decode_units(batch, preprocess={}, columns={}) for e in t["error"].to_pylist()]

    errors = errors_of(unit)  # its version (mtime, size) says it was written again
    assert len(errors) == 5 and all(e.startswith("shard changed: ") and "written again" in e for e in errors)
    unit.version = None  # planned before versions were recorded: the read itself fails
    errors = errors_of(unit)
    assert len(errors) == 5 and all(e.startswith("shard read failed") for e in errors)


@pytest.mark.slow
def test_killed_ingest_reruns_to_the_same_shards(tmp_path):
    for i in range(24):
        write_image(tmp_path / "in" / ("0_real" if i % 2 else "1_fake") / f"{i:02d}.png", seed=i)
    (tmp_path / "in" / "top.png").write_bytes(b"not an image")  # a root-level file, kept as a row
    ingest = [sys.executable, "-m", "pipeline.commands.cli", "ingest", "--input", str(tmp_path / "in"),
              "--rows-per-shard", "5", "--rows-per-row-group", "2"]
    env = own_ray_env()
    subprocess.run([*ingest, "--output", str(tmp_path / "whole")], env=env, check=True, capture_output=True,
                   timeout=300)
    # the listing, streamed, digested as the sorted whole listing (earlier ingests' identity)
    listing = sorted(str(p) for p in (tmp_path / "in").rglob("*.png"))
    identity = json.loads((tmp_path / "whole" / "_ingest.json").read_text())
    assert identity["files"] == 25 and identity["listing_sha256"] == hashlib.sha256(
        "".join(f"{u}\n" for u in listing).encode()).hexdigest()
    assert sorted(p.name for p in (tmp_path / "whole").iterdir())[0] == "_ingest.json"  # its _ingest_plan/ removed
    # slowed so that the kill lands mid-way: some shards written, others not
    # (the console to a file: read if the run never gets that far)
    for attempt in range(2):  # a second time only if the first could not start its Ray
        with open(tmp_path / "slowed.log", "w") as log:
            proc = subprocess.Popen([*ingest, "--output", str(tmp_path / "resumed")], start_new_session=True,
                                    env={**env, "MIRROR_FAULT_WRITE_DELAY_S": "1.5"}, stdout=log, stderr=log)
        # generous: on a 2-core machine shared with other tests' Ray clusters, start-up alone
        # has taken minutes
        kill_group_when(proc, lambda: len(list((tmp_path / "resumed").glob("shard-*.parquet"))) >= 1, 480)
        if "raylet failed to startup" not in (tmp_path / "slowed.log").read_text():
            break
    before = sorted(p.name for p in (tmp_path / "resumed").glob("shard-*.parquet"))
    assert 1 <= len(before) < 5, (before, (tmp_path / "slowed.log").read_text()[-3000:])
    rerun = subprocess.run([*ingest, "--output", str(tmp_path / "resumed")], env=env, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # Ray worker processes of the killed run may still finish a shard after the kill: it
    # is whole (written under a temporary name, then renamed) and counts as already there
    skipped = int(re.search(r"\((\d+) already there", rerun.stdout).group(1))
    assert len(before) <= skipped <= 5, (before, rerun.stdout)
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole").glob("shard-*.parquet")}
    resumed = {p.name: p.read_bytes() for p in (tmp_path / "resumed").glob("shard-*.parquet")}
    assert len(whole) == 5 and resumed == whole  # byte for byte
    rows = pq.read_table(tmp_path / "resumed", columns=["uri", "read_error"]).to_pylist()
    assert len(rows) == 25 and len({r["uri"] for r in rows}) == 25
    other = [a if a != "5" else "6" for a in ingest]  # another shard size over the same output
    changed = subprocess.run([*other, "--output", str(tmp_path / "resumed")], env=env, capture_output=True,
                             text=True, timeout=300)
    assert changed.returncode == 2 and "holds shards of another ingest (rows_per_shard differ)" in changed.stderr


@pytest.mark.slow
def test_a_file_whose_decode_hangs_becomes_an_error_row(parity_bundle, tmp_path):
    """A decode that never ends (fault hook): after decode_timeout_s its process is killed
    (SIGALRM), the task's retry decodes that unit in isolation, where the record is given up
    after the same time: an error row, every other row scored, the scan ends."""
    for i in range(8):
        write_image(tmp_path / "in" / (f"{i:02d}.png" if i != 2 else "02-stuck.png"), seed=i)
    (tmp_path / "scan.yaml").write_text("decode_timeout_s: 3\nunit_size: 4\n")
    env = {**os.environ, "MIRROR_FAULT_DECODE_HANG": "02-stuck"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(_scan_cmd(parity_bundle, tmp_path / "in", tmp_path / "out", "--config",
                                    str(tmp_path / "scan.yaml")), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pq.read_table(tmp_path / "out" / "scores").to_pylist()
    (hung,) = [r for r in rows if "02-stuck" in r["uri"]]
    assert hung["error"] == "decode failed: no result in 3 s: hung (its process was killed)"
    assert len(rows) == 8 and sum(r["error"] is None for r in rows) == 7
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["this_run"]["units_decoded_in_isolation"] == 1
