"""GPU figures for benchmarks/run.py (--device cuda): a DINOv3-L-sized random MIRROR.

model: images/s of our forward, the official-style reference and the backbone alone per
batch size, bf16 autocast (and bf16 weights, and torch.compile); model FLOP utilisation
against the datasheet and a measured bf16 matmul; bf16-vs-fp32 score drift.
pipeline: `mirror scan` over pre-resized (224x224 JPEG) Parquet shards vs a pure model
loop on pre-decoded crops, same batch size.
"""
from __future__ import annotations

import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

H100_BF16_DENSE_TFLOPS = 989.0  # datasheet, SXM; MFU is also given against a measured matmul


# Inductor settings measured as if they were compile modes (torch.compile takes a mode or
# options, not both): "coordinate-descent" tunes each generated kernel's launch shape.
COMPILE_OPTIONS = {"coordinate-descent": {"coordinate_descent_tuning": True}}


def compile_kwargs(mode: str) -> dict:
    """torch.compile's arguments for a harness compile mode ('default', a torch.compile
    mode, or a key of COMPILE_OPTIONS)."""
    if mode in COMPILE_OPTIONS:
        return {"options": COMPILE_OPTIONS[mode]}
    return {"mode": None if mode == "default" else mode}


def set_kernel_shape(spec: str | None) -> None:
    """'r4_w8' or 'bounded_r4_w8' (as memory_bank_gpu.py's sweep names them): the read-out
    kernel's launch shape, and its selection method when named."""
    if spec:
        from mirror_core import kernels

        *method, rows, warps = spec.split("_")
        kernels.BLOCK_ROWS, kernels.NUM_WARPS = int(rows[1:]), int(warps[1:])
        if method:
            if method[0] not in kernels.METHODS:
                raise ValueError(f"unknown read-out kernel method {method[0]!r} (one of {kernels.METHODS})")
            kernels.METHOD = method[0]


def figure(name: str, value) -> None:
    """A figure on stderr as soon as it is measured: a round cut short by its time limit
    still leaves its figures in the log (the JSON is written per section)."""
    print(f"[figure] {name} {value}", file=sys.stderr, flush=True)


