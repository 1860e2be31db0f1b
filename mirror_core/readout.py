"""Sparse top-k read-out of the memory bank: three exact implementations of one function.

Given per-head queries q [H, R, hd] (already scaled), keys k and values v [H, K, hd]:
    logits = q k^T                      [H, R, K]
    w      = softmax over the top_k logits of each row, 0 elsewhere (fp32)
    mixed  = w v                        [H, R, hd]
    max_w, entropy = max_k w, -sum w log(w + 1e-9)   [H, R]

- `readout_dense`: the plain form (autograd-safe; any device).
- `readout_native`: inference on CPU, in fp32: the `mirror_core._readout` extension
  (csrc/topk_readout.cpp) computes a few rows of logits at a time in cache, finds each
  row's k-th value among a few candidates (torch.topk does a full selection: ~80% of
  `readout_cpu`'s time) and writes the softmax statistics and w v directly.
- `readout_cpu`: the same in torch ops (torch.topk + an embedding_bag over the kept
  slots), used where the extension was not built.
- `readout_gpu`: inference on CUDA with 16-bit logits: one Triton kernel finds each
  row's k-th value and writes the fp32 softmax over the slots at or above it (ties
  kept, as the official masked softmax does), then one batched matmul.

Heads lead the layout so that every product is a plain batched matmul: a [B, H, N, hd]
query against [H, hd, K] keys would make torch.matmul copy the keys B times.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch.nn import functional as F

from .config import ENTROPY_EPS
from .extensions import extension

log = logging.getLogger(__name__)

CPU_CHUNK_BYTES = 4 << 20  # logits per chunk: a few MB stays in L2


def _stats(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return weights.amax(dim=-1), -(weights * torch.log(weights + ENTROPY_EPS)).sum(-1)


def readout_dense(q, k, v, top_k: int):
    logits = torch.bmm(q, k.transpose(1, 2).to(q.dtype))  # [H, R, K]
    top_logits, top_idx = logits.topk(top_k, dim=-1, sorted=False)  # any order
    weights = F.softmax(top_logits.float(), dim=-1)  # [H, R, k]
    max_w, entropy = _stats(weights)
    # Reuse the logits buffer for the sparse attention matrix (no second [H, R, K] tensor).
    attn = logits.zero_().scatter_(-1, top_idx, weights.to(logits.dtype))
    return torch.bmm(attn, v.to(attn.dtype)), max_w, entropy


def readout_cpu(q, k, v, top_k: int, chunk_bytes: int = CPU_CHUNK_BYTES):
    h, r, hd = q.shape
    slots = k.shape[1]
    kt = k.transpose(1, 2).contiguous()  # [H, hd, K]
    table = v.reshape(h * slots, hd)  # embedding rows: head-major slots
    offsets = (torch.arange(h, device=q.device) * slots).view(h, 1, 1)
    mixed = q.new_empty(h, r, hd)
    max_w = q.new_empty(h, r, dtype=torch.float32)
    entropy = q.new_empty(h, r, dtype=torch.float32)
    step = max(1, chunk_bytes // (h * slots * q.element_size()))
    for s in range(0, r, step):
        e = min(r, s + step)
        logits = torch.bmm(q[:, s:e], kt)  # [H, rows, K]
        top_logits, top_idx = logits.topk(top_k, dim=-1, sorted=False)
        weights = F.softmax(top_logits.float(), dim=-1)
        max_w[:, s:e], entropy[:, s:e] = _stats(weights)
        bag = F.embedding_bag((top_idx + offsets).view(-1, top_k), table,
                              per_sample_weights=weights.to(table.dtype).view(-1, top_k), mode="sum")
        mixed[:, s:e] = bag.view(h, e - s, hd)
    return mixed, max_w, entropy


# Looked up once at import: the read-out's dispatch runs inside torch.compile'd graphs,
# where a call to a cached function is traced (and warned about) instead.
_NATIVE = extension("_readout")  # the compiled CPU read-out (csrc/)


def native_readout_module():
    return _NATIVE


# A torch custom op, so torch.compile keeps it as one opaque call (tracing into the
# .numpy() views and the extension broke the compiled graph's guards).
@torch.library.custom_op("mirror::topk_readout_cpu", mutates_args=())
def _topk_readout_cpu(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, top_k: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, r, hd = q.shape
    mixed, max_w, entropy = q.new_empty(h, r, hd), q.new_empty(h, r), q.new_empty(h, r)
    native_readout_module().topk_readout(q.numpy(), kt.numpy(), v.numpy(), mixed.numpy(), max_w.numpy(),
                                         entropy.numpy(), h, r, kt.shape[2], hd, top_k, ENTROPY_EPS,
                                         torch.get_num_threads())
    return mixed, max_w, entropy


@_topk_readout_cpu.register_fake
def _(q, kt, v, top_k):
    h, r, hd = q.shape
    return q.new_empty(h, r, hd), q.new_empty(h, r), q.new_empty(h, r)


def readout_native(q, k, v, top_k: int):
    """fp32 throughout (16-bit inputs under CPU autocast are widened); w v in q's dtype."""
    dtype = q.dtype
    q, v = q.detach().float().contiguous(), v.detach().float().contiguous()
    kt = k.detach().float().transpose(1, 2).contiguous()  # [H, hd, K]: slots along the vector lanes
    mixed, max_w, entropy = _topk_readout_cpu(q, kt, v, top_k)
    return mixed.to(dtype), max_w, entropy


def readout_gpu(q, k, v, top_k: int):
    from .kernels import threshold_softmax_

    logits = torch.bmm(q, k.transpose(1, 2).to(q.dtype))  # [H, R, K], 16-bit
    h, r, slots = logits.shape
    weights, max_w, entropy = threshold_softmax_(logits.view(h * r, slots), top_k)
    return torch.bmm(weights.view(h, r, slots), v.to(weights.dtype)), max_w.view(h, r), entropy.view(h, r)


def gpu_readout_available(q: torch.Tensor) -> bool:
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    from .kernels import triton_available

    return triton_available()


def inference_readout(device: str | torch.device, autocast_16bit: bool) -> str:
    """Which read-out `sparse_readout` runs for inference on `device`, in words (recorded
    by scans and the benchmark: a fallback must never pass unnoticed)."""
    if torch.device(device).type == "cpu":
        ext = native_readout_module()
        return f"extension ({ext.isa()})" if ext else "torch.topk (extension not built)"
    from .kernels import triton_available

    return "triton" if autocast_16bit and triton_available() else "dense masked softmax"


@functools.cache  # once per process
def _warn_no_extension() -> None:
    log.warning("the mirror_core._readout extension is not built (no C++ compiler when this package was installed?): "
                "the CPU read-out falls back to torch.topk: same scores, a slower model")


def sparse_readout(q, k, v, top_k: int):
    """Pick the fastest exact implementation for these tensors."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return readout_dense(q, k, v, top_k)
    if q.device.type == "cpu":
        if native_readout_module() is None:
            _warn_no_extension()
            return readout_cpu(q, k, v, top_k)
        return readout_native(q, k, v, top_k)
    if gpu_readout_available(q):
        return readout_gpu(q, k, v, top_k)
    return readout_dense(q, k, v, top_k)
