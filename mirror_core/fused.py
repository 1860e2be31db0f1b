"""Inference-only fusions of a DINOv3 backbone (after LoRA is merged).

`fuse_projections_` replaces each attention's three q/k/v projections by one Linear of
three times the width, and a gated (SwiGLU) MLP's gate and up projections by one of twice
the width: one GEMM reads its input once instead of three (two) times. The key projection
has no bias in DINOv3; its third of the fused bias is zero, so the sums are the same
products (equal within float rounding). Scoring replicas on GPU use it; training and
weight export never see it (it changes the module names).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FusedQKVAttention(nn.Module):
    """DINOv3 self-attention with one q/k/v projection; same inputs and outputs as the module it replaces."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.qkv = _concat_linear([attention.q_proj, attention.k_proj, attention.v_proj])
        self.o_proj = attention.o_proj

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs):
        from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

        b, n, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, N, hd]
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), None


def _concat_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear computing the outputs of `parts` side by side (a missing bias is zero)."""
    ref = parts[0].weight
    fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=True,
                      device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        fused.bias.copy_(torch.cat([p.bias if p.bias is not None else torch.zeros_like(p.weight[:, 0]) for p in parts]))
    return fused


class FusedGatedMLP(nn.Module):
    """SwiGLU MLP with one gate+up projection: down(act(gate(x)) * up(x))."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_up = _concat_linear([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def fuse_projections_(backbone: nn.Module) -> int:
    """Fuse the projections of every DINOv3 attention and gated MLP in place; returns how
    many modules were replaced. Other families (DINOv2) are left as they are (0)."""
    from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTAttention, DINOv3ViTGatedMLP

    kinds = {DINOv3ViTAttention: FusedQKVAttention, DINOv3ViTGatedMLP: FusedGatedMLP}
    targets = [(name, m) for name, m in backbone.named_modules() if type(m) in kinds]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        setattr(parent, child, kinds[type(module)](module))
    return len(targets)
