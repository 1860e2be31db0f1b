"""The GPU benchmark harness's code paths, run on CPU with CUDA timing stubbed: a device
round is short, and a Python error in it costs the whole round."""
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO))

from benchmarks import gpu  # noqa: E402
from benchmarks.memory_bank_gpu import bounded_rounds, order_keys  # noqa: E402

TINY = {"model_type": "dinov3_vit", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "patch_size": 16, "num_register_tokens": 4, "image_size": 224}


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """`.cuda()`, device="cuda" and CUDA timing become CPU no-ops / one plain call."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **k: None)
    randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda *a, device=None, **k: randint(*a, **k))
    monkeypatch.setattr(gpu, "cuda_median_s", lambda fn, reps, warmup=2: (fn(), 0.01)[1])
    monkeypatch.setattr(gpu, "attention_kernels", lambda model, pixels: [])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:CUDA is not available")  # the CPU stand-in's autocast / profiler
def test_architecture_figures_with_rope_baseline_and_fp8(cuda_on_cpu):
    res = gpu.architecture_figures("t", TINY, 2, 1, ("default", "coordinate-descent"), with_backbone=False,
                                   rope_baseline=True, fp8=True, patch_baseline=True)
    for name in ("patch_conv_compiled_default", "rope_per_layer_compiled_default", "compiled_default",
                 "compiled_coordinate-descent", "fp8_compiled_default"):
        assert res[f"t_{name}_img_s"] > 0 and res[f"t_{name}_first_call_s"] > 0
    assert res["t_fp8_linears"] == 4 * TINY["num_hidden_layers"]  # qkv (fused), o, fc1, fc2
    assert 0 < res["t_fp8_max_abs_dprob_vs_fp32"] < 0.05


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_architecture_figures_with_gelu_epilogue(cuda_on_cpu, monkeypatch):
    """The GELU-epilogue variant's control flow (the Triton kernel itself is checked in
    tests/kernel_check.py): MLPs swapped in, measured, and put back for what follows."""
    import torch.nn.functional as F

    from mirror_core import gelu_gemm

    calls = []

    def torch_linear_gelu(x, w, b=None, tile=None):
        calls.append(tile)
        return F.gelu(F.linear(x.float(), w.float(), None if b is None else b.float())).to(x.dtype)

    monkeypatch.setattr(gelu_gemm, "linear_gelu", torch_linear_gelu)
    res = gpu.architecture_figures("t", TINY, 2, 1, ("default",), with_backbone=False, gelu_epilogue=True, fp8=True)
    assert res["t_gelu_epilogue_mlps"] == TINY["num_hidden_layers"]
    assert res["t_gelu_epilogue_compiled_default_img_s"] > 0
    assert res["t_gelu_epilogue_max_abs_dprob_vs_bf16_weights"] < 0.05
    assert res["t_gelu_tanh_epilogue_mlps"] == TINY["num_hidden_layers"]  # cuBLASLt's epilogue (exact GELU on CPU)
    assert res["t_gelu_tanh_epilogue_compiled_default_img_s"] > 0
    assert res["t_gelu_tanh_epilogue_max_abs_dprob_vs_bf16_weights"] < 0.05
    fig = res["t_gelu_gemm"]
    assert fig["shape_mnk"] == [2 * (196 + 1 + TINY["num_register_tokens"]), 128, 64]
    assert all(isinstance(fig[f"epilogue_{n}"], float) for n in ("autotuned_ms", "m128_n256_k64_g8_w8_s3_ms"))
    assert fig["epilogue_max_abs_diff_vs_fp32"] < 0.05 and set(calls) >= {None, *gelu_gemm.GPU_TILES}
    assert fig["cublaslt_tanh_max_abs_diff_vs_fp32"] < 0.05 and isinstance(fig["cublaslt_tanh_epilogue_ms"], float)
    assert res["t_fp8_linears"] == 4 * TINY["num_hidden_layers"]  # the plain MLPs were put back


def test_kernel_method_names_parse():
    from mirror_core import kernels

    before = kernels.BLOCK_ROWS, kernels.NUM_WARPS, kernels.METHOD
    try:
        gpu.set_kernel_shape("bounded_r2_w4")
        assert (kernels.BLOCK_ROWS, kernels.NUM_WARPS, kernels.METHOD) == (2, 4, "bounded")
        gpu.set_kernel_shape("r1_w8")
        assert (kernels.BLOCK_ROWS, kernels.NUM_WARPS, kernels.METHOD) == (1, 8, "bounded")  # method kept
        gpu.set_kernel_shape("radix_r1_w16")
        assert (kernels.BLOCK_ROWS, kernels.NUM_WARPS, kernels.METHOD) == (1, 16, "radix")
        with pytest.raises(ValueError, match="unknown read-out kernel method"):
            gpu.set_kernel_shape("quickselect_r1_w8")
    finally:
        kernels.BLOCK_ROWS, kernels.NUM_WARPS, kernels.METHOD = before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_bounded_methods_bound_brackets_the_kth_key(dtype):
    """What the "bounded" kernel relies on: the k-th largest key shares its high bits with
    the row max above the rounds it runs."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 4096, generator=gen) * torch.logspace(-3, 1, 64)[:, None]).to(dtype)
    x[0] = -x[0].abs()  # all negative
    x[1] = 0.5  # all tied
    key = order_keys(x)
    kth = key.topk(128, dim=1).values[:, -1]
    rounds = bounded_rounds(x, 128)
    assert rounds.max() <= 16 and rounds[1] == 0
    assert torch.equal(kth >> rounds, key.amax(1) >> rounds)
    assert rounds.float().mean() < 16  # fewer than the bitwise method's


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_a_failing_variant_is_recorded_and_the_next_one_still_measured(cuda_on_cpu, monkeypatch):
    """A device round once lost its fp8 figures to a GELU-epilogue kernel that did not
    compile: each optional variant now fails on its own."""
    from mirror_core import gelu_gemm

    def refused(*args, **kwargs):
        raise RuntimeError("kernel refused by the compiler")

    monkeypatch.setattr(gelu_gemm, "linear_gelu", refused)
    res = gpu.architecture_figures("t", TINY, 2, 1, (), with_backbone=False, gelu_epilogue=True, fp8=True)
    assert res["t_gelu_epilogue_failed"] == "RuntimeError: kernel refused by the compiler"
    assert res["t_fp8_compiled_default_img_s"] > 0 and "t_fp8_failed" not in res
