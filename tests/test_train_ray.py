"""Training on Ray Train (CPU, tiny models): Phase 1 and Phase 2, bundles that scan, resume."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from conftest import kill_group_when, own_ray_env
from test_train import smooth_image, tiny

from mirror_core.bundle import save_bundle
from pipeline.commands.cli import main
from pipeline.scan.config import ScanConfig
from pipeline.scan.run import run_scan
from pipeline.train.data import is_held_out

pytestmark = pytest.mark.slow


def labeled_folder(root, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % 2
        folder = root / ("1_fake" if label else "0_real")
        folder.mkdir(parents=True, exist_ok=True)
        smooth_image(rng, bool(label)).save(folder / f"{seed}_{i:03d}.png")
    return root


def detector_args(base, data, out, storage, epochs=4):
    return ["train-detector", "--base", str(base), "--input", str(data), "--output", str(out), "--storage",
            str(storage), "--epochs", str(epochs), "--batch-size", "16", "--lr", "1e-3", "--warmup-steps", "5",
            "--val-fraction", "0.25"]


def assert_same_trained_weights(resumed_bundle, straight_bundle):
    """A resumed run's bundle against an uninterrupted run's: LoRA, head and memory bank."""
    from safetensors.torch import load_file

    for name in ("lora.safetensors", "mirror.safetensors"):
        resumed, straight = (load_file(str(d / name)) for d in (resumed_bundle, straight_bundle))
        assert resumed.keys() == straight.keys()
        for key in resumed:
            assert (resumed[key] - straight[key]).abs().max() <= 1e-6, (name, key)


def test_phase2_on_a_planted_trace_gives_a_bundle_that_scans(ray_local, tmp_path):
    cfg, weights = tiny(seed=1)
    save_bundle(str(tmp_path / "base"), cfg, weights)
    labeled_folder(tmp_path / "train", 80, seed=0)
    # one bad file must not stop training; named so it lands in the training split (the
    # split hashes the path below the input), so its skip is counted in every epoch
    broken = next(name for name in (f"1_fake/broken_{i}.png" for i in range(100)) if not is_held_out([name], 0.25)[0])
    (tmp_path / "train" / broken).write_bytes(b"")
    # a name that is not UTF-8 (an old archive's) is skipped as a scan reports it, never read;
    # its uri is the name's bytes escaped, and that name puts it in the held-out split
    escaped = next(f"0_real/caf\\xe9_{i}.png" for i in range(100) if is_held_out([f"0_real/caf\\xe9_{i}.png"], 0.25)[0])
    latin1 = escaped.encode().decode("unicode_escape").encode("latin-1")
    smooth_image(np.random.default_rng(5), False).save(os.fsencode(tmp_path / "train") + b"/" + latin1, "PNG")
    assert main(detector_args(tmp_path / "base", tmp_path / "train", tmp_path / "out", tmp_path / "store", epochs=8)) == 0
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["final"]["val_bal_acc"] >= 0.9 and len(card["history"]) == 8
    assert card["recipe"]["phase"] == 2 and card["train_images"] + card["val_images"] == 82
    assert all(h["skipped_images"] == 1 and h["val_skipped_images"] == 1 for h in card["history"])
    # the model card names what it skipped, and why, as a scan's error rows would
    train_skips, val_skips = card["skipped_images"]["train"], card["skipped_images"]["val"]
    assert [s["uri"] for s in train_skips["named"]] == [str(tmp_path / "train" / broken)]
    assert train_skips["named"][0]["reason"].startswith("decode failed: ")
    assert val_skips["by_kind"] == {"file name not UTF-8": 1}
    assert val_skips["named"][0]["uri"] == str(tmp_path / "train" / escaped)
    # decoding and augmentation ran in Ray Data tasks, never in the training worker
    assert all(h["prepared_in_training_worker"] == 0 for h in card["history"])
    labeled_folder(tmp_path / "heldout", 32, seed=7)  # images never seen in training
    summary = run_scan(str(tmp_path / "out"), str(tmp_path / "heldout"), str(tmp_path / "scan"), ScanConfig())
    assert summary["metrics"]["ALL"]["Bal_Acc"] >= 0.9, summary["metrics"]


def test_phase1_from_a_backbone_directory_lowers_reconstruction(ray_local, tmp_path):
    from official_format import tiny_backbone

    tiny_backbone("dinov3", dim=64).save_pretrained(tmp_path / "backbone")
    labeled_folder(tmp_path / "reals", 40, seed=3)  # the 1_fake half is filtered out: phase 1 sees reals only
    assert main(["train-memory", "--base", str(tmp_path / "backbone"), "--input", str(tmp_path / "reals"),
                 "--output", str(tmp_path / "memory"), "--storage", str(tmp_path / "store"), "--epochs", "4",
                 "--batch-size", "8", "--lr", "3e-3", "--memory-slots", "256", "--top-k", "32",
                 "--val-fraction", "0.25"]) == 0
    card = json.loads((tmp_path / "memory" / "model_card.json").read_text())
    recon = [h["val_reconstruction"] for h in card["history"]]
    # training lowers held-out reconstruction error overall (single epochs may wobble)
    assert len(recon) == 4 and min(recon[1:]) < recon[0] and recon[-1] < 0.99 * recon[0], recon
    assert card["train_images"] + card["val_images"] == 20


def test_workers_a_local_ray_cannot_hold_at_once_are_refused_before_training(ray_local, tmp_path, monkeypatch, capsys):
    """Ray Train would wait forever for a placement group the local Ray cannot give: more
    workers than its 4 CPUs, or GPU workers on a machine without one. Exit 2, one line."""
    cfg, weights = tiny(seed=2)
    save_bundle(str(tmp_path / "base"), cfg, weights)
    root = labeled_folder(tmp_path / "train", 8, seed=6)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = detector_args(tmp_path / "base", root, tmp_path / "out", tmp_path / "store", epochs=1)
    assert main([*args, "--workers", "5"]) == 2
    assert ("a training worker (--workers) asks for 1 CPU, 5 at once, and the nodes hold 4 on this machine's Ray: "
            "fewer --workers, or --address") in capsys.readouterr().err
    assert main([*args, "--gpu"]) == 2
    assert "a training worker (--workers, --gpu) asks for 1 CPU, 1 GPU, and no node has" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model_card.json").exists()


def test_a_held_out_split_of_unusable_images_validates_to_nan_not_a_crash(ray_local, tmp_path):
    """Every held-out image broken: the epochs train, their validation is NaN (no image to
    measure on), and the model card names the skipped images."""
    import math

    cfg, weights = tiny(seed=2)
    save_bundle(str(tmp_path / "base"), cfg, weights)
    root = labeled_folder(tmp_path / "train", 24, seed=6)
    held = [p for p in sorted(root.rglob("*.png")) if is_held_out([str(p.relative_to(root))], 0.25)[0]]
    for path in held:
        path.write_bytes(b"\x89PNG but nothing after")
    assert main(detector_args(tmp_path / "base", root, tmp_path / "out", tmp_path / "store", epochs=1)) == 0
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    (epoch,) = card["history"]
    assert card["val_images"] == len(held) > 0 and epoch["val_skipped_images"] == len(held)
    assert math.isnan(epoch["val_bal_acc"]) and epoch["val_n"] == 0 and not math.isnan(epoch["train_loss"])
    assert card["skipped_images"]["val"]["count"] == len(held)


RESUME_EPOCHS = 5  # the kill must land between the first registered checkpoint and the end


def train_command(run: dict, out, store) -> list[str]:
    """The CLI training run of the resume tests (`run`: the straight_run fixture)."""
    return [sys.executable, "-m", "pipeline.commands.cli",
            *detector_args(run["base"], run["data"], out, store, epochs=RESUME_EPOCHS), "--ema", "0.9"]


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, worker_id):
    """One uninterrupted training run: what every resumed run must end with. Made once per
    test session, also when the resume tests run on two xdist workers (the session's base
    folder is theirs to share; the lock makes the second wait for the first's run)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker_id != "master" else base) / "straight-run"
    run = {"base": root / "base", "data": root / "train", "bundle": root / "whole"}
    with FileLock(f"{root}.lock"):
        if not (root / "whole" / "model_card.json").exists():
            cfg, weights = tiny(seed=2)
            save_bundle(str(root / "base"), cfg, weights)
            labeled_folder(root / "train", 32, seed=1)
            whole = subprocess.run(train_command(run, run["bundle"], root / "store"), env=own_ray_env(),
                                   capture_output=True, text=True, timeout=400)
            assert whole.returncode == 0, whole.stderr[-3000:]
    return run


def test_killed_training_resumes_to_the_bundle_of_an_uninterrupted_run(straight_run, tmp_path):
    cmd = train_command(straight_run, tmp_path / "out", tmp_path / "store")
    proc = subprocess.Popen(cmd, env=own_ray_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    # A checkpoint counts once Ray Train has registered it (its manager snapshot names it);
    # the files alone can be uploaded a moment earlier.
    snapshot = tmp_path / "store" / "mirror-phase2" / "checkpoint_manager_snapshot.json"
    # a loaded CI machine: the run's start alone can take minutes
    kill_group_when(proc, lambda: snapshot.exists() and "checkpoint_" in snapshot.read_text(), 400)
    assert snapshot.exists(), "no registered checkpoint before the kill"
    assert not (tmp_path / "out" / "model_card.json").exists()
    # A kill can land while Ray Train rewrites its checkpoint list in place (seen in CI): the
    # list is left empty. Make that the case here: the rerun must recover from our own files.
    snapshot.write_bytes(b"")
    rerun = subprocess.run(cmd, env=own_ray_env(), capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["resumed_from_epoch"] is not None and card["resumed_from_epoch"] >= 0
    assert [h["epoch"] for h in card["history"]] == list(range(RESUME_EPOCHS))
    assert "resumed after epoch" in rerun.stdout
    # live weights, EMA, optimizer and schedule all continued exactly
    assert_same_trained_weights(tmp_path / "out", straight_run["bundle"])
    assert_clean_training_console(rerun.stdout + rerun.stderr)


def assert_clean_training_console(console: str) -> None:
    """A training run's console: its own line per epoch; no error-level line, no line of
    Ray's known false alarms, no progress bar drawn by a remote process (cursor moves).
    (Ray Train's controller may log a traceback of its own when a resource request times
    out on a loaded machine, and carry on: seen in CI, not ours to hide.)"""
    from test_cli import ERROR_LINE

    assert f"INFO mirror -- epoch {RESUME_EPOCHS}/{RESUME_EPOCHS}: " in console
    for noise in ("Failed to query Ray Train Controller", "PreemptionWatcher", "\x1b[A", "PlacementGroupCleaner"):
        assert noise not in console, noise
    native_errors = re.findall(r"\[[^\]]* [EF] \d+ \d+\] .*", console)  # Ray's C++ lines, prefixed or not
    assert not ERROR_LINE.search(console) and not native_errors, native_errors or ERROR_LINE.search(console).group(0)


def test_a_training_worker_lost_mid_run_resumes_in_the_same_run_to_the_uninterrupted_bundle(straight_run, tmp_path):
    """A worker process dies after its epoch-1 checkpoint (fault hook: a preempted node).
    Ray Train restarts the worker group from that checkpoint within the same command (the
    default max_failures), which finishes with the weights of a run never interrupted."""
    from pipeline.train.run import TrainConfig

    assert TrainConfig.max_failures > 0  # the default recovers
    marker = tmp_path / "worker-exited"
    lost = subprocess.run(train_command(straight_run, tmp_path / "lost", tmp_path / "store"), capture_output=True,
                          env=own_ray_env(MIRROR_FAULT_TRAIN_EXIT_AFTER_EPOCH="1", MIRROR_FAULT_MARKER=str(marker)),
                          text=True, timeout=400)
    assert lost.returncode == 0, lost.stderr[-3000:]
    assert marker.exists()  # the worker did die
    card = json.loads((tmp_path / "lost" / "model_card.json").read_text())
    # Epoch 1's checkpoint is written before the worker dies; whether Ray Train had
    # registered it by then is a race (it registers reports asynchronously): either resume is right
    assert card["resumed_from_epoch"] in (0, 1) and [h["epoch"] for h in card["history"]] == list(range(RESUME_EPOCHS))
    assert_same_trained_weights(tmp_path / "lost", straight_run["bundle"])


def test_checkpoints_in_s3_storage_and_a_rerun_after_the_last_one(ray_local, s3_bucket, tmp_path):
    """A cluster's workers share no disk: checkpoints go to object storage (--storage
    s3://...). A run killed after its last checkpoint, while Ray Train rewrote its list of
    checkpoints (left empty), is rerun: it recovers that checkpoint from the bucket, trains
    no further epoch and writes the bundle of the finished run."""
    import s3fs

    cfg, weights = tiny(seed=3)
    save_bundle(str(tmp_path / "base"), cfg, weights)
    labeled_folder(tmp_path / "train", 32, seed=2)
    storage = f"s3://{s3_bucket}/runs"

    def train(out):
        return main(detector_args(tmp_path / "base", tmp_path / "train", tmp_path / out, storage, epochs=2))

    assert train("first") == 0
    fs = s3fs.S3FileSystem()
    run = f"{s3_bucket}/runs/mirror-phase2"
    checkpoints = sorted(p for p in fs.ls(run) if p.rsplit("/", 1)[-1].startswith("checkpoint_") and fs.isdir(p))
    assert len(checkpoints) == 2 and all(fs.exists(f"{c}/export.safetensors") for c in checkpoints)
    fs.pipe(f"{run}/checkpoint_manager_snapshot.json", b"")
    assert train("rerun") == 0
    card = json.loads((tmp_path / "rerun" / "model_card.json").read_text())
    assert card["resumed_from_epoch"] == 1 and [h["epoch"] for h in card["history"]] == [0, 1]
    assert_same_trained_weights(tmp_path / "rerun", tmp_path / "first")


def test_two_workers_data_parallel_with_ema(ray_local, tmp_path):
    cfg, weights = tiny(seed=4)
    save_bundle(str(tmp_path / "base"), cfg, weights)
    labeled_folder(tmp_path / "train", 48, seed=5)
    broken = [name for name in (f"1_fake/broken_{i}.png" for i in range(40)) if not is_held_out([name], 0.25)[0]][:6]
    for name in broken:
        (tmp_path / "train" / name).write_bytes(b"not an image")
    assert main([*detector_args(tmp_path / "base", tmp_path / "train", tmp_path / "out", tmp_path / "store",
                                epochs=2), "--workers", "2", "--ema", "0.9"]) == 0
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["recipe"]["num_workers"] == 2 and card["recipe"]["ema_decay"] == 0.9
    assert card["final"]["val_n"] == card["val_images"]  # the whole held-out set, no row dropped
    # each worker reads its own part of the training split: the skips are every worker's
    assert [h["skipped_images"] for h in card["history"]] == [6, 6]
    assert sorted(s["uri"] for s in card["skipped_images"]["train"]["named"]) == sorted(
        str(tmp_path / "train" / name) for name in broken)


@pytest.mark.parametrize("phase", [1, 2])
def test_two_ddp_workers_with_batch_b_match_one_worker_with_batch_2b(ray_local, tmp_path, phase):
    import dataclasses

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    def ddp_steps(config):  # local: Ray pickles it by value
        """A Ray Train worker: the production trainer (`phase_trainer`: prepare_model / DDP with
        several workers) stepping on this rank's half of every batch."""
        import ray.train
        import torch
        from safetensors.torch import save_file

        from mirror_core.config import MirrorConfig
        from mirror_core.model import assemble_model
        from mirror_core.train.loop import trainable_state
        from mirror_core.weights import MirrorWeights
        from pipeline.train.run import TrainConfig, phase_trainer

        ctx = ray.train.get_context()
        rank, world, phase = ctx.get_world_rank(), ctx.get_world_size(), config["phase"]
        model = assemble_model(MirrorConfig.from_dict(config["cfg"]), MirrorWeights.from_numpy(config["weights"]),
                               merge_lora=phase == 1)
        trainer = phase_trainer(model, TrainConfig(phase=phase, lr=1e-2), 3, torch.device("cpu"))
        for x, y in config["batches"]:
            part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
            trainer.step(torch.from_numpy(x[part]), torch.from_numpy(y[part]) if phase == 2 else None)
        if rank == 0:
            save_file(trainable_state(model, phase), os.path.join(config["out"], f"world{world}.safetensors"))
        ray.train.report({"steps": len(config["batches"])})

    cfg, weights = tiny(seed=6)
    cfg = dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, dropout=0.0))  # no random masks to differ
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (8, 224, 224, 3), dtype=np.uint8), rng.integers(0, 2, 8)) for _ in range(3)]
    for world in (1, 2):
        TorchTrainer(ddp_steps, train_loop_config={"cfg": cfg.to_dict(), "weights": weights.to_numpy(), "phase": phase,
                                                    "batches": batches, "out": str(tmp_path)},
                     scaling_config=ScalingConfig(num_workers=world),
                     run_config=RunConfig(name=f"ddp{world}", storage_path=str(tmp_path / "store"))).fit()
    one, two = (load_file(str(tmp_path / f"world{w}.safetensors")) for w in (1, 2))
    assert one.keys() == two.keys() and len(one) > 0
    moved = 0
    for key in one:
        torch_diff = (one[key] - two[key]).abs().max().item()
        # Float sums in another order (two half batches, then an all-reduce), which Adam's
        # normalised steps can magnify near zero gradients: 1.2e-5 seen on an AVX2 machine.
        # Workers that did not synchronise would differ by about the step size (1e-2).
        assert torch_diff <= 1e-4, (key, torch_diff)
        moved += int(not np.allclose(one[key].numpy(), weights.to_numpy()["mirror"].get(key, one[key].numpy() + 1)))
    assert moved  # training changed the weights: the comparison is not between two untouched copies


