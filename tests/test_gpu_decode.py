"""GPU decode mode, on CPU: the tensor resize/crop against the exact path, which rows go to the
GPU, the CPU fallback when a replica has no GPU decoder, and the per-row recording."""
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import inline_unit_batch, write_image
from PIL import Image

from mirror_core.bundle import load_bundle
from mirror_core.config import PreprocessConfig
from mirror_core.gpu_decode import device_jpeg_decoder, official_crop, official_crops
from mirror_core.preprocess import official_preprocess, preprocess_rgb
from pipeline.scan.commit import commit_units
from pipeline.scan.config import ConfigError, ScanConfig
from pipeline.scan.decode import decode_units, numpy_batch
from pipeline.scan.schema import ENCODED, ROW_PREPROCESS
from pipeline.scan.scorer import Scorer


def photo_like(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8))
    base = np.asarray(small.resize((w, h), Image.BICUBIC)).astype(int)
    return Image.fromarray(np.clip(base + rng.integers(0, 24, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(1920, 1080), (1080, 1920), (700, 513), (640, 480), (200, 150), (512, 900),
                                  (3000, 2000), (720, 1280), (899, 1921), (611, 1403)])
def test_tensor_resize_and_crop_equal_the_exact_path(size):
    """The GPU path's resize and crop are Pillow's arithmetic on the crop's pixels only:
    bit-exact against the CPU path given the same decoded image."""
    img = photo_like(*size, seed=size[0])
    exact = preprocess_rgb(img, PreprocessConfig()).pixels
    got = official_crop(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), PreprocessConfig()).numpy()
    assert got.shape == exact.shape == (224, 224, 3)
    np.testing.assert_array_equal(got, exact)


def test_images_of_one_size_are_cropped_in_one_batch_as_one_by_one():
    images = torch.stack([torch.from_numpy(np.asarray(photo_like(1280, 720, seed=s)).copy()).permute(2, 0, 1)
                          for s in range(3)])
    batched = official_crops(images, PreprocessConfig())
    assert batched.shape == (3, 224, 224, 3)
    for i in range(3):
        assert torch.equal(batched[i], official_crop(images[i], PreprocessConfig()))


def test_a_block_of_large_images_is_decoded_and_resized_in_memory_bounded_batches(monkeypatch):
    """decode_crops with a stand-in decoder (Pillow, on CPU): images of one size go through
    as many batched resizes as RESIZE_BYTES allows, and the block through as many decoder
    calls as DECODE_BYTES allows, with the same crops as one batch."""
    from mirror_core import gpu_decode

    payloads, pixels, sizes = [], [], []
    for s in range(5):
        img = photo_like(1280 if s != 2 else 700, 720 if s != 2 else 600, seed=s)
        sizes.append(img.size)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        payloads.append(buf.getvalue())
        pixels.append(preprocess_rgb(Image.open(io.BytesIO(buf.getvalue())), PreprocessConfig()).pixels)
    calls = []

    def pillow_decoder(encoded):
        return [torch.from_numpy(np.asarray(Image.open(io.BytesIO(e.numpy().tobytes())).convert("RGB")).copy())
                .permute(2, 0, 1) for e in encoded]

    def counted(images, cfg):
        calls.append(images.shape[0])
        return official_crops(images, cfg)

    monkeypatch.setattr(gpu_decode, "official_crops", counted)
    one_window = gpu_decode.RESIZE_BYTES // gpu_decode.images_per_resize((3, 720, 1280), PreprocessConfig())
    monkeypatch.setattr(gpu_decode, "RESIZE_BYTES", 2 * one_window)  # two 1280x720 windows per resize
    crops, refused = gpu_decode.decode_crops(payloads, sizes, PreprocessConfig(), pillow_decoder, torch.device("cpu"))
    assert refused == [None] * 5 and sorted(calls) == [1, 2, 2]  # 4 of one size in pairs, 1 of another
    for got, want in zip(crops.numpy(), pixels):
        np.testing.assert_array_equal(got, want)
    # decoded in groups of at most two 1280x720 images: the 700x600 one shares a group
    monkeypatch.setattr(gpu_decode, "DECODE_BYTES", 2 * 3 * 1280 * 720)
    assert gpu_decode.decode_groups(sizes) == [[0, 1], [2, 3], [4]]
    decoded = []
    crops, refused = gpu_decode.decode_crops(payloads + [b"not an image"], sizes + [(64, 64)], PreprocessConfig(),
                                             lambda enc: decoded.append(len(enc)) or pillow_decoder(enc),
                                             torch.device("cpu"))
    assert decoded[:2] == [2, 2] and refused[:5] == [None] * 5 and refused[5] is not None
    for got, want in zip(crops.numpy(), pixels):
        np.testing.assert_array_equal(got, want)


