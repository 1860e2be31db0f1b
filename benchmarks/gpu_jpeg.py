"""Raw-JPEG figures for benchmarks/run.py: decode modes end to end, GPU decode's deviation.

raw_jpeg: `mirror scan` over Parquet shards of full-size JPEGs (a mix of sizes up to
1920x1080) with CPU exact decode, CPU fast decode and GPU decode (overlapping the model, or
`gpu_serial`: not), each against a pure model loop on pre-decoded crops (same model, batch
and precision).
gpu_decode_parity: the parity fixture's JPEGs through the GPU path and the exact CPU path:
max |d pixel| of the crops and max |d prob_fake| of the fixture model's scores.
Both run on CPU too (GPU decode then falls back to the CPU path and says so).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RAW_SIZES = ((1920, 1080), (1280, 720), (1080, 1350), (800, 600), (640, 480))


def write_raw_shards(folder: Path, n_images: int, distinct: int = 160, rows_per_group: int = 256,
                     groups_per_file: int = 8) -> dict:
    """Shards of full-size JPEGs (uri, bytes): `distinct` images of RAW_SIZES, repeated."""
    from benchmarks.images import jpeg, write_repeated_shards

    payloads = [jpeg(RAW_SIZES[i % len(RAW_SIZES)], seed=i, quality=92) for i in range(distinct)]
    write_repeated_shards(folder, payloads, n_images, rows_per_group, groups_per_file)
    return {"raw_mean_jpeg_kb": float(np.mean([len(p) for p in payloads]) / 1024)}


def pure_model_img_s(det, n_images: int, batch: int) -> float:
    from benchmarks.gpu import natural_like

    crops = natural_like(4 * batch, 2)
    for _ in range(3):
        det.score_pixels(crops[:batch])
    sync = torch.cuda.synchronize if det.device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for s in range(0, n_images, batch):
        j = (s // batch) % 4
        det.score_pixels(crops[j * batch : (j + 1) * batch][: n_images - s])
    sync()
    return n_images / (time.perf_counter() - t)


def raw_jpeg_figures(backbone: dict, n_images: int, batch: int, device: str, precision: str,
                     modes=("exact", "fast", "gpu"), compile: bool = False, decode_cpus: float = 1.0,
                     actors: int = 1) -> dict:
    from mirror_core.bundle import load_bundle, save_bundle
    from mirror_core.detector import Detector
    from mirror_core.smoke import official_sized, random_mirror
    from pipeline.cluster import ensure_ray
    from pipeline.scan.config import ScanConfig
    from pipeline.scan.run import run_scan

    cuda = device == "cuda"
    cfg = official_sized(backbone)
    _, weights = random_mirror(cfg, seed=1)
    res: dict = {"raw_images": n_images, "raw_batch": batch, "raw_precision": precision, "raw_compile": compile,
                 "raw_actors": actors}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_bundle(str(tmp / "bundle"), cfg, weights)
        del weights
        res.update(write_raw_shards(tmp / "shards", n_images))
        bundle = load_bundle(str(tmp / "bundle"))
        det = Detector.from_bundle(bundle, device=device, precision=precision, compile=compile)
        res["raw_pure_model_img_s"] = pure = pure_model_img_s(det, min(n_images, 16 * batch), batch)
        del det
        if cuda:
            torch.cuda.empty_cache()
        ensure_ray()
        for mode in modes:
            gpu_decode = mode in ("gpu", "gpu_serial")  # gpu_serial: decode not overlapping the model
            if gpu_decode and not cuda:
                continue
            scan_cfg = ScanConfig(batch_size=batch, actors=actors, gpus_per_actor=1.0 / actors if cuda else 0.0,
                                  cpus_per_actor=1 if cuda else None, cpus_per_decode_task=decode_cpus,
                                  decode_rows_per_batch=64, precision=precision, compile=compile,
                                  fast_decode=mode == "fast", gpu_decode=gpu_decode,
                                  replica_overlap=mode != "gpu_serial")
            summary = run_scan(bundle, str(tmp / "shards"), str(tmp / f"out-{mode}"), scan_cfg)
            run = summary["this_run"]
            assert summary["rows_out"] == n_images and summary["errors"] == 0, summary
            res[f"raw_{mode}_img_s"] = run["images_per_s"]
            res[f"raw_{mode}_steady_img_s"] = run["steady_images_per_s"]
            res[f"raw_{mode}_steady_over_pure"] = (run["steady_images_per_s"] or 0) / pure
            res[f"raw_{mode}_first_batch_s"] = run["first_batch_s"]
            res[f"raw_{mode}_stage_busy_s"] = run["stage_busy_s"]
            res[f"raw_{mode}_cpu_decoded_in_gpu_mode"] = run["cpu_decoded_in_gpu_mode"]
    return res


def gpu_decode_parity(fixture: Path, device: str) -> dict:
    """The fixture's JPEGs: GPU crops and scores against the exact CPU path (fp32 model)."""
    from mirror_core.bundle import Bundle
    from mirror_core.detector import Detector
    from mirror_core.gpu_decode import decode_crops, device_jpeg_decoder
    from mirror_core.jpeg import is_jpeg
    from mirror_core.official import import_official
    from mirror_core.preprocess import official_preprocess
    from pipeline.scan.decode import gpu_decodable

    report = import_official(fixture / "checkpoint.pth", fixture / "backbone", fixture / "mirror_phase1.pth")
    det = Detector.from_bundle(Bundle(report.config, report.weights, "parity"), device=device)
    cfg = det.config.preprocess
    files = sorted((fixture / "data").rglob("*.*"))
    # what a scan sends to the GPU: plain (YCbCr / grayscale) JPEGs with no alignment due
    sized = [(p, gpu_decodable(p.read_bytes(), p.name, cfg)) for p in files if is_jpeg(p.read_bytes())]
    sent, sizes = [p for p, size in sized if size], [size for _, size in sized if size]
    jpegs = [p.read_bytes() for p in sent]
    decoder = device_jpeg_decoder(device)
    if decoder is None:
        return {"gpu_decode_available": False, "gpu_decode_parity_jpegs": len(jpegs)}
    crops, refused = decode_crops(jpegs, sizes, cfg, decoder, det.device)
    ok = [i for i, why in enumerate(refused) if why is None]
    exact = np.stack([official_preprocess(jpegs[i], cfg).pixels for i in ok])
    gpu = crops[ok].cpu().numpy()
    diff = np.abs(gpu.astype(int) - exact.astype(int))
    s_exact = det.score_pixels(exact)["prob_fake"]
    s_gpu = det.score_tensor(crops[ok])["prob_fake"]
    per_image = {sent[i].name: [int(diff[j].max()), round(float(diff[j].mean()), 3), round(float(abs(s_gpu[j] - s_exact[j])), 5)]
                 for j, i in enumerate(ok)}
    return {"gpu_decode_available": True, "gpu_decode_parity_jpegs": len(jpegs),
            "gpu_decode_per_image_max_mean_dpixel_dprob": per_image,
            "gpu_decode_refused": [why for why in refused if why], "gpu_decode_max_abs_dpixel": int(diff.max()),
            "gpu_decode_mean_abs_dpixel": float(diff.mean()),
            "gpu_decode_max_abs_dprob": float(np.abs(s_gpu - s_exact).max())}


def gpu_decode_speed(batch: int = 256, reps: int = 3) -> dict:
    """Where GPU decode mode spends its time: nvJPEG alone, then with the resize and crop,
    on a batch of the raw_jpeg images (images/s, one process)."""
    from benchmarks.gpu import cuda_median_s
    from benchmarks.images import jpeg
    from mirror_core.config import PreprocessConfig
    from mirror_core.gpu_decode import decode_crops, device_jpeg_decoder

    decoder = device_jpeg_decoder("cuda")
    sizes = [RAW_SIZES[i % len(RAW_SIZES)] for i in range(batch)]
    payloads = [jpeg(size, seed=i, quality=92) for i, size in enumerate(sizes)]
    encoded = [torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in payloads]
    device = torch.device("cuda")
    return {"gpu_nvjpeg_only_img_s": batch / cuda_median_s(lambda: decoder(encoded), reps, 1),
            "gpu_decode_and_crop_img_s": batch / cuda_median_s(
                lambda: decode_crops(payloads, sizes, PreprocessConfig(gpu_decode=True), decoder, device), reps, 1)}
