"""Checks of the Triton read-out kernel, run as a script so that TRITON_INTERPRET can be
set before Triton loads (CPU machines run the kernel in Triton's interpreter).

    TRITON_INTERPRET=1 python tests/kernel_check.py cpu
    python tests/kernel_check.py cuda
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mirror_core.gelu_gemm import GemmTile, gelu_epilogue_, linear_gelu  # noqa: E402
from mirror_core.kernels import threshold_softmax_  # noqa: E402
from mirror_core.readout import readout_dense, readout_gpu  # noqa: E402


def masked_softmax(x: torch.Tensor, k: int):
    """The official form: everything below the k-th value -> -inf, softmax, stats."""
    x = x.float()
    kth = x.topk(k, dim=-1).values[..., -1:]
    w = torch.softmax(x.masked_fill(x < kth, float("-inf")), dim=-1)
    return w, w.amax(-1), -(w * torch.log(w + 1e-9)).sum(-1)


def hard_rows(rows: int, cols: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = (torch.randn(rows, cols, generator=gen) * 3).to(dtype)
    x[0, :12] = x[0, 7]  # a run of ties, likely straddling the k-th value in 16 bits
    x[-1, -5:] = -x[-1, -5:].abs() - 100  # very negative values
    if rows > 2:
        x[1] = -x[1].abs() - 0.5  # all negative: the bound and the max share the sign bit
    if rows > 3:
        x[2] = 1.25  # all tied: the bound equals the max, no round at all
    if rows > 4:
        x[3, 1::2] = -x[3, 1::2].abs() * 1e-3  # signs and exponents far apart
    return x


def check_kernel(device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype, method, rows_per_program in ((torch.float16, "bitwise", 1), (torch.bfloat16, "bitwise", 1),
                                            (torch.float16, "bounded", 1), (torch.bfloat16, "bounded", 1),
                                            (torch.bfloat16, "bounded", 4), (torch.float16, "radix", 1),
                                            (torch.bfloat16, "radix", 1)):
        for rows, cols, k in ((5, 300, 32), (6, 4096, 128), (3, 64, 64), (1, 50, 1), (7, 200, 100)):
            x = hard_rows(rows, cols, dtype, gen)
            w_ref, max_ref, ent_ref = masked_softmax(x, k)
            w, max_w, ent = threshold_softmax_(x.clone().to(device), k, rows_per_program, 0, method)
            w = w.float().cpu()
            # kept = weight > 0 once stored in 16 bits (the smallest weights underflow there)
            assert torch.equal(w > 0, w_ref.to(dtype) > 0), (dtype, method, rows, cols, k, "kept entries differ")
            tol = 4e-3 if dtype == torch.bfloat16 else 5e-4  # weights are stored in 16 bits
            torch.testing.assert_close(w, w_ref, atol=tol, rtol=0)
            torch.testing.assert_close(max_w.cpu(), max_ref, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(ent.cpu(), ent_ref, atol=1e-5, rtol=1e-5)
    try:
        threshold_softmax_(torch.zeros(2, 8, device=device, dtype=torch.bfloat16), 2, method="quickselect")
    except ValueError as err:
        assert "method" in str(err)
    else:
        raise AssertionError("an unknown method was accepted")
    try:
        threshold_softmax_(torch.zeros(2, 8, device=device, dtype=torch.bfloat16), 2, 2, method="radix")
    except ValueError as err:
        assert "one row per program" in str(err)
    else:
        raise AssertionError("radix with two rows per program was accepted")
    try:
        threshold_softmax_(torch.zeros(2, 8, device=device), 2)
    except ValueError as err:
        assert "fp16/bf16" in str(err)
    else:
        raise AssertionError("fp32 logits were accepted")


def check_readout(device: str) -> None:
    gen = torch.Generator().manual_seed(1)
    heads, rows, slots, hd, k = 4, 37, 512, 16, 64
    q, keys, values = (torch.randn(heads, n, hd, generator=gen) for n in (rows, slots, slots))
    q = q * 0.5
    mixed_ref, max_ref, ent_ref = readout_dense(q, keys, values, k)  # fp32
    mixed, max_w, ent = readout_gpu(q.to(device, torch.bfloat16), keys.to(device), values.to(device), k)
    torch.testing.assert_close(mixed.float().cpu(), mixed_ref, atol=0.05, rtol=0.05)
    torch.testing.assert_close(max_w.cpu(), max_ref, atol=0.02, rtol=0.05)
    torch.testing.assert_close(ent.cpu(), ent_ref, atol=0.02, rtol=0.02)


SMALL_TILE = GemmTile(32, 32, 32, 2, 4, 1)  # the interpreter's cost grows with the tile


def check_linear_gelu(device: str) -> None:
    """The GEMM + exact-GELU kernel against fp32 torch, ragged and even shapes, with and
    without bias; then a DINOv3 backbone with it against the same backbone without."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.bfloat16, torch.float16):
        for m, k, n, bias in ((70, 96, 80, True), (64, 64, 128, False), (33, 40, 36, True)):
            # None: autotuned over GPU_TILES (CUDA only: the autotuner needs a GPU driver), once
            tiles = (SMALL_TILE, None) if device == "cuda" and (dtype, m) == (torch.bfloat16, 70) else (SMALL_TILE,)
            x = torch.randn(m, k, generator=gen).to(dtype)
            w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
            b = torch.randn(n, generator=gen).to(dtype) if bias else None
            ref = F.gelu(x.float() @ w.float().T + (b.float() if bias else 0))
            for tile in tiles:
                y = linear_gelu(x.to(device), w.to(device), b.to(device) if bias else None, tile)
                assert y.dtype == dtype and y.shape == (m, n), (y.dtype, y.shape)
                # one 16-bit rounding of the output (the interpreter may truncate to bf16: a whole ulp)
                rtol = 2**-7 if dtype == torch.bfloat16 else 2**-10
                torch.testing.assert_close(y.float().cpu(), ref, atol=1e-4, rtol=rtol)
    for bad in (lambda: linear_gelu(torch.zeros(4, 8, device=device), torch.zeros(4, 8, device=device)),
                lambda: linear_gelu(torch.zeros(4, 8, device=device, dtype=torch.bfloat16),
                                    torch.zeros(4, 6, device=device, dtype=torch.bfloat16))):
        try:
            bad()
        except ValueError:
            continue
        raise AssertionError("linear_gelu accepted a wrong input")
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          patch_size=16, image_size=64, num_register_tokens=2, hidden_act="gelu")
    backbone = DINOv3ViTModel(cfg).to(device, torch.bfloat16).eval()
    pixels = torch.randn(3, 3, 64, 64, generator=gen).to(device, torch.bfloat16)
    with torch.inference_mode():
        ref = backbone(pixel_values=pixels).last_hidden_state.float()
        assert gelu_epilogue_(backbone, SMALL_TILE) == 2
        out = backbone(pixel_values=pixels).last_hidden_state.float()
        torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)  # compiled: the harness's --gelu-epilogue


