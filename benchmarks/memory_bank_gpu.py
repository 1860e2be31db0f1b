"""Memory-bank read-out on a GPU, piece by piece (exploration kept for the record).

    python benchmarks/memory_bank_gpu.py [--batch 256]

DINOv3-L size (D 1024, 8 heads, 4096 slots, top-128, 200 tokens), bf16 autocast: the
Triton read-out against the plain top-k + scatter + matmul one, each checked against
an fp32 run of the plain math; the kernel alone for each selection method and launch shape.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu import cuda_median_s, figure  # noqa: E402
from mirror_core import kernels, readout  # noqa: E402
from mirror_core.config import MemoryConfig  # noqa: E402
from mirror_core.kernels import threshold_softmax_  # noqa: E402
from mirror_core.memory import MemoryBank  # noqa: E402


def order_keys(logits: torch.Tensor) -> torch.Tensor:
    """16-bit logits -> the kernel's int keys 0..65535 in the same order (as its first lines map them)."""
    bits = logits.view(torch.int16).int()
    return (bits ^ ((bits >> 15) & 0x7FFF)) + 32768


def bounded_rounds(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Counting rounds the "bounded" kernel method runs per row of 16-bit logits [R, K]
    (the bits in which its lower bound and the row max differ; "bitwise" always runs 16)."""
    key = order_keys(logits)
    blocks = min(1 << (top_k - 1).bit_length(), key.shape[1])
    block_max = key.view(key.shape[0], -1, blocks).amax(1)
    diff = block_max.amin(1).clamp(min=0) ^ block_max.amax(1)
    return sum(((diff >> b) != 0).int() for b in range(16))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rows", default="1,2", help="rows per program to sweep (4 and 8 spill registers: slow to compile and run)")
    p.add_argument("--best-to", help="write the fastest kernel method and launch shape (e.g. bounded_r1_w8) to this file")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    dim, n, b = 1024, 200, args.batch
    bank = MemoryBank(dim, MemoryConfig()).cuda().eval()
    tokens = torch.randn(b, n, dim, device="cuda")
    ms = lambda fn: 1e3 * cuda_median_s(fn, args.reps)  # noqa: E731
    res = {"batch": b}

    def put(name: str, value):  # a figure in the JSON and, as soon as measured, on stderr
        res[name] = value
        figure(name, value)

    with torch.inference_mode():
        exact = bank(tokens)  # fp32: the plain top-k path
        figure("fp32_reference_done", True)
        k, v = bank.keys_values()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast = bank(tokens)
            q = (bank.q_proj(tokens) * bank.scale).view(b * n, 8, 128).transpose(0, 1).contiguous()
            put("bank_triton_ms", ms(lambda: bank(tokens)))
            put("readout_triton_ms", ms(lambda: readout.readout_gpu(q, k, v, 128)))
            put("readout_dense_ms", ms(lambda: readout.readout_dense(q, k, v, 128)))
            kb = k.transpose(1, 2).to(q.dtype)
            logits = torch.bmm(q, kb)
            put("logits_bmm_ms", ms(lambda: torch.bmm(q, kb)))
            put("topk_ms", ms(lambda: logits.topk(128, dim=-1, sorted=False)))
            flat = logits.view(-1, 4096)
            put("bounded_mean_rounds", float(bounded_rounds(flat, 128).float().mean()))
            copy_ms = ms(lambda: flat.clone())  # each kernel call below works on a fresh copy
            put("kernel_ms", ms(lambda: threshold_softmax_(flat.clone(), 128)) - copy_ms)
            res["kernel_gb_s"] = 2 * flat.numel() * 2 / (res["kernel_ms"] / 1e3) / 1e9
            sweep = {}
            for method in kernels.METHODS:
                for rows in map(int, args.rows.split(",")):
                    if method == "radix" and rows != 1:
                        continue  # one row per program by design (kernels.threshold_softmax_)
                    for warps in (4, 8, 16):
                        name = f"{method}_r{rows}_w{warps}"
                        try:
                            sweep[name] = ms(lambda: threshold_softmax_(flat.clone(), 128, rows, warps, method)) - copy_ms
                        except Exception as err:  # noqa: BLE001 - e.g. out of registers
                            sweep[name] = f"{type(err).__name__}"
                        figure(f"kernel_{name}_ms", sweep[name])
            res["kernel_sweep_ms"] = sweep
            timed = {k: t for k, t in sweep.items() if isinstance(t, float)}
            res["kernel_best"] = min(timed, key=timed.get)
            dense = readout.readout_dense(q, k, v, 128)
    res["per_image_us_triton"] = 1e3 * res["bank_triton_ms"] / b
    res["triton_vs_fp32_max_abs_dref"] = float((fast.reference.float() - exact.reference).abs().max())
    res["triton_vs_fp32_max_abs_dentropy"] = float((fast.entropy - exact.entropy).abs().max())
    res["triton_vs_fp32_max_abs_dmax"] = float((fast.max_score - exact.max_score).abs().max())
    res["dense_bf16_vs_triton_max_abs_dmixed"] = float((dense[0].float() - readout.readout_gpu(q, k, v, 128)[0].float()).abs().max())
    print(json.dumps(res, indent=2))
    if args.best_to:
        Path(args.best_to).write_text(res["kernel_best"])


if __name__ == "__main__":
    main()
