"""MemoryBank: reconstructs an "ideal reference" of patch features from real-image prototypes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import MemoryConfig
from .readout import sparse_readout


@dataclass
class MemoryOutput:
    reference: torch.Tensor  # [B, N, D] reconstructed features F^
    max_score: torch.Tensor  # [B] mean over heads/tokens of max_k A
    entropy: torch.Tensor  # [B] mean over heads/tokens of the attention entropy


class MemoryBank(nn.Module):
    """Sparse top-k multi-head attention from tokens to K learned memory slots.

    Keys and values depend only on the memory, so in inference they are
    projected once and cached; the cache drops whenever weights may change
    (train mode, state-dict load, device/dtype moves).
    """

    def __init__(self, dim: int, cfg: MemoryConfig):
        super().__init__()
        if dim % cfg.num_heads:
            raise ValueError(f"width {dim} is not divisible by {cfg.num_heads} memory heads")
        if not 0 < cfg.top_k <= cfg.num_slots:
            raise ValueError(f"top_k={cfg.top_k} must be in 1..num_slots={cfg.num_slots}")
        self.cfg = cfg
        self.num_heads = cfg.num_heads
        self.head_dim = dim // cfg.num_heads
        self.scale = self.head_dim**-0.5
        self.memory = nn.Parameter(torch.empty(cfg.num_slots, dim))
        nn.init.orthogonal_(self.memory)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=True)
        self._kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._register_load_state_dict_pre_hook(lambda *a, **k: self.clear_cache())

    def clear_cache(self) -> None:
        self._kv_cache = None

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # [..., L, D] -> [..., H, L, hd]
        *lead, length, _ = x.shape
        return x.view(*lead, length, self.num_heads, self.head_dim).transpose(-3, -2)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [H, K, hd] each; cached when nothing can change them."""
        needs_grad = torch.is_grad_enabled() and (self.training or self.memory.requires_grad)
        if needs_grad:
            return self._split(self.k_proj(self.memory)), self._split(self.v_proj(self.memory))
        if self._kv_cache is None:
            # In the parameters' own dtype whatever autocast says: the cache must not
            # depend on which precision happened to ask first (autocast casts it per use).
            with torch.no_grad(), torch.autocast(self.memory.device.type, enabled=False):
                k, v = self._split(self.k_proj(self.memory)), self._split(self.v_proj(self.memory))
            # Kept in the layouts the read-outs multiply with, k^T [H, hd, K] and v [H, K, hd]
            # contiguous, so no forward copies them again.
            self._kv_cache = (k.transpose(1, 2).contiguous().transpose(1, 2), v.contiguous())
        return self._kv_cache

    def forward(self, tokens: torch.Tensor) -> MemoryOutput:
        b, n, d = tokens.shape
        k, v = self.keys_values()  # [H, K, hd]
        # Scaling q, not the [.., K] logits, saves a K-wide pass.
        q = (self.q_proj(tokens) * self.scale).view(b * n, self.num_heads, self.head_dim).transpose(0, 1)
        mixed, max_w, entropy = sparse_readout(q.contiguous(), k, v, self.cfg.top_k)  # [H, B*N, hd], [H, B*N]
        reference = self.out_proj(mixed.transpose(0, 1).reshape(b, n, d))
        return MemoryOutput(
            reference=reference,
            max_score=max_w.view(-1, b, n).mean(dim=(0, 2)),  # [B]: mean over heads and tokens
            entropy=entropy.view(-1, b, n).mean(dim=(0, 2)),
        )