def check_cublas_gelu(device: str) -> None:
    """gelu_epilogue_(approximate="tanh"): cuBLASLt's GELU epilogue on CUDA, the same
    tanh approximation in two steps elsewhere, in a DINOv3 backbone."""
    import torch.nn.functional as F
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from mirror_core.gelu_gemm import CublasGeluMLP

    gen = torch.Generator().manual_seed(3)
    cfg = DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          patch_size=16, image_size=64, num_register_tokens=2, hidden_act="gelu")
    backbone = DINOv3ViTModel(cfg).to(device, torch.bfloat16).eval()
    mlp = backbone.model.layer[0].mlp
    x = torch.randn(2, 20, 64, generator=gen).to(device, torch.bfloat16)
    with torch.inference_mode():
        up = F.linear(x.float(), mlp.up_proj.weight.float(), mlp.up_proj.bias.float())
        ref = F.linear(F.gelu(up, approximate="tanh"), mlp.down_proj.weight.float(), mlp.down_proj.bias.float())
        out = CublasGeluMLP(mlp)(x).float()
        torch.testing.assert_close(out, ref, atol=0.03, rtol=0.02)
        pixels = torch.randn(3, 3, 64, 64, generator=gen).to(device, torch.bfloat16)
        plain = backbone(pixel_values=pixels).last_hidden_state.float()
        assert gelu_epilogue_(backbone, approximate="tanh") == 2
        assert all(type(layer.mlp) is CublasGeluMLP for layer in backbone.model.layer)
        torch.testing.assert_close(backbone(pixel_values=pixels).last_hidden_state.float(), plain, atol=0.05, rtol=0.05)


if __name__ == "__main__":
    dev = sys.argv[1]
    check_kernel(dev)
    check_readout(dev)
    check_linear_gelu(dev)
    check_cublas_gelu(dev)
    print("kernel checks passed on", dev)
