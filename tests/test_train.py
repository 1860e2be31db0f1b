"""Training core (no Ray): augmentations, Phase 1 reconstruction, Phase 2 on a planted trace."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mirror_core.bundle import Bundle
from mirror_core.config import BackboneConfig, MemoryConfig, MirrorConfig
from mirror_core.detector import Detector
from mirror_core.jpeg_region import region_decoder
from mirror_core.metrics import binary_metrics
from mirror_core.model import assemble_model
from mirror_core.preprocess import ImageRegions
from mirror_core.smoke import DEMO_BACKBONE, random_mirror
from mirror_core.train.augment import phase1_augment, phase2_augment, random_view
from mirror_core.train.loop import OptimConfig, PhaseTrainer, trainable_state, trained_weights


def regions(img: Image.Image) -> ImageRegions:
    return ImageRegions.of_image(img)


def smooth_image(rng, fake: bool, size=(256, 240)) -> Image.Image:
    w, h = size
    base = rng.normal(128, 40, (h // 16 + 1, w // 16 + 1, 3)).clip(0, 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.int16)
    if fake:  # a periodic, upsampling-like trace
        img[::4, :] += 40
        img[:, ::4] += 40
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def tiny(slots=256, top_k=32, seed=0):
    cfg = MirrorConfig(backbone=BackboneConfig(dict(DEMO_BACKBONE)), memory=MemoryConfig(slots, 8, top_k))
    return cfg, random_mirror(cfg, seed=seed)[1]


def test_augmentations_are_seeded_and_cover_every_view():
    img = smooth_image(np.random.default_rng(0), fake=False, size=(400, 300))
    a = phase1_augment(regions(img), np.random.default_rng(7))
    b = phase1_augment(regions(img), np.random.default_rng(7))
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    views = {random_view(regions(img), np.random.default_rng(s)).tobytes() for s in range(12)}
    assert len(views) >= 3
    assert phase2_augment(regions(img), 1, np.random.default_rng(1)).shape == (224, 224, 3)


def test_views_equal_pillows_whole_resize_then_crop():
    """Every view, drawn with the same seeds, equals the recipe computed with Pillow's whole
    resize, from a decoded image and from JPEG bytes (each view resamples, and decodes, only
    the pixels it keeps)."""
    from mirror_core.preprocess import center_crop
    from mirror_core.train.augment import VIEW_MODES

    def with_pillow(img, rng, size=224):
        mode = VIEW_MODES[int(rng.integers(len(VIEW_MODES)))]
        if mode == "resize":
            return np.asarray(img.resize((size, size), Image.BICUBIC))
        if mode == "rescale_crop":
            short = min(img.size)
            scale = rng.uniform(size / short, max(size / short, 1.0) * 1.5)
            img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                             Image.BICUBIC)
        arr = np.asarray(img)
        if mode == "center_crop" or arr.shape[0] < size or arr.shape[1] < size:
            return center_crop(arr, size)
        top, left = int(rng.integers(arr.shape[0] - size + 1)), int(rng.integers(arr.shape[1] - size + 1))
        return arr[top : top + size, left : left + size]

    noise = np.random.default_rng(3)
    for s, size in enumerate([(900, 600), (300, 1000), (250, 230), (1600, 900)] * 6):
        img = Image.fromarray(noise.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        np.testing.assert_array_equal(random_view(regions(img), np.random.default_rng(s)),
                                      with_pillow(img, np.random.default_rng(s)), err_msg=str((s, size)))
        # from JPEG bytes: each view decodes only what it reads (region decoder), same pixels
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85, **({"progressive": True} if s % 3 == 0 else {}))
        image = ImageRegions.of_bytes(buf.getvalue())
        np.testing.assert_array_equal(random_view(image, np.random.default_rng(s)),
                                      with_pillow(Image.open(buf).convert("RGB"), np.random.default_rng(s)),
                                      err_msg=str((s, size, "jpeg")))
        assert image.region_decoded == (region_decoder() is not None)  # built wherever libjpeg's headers are


def test_phase1_lowers_reconstruction_loss():
    cfg, weights = tiny()
    model = assemble_model(cfg, weights)
    rng = np.random.default_rng(0)
    batch = lambda: torch.from_numpy(np.stack([phase1_augment(regions(smooth_image(rng, False)), rng) for _ in range(8)]))  # noqa: E731
    held_out = batch()
    trainer = PhaseTrainer(model, phase=1, optim=OptimConfig(lr=3e-3, total_steps=40))
    before = float(trainer.loss(held_out)["reconstruction"])
    for _ in range(40):
        trainer.step(batch())
    after = float(trainer.loss(held_out)["reconstruction"])
    assert after < 0.85 * before, (before, after)


@pytest.mark.slow
def test_phase2_learns_a_planted_trace_and_the_bundle_scores_the_same():
    cfg, weights = tiny(seed=1)
    model = assemble_model(cfg, weights, merge_lora=False)
    rng = np.random.default_rng(1)

    def batch(n, augment=True):
        labels = rng.integers(0, 2, n)
        imgs = [smooth_image(rng, bool(y)) for y in labels]
        arrs = [phase2_augment(regions(im), int(y), rng) if augment else np.asarray(im)[:224, :224] for im, y in zip(imgs, labels)]
        return torch.from_numpy(np.stack(arrs)), torch.from_numpy(labels)

    trainer = PhaseTrainer(model, phase=2, optim=OptimConfig(lr=1e-3, warmup_steps=5, total_steps=80))
    for _ in range(80):
        trainer.step(*batch(16))
    x, y = batch(64, augment=False)
    model.eval()
    with torch.no_grad():
        prob = model(x).prob_fake.numpy()
    metrics = binary_metrics(y.numpy(), prob, (prob > 0.5).astype(int))
    assert metrics["Bal_Acc"] >= 0.9, metrics
    bundle = Bundle(cfg, trained_weights(weights, trainable_state(model, phase=2)), "trained")
    scored = Detector.from_bundle(bundle).score_pixels(x.numpy())["prob_fake"]
    np.testing.assert_allclose(scored, prob, atol=1e-4)  # merged LoRA scores as the trained model


def test_ema_tracks_weights_and_is_swapped_in_only_inside_averaged():
    cfg, weights = tiny(seed=3)
    model = assemble_model(cfg, weights, merge_lora=False)
    trainer = PhaseTrainer(model, phase=2, optim=OptimConfig(lr=1e-2, total_steps=5), ema_decay=0.5)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (4, 224, 224, 3), dtype=np.uint8))
    y = torch.tensor([0, 1, 0, 1])
    start = [p.detach().clone() for p in trainer.params]
    for _ in range(3):
        trainer.step(x, y)
    live = [p.detach().clone() for p in trainer.params]
    with trainer.averaged():
        inside = [p.detach().clone() for p in trainer.params]
    after = [p.detach().clone() for p in trainer.params]
    assert all(torch.equal(a, b) for a, b in zip(live, after))  # restored
    moved = [(i - s).norm() / ((l - s).norm() + 1e-12) for i, l, s in zip(inside, live, start) if (l - s).norm() > 0]
    assert moved and all(0 < m < 1 for m in moved)  # the average lags behind the live weights


@pytest.mark.parametrize("phase", [1, 2])
@pytest.mark.parametrize("ema", [None, 0.8])
def test_resuming_from_a_saved_trainer_state_equals_the_uninterrupted_run(phase, ema, tmp_path):
    """Six steps in one go against three, a checkpoint through disk (loaded safely), a fresh
    model from the base weights, and three more; each 'epoch' of three steps seeds itself."""
    cfg, weights = tiny(seed=5)
    rng = np.random.default_rng(0)
    data = [(torch.from_numpy(rng.integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)), torch.tensor([0, 1, 1, 0]))
            for _ in range(6)]

    def trainer():
        model = assemble_model(cfg, weights, merge_lora=phase == 1)
        return model, PhaseTrainer(model, phase, OptimConfig(lr=1e-2, warmup_steps=2, total_steps=6, grad_accum=2),
                                   ema_decay=ema)

    def epoch(t, e):
        torch.manual_seed(e)  # as the training loop does per (seed, epoch, rank)
        for x, y in data[3 * e : 3 * e + 3]:
            t.step(x, y if phase == 2 else None)

    model_a, a = trainer()
    epoch(a, 0)
    epoch(a, 1)
    _, b = trainer()
    epoch(b, 0)
    torch.save(b.state_dict(), tmp_path / "trainer.pt")
    model_c, c = trainer()
    c.load_state_dict(torch.load(tmp_path / "trainer.pt", weights_only=True))
    epoch(c, 1)
    for key, value in trainable_state(model_a, phase).items():
        assert torch.equal(value, trainable_state(model_c, phase)[key]), key
    with a.averaged(), c.averaged():  # the EMA shadow continued too
        for key, value in trainable_state(model_a, phase).items():
            assert torch.equal(value, trainable_state(model_c, phase)[key]), key
    if ema is None:
        with pytest.raises(ValueError, match="disagree on EMA"):
            PhaseTrainer(model_c, phase, OptimConfig(), ema_decay=0.5).load_state_dict(b.state_dict())


def test_the_held_out_split_is_the_sha256_rule_of_each_path_below_the_root():
    """Every corpus keeps the held-out set it had: a record is held out when the first 32
    bits of the sha256 of its path below the input root, modulo 1000, fall below the
    fraction; a uri elsewhere is hashed whole."""
    import hashlib

    import pyarrow as pa

    from pipeline.train.data import is_held_out, split_keys

    uris = [f"s3://b/corpus/{'0_real' if i % 2 else '1_fake'}/{i:05d}.jpg" for i in range(2000)] + ["s3://x/y.jpg"]
    keys = split_keys(pa.chunked_array([uris[:700], uris[700:]]), "s3://b/corpus/")
    assert keys[:2] == ["1_fake/00000.jpg", "0_real/00001.jpg"] and keys[-1] == "s3://x/y.jpg"
    rule = [int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) % 1000 < 250 for k in keys]
    held = is_held_out(keys, 0.25)
    assert held.tolist() == rule and 400 < held.sum() < 600
