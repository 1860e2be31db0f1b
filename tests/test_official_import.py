import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from official_format import make_parts, reference_logits, save_official, to_official_state

from mirror_core.bundle import load_bundle
from mirror_core.detector import Detector
from mirror_core.official import (
    CheckpointMismatchError,
    UnsafeCheckpointError,
    import_official,
    import_official_bundle,
    safe_torch_load,
)


def mirror_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "pipeline.commands.cli", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(proc.stderr)
    return proc


def official_state(parity_dir):
    return safe_torch_load(parity_dir / "checkpoint.pth")["model"]


def test_cli_import_reproduces_official_scores(parity_dir, tmp_path):
    out = tmp_path / "bundle"
    proc = mirror_cli("import-official", "--checkpoint", parity_dir / "checkpoint.pth",
                      "--memory", parity_dir / "mirror_phase1.pth", "--backbone", parity_dir / "backbone", "--out", out)
    for text in ("dinov3", "width 64", "depth 2", "4 register tokens", "K=4096", "8 heads", "top_k=128",
                 "rank 8", "total 764,488", f"bundle: {out}"):
        assert text in proc.stdout
    detector = Detector.from_pretrained(out)
    rows = list(csv.DictReader(open(parity_dir / "expected_scores.csv")))
    scores = detector.score([parity_dir / "data" / r["path"] for r in rows], batch_size=16)
    assert all(s["error"] is None for s in scores)
    for r, s in zip(rows, scores):
        assert abs(s["logit_real"] - float(r["logit_real"])) < 1e-3, r["path"]
        assert abs(s["logit_fake"] - float(r["logit_fake"])) < 1e-3, r["path"]
        assert s["pred"] == int(r["pred"]), r["path"]


def test_memory_is_optional_when_the_checkpoint_has_it_and_checkpoint_wins(parity_dir):
    with_memory = import_official(parity_dir / "checkpoint.pth", parity_dir / "backbone", parity_dir / "mirror_phase1.pth")
    alone = import_official(parity_dir / "checkpoint.pth", parity_dir / "backbone")
    ckpt = official_state(parity_dir)
    for key in ("memory_bank.memory", "memory_bank.out_proj.bias"):
        assert torch.equal(with_memory.weights.mirror[key], ckpt[key])
        assert torch.equal(alone.weights.mirror[key], ckpt[key])
    assert any("override the memory file" in n for n in with_memory.notes)


def test_memory_file_supplies_a_checkpoint_without_memory(parity_dir, tmp_path):
    state = {k: v for k, v in official_state(parity_dir).items() if not k.startswith("memory_bank.")}
    save_official(tmp_path / "ckpt.pth", state)
    phase1 = safe_torch_load(parity_dir / "mirror_phase1.pth")["model_state_dict"]
    report = import_official(tmp_path / "ckpt.pth", parity_dir / "backbone", parity_dir / "mirror_phase1.pth")
    assert torch.equal(report.weights.mirror["memory_bank.memory"], phase1["module.memory"])
    with pytest.raises(CheckpointMismatchError, match="missing: mirror:memory_bank.memory"):
        import_official(tmp_path / "ckpt.pth", parity_dir / "backbone")


@pytest.mark.parametrize("envelope", ["model", "state_dict", "model_state_dict", None])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_envelopes_and_prefixes(parity_dir, tmp_path, envelope, prefix):
    state = official_state(parity_dir)
    save_official(tmp_path / "c.pth", state, envelope=envelope, prefix=prefix, epoch=3)
    report = import_official(tmp_path / "c.pth", parity_dir / "backbone")
    reference = import_official(parity_dir / "checkpoint.pth", parity_dir / "backbone")
    for group in ("backbone", "lora", "mirror"):
        ours, theirs = getattr(report.weights, group), getattr(reference.weights, group)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_transformers5_dinov3_layout_imports_identically(parity_dir, tmp_path):
    state = {k.replace("backbone.dino.layer.", "backbone.dino.model.layer."): v for k, v in official_state(parity_dir).items()}
    save_official(tmp_path / "tf5.pth", state)
    a = import_official(tmp_path / "tf5.pth", parity_dir / "backbone").weights
    b = import_official(parity_dir / "checkpoint.pth", parity_dir / "backbone").weights
    assert a.backbone.keys() == b.backbone.keys() and a.lora.keys() == b.lora.keys()
    assert all(torch.equal(a.backbone[k], b.backbone[k]) for k in a.backbone)