def test_a_file_crashing_its_decoder_is_skipped_not_retried_forever(ray_local):
    """Training's preparation task dies on a file that crashes its decoder (fault hook);
    Ray retries it, and the retry prepares that batch one record per child process: the
    file is skipped (ok false, counted by the worker), the others are prepared as usual."""
    import io

    import ray

    from pipeline.scan.isolation import decode_attempts
    from pipeline.train.prepare import CROPS, OK, prepare_batch, prepared_crop

    buf = io.BytesIO()
    smooth_image(np.random.default_rng(0), False).save(buf, "PNG")
    png = buf.getvalue()
    batch = pa.table({"uri": ["a.png", "b-poison.png", "c.png"], "label": [0, 1, 0], "bytes": [png] * 3})
    attempts = decode_attempts()
    task = ray.remote(prepare_batch).options(max_retries=2, runtime_env={"env_vars": {
        "MIRROR_FAULT_DECODE_CRASH": "poison"}})
    out = ray.get(task.remote(batch, phase=2, seed=3, attempts=attempts))
    assert out[OK].to_pylist() == [True, False, True]
    assert len(ray.get(attempts.isolated_units.remote())) == 1  # the first attempt died
    want = prepared_crop(png, "c.png", 0, 2, 3, 0, False)
    np.testing.assert_array_equal(np.asarray(out[CROPS].to_pylist()[2], np.uint8), want)  # as in-process