def cuda_median_s(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return float(np.median(times))


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / cuda_median_s(lambda: a @ b, 10, 3) / 1e12


def flops_per_image(model, pixels) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cuda", dtype=torch.bfloat16):
        model(pixels[:1])
    return float(counter.get_total_flops())


def natural_like(batch: int, seed: int) -> np.ndarray:
    """Smooth random images (upscaled noise): closer to photos than white noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((batch, 224, 224, 3), np.uint8)
    for i in range(batch):
        small = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
        out[i] = np.asarray(Image.fromarray(small).resize((224, 224), Image.BICUBIC))
    return out


def model_figures(backbone: dict, batches: list[int], reps: int, compile_batch: int | None) -> dict:
    from benchmarks.reference import OfficialStyleMirror
    from mirror_core.model import assemble_model
    from mirror_core.smoke import official_sized, random_mirror

    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = official_sized(backbone)
    base, weights = random_mirror(cfg, seed=0, lora_scale=0.02)
    ours = assemble_model(cfg, weights).cuda()
    reference = OfficialStyleMirror(base, weights.lora).cuda()
    del base
    res: dict = {"matmul_bf16_tflops_measured": matmul_tflops()}
    check = torch.from_numpy(natural_like(32, 0)).cuda()
    with torch.inference_mode():
        fp32 = ours(check)
        res["reference_max_abs_logit_diff_fp32"] = float((fp32.logits - reference(check)).abs().max())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = ours(check)
        res["bf16_autocast_max_abs_dprob"] = float((bf16.prob_fake - fp32.prob_fake).abs().max())
        res["bf16_autocast_max_abs_dlogit"] = float((bf16.logits - fp32.logits).abs().max())
        res["flops_per_image_g"] = flops_per_image(ours, check) / 1e9
        per_batch = {}
        for batch in batches:
            pixels = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device="cuda")
            x = ours.normalize(pixels.permute(0, 3, 1, 2).float() / 255)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                t_ours = cuda_median_s(lambda: ours(pixels), reps)
                t_ref = cuda_median_s(lambda: reference(pixels), reps)
                t_bb = cuda_median_s(lambda: ours.backbone(pixel_values=x), reps)
            per_batch[batch] = {"ours_img_s": batch / t_ours, "reference_img_s": batch / t_ref,
                                "backbone_img_s": batch / t_bb, "speedup_vs_reference": t_ref / t_ours,
                                "model_over_backbone": t_ours / t_bb}
            torch.cuda.empty_cache()
        res["per_batch"] = per_batch
        best = max(per_batch, key=lambda b: per_batch[b]["ours_img_s"])
        res["best_batch"] = best
        res["model_img_s_bf16"] = per_batch[best]["ours_img_s"]
        res["model_over_backbone"] = per_batch[best]["model_over_backbone"]
        res["model_speedup_vs_reference"] = per_batch[best]["speedup_vs_reference"]
        achieved = res["model_img_s_bf16"] * res["flops_per_image_g"] / 1e3  # TFLOP/s
        res["mfu_vs_datasheet"] = achieved / H100_BF16_DENSE_TFLOPS
        res["mfu_vs_measured_matmul"] = achieved / res["matmul_bf16_tflops_measured"]
        reference = None  # freed (closures above hold its name)
        torch.cuda.empty_cache()
        # bf16 weights (no autocast): LayerNorms and residual adds in bf16 too.
        pixels = torch.randint(0, 256, (best, 224, 224, 3), dtype=torch.uint8, device="cuda")
        half = assemble_model(cfg, weights).cuda().to(torch.bfloat16)
        res["bf16_weights_img_s"] = best / cuda_median_s(lambda: half(pixels), reps)
        res["bf16_weights_max_abs_dprob"] = float((half(check).prob_fake.float() - fp32.prob_fake).abs().max())
        half = None
        torch.cuda.empty_cache()
    if compile_batch:
        t0 = time.perf_counter()
        compiled = torch.compile(ours, dynamic=False)
        pixels = torch.randint(0, 256, (compile_batch, 224, 224, 3), dtype=torch.uint8, device="cuda")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            compiled(pixels)
            torch.cuda.synchronize()
            res["compile_s"] = time.perf_counter() - t0
            res["compiled_img_s_bf16"] = compile_batch / cuda_median_s(lambda: compiled(pixels), reps)
    return res


def write_shards(folder: Path, n_images: int, distinct: int = 2048, rows_per_group: int = 1024,
                 groups_per_file: int = 8) -> None:
    """Pre-resized shards: 224x224 JPEGs in Parquet (uri, bytes), `distinct` images repeated."""
    from benchmarks.images import jpeg, write_repeated_shards

    write_repeated_shards(folder, [jpeg((224, 224), seed=i) for i in range(distinct)], n_images, rows_per_group,
                          groups_per_file)


def pipeline_figures(backbone: dict, n_images: int, batch: int, actors: int, gpus_per_actor: float,
                     compile: bool = False, serial_baseline: bool = False, precision: str = "bf16") -> dict:
    """A scan of pre-resized shards against the pure model loop, both in `precision`.
    `serial_baseline`: also the scan with one call per replica at a time (each block's
    upload not overlapping the model)."""
    from mirror_core.bundle import load_bundle, save_bundle
    from mirror_core.detector import Detector
    from mirror_core.smoke import official_sized, random_mirror
    from pipeline.cluster import ensure_ray
    from pipeline.scan.config import ScanConfig
    from pipeline.scan.run import run_scan

    cfg = official_sized(backbone)
    _, weights = random_mirror(cfg, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_bundle(str(tmp / "bundle"), cfg, weights)
        del weights
        t = time.perf_counter()
        write_shards(tmp / "shards", n_images)
        shards_s = time.perf_counter() - t
        bundle = load_bundle(str(tmp / "bundle"))
        det = Detector.from_bundle(bundle, device="cuda", precision=precision, compile=compile)
        torch.cuda.reset_peak_memory_stats()
        crops = natural_like(4 * batch, 2)  # the pure loop cycles through pre-decoded crops
        for _ in range(3):
            det.score_pixels(crops[:batch])
        torch.cuda.synchronize()
        t = time.perf_counter()
        for s in range(0, n_images, batch):
            j = (s // batch) % 4
            det.score_pixels(crops[j * batch : (j + 1) * batch][: n_images - s])
        pure = n_images / (time.perf_counter() - t)
        replica_mb = torch.cuda.max_memory_allocated() / 2**20
        del det
        torch.cuda.empty_cache()
        ensure_ray()
        scan_cfg = ScanConfig(batch_size=batch, actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=1,
                              decode_rows_per_batch=256, precision=precision, compile=compile)
        summary = run_scan(bundle, str(tmp / "shards"), str(tmp / "out"), scan_cfg)
        serial = {}
        if serial_baseline:
            base = run_scan(bundle, str(tmp / "shards"), str(tmp / "out-serial"), replace(scan_cfg, replica_overlap=False))
            serial = {"gpu_pipeline_serial_steady_efficiency": base["this_run"]["steady_images_per_s"] / pure,
                      "gpu_pipeline_serial_img_s": base["this_run"]["images_per_s"]}
    run = summary["this_run"]
    steady = run["steady_images_per_s"]
    assert summary["rows_out"] == n_images and summary["errors"] == 0, summary
    return {**serial, "gpu_pure_model_img_s": pure, "gpu_pipeline_img_s": run["images_per_s"],
            "gpu_pipeline_steady_img_s": steady, "gpu_pipeline_efficiency": run["images_per_s"] / pure,
            "gpu_pipeline_steady_efficiency": steady / pure, "gpu_pipeline_first_batch_s": run["first_batch_s"],
            "gpu_pipeline_images": n_images, "gpu_pipeline_batch": batch, "gpu_pipeline_precision": precision, "gpu_pipeline_actors": actors,
            "gpu_pipeline_gpus_per_actor": gpus_per_actor, "gpu_pipeline_stage_busy_s": run["stage_busy_s"],
            "gpu_shard_write_s": shards_s, "gpu_replica_peak_mem_mb": replica_mb}


def compile_figures(backbone: dict, batch: int, reps: int,
                    names=("full_eager", "backbone_eager", "full_compiled", "backbone_compiled")) -> dict:
    """Eager vs torch.compile, autocast vs bf16 weights, full model vs backbone alone."""
    from mirror_core.model import assemble_model
    from mirror_core.smoke import official_sized, random_mirror

    cfg = official_sized(backbone)
    _, weights = random_mirror(cfg, seed=0, lora_scale=0.02)
    pixels = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device="cuda")
    res: dict = {"compile_batch": batch}
    for weights_dtype in ("fp32", "bf16"):
        model = assemble_model(cfg, weights).cuda()
        if weights_dtype == "bf16":
            model = model.to(torch.bfloat16)
        x = model.normalize(pixels.permute(0, 3, 1, 2).float() / 255).to(model.backbone_dtype)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=weights_dtype == "fp32")
        with torch.inference_mode(), autocast:
            full, bb = torch.compile(model, dynamic=False), torch.compile(model.backbone, dynamic=False)
            variants = {"full_eager": lambda: model(pixels), "backbone_eager": lambda: model.backbone(pixel_values=x),
                        "full_compiled": lambda: full(pixels), "backbone_compiled": lambda: bb(pixel_values=x)}
            for name in names:
                fn = variants[name]
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                res[f"{weights_dtype}_{name}_img_s"] = batch / cuda_median_s(fn, reps)
                res[f"{weights_dtype}_{name}_first_call_s"] = first
        model = full = bb = None  # freed before the next dtype
        torch.cuda.empty_cache()
    return res


def attention_kernels(model, pixels) -> list[str]:
    """CUDA kernels that one forward launches for attention (flash / cuDNN / mem-efficient / math)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(pixels)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(t in n.lower() for t in ("flash", "fmha", "attention", "cudnn", "sdpa")))[:8]


