"""Performance harness (not a test): prints one JSON object and appends a dated row to
the performance log (benchmarks/results/perf-log.md).

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--no-record]

Figures: model_speedup_vs_reference, model_over_backbone, pipeline_efficiency,
decode_img_per_s_per_core (exact, exact without the region decode, Pillow alone, fast,
training's views by region and from whole decodes; 4 sizes), exact_region_decode_speedup,
train_views_region_decode_speedup, exact_window_speedup, fast_decode_speedup_1080p,
fast_mode_max_abs_dprob (parity fixture), peak_actor_rss_mb.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PERF_LOG = REPO / "benchmarks" / "results" / "perf-log.md"  # dated figures, appended by every run
sys.path.insert(0, str(REPO))

from benchmarks.images import heic, jpeg  # noqa: E402
from mirror_core.config import PreprocessConfig  # noqa: E402
from mirror_core.detector import Detector  # noqa: E402
from mirror_core.model import assemble_model  # noqa: E402
from mirror_core.preprocess import official_preprocess  # noqa: E402

VIT_S = {"model_type": "dinov3_vit", "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
         "intermediate_size": 1536, "patch_size": 16, "num_register_tokens": 4, "image_size": 224}
VIT_L = {**VIT_S, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
# The official detector's backbone, dinov3-vith16plus: SwiGLU MLP (6x ratio -> 5120 gated), 4 registers.
VIT_HPLUS = {**VIT_S, "hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 20,
             "intermediate_size": 5120, "use_gated_mlp": True, "hidden_act": "silu"}
PARITY_FIXTURE = Path(os.environ.get("MIRROR_PARITY_FIXTURE", REPO.parent / "shared/fixtures/official_parity"))
DECODE_SIZES = {"500x375": (500, 375), "1024x768": (1024, 768), "1920x1080": (1920, 1080),
                "3024x4032": (3024, 4032)}


def timed(fn, reps: int) -> float:
    """Median seconds per call after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def model_figures(backbone: dict, batch: int, reps: int, device: str) -> dict:
    from benchmarks.reference import OfficialStyleMirror
    from mirror_core.smoke import official_sized, random_mirror

    cfg = official_sized(backbone)
    base, weights = random_mirror(cfg, seed=0, lora_scale=0.02)
    ours = assemble_model(cfg, weights).to(device)
    reference = OfficialStyleMirror(base, weights.lora).to(device)
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)).to(device)
    with torch.inference_mode():
        ours_logits = ours(pixels).logits
        ref_logits = reference(pixels)
        max_diff = float((ours_logits - ref_logits).abs().max())
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        t_ours = timed(lambda: (ours(pixels), sync()), reps)
        t_ref = timed(lambda: (reference(pixels), sync()), reps)
        x = ours.normalize(pixels.permute(0, 3, 1, 2).float() / 255)
        t_backbone = timed(lambda: (ours.backbone(pixel_values=x), sync()), reps)
    return {"model_speedup_vs_reference": t_ref / t_ours, "model_over_backbone": t_ours / t_backbone,
            "model_ms_per_image": 1000 * t_ours / batch, "reference_ms_per_image": 1000 * t_ref / batch,
            "backbone_ms_per_image": 1000 * t_backbone / batch, "reference_max_abs_logit_diff": max_diff}


def pillow_resize_then_crop(data: bytes, cfg: PreprocessConfig) -> np.ndarray:
    """The exact path as Pillow alone computes it: the whole resize, then the crop (the
    reference the exact path's crop-window resize equals pixel for pixel)."""
    from mirror_core.preprocess import center_crop, decode_rgb, resize_short_side

    img, _, _ = decode_rgb(data, cfg.max_pixels)
    return center_crop(np.asarray(resize_short_side(img, cfg.resize_short_side)), cfg.crop_size)


def whole_decode_then_window_resize(data: bytes, cfg: PreprocessConfig) -> np.ndarray:
    """The exact path without the JPEG region decoder: Pillow decodes the whole image, then
    only the crop window is resized."""
    from mirror_core.preprocess import decode_rgb, preprocess_rgb

    img, fmt, size = decode_rgb(data, cfg.max_pixels)
    return preprocess_rgb(img, cfg, fmt=fmt, size=size).pixels


def training_views(files: list[bytes], whole_decode: bool) -> None:
    """Phase 1's augmentation of each file (a view drawn per file, then JPEG), as training
    prepares it: views decoded by region, or (`whole_decode`) from Pillow's whole decode."""
    from mirror_core.preprocess import ImageRegions, decode_rgb
    from mirror_core.train.augment import phase1_augment

    for i, data in enumerate(files):
        image = ImageRegions.of_image(decode_rgb(data)[0]) if whole_decode else ImageRegions.of_bytes(data)
        phase1_augment(image, np.random.default_rng(i))


