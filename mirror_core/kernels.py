"""Triton kernel for the GPU read-out: k-th value, thresholded softmax, max and entropy.

One program takes BLOCK_R rows of 16-bit logits (fp16 / bf16) and, in registers:
1. maps each value to a 16-bit key with the same order (sign-magnitude -> unsigned),
2. finds the k-th largest key bit by bit (rounds of count(key >= candidate)),
3. writes softmax weights (computed in fp32) over the entries at or above it, 0
   elsewhere, over the logits in place, and each row's max weight and entropy.
Entries tied with the k-th value are all kept, as the official masked softmax
(`logits < kth -> -inf`) keeps them.

Step 2 has three methods (`METHODS`): "bitwise" runs all 16 rounds; "bounded" first
brackets the k-th key between a lower bound and the row's largest key and runs only
the rounds for the bits in which the two differ (their common high bits are the k-th
key's too). The bound: split the row into NB >= k strided blocks; their maxima are NB
distinct entries, so the smallest of them has at least k entries at or above it.
Each round is a reduction over the whole row, which is what the kernel's time goes to.
"radix" (one row per program) replaces the 16 rounds by two histograms of 256 bins: the
keys' high bytes give the k-th key's high byte (the largest b with count(high >= b) >= k),
the low bytes of the keys sharing it give the rest, the same key as the rounds find.
"""
from __future__ import annotations

import functools

import torch

from .config import ENTROPY_EPS