def test_missing_tensor_error_text(parity_dir, tmp_path):
    state = official_state(parity_dir)
    del state["detector.head.3.bias"]
    save_official(tmp_path / "c.pth", state)
    with pytest.raises(CheckpointMismatchError) as err:
        import_official(tmp_path / "c.pth", parity_dir / "backbone")
    assert str(err.value) == "checkpoint does not match the model:\n  missing: mirror:detector.head.3.bias [2]"


def test_misshaped_and_unexpected_tensor_error_text_and_cli_exit(parity_dir, tmp_path):
    state = official_state(parity_dir)
    state["detector.head.0.weight"] = torch.zeros(512, 100)
    state["detector.extra.weight"] = torch.zeros(3)
    save_official(tmp_path / "c.pth", state)
    with pytest.raises(CheckpointMismatchError) as err:
        import_official(tmp_path / "c.pth", parity_dir / "backbone")
    assert str(err.value) == (
        "checkpoint does not match the model:\n"
        "  unexpected: mirror:detector.extra.weight\n"
        "  wrong shape: mirror:detector.head.0.weight checkpoint [512, 100] vs model [512, 384]"
    )
    proc = mirror_cli("import-official", "--checkpoint", tmp_path / "c.pth", "--backbone", parity_dir / "backbone",
                      "--out", tmp_path / "b", check=False)
    assert proc.returncode != 0
    assert "wrong shape: mirror:detector.head.0.weight" in proc.stderr and "detector.extra.weight" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_foreign_keys_are_unexpected(parity_dir, tmp_path):
    state = official_state(parity_dir)
    state["backbone.dino.layer.0.base_model.model.attention.q_proj.lora_C.default.weight"] = torch.zeros(1)
    state["optimizer.step"] = torch.zeros(1)
    save_official(tmp_path / "c.pth", state)
    with pytest.raises(CheckpointMismatchError) as err:
        import_official(tmp_path / "c.pth", parity_dir / "backbone")
    assert err.value.unexpected == ["backbone.dino.layer.0.base_model.model.attention.q_proj.lora_C.default.weight",
                                    "optimizer.step"]


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_a_command_is_refused_and_never_runs(tmp_path, parity_dir):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(1)}, "args": _RunsACommand(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"would call (posix|os)\.system"):
        safe_torch_load(tmp_path / "evil.pth")
    proc = mirror_cli("import-official", "--checkpoint", tmp_path / "evil.pth", "--backbone", parity_dir / "backbone",
                      "--out", tmp_path / "b", check=False)
    assert proc.returncode != 0 and "not allowed" in proc.stderr
    assert not marker.exists()


def test_args_namespace_is_the_only_extra_class_allowed(tmp_path):
    import argparse
    import pathlib

    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "ok.pth")
    assert safe_torch_load(tmp_path / "ok.pth")["args"].lr == 1.0
    torch.save({"model": {}, "x": pathlib.PurePosixPath("/data")}, tmp_path / "other.pth")
    with pytest.raises(UnsafeCheckpointError, match="PurePosixPath"):
        safe_torch_load(tmp_path / "other.pth")