def test_a_corpus_copied_to_s3_keeps_its_held_out_split(ray_local, s3_corpus, tmp_path):
    from pipeline.train.data import plan_training_data, training_datasets

    def held_out_names(input_uri):
        data = plan_training_data(input_uri, phase=2, val_fraction=0.5, store_uri=str(tmp_path / "run"))
        _, val = training_datasets(data)
        names = sorted("/".join(u.split("/")[-2:]) for u in val.select_columns(["uri"]).to_pandas()["uri"])
        assert len(names) == data.n_val and data.n_train + data.n_val == 12
        return names

    local = held_out_names(str(tmp_path / "src"))  # the folder the fixture uploaded
    assert 0 < len(local) < 12
    assert held_out_names(f"s3://{s3_corpus}/images/") == local


def training_corpora(root) -> dict[str, str]:
    """The same six labelled images as a folder, a CSV manifest, an HF Image Parquet shard
    and a WebDataset tar shard (labels in `.cls` members, .json metadata without one):
    input URIs by format."""
    import tarfile

    import pyarrow.parquet as pq
    from test_corpus_formats import corpus, hf_table
    from test_webdataset import add

    records = corpus(root)
    files = sorted((root / "folder").rglob("*.*"))
    (root / "manifest.csv").write_text("uri,label\n" + "".join(f"{f},{f.parent.name}\n" for f in files))
    (root / "hf").mkdir()
    pq.write_table(hf_table(records), root / "hf" / "train-00000.parquet")
    (root / "wds").mkdir()
    with tarfile.open(root / "wds" / "shard-000.tar", "w") as tar:
        for r in records:
            key, ext = r["image"]["path"].split(".")
            add(tar, f"{key}.{ext}", r["image"]["bytes"])
            add(tar, f"{key}.json", b'{"caption": "x"}')
            add(tar, f"{key}.cls", b"0\n" if r["label"] == 1 else b"1\n")  # the HF label names are [fake, real]
    return {"folder": str(root / "folder"), "manifest": str(root / "manifest.csv"), "parquet": str(root / "hf"),
            "webdataset": str(root / "wds" / "shard-{000..000}.tar")}


