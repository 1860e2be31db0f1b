"""Memory-bank variants on a GPU (exploration kept for the record; see BENCHMARKS.md).

    python benchmarks/memory_bank_gpu.py [--rows-batch 256]

Times the pieces of the sparse top-k read-out at DINOv3-L size (D 1024, 8 heads,
4096 slots, top-128, 200 tokens) in bf16, and whole-forward variants, each checked
against the current MemoryBank.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu import cuda_median_s  # noqa: E402
from mirror_core.config import MemoryConfig  # noqa: E402
from mirror_core.memory import ENTROPY_EPS, MemoryBank  # noqa: E402


def threshold_variant(bank: MemoryBank, tokens: torch.Tensor):
    """Dense masked softmax at the k-th value (the reference's own form), fused by compile."""
    b, n, d = tokens.shape
    k, v = bank.keys_values()
    q = bank._split(bank.q_proj(tokens)) * bank.scale
    logits = torch.matmul(q, k.transpose(-1, -2).to(q.dtype))
    kth = logits.topk(bank.cfg.top_k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    z = logits.float()
    z = torch.where(z >= kth.float(), z - z.amax(-1, keepdim=True), float("-inf"))
    e = z.exp()
    w = e / e.sum(-1, keepdim=True)
    max_score = w.amax(-1).mean((1, 2))
    entropy = -(w * torch.log(w + ENTROPY_EPS)).sum(-1).mean((1, 2))
    mixed = torch.matmul(w.to(q.dtype), v.to(q.dtype))
    return bank.out_proj(mixed.transpose(1, 2).reshape(b, n, d)), max_score, entropy


def chunked_variant(bank: MemoryBank, tokens: torch.Tensor, images_per_chunk: int):
    outs = [bank(tokens[i : i + images_per_chunk]) for i in range(0, tokens.shape[0], images_per_chunk)]
    return (torch.cat([o.reference for o in outs]), torch.cat([o.max_score for o in outs]),
            torch.cat([o.entropy for o in outs]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    dim, n, b = 1024, 200, args.batch
    bank = MemoryBank(dim, MemoryConfig(4096, 8, 128)).cuda().eval()
    tokens = torch.randn(b, n, dim, device="cuda")
    res = {}
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = bank(tokens)
        k, v = bank.keys_values()
        q = bank._split(bank.q_proj(tokens)) * bank.scale
        logits = torch.matmul(q, k.transpose(-1, -2))
        res["logits_matmul_ms"] = 1e3 * cuda_median_s(lambda: torch.matmul(q, k.transpose(-1, -2)), args.reps)
        res["topk_bf16_ms"] = 1e3 * cuda_median_s(lambda: logits.topk(128, dim=-1, sorted=False), args.reps)
        lf = logits.float()
        res["topk_fp32_ms"] = 1e3 * cuda_median_s(lambda: lf.topk(128, dim=-1, sorted=False), args.reps)
        tl, ti = logits.topk(128, dim=-1, sorted=False)
        res["zero_scatter_ms"] = 1e3 * cuda_median_s(lambda: logits.clone().zero_().scatter_(-1, ti, tl), args.reps)
        res["attn_v_matmul_ms"] = 1e3 * cuda_median_s(lambda: torch.matmul(logits, v), args.reps)
        res["current_ms"] = 1e3 * cuda_median_s(lambda: bank(tokens), args.reps)
        for chunk in (16, 32, 64):
            res[f"chunked_{chunk}_ms"] = 1e3 * cuda_median_s(lambda: chunked_variant(bank, tokens, chunk), args.reps)
        out = threshold_variant(bank, tokens)
        res["threshold_eager_ms"] = 1e3 * cuda_median_s(lambda: threshold_variant(bank, tokens), args.reps)
        compiled = torch.compile(threshold_variant, dynamic=False)
        compiled(bank, tokens)
        res["threshold_compiled_ms"] = 1e3 * cuda_median_s(lambda: compiled(bank, tokens), args.reps)
        res["threshold_max_abs_dref"] = float((out[0].float() - ref.reference.float()).abs().max())
        res["threshold_max_abs_dentropy"] = float((out[2] - ref.entropy).abs().max())
        cbank = torch.compile(bank, dynamic=False)
        cbank(tokens)
        res["current_compiled_ms"] = 1e3 * cuda_median_s(lambda: cbank(tokens), args.reps)
    res["per_image_us_current"] = 1e3 * res["current_ms"] / b
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