@pytest.mark.parametrize("kind", ["dinov2", "dinov3"])
def test_generated_official_checkpoint_matches_reference_math(kind, tmp_path):
    """DINOv2 (and a second DINOv3) in the official transformers-4 key layout."""
    parts = make_parts(kind, dim=32, slots=512, seed=3, top_k=64)
    parts.backbone.save_pretrained(tmp_path / "backbone")
    save_official(tmp_path / "ckpt.pth", to_official_state(parts), envelope="model", prefix="module.")
    model_id, report = import_official_bundle(tmp_path / "ckpt.pth", tmp_path / "backbone", str(tmp_path / "bundle"),
                                              top_k=64)
    assert report.config.backbone.family == kind and report.config.memory.num_slots == 512
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    ours = Detector.from_pretrained(tmp_path / "bundle").score_pixels(pixels)
    expected = reference_logits(parts, torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(ours["logit_real"], expected[:, 0], atol=1e-4)
    np.testing.assert_allclose(ours["logit_fake"], expected[:, 1], atol=1e-4)
    assert load_bundle(str(tmp_path / "bundle")).model_id == model_id


@pytest.fixture
def phase1_with_memory_config(tmp_path):
    """A detector checkpoint without memory, and a newer-release Phase 1 file that records
    memory_config (heads 4 / top_k 64: not the defaults, and unreadable from shapes)."""
    parts = make_parts("dinov3", dim=32, slots=512, seed=5, top_k=64)
    parts.backbone.save_pretrained(tmp_path / "backbone")
    state = {k: v for k, v in to_official_state(parts).items() if not k.startswith("memory_bank.")}
    save_official(tmp_path / "checkpoint-1.pth", state)

    def write_phase1(**memory_config):
        path = tmp_path / "mirror_phase1.pth"
        torch.save({"model_state_dict": parts.memory, "memory_config": memory_config, "epoch": 3}, path)
        return path

    write_phase1(feature_dim=32, mem_slots=512, num_heads=4, top_k=64)
    return tmp_path, write_phase1


def import_cli(root, *flags, check=False):
    return mirror_cli("import-official", "--checkpoint", root / "checkpoint-1.pth", "--memory",
                      root / "mirror_phase1.pth", "--backbone", root / "backbone", "--out", root / "bundle",
                      *flags, check=check)


def test_memory_config_is_read_and_an_agreeing_flag_is_accepted(phase1_with_memory_config):
    root, _ = phase1_with_memory_config
    proc = import_cli(root, "--memory-heads", "4", check=True)
    memory = load_bundle(str(root / "bundle")).config.memory
    assert (memory.num_slots, memory.num_heads, memory.top_k) == (512, 4, 64)
    assert ("memory: num_slots=512 (memory tensor rows), num_heads=4 (memory_config in mirror_phase1.pth), "
            "top_k=64 (memory_config in mirror_phase1.pth)") in proc.stdout
    provenance = load_bundle(str(root / "bundle")).provenance
    assert provenance["memory_config_from"]["num_heads"] == "memory_config in mirror_phase1.pth"


@pytest.mark.parametrize("flag, value, field, recorded", [("--memory-heads", "8", "num_heads", 4),
                                                          ("--top-k", "32", "top_k", 64)])
def test_a_flag_contradicting_memory_config_is_refused(phase1_with_memory_config, flag, value, field, recorded):
    root, _ = phase1_with_memory_config
    proc = import_cli(root, flag, value)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"mirror import-official: error: ValueError: {field} is {recorded} in memory_config in mirror_phase1.pth "
        f"but {flag} is {value}; the file's value is authoritative (drop {flag} or pass {recorded})")
    assert not (root / "bundle").exists()


@pytest.mark.parametrize("memory_config, flags, message", [
    (dict(mem_slots=600, num_heads=4), (), "mem_slots is 600 in memory_config in mirror_phase1.pth but the memory "
                                           "tensor has 512 rows"),
    (dict(num_heads=4, top_k=1000), (), "top_k=1000 (memory_config in mirror_phase1.pth) must be between 1 and "
                                        "mem_slots=512"),
    (dict(num_heads=4), ("--top-k", "513"), "top_k=513 (flag --top-k) must be between 1 and mem_slots=512"),
    ({}, ("--memory-heads", "5"), "feature_dim=32 is not divisible by num_heads=5 (flag --memory-heads)"),
    (dict(feature_dim=48), (), "feature_dim is 48 in memory_config in mirror_phase1.pth but the backbone width is 32"),
])
def test_inconsistent_memory_settings_are_one_line_errors(phase1_with_memory_config, memory_config, flags, message):
    root, write_phase1 = phase1_with_memory_config
    write_phase1(**memory_config)
    proc = import_cli(root, *flags)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"mirror import-official: error: ValueError: {message}"


def test_flags_apply_where_the_files_record_nothing(phase1_with_memory_config):
    root, write_phase1 = phase1_with_memory_config
    write_phase1()
    report = import_official(root / "checkpoint-1.pth", root / "backbone", root / "mirror_phase1.pth", top_k=64)
    assert (report.config.memory.num_heads, report.config.memory.top_k) == (8, 64)
    assert report.memory_sources == {"num_slots": "memory tensor rows", "num_heads": "default",
                                     "top_k": "flag --top-k"}