@pytest.mark.parametrize("fmt", ["folder", "manifest", "parquet", "webdataset"])
def test_every_corpus_format_trains_each_record_once_in_its_split(ray_local, tmp_path, fmt):
    """Each record reaches exactly one split, with its own image bytes (its held-out crop is
    the official crop of those bytes), and the driver keeps units only."""
    from pipeline.train.data import plan_training_data, split_keys, training_datasets
    from pipeline.train.prepare import CROPS, OK, prepared_crop

    uri = training_corpora(tmp_path)[fmt]
    phase, label = 2, "cls" if fmt == "webdataset" else "label"
    if fmt == "webdataset":  # its .json members hold no "label": not labeled unless told where
        with pytest.raises(ValueError, match="phase 2 needs a label for every image; 6 in .* have none"):
            plan_training_data(uri, 2, 0.5, str(tmp_path / "run"))
    data = plan_training_data(uri, phase, 0.5, str(tmp_path / "run"), label)
    assert data.n_train + data.n_val == 6 and not hasattr(data, "index")
    train, val = training_datasets(data, seed=1)
    rows = {name: split.take_all() for name, split in (("train", train), ("val", val))}
    assert [len(rows["train"]), len(rows["val"])] == [data.n_train, data.n_val]
    assert all(r[OK] for split in rows.values() for r in split)
    uris = [r["uri"] for split in rows.values() for r in split]
    assert len(set(uris)) == 6
    if fmt == "webdataset":  # the folder of the shard pattern: a copied corpus keeps its split
        assert data.root == str(tmp_path / "wds") and split_keys(pa.array(uris[:1]), data.root)[0].startswith("shard-000.tar#")
    images = {p.name.split(".")[0]: p.read_bytes() for p in (tmp_path / "folder").rglob("*.*")}
    truth = {p.name.split(".")[0]: int(p.parent.name == "1_fake") for p in (tmp_path / "folder").rglob("*.*")}
    keys = {r["uri"]: r["uri"].rsplit("/", 1)[-1].rsplit("#", 1)[-1].split(".")[0] for split in rows.values() for r in split}
    assert all(r["label"] == truth[keys[r["uri"]]] for split in rows.values() for r in split)
    for r in rows["val"]:
        key = r["uri"].rsplit("/", 1)[-1].rsplit("#", 1)[-1].split(".")[0]
        np.testing.assert_array_equal(np.asarray(r[CROPS], np.uint8),
                                      prepared_crop(images[key], r["uri"], r["label"], phase, 1, 0, True))
