"""The `mirror` command as a user meets it: version, inspect, help, flags, errors, console."""
import hashlib
import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import mirror_log_lines, tampered_copy

from pipeline.commands import cli

MIRROR = Path(sys.executable).parent / "mirror"  # the installed console script


def run_mirror(*args, check=True):
    proc = subprocess.run([MIRROR, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(proc.stdout[-2000:] + proc.stderr[-2000:])
    return proc


def test_version_is_the_installed_package_version():
    assert run_mirror("--version").stdout.strip() == f"mirror {version('mirror-at-scale')}"


def test_inspect_shows_architecture_policy_threshold_provenance_counts_and_hashes(parity_bundle):
    text = run_mirror("inspect", parity_bundle).stdout
    for expected in ("verified", "width 64", "K=4096", "top_k=128", "total 764,488", "threshold 0.5",
                     "alignment by-extension", "provenance: official; backbone backbone; checkpoint checkpoint.pth; "
                     "memory mirror_phase1.pth", "memory num_heads: from default"):
        assert expected in text, expected
    info = json.loads(run_mirror("inspect", parity_bundle, "--json").stdout)
    for name, digest in info["files"].items():
        assert hashlib.sha256((parity_bundle / name).read_bytes()).hexdigest() == digest
        assert f"file: {name} sha256 {digest}" in text
    assert info["parameters"]["total"] == 764_488
    assert info["architecture"]["memory"] == {"num_slots": 4096, "num_heads": 8, "top_k": 128}
    assert info["preprocessing"]["name"] == "official/align=by-extension"
    assert info["provenance"]["sources"]["checkpoint"]["file"] == "checkpoint.pth"


def test_inspect_of_an_edited_bundle_is_a_one_line_error(parity_bundle, tmp_path):
    proc = run_mirror("inspect", tampered_copy(parity_bundle, tmp_path / "edited"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "does not match mirror.json" in proc.stderr


def test_score_prints_the_official_scores_a_line_each_and_error_lines_for_what_cannot_be_scored(
        parity_bundle, parity_dir, tmp_path):
    import csv

    from pipeline.scan.schema import OUTPUT_COLUMNS

    expected = list(csv.DictReader(open(parity_dir / "expected_scores.csv")))[:6]
    images = [str(parity_dir / "data" / r["path"]) for r in expected]
    (tmp_path / "page.jpg").write_text("<html>not an image</html>")
    given = images + [str(tmp_path / "page.jpg"), str(tmp_path / "gone.png")]
    proc = run_mirror("score", "--model", parity_bundle, *given, check=False)
    assert proc.returncode == 1 and proc.stderr == ""  # a clean console: the lines and nothing else
    lines = proc.stdout.splitlines()
    assert len(lines) == len(given)
    for line, row, image in zip(lines, expected, images):
        prob, verdict, uri = line.split()
        assert uri == image and verdict == ("real", "fake")[int(row["pred"])]
        assert float(prob) == pytest.approx(float(row["prob_fake"]), abs=1e-3)
    assert lines[-2].split()[:2] == ["-", "error"]
    assert ("page.jpg: decode failed: UnidentifiedImageError: not an image: an HTML page (a web link that answers "
            "with a page?) (25 bytes, starting b'<html>not an ima')") in lines[-2]
    assert lines[-1].split()[:2] == ["-", "error"] and "gone.png: read failed: FileNotFoundError" in lines[-1]

    # --json: a scan's output row per image; --threshold decides anew
    proc = run_mirror("score", "--model", parity_bundle, "--json", "--threshold", "0.999", "--batch-size", "4",
                      *images)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["uri"] for r in rows] == images and set(rows[0]) == set(OUTPUT_COLUMNS)
    for r, row in zip(rows, expected):
        assert r["logit_fake"] == pytest.approx(float(row["logit_fake"]), abs=1e-3)
        assert r["threshold"] == 0.999 and r["pred"] == int(r["prob_fake"] > 0.999) and r["precision"] == "fp32"
    proc = run_mirror("score", "--model", parity_bundle, parity_dir / "data", check=False)
    assert proc.returncode == 2 and "is a folder: `mirror scan --input" in proc.stderr
    # a reader that went away (`mirror score ... | head -1`): exit 141, no traceback
    proc = subprocess.Popen([MIRROR, "score", "--model", str(parity_bundle), *images], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the first line: every write finds the pipe closed
    assert proc.wait(timeout=300) == 141 and proc.stderr.read() == ""
    for flags, says in ((("--batch-size", "0"), "batch_size must be >= 1, got 0"),  # a scan's settings, checked alike
                        (("--device", "tpu"), "--device 'tpu': expected cpu, cuda or cuda:N")):
        proc = run_mirror("score", "--model", parity_bundle, *flags, images[0], check=False)
        assert proc.returncode == 2 and says in proc.stderr and proc.stdout == ""


def test_score_expands_a_pattern_of_a_bucket_or_a_quoted_local_one(parity_bundle, s3_bucket, tmp_path, capsys):
    """No shell expands `s3://bucket/dir/*.png`: `mirror score` does, in name order."""
    import fsspec
    from conftest import write_image

    for name in ("b.png", "a.png", "c.jpg"):
        write_image(tmp_path / "imgs" / name)
    fsspec.filesystem("s3").put(str(tmp_path / "imgs"), f"{s3_bucket}/imgs", recursive=True)
    assert cli.main(["score", "--model", str(parity_bundle), f"s3://{s3_bucket}/imgs/*.png",
                     str(tmp_path / "imgs" / "[c]*")]) == 0
    uris = [line.split()[-1] for line in capsys.readouterr().out.splitlines()]
    assert uris == [f"s3://{s3_bucket}/imgs/a.png", f"s3://{s3_bucket}/imgs/b.png", str(tmp_path / "imgs" / "c.jpg")]
    assert cli.main(["score", "--model", str(parity_bundle), f"s3://{s3_bucket}/imgs/*.webp"]) == 2
    assert capsys.readouterr().err == f"mirror score: error: ValueError: no file matches s3://{s3_bucket}/imgs/*.webp\n"


def test_help_shows_defaults():
    text = run_mirror("scan", "--help").stdout
    assert re.search(r"images per model call\s+\(default: 32\)", text)
    assert "--no-fast-decode" in text and "--no-compile" in text
    assert "(default: 4096)" in run_mirror("ingest", "--help").stdout


def test_a_boolean_turned_on_in_yaml_can_be_turned_off_on_the_command_line(tmp_path):
    config = tmp_path / "on.yaml"
    config.write_text("fast_decode: true\ncompile: true\n")
    base = ["scan", "--model", "m", "--input", "i", "--output", "o", "--config", str(config)]
    on = cli.scan_config_from_args(cli.build_parser().parse_args(base))
    assert on.fast_decode is True and on.compile is True
    off = cli.scan_config_from_args(cli.build_parser().parse_args(base + ["--no-fast-decode", "--no-compile"]))
    assert off.fast_decode is False and off.compile is False


def test_malformed_yaml_is_one_line_naming_the_file_and_position(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("batch_size: 8\nactors: [1, 2\nunit_size: 4\n")
    code = cli.main(["scan", "--model", "m", "--input", "i", "--output", "o", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert f"{config}: not valid YAML at line 3, column " in err


def test_programming_errors_keep_their_traceback(monkeypatch):
    def broken(args):
        return {}["missing"]

    monkeypatch.setattr(cli, "cmd_inspect", broken)
    with pytest.raises(KeyError, match="missing"):
        cli.main(["inspect", "somewhere"])


def test_s3_without_credentials_or_endpoint_is_one_line_saying_what_is_missing(parity_bundle, tmp_path):
    """No AWS credentials on the machine, or no S3 endpoint answering: the user's set-up,
    told in one line, exit 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL="http://127.0.0.1:1", AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    proc = subprocess.run([MIRROR, "scan", "--model", parity_bundle, "--input", "s3://corpus/images", "--output",
                           tmp_path / "out"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "mirror scan: error: NoCredentialsError: Unable to locate credentials (s3:// needs AWS credentials: "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role; on a cluster, on every node: "
        "env_vars of the runtime environment)")
    env.update(AWS_ACCESS_KEY_ID="key", AWS_SECRET_ACCESS_KEY="secret")  # now nothing answers at the endpoint
    proc = subprocess.run([MIRROR, "scan", "--model", parity_bundle, "--input", "s3://corpus/images", "--output",
                           tmp_path / "out"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("mirror scan: error: EndpointConnectionError: Could not connect")
    assert proc.stderr.endswith("(the S3 endpoint cannot be reached: check the network, AWS_ENDPOINT_URL and the "
                                "region)\n")


def test_output_flags_are_named_alike_with_old_spellings_kept():
    parser = cli.build_parser()
    for argv in (["import-official", "--checkpoint", "c", "--backbone", "b", "--output", "x"],
                 ["import-official", "--checkpoint", "c", "--backbone", "b", "--out", "x"],
                 ["scan", "--model", "m", "--input", "i", "--output", "x"],
                 ["ingest", "--input", "i", "--output", "x"],
                 ["audit", "--model", "m", "--input", "i", "--output", "x"],
                 ["benchmark", "--benchmarks", "b", "--output", "x"],
                 ["benchmark", "--benchmarks", "b", "--output_dir", "x"]):
        assert parser.parse_args(argv).output == "x", argv


# Error-level lines as Ray's C++ (glog: "[date time,ms E pid tid]"), Python logging
# ("ERROR"/"CRITICAL" level field) and tracebacks print them.
ERROR_LINE = re.compile(r"^\[[^\]]* [EF] \d+ \d+\]|\t(ERROR|CRITICAL) |\b(ERROR|CRITICAL)\b.* -- |^Traceback", re.M)


@pytest.mark.slow
def test_demo_console_has_no_error_level_lines_and_one_row_per_image(tmp_path):
    proc = run_mirror("demo", "--workdir", tmp_path / "demo")
    console = proc.stdout + proc.stderr
    assert not ERROR_LINE.search(console), ERROR_LINE.search(console).group(0)
    # nor the noise of a first run: Ray's choice of authentication, a progress bar over one file
    assert "Token authentication" not in console and "Writing model shards" not in console
    assert "24/24 rows: 24 scored, 0 errors" in proc.stdout
    assert f"next: `mirror score --model {tmp_path / 'demo'}/bundle IMAGE...`" in proc.stdout
    images = [p for p in (tmp_path / "demo" / "images").rglob("*") if p.is_file()]
    assert len(images) == 24
    assert "INFO mirror -- planning" in proc.stderr  # work outside Ray Data shows progress too
    # no terminal here: Ray Data's block of progress lines comes at our pace (a minute), not every 10 s
    assert console.count("Total Progress:") <= 2, console.count("Total Progress:")


def test_training_input_errors_are_one_line_before_ray_starts(tmp_path):
    """A wrong training input fails while the driver lists it: no Ray start (seconds of
    waiting, and Ray's shutdown lines after the error), one line naming the problem."""
    from PIL import Image
    from test_train import tiny

    from mirror_core.bundle import save_bundle

    save_bundle(str(tmp_path / "base"), *tiny(seed=0))
    for path in ("flat/a.png", "flat/b.png", "one/0_real/a.png"):  # flat: no labels (fine for phase 1 only)
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32)).save(tmp_path / path)
    cases = [("train-detector", "missing", "FileNotFoundError: input"),
             ("train-detector", "flat", "ValueError: phase 2 needs a label for every image; 2 in "),
             ("train-memory", "one", "ValueError: not enough images in")]
    for command, data, error in cases:
        proc = run_mirror(command, "--base", tmp_path / "base", "--input", tmp_path / data, "--output",
                          tmp_path / "out", "--storage", tmp_path / "store", check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"mirror {command}: error: {error}" in proc.stderr, proc.stderr[-2000:]
        assert "Ray" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()


def test_the_console_filter_drops_only_the_known_line_and_passes_partial_lines_at_once():
    from pipeline.commands.console import _FILTER, FALSE_ALARM

    alarm = ("[2026-11-26 12:16:29,066 E 6390 6390] core_worker.cc:2465: Actor with class name: "
             "'MapWorker(MapBatches(Scorer))' and ID: 'b87c1cb6e0e93fedfb40ba2e01000000' has constructor arguments "
             "in the object store and max_restarts > 0. If the arguments in the object store go out of scope or are "
             "lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")
    other = "[2026-11-26 12:16:29,067 E 6390 6390] core_worker.cc:100: a real error"
    text = f"before\n{alarm}\n{other}\nprogress 10%\rprogress 20%\r[no newline at the end"
    proc = subprocess.run([sys.executable, "-c", _FILTER, FALSE_ALARM], input=text.encode(), capture_output=True)
    assert proc.stdout.decode() == f"before\n{other}\nprogress 10%\rprogress 20%\r[no newline at the end"


def test_the_console_filter_drops_ray_trains_false_alarms_even_when_a_line_comes_in_two_writes():
    import time

    from pipeline.commands.console import _FILTER, FALSE_ALARM

    cleaner = ("\x1b[36m(PlacementGroupCleaner pid=19597)\x1b[0m Failed to query Ray Train Controller actor state. "
               "State API may be temporarily unavailable. Continuing to monitor.\n")
    watcher = ("\x1b[36m(TrainController pid=18543)\x1b[0m [2026-11-27 20:26:21,833 E 18543 18575] "
               "core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: '12783a5a718105e9' "
               "has constructor arguments in the object store and max_restarts > 0. If the arguments ...\n")
    kept = "\x1b[36m(RayTrainWorker pid=18647)\x1b[0m INFO mirror -- epoch 1/3: train_loss=0.78\n"
    child = subprocess.Popen([sys.executable, "-c", _FILTER, FALSE_ALARM], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    for line in (cleaner, watcher, kept, cleaner):
        for piece in (line[:60], line[60:]):  # the driver writes some forwarded lines in two pieces
            child.stdin.write(piece.encode())
            child.stdin.flush()
            time.sleep(0.05)
    out, _ = child.communicate(timeout=30)
    assert out.decode() == kept


def test_row_progress_lines_say_rows_rate_and_time_left():
    from pipeline.progress import RowProgress, duration

    now = [0.0]
    meter = RowProgress("scoring", 1000, every_s=10, clock=lambda: now[0])
    with mirror_log_lines() as said:
        now[0] = 30.0  # start-up: the first rows come after 30 s, a line (no rate yet)
        meter.add(100)
        now[0] = 35.0
        meter.add(100)  # 5 s after that line: none
        now[0] = 40.0
        meter.add(100)  # the rate counts from the first rows, not from the start
        now[0] = 80.0
        meter.add(700)  # done: no line, the summary says it
        quiet = RowProgress("scoring", 10, every_s=0, clock=lambda: now[0])
        now[0] = 1e6
        quiet.add(1)
    assert said == ["scoring: 100 / 1,000 rows (10.0%)",
                    "scoring: 300 / 1,000 rows (30.0%), 20 rows/s, about 35s left"]
    assert (duration(7.2), duration(125), duration(3725)) == ("7s", "2m 5s", "1h 2m")



def test_loops_log_their_progress_where_stderr_is_no_terminal():
    """A job's log (no terminal, no tqdm bar) gets a line every so often of each counted loop."""
    from pipeline.progress import progress

    with mirror_log_lines() as said:
        assert list(progress(range(3), "indexing tar shards", total=3, unit="shard", every_s=1e-9)) == [0, 1, 2]
        assert list(progress(iter("ab"), "explaining", unit="image", every_s=1e-9)) == ["a", "b"]
        assert list(progress(range(3), "quiet", total=3, every_s=0)) == [0, 1, 2]
    assert said[0] == "indexing tar shards: 1 / 3 shards (33.3%)"
    assert said[1].startswith("indexing tar shards: 2 / 3 shards (66.7%), ") and said[1].endswith(" left")
    assert said[2] == "explaining: 1 images" and said[3].startswith("explaining: 2 images, ")
    assert len(said) == 4


def test_stall_reports_warn_while_no_rows_come_and_stop_when_they_do():
    import time

    from pipeline.progress import RowProgress, stall_reports

    meter = RowProgress("scoring", 1000, every_s=0)
    with mirror_log_lines() as said:
        with stall_reports(meter, 1.0, lambda: "CPU 0 of 4 free"):
            time.sleep(2.6)  # stalled: a warning a second
            stalled = len(said)
            for _ in range(75):  # rows again, every 20 ms for 1.5 s: no warning
                meter.add(1)
                time.sleep(0.02)
            flowing = len(said)
        with stall_reports(meter, 0.1, lambda: 1 / 0):
            time.sleep(0.4)  # a failing picture is reported, never raised
    assert stalled >= 2 and flowing == stalled, said
    assert re.fullmatch(r"no rows done for \d+s \(0 of 1,000 so far\): CPU 0 of 4 free", said[0]), said
    assert "no picture of the cluster (ZeroDivisionError" in said[-1]


def test_an_output_inside_a_folder_input_is_refused_before_anything_is_written(parity_bundle, tmp_path, s3_bucket):
    import fsspec
    from conftest import write_image

    from pipeline.scan.sources import refuse_output_in_input

    write_image(tmp_path / "corpus" / "a.png")
    proc = run_mirror("scan", "--model", parity_bundle, "--input", tmp_path / "corpus", "--output",
                      tmp_path / "corpus" / "mirror", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"--output {tmp_path}/corpus/mirror lies inside the input folder {tmp_path}/corpus" in proc.stderr
    assert not (tmp_path / "corpus" / "mirror").exists()
    for output in (tmp_path / "corpus-scan", tmp_path / "elsewhere"):  # beside it, not inside
        refuse_output_in_input(str(tmp_path / "corpus"), str(output))
    refuse_output_in_input(str(tmp_path / "corpus" / "a.png"), str(tmp_path / "corpus" / "out"))  # a file is not listed
    fsspec.filesystem("s3").pipe(f"{s3_bucket}/data/x/a.png", b"x")
    with pytest.raises(ValueError, match="lies inside the input folder"):
        refuse_output_in_input(f"s3://{s3_bucket}/data", f"s3://{s3_bucket}/data/x/out/")
    with pytest.raises(ValueError, match="lies inside the input folder"):
        refuse_output_in_input(f"s3://{s3_bucket}/data/", f"s3://{s3_bucket}/data")
    refuse_output_in_input(f"s3://{s3_bucket}/data", f"s3://{s3_bucket}/data-scan")


def test_an_output_claimed_by_a_mistyped_input_takes_the_right_one_and_a_planned_one_does_not(parity_bundle, tmp_path,
                                                                                                capsys):
    from conftest import write_image

    write_image(tmp_path / "corpus" / "a.png")
    out = str(tmp_path / "scan")
    scan = ["scan", "--model", str(parity_bundle), "--output", out, "--plan-only", "--input"]
    assert cli.main(scan + [str(tmp_path / "corpsu")]) == 2  # nothing there: the planning never ends
    assert "corpsu does not exist" in capsys.readouterr().err
    assert cli.main(scan + [str(tmp_path / "corpus")]) == 0  # the output is not held by the typo
    assert "folder input: 1 records in 1 units" in capsys.readouterr().out
    write_image(tmp_path / "other" / "b.png")
    assert cli.main(scan + [str(tmp_path / "other")]) == 2  # planned: it holds a scan of corpus/ now
    assert f"holds another scan (input: '{tmp_path}/corpus' there, '{tmp_path}/other' now)" in capsys.readouterr().err


def test_an_output_being_written_by_another_run_is_refused_and_a_dead_runs_hold_is_not(parity_bundle, tmp_path,
                                                                                        capsys):
    """A nightly scan still going when the next one starts: the second is told, instead of
    both writing one plan and summary."""
    import socket
    import time

    from conftest import write_image

    from pipeline.scan.export import export_scores
    from pipeline.scan.store import RUNNING_FILE, OutputBusyError, ScanStore

    write_image(tmp_path / "corpus" / "a.png")
    out = ScanStore(str(tmp_path / "scan"))
    scan = ["scan", "--model", str(parity_bundle), "--input", str(tmp_path / "corpus"), "--output", out.uri,
            "--plan-only"]
    assert cli.main(scan) == 0 and not (tmp_path / "scan" / RUNNING_FILE).exists()  # let go when it ended
    capsys.readouterr()
    with out.running():  # another run, going on
        assert cli.main(scan) == 2
        err = capsys.readouterr().err
        assert f"{out.uri} is being written by another run (host {socket.gethostname()}, pid " in err
        assert f"wait for it to end; if that run is gone, remove {out.uri}/{RUNNING_FILE}" in err
        with pytest.raises(OutputBusyError, match="export it once that run has ended"):
            export_scores(out.uri, str(tmp_path / "export"))
        assert cli.main(["status", "--output", out.uri]) == 0
        assert f"  being written now by host {socket.gethostname()}, pid {os.getpid()} (since " in \
            capsys.readouterr().out
    assert not (tmp_path / "scan" / RUNNING_FILE).exists()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a run killed on this host: its process is gone
    stale = {"host": socket.gethostname(), "pid": gone.pid, "run": "x", "since": 0, "beat": time.time()}
    restarted = {**stale, "pid": os.getpid(), "process": "another-boot:0"}  # a container's driver, pid 1 again
    elsewhere = {**stale, "host": "elsewhere"}
    for holder, refused in ((stale, False), (restarted, False), ({**elsewhere, "beat": time.time()}, True),
                            ({**elsewhere, "beat": time.time() - 3600}, False)):
        out.write_json(RUNNING_FILE, holder)  # on another host: alive while it says so
        assert cli.main(scan) == (2 if refused else 0), holder
        capsys.readouterr()