KERNEL_KINDS = (("attention", ("flash", "fmha", "sdpa", "attention")),
                ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "mm_")),
                ("fused_elementwise", ("triton",)))


def kernel_time_shares(fn) -> dict:
    """Share of one call's CUDA kernel time by kind (attention / matmul / inductor-fused
    elementwise / other) and the total: where a compiled forward spends the GPU."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    per_kernel: dict[str, float] = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        name = e.key.lower()
        kind = next((k for k, tags in KERNEL_KINDS if any(t in name for t in tags)), "other")
        totals[kind] = totals.get(kind, 0.0) + us
        per_kernel[e.key[:90]] = per_kernel.get(e.key[:90], 0.0) + us
    all_us = sum(totals.values()) or 1.0
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {"kernel_ms": all_us / 1e3, **{f"share_{k}": round(v / all_us, 3) for k, v in sorted(totals.items())},
            "top_kernels_ms": {k: round(v / 1e3, 2) for k, v in top}}


def architecture_figures(prefix: str, backbone: dict, batch: int, reps: int,
                         compile_modes: tuple[str, ...] = ("default",), with_backbone: bool = True,
                         unfused_baseline: bool = False, rope_baseline: bool = False, fp8: bool = False,
                         gelu_epilogue: bool = False, patch_baseline: bool = False) -> dict:
    """One backbone size, bf16 weights, projections fused and RoPE precomputed as scoring
    replicas run them: eager and compiled images/s of the model (and of the backbone
    alone), FLOPs per image, MFU, the attention kernels. Compile modes: 'default',
    'reduce-overhead' (CUDA graphs), 'max-autotune-no-cudagraphs'. Baselines (default
    compile): `unfused_baseline` without the fused projections, `patch_baseline` with the
    patch embedding as a convolution, `rope_baseline` with RoPE's cos/sin computed in
    every layer. `gelu_epilogue`: also the GELU MLPs' first GEMM with the GELU in its
    epilogue (compiled; the bare GEMMs too, `gelu_gemm_figures`) and its score deviation
    from the model without. `fp8`: also the "fp8" precision (FP8 backbone GEMMs),
    compiled, and its score deviation from fp32 and from bf16 weights."""
    from mirror_core.fp8 import fp8_linears_
    from mirror_core.fused import fuse_projections_, patch_embedding_as_linear_, precompute_rope_
    from mirror_core.model import assemble_model
    from mirror_core.smoke import official_sized, random_mirror

    cfg = official_sized(backbone)
    _, weights = random_mirror(cfg, seed=0, lora_scale=0.02)
    if fp8:  # scores to compare the fp8 model's with
        check = torch.from_numpy(natural_like(32, 0)).cuda()
        with torch.inference_mode():
            fp32_prob = assemble_model(cfg, weights).cuda().eval()(check).prob_fake
        torch.cuda.empty_cache()
    model = assemble_model(cfg, weights).cuda().to(torch.bfloat16).eval().requires_grad_(False)
    del weights
    pixels = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device="cuda")
    res: dict = {f"{prefix}_batch": batch, f"{prefix}_params_m": sum(p.numel() for p in model.parameters()) / 1e6}

    def compiled_img_s(name: str, mode: str) -> float:
        t0 = time.perf_counter()
        full = torch.compile(model, dynamic=False, **compile_kwargs(mode))
        full(pixels)
        torch.cuda.synchronize()
        res[f"{prefix}_{name}_first_call_s"] = time.perf_counter() - t0
        img_s = res[f"{prefix}_{name}_img_s"] = batch / cuda_median_s(lambda: full(pixels), reps)
        figure(f"{prefix}_{name}_img_s", round(img_s, 1))
        res[f"{prefix}_{name}_mfu_vs_datasheet"] = img_s * res[f"{prefix}_flops_per_image_g"] / 1e3 / H100_BF16_DENSE_TFLOPS
        try:  # a profiler failure must not cost the section's figures
            res[f"{prefix}_{name}_kernel_time"] = kernel_time_shares(lambda: full(pixels))
        except Exception as err:
            res[f"{prefix}_{name}_kernel_time"] = f"profiler failed: {type(err).__name__}: {err}"
        torch._dynamo.reset()
        return img_s

    def guarded(name: str, variant) -> None:
        """An optional variant: its failure is recorded and the figures after it are still
        measured (a device round is short)."""
        try:
            variant()
        except Exception as err:  # noqa: BLE001 - recorded in the output
            import traceback

            traceback.print_exc()
            res[f"{prefix}_{name}_failed"] = f"{type(err).__name__}: {err}"
            figure(f"{prefix}_{name}_failed", res[f"{prefix}_{name}_failed"][:200])
            torch._dynamo.reset()

    def gelu_epilogue_figures() -> None:
        res[f"{prefix}_gelu_gemm"] = gelu_gemm_figures(model.backbone, batch * tokens_per_image(model, pixels), reps)
        figure(f"{prefix}_gelu_gemm", res[f"{prefix}_gelu_gemm"])
        for approximate, name in (("none", "gelu_epilogue"), ("tanh", "gelu_tanh_epilogue")):
            with swapped_gelu_epilogue(model.backbone, approximate) as replaced:
                res[f"{prefix}_{name}_mlps"] = replaced
                if replaced:
                    res[f"{prefix}_{name}_max_abs_dprob_vs_bf16_weights"] = float(
                        (model(pixels[:32]).prob_fake.float() - plain_prob).abs().max())
                    figure(f"{name}_max_abs_dprob", res[f"{prefix}_{name}_max_abs_dprob_vs_bf16_weights"])
                    compiled_img_s(f"{name}_compiled_default", "default")

    def fp8_figures() -> None:  # last: the model keeps its fp8 layers
        bf16_prob = model(check).prob_fake.float()
        res[f"{prefix}_fp8_linears"] = fp8_linears_(model.backbone)
        fp8_prob = model(check).prob_fake.float()
        res[f"{prefix}_fp8_max_abs_dprob_vs_fp32"] = float((fp8_prob - fp32_prob).abs().max())
        res[f"{prefix}_fp8_max_abs_dprob_vs_bf16_weights"] = float((fp8_prob - bf16_prob).abs().max())
        res[f"{prefix}_bf16_weights_max_abs_dprob_vs_fp32"] = float((bf16_prob - fp32_prob).abs().max())
        figure("fp8_max_abs_dprob_vs_fp32", res[f"{prefix}_fp8_max_abs_dprob_vs_fp32"])
        res[f"{prefix}_fp8_eager_img_s"] = batch / cuda_median_s(lambda: model(pixels), reps)
        compiled_img_s("fp8_compiled_default", "default")

    with torch.no_grad():  # the FLOP counter's module tracker does not run under inference_mode
        res[f"{prefix}_flops_per_image_g"] = flops_per_image(model, pixels) / 1e9
    with torch.inference_mode():
        precompute_rope_(model.backbone, 224)
        if unfused_baseline:
            res[f"{prefix}_unfused_eager_img_s"] = batch / cuda_median_s(lambda: model(pixels), reps)
            compiled_img_s("unfused_compiled_default", "default")
        fuse_projections_(model.backbone)
        if patch_baseline:
            compiled_img_s("patch_conv_compiled_default", "default")
        patch_embedding_as_linear_(model.backbone)
        if rope_baseline:
            precomputed = model.backbone.rope_embeddings
            model.backbone.rope_embeddings = precomputed.rope
            compiled_img_s("rope_per_layer_compiled_default", "default")
            model.backbone.rope_embeddings = precomputed
        x = model.normalize(pixels.permute(0, 3, 1, 2).float() / 255).to(torch.bfloat16)
        res[f"{prefix}_attention_kernels"] = attention_kernels(model, pixels[:8])
        plain_prob = model(pixels[:32]).prob_fake.float()
        res[f"{prefix}_eager_img_s"] = batch / cuda_median_s(lambda: model(pixels), reps)
        if with_backbone:
            res[f"{prefix}_eager_backbone_img_s"] = batch / cuda_median_s(lambda: model.backbone(pixel_values=x), reps)
            res[f"{prefix}_eager_model_over_backbone"] = res[f"{prefix}_eager_backbone_img_s"] / res[f"{prefix}_eager_img_s"]
        for mode in compile_modes:
            compiled_img_s(f"compiled_{mode}", mode)
        if with_backbone:
            bb = torch.compile(model.backbone, dynamic=False)
            bb(pixel_values=x)
            res[f"{prefix}_compiled_backbone_img_s"] = batch / cuda_median_s(lambda: bb(pixel_values=x), reps)
            res[f"{prefix}_compiled_model_over_backbone"] = (res[f"{prefix}_compiled_backbone_img_s"]
                                                              / res[f"{prefix}_compiled_{compile_modes[0]}_img_s"])
            torch._dynamo.reset()
        if gelu_epilogue:
            guarded("gelu_epilogue", gelu_epilogue_figures)
        if fp8:
            guarded("fp8", fp8_figures)
    model = None  # freed (the figure closures hold its name)
    torch.cuda.empty_cache()
    return res


def tokens_per_image(model, pixels) -> int:
    """Tokens per image in the backbone (patches + class + registers)."""
    x = model.normalize(pixels[:1].permute(0, 3, 1, 2).float() / 255).to(torch.bfloat16)
    return model.backbone(pixel_values=x).last_hidden_state.shape[1]


@contextmanager
def swapped_gelu_epilogue(backbone, approximate: str = "none"):
    """The backbone with its GELU MLPs' first GEMM + GELU as one (`gelu_epilogue_`), put
    back afterwards; yields how many were replaced."""
    from mirror_core.fused import replace_submodule
    from mirror_core.gelu_gemm import gelu_epilogue_

    originals = [(name, m) for name, m in backbone.named_modules() if type(m).__name__ == "DINOv3ViTMLP"]
    try:
        yield gelu_epilogue_(backbone, approximate=approximate)
    finally:
        for name, module in originals:
            replace_submodule(backbone, name, module)


def gelu_gemm_figures(backbone, tokens: int, reps: int) -> dict:
    """The first MLP GEMM of one block and its GELU at the benchmark's token count, each way:
    cuBLAS alone, cuBLAS + GELU compiled (what inductor runs), cuBLASLt with its (tanh) GELU
    epilogue, the Triton GEMM with the exact GELU epilogue autotuned and per launch shape:
    milliseconds (no GELU MLP: {})."""
    import torch.nn.functional as F

    from mirror_core.gelu_gemm import GPU_TILES, linear_gelu

    mlp = next((m for m in backbone.modules() if type(m).__name__ == "DINOv3ViTMLP"), None)
    if mlp is None:
        return {}
    w, b = mlp.up_proj.weight, mlp.up_proj.bias
    x = torch.randn(tokens, w.shape[1], device=w.device, dtype=w.dtype)
    two_pass = torch.compile(lambda x: F.gelu(F.linear(x, w, b)), dynamic=False)

    def lt_tanh(x):
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)

    res = {"shape_mnk": [tokens, w.shape[0], w.shape[1]],
           "cublas_ms": cuda_median_s(lambda: F.linear(x, w, b), reps) * 1e3,
           "cublas_plus_gelu_compiled_ms": cuda_median_s(lambda: two_pass(x), reps) * 1e3,
           "cublaslt_tanh_epilogue_ms": cuda_median_s(lambda: lt_tanh(x), reps) * 1e3,
           "epilogue_autotuned_ms": cuda_median_s(lambda: linear_gelu(x, w, b), reps) * 1e3}
    for tile in GPU_TILES:
        name = "epilogue_" + "_".join(f"{k[0]}{v}" for k, v in zip(("m", "n", "k", "g", "w", "s"), tile)) + "_ms"
        try:  # a tile the GPU cannot hold (shared memory) fails alone
            res[name] = cuda_median_s(lambda: linear_gelu(x, w, b, tile), reps) * 1e3
        except Exception as err:
            res[name] = f"failed: {type(err).__name__}: {str(err)[:120]}"
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()))
    res["epilogue_max_abs_diff_vs_fp32"] = float((linear_gelu(x, w, b).float() - ref).abs().max())
    res["two_pass_max_abs_diff_vs_fp32"] = float((two_pass(x).float() - ref).abs().max())
    res["cublaslt_tanh_max_abs_diff_vs_fp32"] = float((lt_tanh(x).float() - ref).abs().max())  # vs the exact GELU
    torch._dynamo.reset()
    return res
