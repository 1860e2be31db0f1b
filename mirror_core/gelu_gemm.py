"""A GELU MLP's first projection as one Triton GEMM with the exact GELU in its epilogue.

DINOv3 ViT-S/B/L blocks compute down(gelu(up(x))) with the exact (erf) GELU. Run as a
cuBLAS GEMM and a separate elementwise kernel, the [tokens, 4 x hidden] activation goes
to memory twice and is read once more in between; cuBLAS's own GELU epilogue is the tanh
approximation, not the model's function. Here the GEMM's fp32 accumulator gets the bias
and the exact GELU before it is stored, once, in 16 bits: the same function, products
summed in another order than cuBLAS's and the pre-activation not rounded to 16 bits
first (equal within 16-bit rounding). For 16-bit weights on CUDA; opt-in
(`gelu_epilogue_`): on Hopper it loses to cuBLAS + the separate pass (BENCHMARKS.md).

`gelu_epilogue_(..., approximate="tanh")` instead runs the GEMM in cuBLASLt with its own
GELU epilogue (`torch._addmm_activation`, kept whole by inductor), which is the tanh
approximation of GELU: a lossy variant (the "bf16-gelu-tanh" precision), measured with its
score deviation like fp8. Other devices compute the same tanh approximation in two steps
(torch's CPU `_addmm_activation` would compute the exact GELU: another function).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .fused import replace_submodule
from .kernels import FP_FUSION, triton_available


class GemmTile(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int  # output tiles that walk down the rows together, so their weight tiles stay in L2
    num_warps: int
    num_stages: int


# Launch shapes tried once per GEMM shape on a GPU (Triton's autotuner keeps the fastest):
# the usual Hopper/Ampere bf16 tiles. Tests on CPU pass a small tile explicitly.
GPU_TILES = (GemmTile(128, 256, 64, 8, 8, 3), GemmTile(128, 128, 64, 8, 8, 4),
             GemmTile(256, 128, 64, 8, 8, 3), GemmTile(128, 128, 64, 8, 4, 4))


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def linear_gelu_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, HAS_BIAS: tl.constexpr,
                           DOT_IN_FP32: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # y[M, N] = gelu(x[M, K] @ w[N, K]^T + b[N]), all row-major
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % rows_in_group
        pid_n = (pid % per_group) // rows_in_group
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        # rows past the end read row r % M (in bounds) and are never stored: no load masks on M, N
        x_ptrs = x_ptr + (rm % M)[:, None].to(tl.int64) * K + rk[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + (rn % N)[None, :].to(tl.int64) * K + rk[:, None]  # [BLOCK_K, BLOCK_N] of w^T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:  # no ragged last step: unmasked loads pipeline best
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                in_k = (k0 + rk) < K
                a = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=in_k[:, None], other=0.0)
            if DOT_IN_FP32:  # the same products: 16-bit values are exact in fp32
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        y = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
        out = y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

    return linear_gelu_kernel


@functools.cache
def _autotuned():
    import triton

    configs = [triton.Config({"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k,
                              "GROUP_M": t.group_m}, num_warps=t.num_warps, num_stages=t.num_stages)
               for t in GPU_TILES]
    even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})  # sees each config's BLOCK_K
    return triton.autotune(configs=configs, key=["M", "N", "K"])(even_k(_kernel()))


@torch.library.custom_op("mirror::linear_gelu", mutates_args=())
def _linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 tile: list[int] | None = None) -> torch.Tensor:
    import triton

    m, k = x.shape
    n = weight.shape[0]
    y = x.new_empty((m, n))
    args = (x, weight, bias if bias is not None else weight, y, m, n, k)
    # Off CUDA the kernel runs in Triton's interpreter, whose dot misreads 16-bit floats
    flags = {"HAS_BIAS": bias is not None, "DOT_IN_FP32": x.device.type != "cuda", "enable_fp_fusion": FP_FUSION}
    if tile is None:  # GPU: the autotuner's choice for this shape
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _autotuned()[grid](*args, **flags)
    else:
        t = GemmTile(*tile)
        grid = (triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n),)
        _kernel()[grid](*args, **flags, EVEN_K=k % t.block_k == 0, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                        BLOCK_K=t.block_k, GROUP_M=t.group_m, num_warps=t.num_warps, num_stages=t.num_stages)
    return y


@_linear_gelu.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: list[int] | None = None):
    return x.new_empty((x.shape[0], weight.shape[0]))


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                tile: GemmTile | None = None) -> torch.Tensor:
    """gelu(x @ weight^T + bias), exact GELU, for 16-bit x [M, K] and weight [N, K] of the
    same dtype -> [M, N] in that dtype. `tile`: a fixed launch shape (None: autotuned)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_gelu wants x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        raise ValueError(f"linear_gelu wants 16-bit x and weight of one dtype, got {x.dtype} and {weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{weight.shape[0]}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    return _linear_gelu(x.contiguous(), weight.contiguous(), bias, list(tile) if tile is not None else None)


class GeluEpilogueMLP(nn.Module):
    """DINOv3's GELU MLP, down(gelu(up(x))), with up + GELU as one `linear_gelu` call."""

    def __init__(self, mlp: nn.Module, tile: GemmTile | None = None):
        super().__init__()
        self.up_proj = mlp.up_proj
        self.down_proj = mlp.down_proj
        self.tile = tile

    def up_gelu(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, hidden] -> [tokens, 4 x hidden]
        return linear_gelu(x, self.up_proj.weight, self.up_proj.bias, self.tile)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_gelu(x.reshape(-1, x.shape[-1]))
        return self.down_proj(h.view(*x.shape[:-1], h.shape[-1]))  # [..., hidden]


class CublasGeluMLP(GeluEpilogueMLP):
    """DINOv3's GELU MLP with the tanh approximation of GELU: on CUDA up + GELU as one
    cuBLASLt GEMM and its GELU epilogue, elsewhere the same function in two steps."""

    def up_gelu(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return torch._addmm_activation(self.up_proj.bias, x, self.up_proj.weight.t(), use_gelu=True)
        return F.gelu(self.up_proj(x), approximate="tanh")


GELU_EPILOGUES = ("none", "tanh")  # as F.gelu's `approximate`: our exact Triton epilogue, cuBLASLt's tanh one


def gelu_epilogue_(backbone: nn.Module, tile: GemmTile | None = None, approximate: str = "none") -> int:
    """Replace every DINOv3 MLP whose activation is the exact GELU (and whose first
    projection has a bias) by GeluEpilogueMLP (`approximate="none"`) or CublasGeluMLP
    ("tanh"), in place (after the model is in its 16-bit dtype); returns how many were
    replaced. Gated (SwiGLU) MLPs, other activations and other families are left as they
    are (0)."""
    from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTMLP

    if approximate not in GELU_EPILOGUES:
        raise ValueError(f"approximate must be one of {GELU_EPILOGUES}, got {approximate!r}")
    if approximate == "none" and not triton_available():
        raise RuntimeError("the GELU epilogue is a Triton kernel: install the [gpu] extra (triton)")
    targets = [(name, m) for name, m in backbone.named_modules()
               if type(m) is DINOv3ViTMLP and m.config.hidden_act == "gelu" and m.up_proj.bias is not None]
    for name, module in targets:
        fused = GeluEpilogueMLP(module, tile) if approximate == "none" else CublasGeluMLP(module)
        replace_submodule(backbone, name, fused)
    return len(targets)