def test_decode_modes_exclude_each_other_and_need_gpu_replicas():
    with pytest.raises(ValueError, match="choose one decode mode"):
        PreprocessConfig(fast_decode=True, gpu_decode=True)
    assert PreprocessConfig(gpu_decode=True).name == "official/align=by-extension/gpu-decode"
    assert PreprocessConfig(gpu_decode=True).cpu_name == "official/align=by-extension"
    with pytest.raises(ConfigError, match="gpu_decode needs GPU replicas"):
        ScanConfig(gpu_decode=True)
    with pytest.raises(ConfigError, match="choose one decode mode"):
        ScanConfig(gpu_decode=True, fast_decode=True, gpus_per_actor=1)
    assert device_jpeg_decoder("cpu") is None


def test_gpu_mode_rows_fall_back_to_the_exact_cpu_path_and_say_so(tmp_path, parity_bundle):
    """JPEGs leave the decode stage as bytes; other formats, CMYK and alignment-due JPEGs are
    decoded there. A replica without a GPU decoder (this machine) decodes the bytes on its CPU:
    scores equal the exact path, every row records the policy it was decoded under."""
    plain = write_image(tmp_path / "plain.jpg", size=(700, 600), seed=1)
    write_image(tmp_path / "b.png", size=(300, 260), seed=2)
    buf = io.BytesIO()
    photo_like(640, 560, 3).convert("CMYK").save(buf, format="JPEG")
    (tmp_path / "cmyk.jpg").write_bytes(buf.getvalue())
    write_image(tmp_path / "named.png", size=(400, 300), seed=4, fmt="JPEG")  # a JPEG named .png: aligned on CPU
    (tmp_path / "cut.jpg").write_bytes(plain[: len(plain) // 2])  # truncated: the GPU would refuse it
    names = ["plain.jpg", "b.png", "cmyk.jpg", "named.png", "cut.jpg"]
    uris = [str(tmp_path / n) for n in names]
    run = {"model_id": "m", "preprocess": PreprocessConfig(gpu_decode=True).name, "threshold": 0.5}
    (decoded,) = decode_units(inline_unit_batch(tmp_path / "scan", "u1", pa.table({"uri": uris}), run),
                              preprocess={"gpu_decode": True}, columns={})
    sent = [v is not None for v in decoded[ENCODED].to_pylist()]
    assert sent == [True, False, False, False, True]
    assert decoded[ROW_PREPROCESS].to_pylist() == [None, *["official/align=by-extension"] * 3, None]
    assert decoded["width"].to_pylist()[0] == 700 and decoded["error"].null_count == 5

    bundle = load_bundle(str(parity_bundle))
    config = bundle.config.with_overrides(gpu_decode=True)
    scorer = Scorer(bundle.weights.to_numpy(), config.to_dict(), bundle.model_id)
    assert scorer.gpu_decoder is None
    batch = numpy_batch(decoded)
    out = scorer(batch)
    assert out[ROW_PREPROCESS].to_pylist() == ["official/align=by-extension"] * 5
    exact = scorer.detector.score([(tmp_path / n).read_bytes() for n in names], names=names)
    np.testing.assert_allclose(out["prob_fake"].to_numpy(zero_copy_only=False), [r["prob_fake"] for r in exact], atol=1e-6)
    assert out["aligned"].to_pylist() == [False, True, False, True, False]  # the .png names
    (done,) = commit_units(out).to_pylist()
    assert done["cpu_decoded_in_gpu_mode"] == 5 and done["errors"] == 0
    # the decode stage's region decodes: named.png (CMYK is declined; plain.jpg and cut.jpg
    # went to the replica as bytes)
    assert done["jpeg_region_decoded"] == 1


def test_gpu_mode_rows_the_cpu_cannot_decode_either_are_error_rows(tmp_path, parity_bundle):
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 64)  # JPEG magic, no image
    good = write_image(tmp_path / "ok.jpg", size=(300, 300), seed=5)
    uris = [str(tmp_path / "junk.jpg"), str(tmp_path / "ok.jpg")]
    (decoded,) = decode_units(inline_unit_batch(tmp_path / "scan", "u2", pa.table({"uri": uris})),
                              preprocess={"gpu_decode": True}, columns={})
    bundle = load_bundle(str(parity_bundle))
    scorer = Scorer(bundle.weights.to_numpy(), bundle.config.with_overrides(gpu_decode=True).to_dict(), bundle.model_id)
    batch = numpy_batch(decoded)
    out = scorer(batch)
    errors = out["error"].to_pylist()
    assert errors[0] is not None and errors[0].startswith("decode failed:") and errors[1] is None
    assert out["prob_fake"].to_pylist()[0] is None
    direct = official_preprocess(good, PreprocessConfig())
    assert out["width"].to_pylist()[1] == direct.width


def test_a_gpu_scan_pipeline_can_be_built(ray_local, parity_bundle):
    """Ray's public map_batches refuses whole blocks to GPU stages; the scan keeps whole
    units on GPUs too. Built lazily here (nothing runs without a GPU)."""
    from pipeline.scan.run import build_dataset

    bundle = load_bundle(str(parity_bundle))
    cfg = ScanConfig(gpus_per_actor=1.0, gpu_decode=True, cpus_per_actor=1)
    model_cfg = bundle.config.with_overrides(gpu_decode=True)
    ds = build_dataset([{"key": "0/u", "unit": "{}", "records": None, "target": "{}", "perturbation": ""}],
                       bundle, model_cfg, cfg, 1 << 20)
    assert "Scorer" in str(ds)


def test_two_calls_at_once_score_as_one_after_the_other(tmp_path, parity_bundle):
    """GPU replicas run two calls at once (an upload or decode overlapping the model): each
    call's rows are its own, equal to the calls made one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    blocks = []
    for b in range(2):
        uris = [str(tmp_path / f"b{b}_{i}.jpg") for i in range(3)]
        for i, uri in enumerate(uris):
            write_image(Path(uri), size=(300 + 40 * i, 260), seed=10 * b + i)
        (decoded,) = decode_units(inline_unit_batch(tmp_path / "scan", f"u{b}", pa.table({"uri": uris})),
                                  preprocess={"gpu_decode": True}, columns={})
        batch = numpy_batch(decoded)
        blocks.append(batch)
    bundle = load_bundle(str(parity_bundle))
    scorer = Scorer(bundle.weights.to_numpy(), bundle.config.with_overrides(gpu_decode=True).to_dict(), bundle.model_id)
    one_by_one = [scorer(b)["prob_fake"].to_pylist() for b in blocks]
    with ThreadPoolExecutor(2) as pool:
        at_once = [t["prob_fake"].to_pylist() for t in pool.map(scorer, blocks * 3)]
    assert at_once == one_by_one * 3 and None not in at_once[0]


@pytest.mark.parametrize("fault", ["MIRROR_FAULT_DEVICE_DECODE_CRASH", "MIRROR_FAULT_DEVICE_DECODE_ERROR"])
def test_a_jpeg_crashing_the_device_decoder_is_scored_again_on_the_cpu_in_isolation(ray_local, tmp_path,
                                                                                     parity_bundle, fault):
    """A JPEG that kills its replica in the device decode (as a file crashing nvJPEG would),
    or raises a CUDA error there (the replica then ends itself: its CUDA context is lost):
    Ray restarts the replica and retries the block forever (Ray Data's actor pools default
    to it), so the retry decodes the block's JPEGs on the exact CPU path, one per child
    process, and every row is scored as the exact path scores it."""
    import ray

    from pipeline.scan.isolation import decode_attempts

    names = ["a.jpg", "crash.jpg", "c.png", "d.jpg"]
    for i, name in enumerate(names):
        buf = io.BytesIO()
        photo_like(320 + 32 * i, 300, seed=i).save(buf, format="PNG" if name.endswith(".png") else "JPEG",
                                                   **({"comment": b"crash-the-device-decoder"} if i == 1 else {}))
        (tmp_path / name).write_bytes(buf.getvalue())
    uris = [str(tmp_path / n) for n in names]
    (decoded,) = decode_units(inline_unit_batch(tmp_path / "scan", "u1", pa.table({"uri": uris})),
                              preprocess={"gpu_decode": True}, columns={})
    assert [v is not None for v in decoded[ENCODED].to_pylist()] == [True, True, False, True]
    (batch,) = ray.data.from_arrow(decoded).iter_batches(batch_size=None, batch_format="numpy")  # as Ray Data sends it

    bundle = load_bundle(str(parity_bundle))
    attempts, weights = decode_attempts(), ray.put(bundle.weights.to_numpy())  # held: a restart reads them again
    replica = ray.remote(Scorer).options(
        max_restarts=-1, max_task_retries=-1,
        runtime_env={"env_vars": {fault: "crash-the-device-decoder"}},
    ).remote(weights, bundle.config.with_overrides(gpu_decode=True).to_dict(),
             bundle.model_id, attempts=attempts)
    out = ray.get(replica.__call__.remote(batch), timeout=120)
    assert ray.get(attempts.isolated_units.remote()) == ["0/u1#device-decode"]
    assert out["error"].null_count == 4 and out[ROW_PREPROCESS].to_pylist() == ["official/align=by-extension"] * 4
    exact = Scorer(bundle.weights.to_numpy(), bundle.config.to_dict(), bundle.model_id).detector.score(
        [(tmp_path / n).read_bytes() for n in names], names=names)
    np.testing.assert_allclose(out["prob_fake"].to_numpy(zero_copy_only=False), [r["prob_fake"] for r in exact],
                               atol=1e-6)
    ray.kill(attempts)
