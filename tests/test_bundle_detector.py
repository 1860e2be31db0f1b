import io
import json

import numpy as np
import pytest
from conftest import tampered_copy
from PIL import Image

from mirror_core.bundle import load_bundle, save_bundle
from mirror_core.detector import Detector


def sample_pixels(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def test_round_trip_gives_bit_identical_scores(parity_bundle, tmp_path):
    bundle = load_bundle(str(parity_bundle))
    again = tmp_path / "again"
    model_id = save_bundle(str(again), bundle.config, bundle.weights, bundle.provenance)
    assert model_id == bundle.model_id
    a = Detector.from_pretrained(parity_bundle).score_pixels(sample_pixels())
    b = Detector.from_pretrained(again).score_pixels(sample_pixels())
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_bundle_records_provenance_and_has_no_pickle(parity_bundle):
    doc = json.loads((parity_bundle / "mirror.json").read_text())
    sources = doc["provenance"]["sources"]
    assert sources["checkpoint"]["file"] == "checkpoint.pth" and len(sources["checkpoint"]["sha256"]) == 64
    assert sources["memory"]["file"] == "mirror_phase1.pth"
    assert "model.safetensors" in sources["backbone"]["files"]
    assert {"torch", "transformers", "safetensors"} <= set(doc["provenance"]["libraries"])
    assert doc["config"]["preprocess"] == {"policy": "official", "alignment": "by-extension", "resize_short_side": 512,
                                           "crop_size": 224, "jpeg_quality": 96, "max_pixels": 100_000_000,
                                           "fast_decode": False, "gpu_decode": False}
    assert sorted(p.name for p in parity_bundle.iterdir()) == [
        "backbone.safetensors", "lora.safetensors", "mirror.json", "mirror.safetensors"]


def test_tampered_weights_are_refused(parity_bundle, tmp_path):
    with pytest.raises(ValueError, match="sha256"):
        load_bundle(str(tampered_copy(parity_bundle, tmp_path / "copy")))


def test_official_weights_or_a_backbone_given_for_a_bundle_are_told_how_to_import(parity_dir, tmp_path):
    hint = r"convert official weights once: mirror import-official --checkpoint"
    for given, what in ((parity_dir / "checkpoint.pth", "a PyTorch checkpoint"),
                        (parity_dir, "it holds PyTorch checkpoints"),
                        (parity_dir / "backbone", r"a Hugging Face model directory \(a DINOv3 backbone\?\)")):
        with pytest.raises(FileNotFoundError, match=rf"is not a MIRROR bundle \(no mirror.json\): {what}; {hint}"):
            load_bundle(str(given))
    with pytest.raises(FileNotFoundError, match=r"gone is not a MIRROR bundle \(no mirror.json\): it does not exist$"):
        load_bundle(str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match=r"is not a MIRROR bundle \(no mirror.json\)$"):
        load_bundle(str(tmp_path))  # nothing to say of an empty folder


def test_bundle_from_s3(parity_bundle, s3_bucket):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(parity_bundle), f"{s3_bucket}/models/parity", recursive=True)
    remote = Detector.from_pretrained(f"s3://{s3_bucket}/models/parity")
    local = Detector.from_pretrained(parity_bundle)
    assert remote.model_id == local.model_id
    pixels = sample_pixels(2, seed=1)
    assert np.array_equal(remote.score_pixels(pixels)["prob_fake"], local.score_pixels(pixels)["prob_fake"])


def test_save_bundle_to_s3(parity_bundle, s3_bucket):
    bundle = load_bundle(str(parity_bundle))
    uri = f"s3://{s3_bucket}/written"
    assert save_bundle(uri, bundle.config, bundle.weights) == bundle.model_id
    assert load_bundle(uri).model_id == bundle.model_id


def test_score_accepts_pil_paths_bytes_and_reports_errors(parity_bundle, parity_dir):
    detector = Detector.from_pretrained(parity_bundle)
    path = parity_dir / "data/WildRF/test/facebook/0_real/real_000.jpg"
    data = path.read_bytes()
    rows = detector.score([Image.open(io.BytesIO(data)), str(path), data, b"<html>not an image</html>"], batch_size=2)
    assert rows[0]["prob_fake"] == pytest.approx(rows[1]["prob_fake"], abs=1e-5) == rows[2]["prob_fake"]
    assert rows[3]["error"].startswith("UnidentifiedImageError")
    assert all(r["error"] is None for r in rows[:3])


def test_token_residual_grid(parity_bundle):
    out = Detector.from_pretrained(parity_bundle).score_pixels(sample_pixels(2), token_residuals=True)
    assert out["token_residual"].shape == (2, 14, 14) and (out["token_residual"] > 0).all()


def test_alignment_override_is_recorded(parity_bundle):
    det = Detector.from_pretrained(parity_bundle, alignment="by-format")
    assert det.config.preprocess.name == "official/align=by-format"