# Triton's default (FMA contraction on), named at every launch: Triton 3.9 warns on the
# console of every process that leaves it to the default.
FP_FUSION = True
BLOCK_ROWS = 1  # launch shape defaults (0 in the arguments below), the fastest of a sweep on an H100
NUM_WARPS = 8  # warps per program for rows of 2048+ slots (4 below)
METHODS = ("bitwise", "bounded", "radix")
METHOD = "bitwise"  # the default selection method ("" in the arguments below)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or no usable backend
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def threshold_softmax_kernel(x_ptr, max_ptr, ent_ptr, n_rows, n_cols, TOP_K: tl.constexpr,
                                 BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, EPS: tl.constexpr,
                                 BOUND_BLOCKS: tl.constexpr, RADIX: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        valid = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        ptrs = x_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        x = tl.load(ptrs, mask=valid, other=0.0)
        bits = x.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended
        key = (bits ^ ((bits >> 15) & 0x7FFF)) + 32768  # float order -> 0..65535
        key = tl.where(valid, key, -1)  # padding never counts, never kept
        if RADIX:  # one row: its k-th key byte by byte, from two histograms
            row = tl.reshape(key, [BLOCK_C])
            byte = tl.arange(0, 256)
            high = row >> 8  # padding (-1) stays -1: masked out below
            counts = tl.histogram(high, 256, mask=row >= 0)
            at_or_above = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts  # count(high >= b)
            kth_high = tl.max(tl.where(at_or_above >= TOP_K, byte, 0), axis=0)
            above = tl.sum(tl.where(byte > kth_high, counts, 0), axis=0)  # keys of a higher byte, all kept
            counts = tl.histogram(row & 255, 256, mask=high == kth_high)
            at_or_above = above + tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
            kth_low = tl.max(tl.where(at_or_above >= TOP_K, byte, 0), axis=0)
            kth = tl.zeros([BLOCK_R], dtype=tl.int32) + (kth_high * 256 + kth_low)
            row_max = tl.max(tl.where(valid, x.to(tl.float32), float("-inf")), axis=1)
        elif BOUND_BLOCKS > 0:  # "bounded": only the bits in which a lower bound and the max differ
            block_max = tl.max(tl.reshape(key, [BLOCK_R, BLOCK_C // BOUND_BLOCKS, BOUND_BLOCKS]), axis=1)
            lo = tl.maximum(tl.min(block_max, axis=1), 0)  # [BLOCK_R], <= the k-th key
            hi = tl.max(block_max, axis=1)  # the row's largest key
            diff = lo ^ hi
            n_bits = tl.zeros([BLOCK_R], dtype=tl.int32)
            for bit in tl.static_range(16):
                n_bits += ((diff >> bit) != 0).to(tl.int32)
            kth = lo & ~((1 << n_bits) - 1)  # the common high bits, the rest 0
            rounds = tl.max(n_bits, axis=0)
            for i in range(rounds):  # rows needing fewer rounds: their extra candidates exceed hi, never taken
                cand = kth | (1 << (rounds - 1 - i))
                count = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
                kth = tl.where(count >= TOP_K, cand, kth)
            top = hi - 32768  # the largest key back to its float
            row_max = (top ^ ((top >> 15) & 0x7FFF)).to(tl.int16).to(x.dtype, bitcast=True).to(tl.float32)
        else:  # "bitwise": the largest t with count(key >= t) >= TOP_K, all 16 bits
            kth = tl.zeros([BLOCK_R], dtype=tl.int32)
            for bit in tl.static_range(15, -1, -1):
                cand = kth | (1 << bit)
                count = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
                kth = tl.where(count >= TOP_K, cand, kth)
            row_max = tl.max(tl.where(valid, x.to(tl.float32), float("-inf")), axis=1)
        keep = key >= kth[:, None]
        p = tl.where(keep, tl.exp(x.to(tl.float32) - row_max[:, None]), 0.0)
        total = tl.where(rows < n_rows, tl.sum(p, axis=1), 1.0)  # >= 1 in a real row: its max weighs exp(0)
        w = p / total[:, None]
        entropy = -tl.sum(w * tl.log(w + EPS), axis=1)
        tl.store(ptrs, w.to(x.dtype), mask=valid)
        tl.store(max_ptr + rows, 1.0 / total, mask=rows < n_rows)  # the max's weight
        tl.store(ent_ptr + rows, entropy, mask=rows < n_rows)

    return threshold_softmax_kernel


@torch.library.custom_op("mirror::threshold_softmax_", mutates_args=("logits",))
def _threshold_softmax(logits: torch.Tensor, top_k: int, block_rows: int = 0, num_warps: int = 0,
                       method: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    import triton

    rows, cols = logits.shape
    max_w = torch.empty(rows, device=logits.device, dtype=torch.float32)
    entropy = torch.empty_like(max_w)
    block_c = triton.next_power_of_2(cols)
    block_rows = block_rows or BLOCK_ROWS
    num_warps = num_warps or (NUM_WARPS if block_c >= 2048 else 4)
    method = method or METHOD
    bound_blocks = min(triton.next_power_of_2(top_k), block_c) if method == "bounded" else 0
    grid = (triton.cdiv(rows, block_rows),)
    _kernel()[grid](logits, max_w, entropy, rows, cols, TOP_K=top_k, BLOCK_C=block_c, BLOCK_R=block_rows,
                    EPS=ENTROPY_EPS, BOUND_BLOCKS=bound_blocks, RADIX=method == "radix", num_warps=num_warps,
                    enable_fp_fusion=FP_FUSION)
    return max_w, entropy


@_threshold_softmax.register_fake
def _(logits: torch.Tensor, top_k: int, block_rows: int = 0, num_warps: int = 0, method: str = ""):
    rows = logits.shape[0]
    return logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, dtype=torch.float32)


def threshold_softmax_(logits: torch.Tensor, top_k: int, block_rows: int = 0, num_warps: int = 0, method: str = ""
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [R, K] fp16/bf16, contiguous -> (the same tensor now holding the weights,
    max weight [R], entropy [R]); both statistics in fp32. block_rows / num_warps / method:
    launch shape and selection method (0 / "" = the module defaults)."""
    if logits.dtype not in (torch.float16, torch.bfloat16) or logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError(f"threshold_softmax_ wants contiguous 2-D fp16/bf16 logits, got {logits.dtype} {tuple(logits.shape)}")
    if not 0 < top_k <= logits.shape[1]:
        raise ValueError(f"top_k={top_k} must be in 1..{logits.shape[1]}")
    if method and method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if (method or METHOD) == "radix" and (block_rows or BLOCK_ROWS) != 1:
        raise ValueError(f"the radix method takes one row per program, got block_rows={block_rows or BLOCK_ROWS}")
    max_w, entropy = _threshold_softmax(logits, top_k, block_rows, num_warps, method)
    return logits, max_w, entropy