def decode_figures(n: int) -> dict:
    out = {}
    exact, fast = PreprocessConfig(alignment="off"), PreprocessConfig(alignment="off", fast_decode=True)
    for label, size in DECODE_SIZES.items():
        files = [jpeg(size, seed=i) for i in range(n if max(size) < 3000 else max(2, n // 4))]
        for mode, run in (("exact", lambda f: official_preprocess(f, exact)),
                          ("exact_whole_decode", lambda f: whole_decode_then_window_resize(f, exact)),
                          ("exact_whole_resize", lambda f: pillow_resize_then_crop(f, exact)),
                          ("fast", lambda f: official_preprocess(f, fast))):
            t = timed(lambda: [run(f) for f in files], 2)
            out[f"{label}_{mode}"] = len(files) / t  # one process, single-threaded decode: images/s per core
        for mode, whole in (("train_views", False), ("train_views_whole_decode", True)):
            out[f"{label}_{mode}"] = len(files) / timed(lambda: training_views(files, whole), 2)
        phone = [heic(size, seed=i) for i in range(len(files))]  # the same pictures as HEIC (decoded whole)
        out[f"{label}_heic_exact"] = len(phone) / timed(lambda: [official_preprocess(f, exact) for f in phone], 2)
    return {"decode_img_per_s_per_core": out,
            "train_views_region_decode_speedup": {label: out[f"{label}_train_views"] /
                                                  out[f"{label}_train_views_whole_decode"] for label in DECODE_SIZES},
            "fast_decode_speedup_1080p": out["1920x1080_fast"] / out["1920x1080_exact"],
            "exact_window_speedup": {label: out[f"{label}_exact_whole_decode"] / out[f"{label}_exact_whole_resize"]
                                     for label in DECODE_SIZES},
            "heic_vs_jpeg_exact": {label: out[f"{label}_heic_exact"] / out[f"{label}_exact"] for label in DECODE_SIZES},
            "exact_region_decode_speedup": {label: out[f"{label}_exact"] / out[f"{label}_exact_whole_decode"]
                                            for label in DECODE_SIZES}}


def parity_bundle_and_paths():
    """The parity fixture's official files imported as a bundle, and its images; None
    where the fixture is absent."""
    fixture = PARITY_FIXTURE
    if not (fixture / "checkpoint.pth").exists():
        return None
    from mirror_core.bundle import Bundle
    from mirror_core.official import import_official

    report = import_official(fixture / "checkpoint.pth", fixture / "backbone", fixture / "mirror_phase1.pth")
    return Bundle(report.config, report.weights, "parity"), sorted((fixture / "data").rglob("*.*"))


def max_abs_dprob(a: list[dict], b: list[dict]) -> float:
    return max(abs(x["prob_fake"] - y["prob_fake"]) for x, y in zip(a, b))


def fast_mode_dprob() -> float | None:
    loaded = parity_bundle_and_paths()
    if loaded is None:
        return None
    bundle, paths = loaded
    exact = Detector.from_bundle(bundle).score(paths)
    fast = Detector.from_bundle(bundle)
    fast.config.preprocess.fast_decode = True
    return max_abs_dprob(exact, fast.score(paths))


def precision_dprob(device: str) -> dict:
    """Max |d prob_fake| of each precision mode against fp32 on the parity fixture's images."""
    from mirror_core.detector import PRECISIONS
    from mirror_core.fp8 import fp8_supported

    loaded = parity_bundle_and_paths()
    if loaded is None:
        return {}
    bundle, paths = loaded
    exact = Detector.from_bundle(bundle, device=device).score(paths)
    return {f"precision_{name}_max_abs_dprob": max_abs_dprob(exact, Detector.from_bundle(bundle, device=device,
                                                                                         precision=name).score(paths))
            for name, mode in PRECISIONS.items()
            if name != "fp32" and (not mode.fp8_gemms or fp8_supported(torch.device(device)))}


def pipeline_figures(backbone: dict, n_images: int, batch: int) -> dict:
    """End-to-end `mirror scan` images/s over a pure model loop on the same pre-decoded crops."""
    from mirror_core.bundle import load_bundle, save_bundle
    from mirror_core.smoke import official_sized, random_mirror
    from pipeline.cluster import ensure_ray
    from pipeline.scan.config import ScanConfig
    from pipeline.scan.run import run_scan

    cfg = official_sized(backbone)
    _, weights = random_mirror(cfg, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_bundle(str(tmp / "bundle"), cfg, weights)
        (tmp / "images").mkdir()
        for i in range(n_images):
            (tmp / "images" / f"{i:04d}.jpg").write_bytes(jpeg((500, 375), seed=i))
        bundle = load_bundle(str(tmp / "bundle"))
        det = Detector.from_bundle(bundle)
        crops = np.stack([det.preprocess(p.read_bytes(), name=p.name).pixels for p in sorted((tmp / "images").iterdir())])
        t = time.perf_counter()
        for s in range(0, n_images, batch):
            det.score_pixels(crops[s : s + batch])
        pure = n_images / (time.perf_counter() - t)
        ensure_ray()
        # cpus_per_actor left unset: what a user gets (on 2 cores: the replica's 2 threads
        # and 2 logical CPUs for decode tasks).
        scan_cfg = ScanConfig(batch_size=batch, unit_size=max(8, n_images // 8), actors=1)
        summary = run_scan(bundle, str(tmp / "images"), str(tmp / "out"), scan_cfg)
        scorer_cpus = summary["config"]["cpus_per_actor"]
        run = summary["this_run"]
        e2e = run["images_per_s"]
        steady = run["steady_images_per_s"]
    return {"pipeline_efficiency": e2e / pure, "pipeline_img_per_s": e2e, "pure_model_img_per_s": pure,
            "pipeline_steady_efficiency": steady / pure, "pipeline_first_batch_s": run["first_batch_s"],
            "pipeline_images": n_images, "pipeline_cpus_per_actor": scorer_cpus}


def actor_peak_rss_mb(backbone: dict) -> float:
    """Peak RSS (MB) of a fresh process that receives the weights as arrays (as an actor
    does from the object store), builds one scoring replica and scores a batch of 16."""
    import subprocess

    from mirror_core.smoke import official_sized, random_mirror
    
    cfg = official_sized(backbone)
    _, weights = random_mirror(cfg, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        arrays = {f"{g}/{k}": v for g, t in weights.to_numpy().items() for k, v in t.items()}
        np.savez(Path(tmp) / "w.npz", **arrays)
        (Path(tmp) / "cfg.json").write_text(json.dumps(cfg.to_dict()))
        code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.run import replica_memory_probe; " \
               f"replica_memory_probe({tmp!r})"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def replica_memory_probe(folder: str) -> None:
    from pipeline.scan.scorer import Scorer

    loaded = np.load(Path(folder) / "w.npz")
    arrays: dict = {}
    for key in loaded.files:
        group, name = key.split("/", 1)
        arrays.setdefault(group, {})[name] = loaded[key]
    config = json.loads((Path(folder) / "cfg.json").read_text())
    scorer = Scorer(arrays, config, "probe")
    scorer.detector.score_pixels(np.zeros((16, 224, 224, 3), np.uint8))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through
    # fork + exec, so it reported the harness's own peak (2.5 GB) instead of the probe's.
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(f"{hwm_kb / 1024:.1f}")


CPU_TABLE = ("| date | machine | device | quick | speedup vs ref | model/backbone | pipeline eff. (wall / steady) | "
             "decode 1080p exact/fast img/s/core | fast speedup 1080p | fast max dprob | actor RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|")
GPU_TABLE = ("| date | machine | device | model img/s (bf16, batch) | compiled img/s | MFU (datasheet / measured) | "
             "model/backbone | speedup vs ref | pipeline img/s | pipeline eff. (wall / steady) | bf16 max dprob |",
             "|---|---|---|---|---|---|---|---|---|---|---|")


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table_row(r: dict) -> str:
    if r["device"] == "cpu":
        d = r.get("decode_img_per_s_per_core", {})
        cells = [r["date"], r["machine"], r["device"], str(r["quick"]), fmt(r.get("model_speedup_vs_reference")),
                 fmt(r.get("model_over_backbone")),
                 f"{fmt(r.get('pipeline_efficiency'))} / {fmt(r.get('pipeline_steady_efficiency'))}",
                 f"{fmt(d.get('1920x1080_exact'), '.1f')} / {fmt(d.get('1920x1080_fast'), '.1f')}",
                 fmt(r.get("fast_decode_speedup_1080p")), fmt(r.get("fast_mode_max_abs_dprob"), ".1e"),
                 fmt(r.get("peak_actor_rss_mb"), ".0f")]
    else:
        cells = [r["date"], r["machine"], r["device"],
                 f"{fmt(r.get('model_img_s_bf16'), '.0f')} ({r.get('best_batch', '-')})",
                 fmt(r.get("compiled_img_s_bf16"), ".0f"),
                 f"{fmt(r.get('mfu_vs_datasheet'))} / {fmt(r.get('mfu_vs_measured_matmul'))}",
                 fmt(r.get("model_over_backbone")), fmt(r.get("model_speedup_vs_reference")),
                 fmt(r.get("gpu_pipeline_img_s"), ".0f"),
                 f"{fmt(r.get('gpu_pipeline_efficiency'))} / {fmt(r.get('gpu_pipeline_steady_efficiency'))}",
                 fmt(r.get("bf16_autocast_max_abs_dprob"), ".1e")]
    return "| " + " | ".join(cells) + " |\n"


def record(result: dict, path: Path) -> None:
    """Append this run's row, under its own table header, to the end of the performance log."""
    header, rule = CPU_TABLE if result["device"] == "cpu" else GPU_TABLE
    with open(path, "a") as log:
        log.write(f"\n### {result['date']}: {result['device']}, {result['config']}\n\n{header}\n{rule}\n"
                  + table_row(result))


def section(result: dict, name: str, fn, json_out: Path | None) -> None:
    """Run one group of figures; a failure is recorded, not fatal (a GPU lease is short)."""
    t = time.perf_counter()
    try:
        result.update(fn())
    except Exception as err:  # noqa: BLE001 - recorded in the output
        import traceback

        traceback.print_exc()
        result.setdefault("failed", {})[name] = f"{type(err).__name__}: {err}"
    result.setdefault("section_s", {})[name] = round(time.perf_counter() - t, 1)
    print(f"[{name}] {result['section_s'][name]} s", file=sys.stderr, flush=True)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2, default=str))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions and images (< 2 minutes on 2 cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-record", action="store_true", help="do not append to the performance log")
    p.add_argument("--json-out", type=Path, help="also write the JSON here after every section")
    p.add_argument("--only", help="comma-separated sections: model,decode,fast,pipeline,rss (cpu), compile (cuda); "
                                  "opt-in: gpu_decode,raw_jpeg,train,precision (both), hplus,graphs,gpu_decode_speed (cuda)")
    g = p.add_argument_group("cuda")
    g.add_argument("--gpu-batches", default="128,256,512")
    g.add_argument("--compile", action="store_true", help="also time the model under torch.compile")
    g.add_argument("--pipeline-compile", action="store_true", help="compile the replicas of the pipeline figures")
    g.add_argument("--pipeline-precision", default="bf16", help="the pipeline section's precision (model and scan)")
    g.add_argument("--pipeline-serial-baseline", action="store_true",
                   help="pipeline: also scan with one call per replica at a time (uploads not overlapping the model)")
    g.add_argument("--kernel-shape", help="read-out kernel launch shape and method, e.g. r4_w8 or bounded_r1_w8 (default: the library's)")
    g.add_argument("--compile-variants", default="full_eager,backbone_eager,full_compiled,backbone_compiled")
    g.add_argument("--pipeline-images", type=int, default=65536)
    g.add_argument("--pipeline-batch", type=int, default=256)
    g.add_argument("--actors", type=int, default=1)
    g.add_argument("--gpus-per-actor", type=float, default=1.0)
    g.add_argument("--compile-modes", default="default", help="for hplus / graphs: default,reduce-overhead,"
                   "max-autotune-no-cudagraphs,coordinate-descent,...")
    g.add_argument("--graphs-unfused", action="store_true", help="graphs: also the unfused projections")
    g.add_argument("--graphs-rope-baseline", action="store_true", help="graphs: also RoPE computed in every layer")
    g.add_argument("--graphs-patch-baseline", action="store_true", help="graphs: also the patch embedding as a convolution")
    g.add_argument("--fp8", action="store_true", help="graphs / hplus: also the fp8 precision (FP8 backbone GEMMs)")
    g.add_argument("--gelu-epilogue", action="store_true",
                   help="graphs: also the GELU MLPs' first GEMM with the GELU in its epilogue (Triton, exact; "
                        "cuBLASLt, tanh approximation)")
    r = p.add_argument_group("raw_jpeg")
    r.add_argument("--raw-images", type=int, default=8192)
    r.add_argument("--raw-modes", default="exact,fast,gpu", help="exact,fast,gpu,gpu_serial")
    r.add_argument("--raw-precision", default=None, help="default: bf16-weights on cuda, fp32 on cpu")
    r.add_argument("--raw-compile", action="store_true")
    r.add_argument("--raw-actors", type=int, default=1, help="scoring actors sharing the GPU (1/N GPU each)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    only = set(args.only.split(",")) if args.only else {"model", "decode", "fast", "pipeline", "rss"}
    reps = 2 if args.quick else 5
    result = {"date": datetime.now().strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
              "device": torch.cuda.get_device_name() if cuda else "cpu", "quick": args.quick,
              "config": "ViT-L DINOv3 (1024/24/16), memory 4096/8/128, bf16 autocast" if cuda
              else "ViT-S DINOv3 (384/12/6), memory 4096/8/128, batch 16, fp32"}
    if cuda:
        from benchmarks import gpu

        batches = [int(b) for b in args.gpu_batches.split(",")]
        gpu.set_kernel_shape(args.kernel_shape)
        result["kernel_shape"] = args.kernel_shape
        if "model" in only:
            section(result, "model", lambda: gpu.model_figures(VIT_L, batches, reps, args.pipeline_batch if args.compile else None), args.json_out)
        if "compile" in only:
            names = args.compile_variants.split(",")
            section(result, "compile", lambda: gpu.compile_figures(VIT_L, args.pipeline_batch, reps, names), args.json_out)
        if "pipeline" in only:
            section(result, "pipeline", lambda: gpu.pipeline_figures(
                VIT_L, args.pipeline_images, args.pipeline_batch, args.actors, args.gpus_per_actor, args.pipeline_compile,
                args.pipeline_serial_baseline, args.pipeline_precision), args.json_out)
        modes = tuple(args.compile_modes.split(","))
        if "hplus" in only:
            section(result, "hplus", lambda: gpu.architecture_figures("vith_plus", VIT_HPLUS, args.pipeline_batch, reps, modes,
                                                                      fp8=args.fp8), args.json_out)
        if "gpu_decode_speed" in only:
            from benchmarks.gpu_jpeg import gpu_decode_speed

            section(result, "gpu_decode_speed", gpu_decode_speed, args.json_out)
        if "graphs" in only:
            section(result, "graphs", lambda: gpu.architecture_figures("vitl", VIT_L, args.pipeline_batch, reps, modes,
                                                                       with_backbone=False,
                                                                       unfused_baseline=args.graphs_unfused,
                                                                       rope_baseline=args.graphs_rope_baseline,
                                                                       patch_baseline=args.graphs_patch_baseline,
                                                                       fp8=args.fp8, gelu_epilogue=args.gelu_epilogue),
                    args.json_out)
    else:
        from mirror_core.readout import inference_readout

        result["cpu_readout"] = inference_readout("cpu", autocast_16bit=False)
        if "model" in only:
            section(result, "model", lambda: model_figures(VIT_S, 16, reps, "cpu"), args.json_out)
        if "pipeline" in only:
            section(result, "pipeline", lambda: pipeline_figures(VIT_S, 48 if args.quick else 256, 16), args.json_out)
        if "rss" in only:
            section(result, "rss", lambda: {"peak_actor_rss_mb": actor_peak_rss_mb(VIT_S)}, args.json_out)
    if "gpu_decode" in only:
        from benchmarks.gpu_jpeg import gpu_decode_parity

        section(result, "gpu_decode", lambda: gpu_decode_parity(PARITY_FIXTURE, args.device), args.json_out)
    if "raw_jpeg" in only:
        from benchmarks.gpu_jpeg import raw_jpeg_figures

        backbone, batch = (VIT_L, args.pipeline_batch) if cuda else (VIT_S, 16)
        precision = args.raw_precision or ("bf16-weights" if cuda else "fp32")
        section(result, "raw_jpeg", lambda: raw_jpeg_figures(backbone, args.raw_images if not args.quick else 64, batch,
                                                             args.device, precision, tuple(args.raw_modes.split(",")),
                                                             args.raw_compile, actors=args.raw_actors), args.json_out)
    if "train" in only:
        from benchmarks.train_speed import train_figures

        section(result, "train", lambda: train_figures(args.device), args.json_out)
    if "decode" in only:
        section(result, "decode", lambda: decode_figures(8 if args.quick else 24), args.json_out)
    if "fast" in only:
        section(result, "fast", lambda: {"fast_mode_max_abs_dprob": fast_mode_dprob()}, args.json_out)
    if "precision" in only:
        section(result, "precision", lambda: precision_dprob(args.device), args.json_out)
    print(json.dumps(result, indent=2, default=str))
    if not args.no_record:
        record(result, PERF_LOG)
        extra = {k: v for k, v in result.items() if k.startswith(("train_", "raw_", "gpu_decode", "vit", "precision_"))}
        if extra:  # figures the table has no column for: kept as JSON under the row
            with open(PERF_LOG, "a") as log:
                log.write("\n```json\n" + json.dumps(extra, indent=2, default=str) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
