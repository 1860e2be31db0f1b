"""Inference-only fusions of a DINOv3 backbone (after LoRA is merged).

`precompute_rope_` computes the rotary embedding's cos/sin once for the patch grid every
scored crop has: torch.compile otherwise folds their computation into each layer's fused
RoPE kernel and evaluates sin and cos again for every query and key element. Same values
(the same module computes them, once). Every device uses it.

`fuse_projections_` replaces each attention's three q/k/v projections by one Linear of
three times the width, and a gated (SwiGLU) MLP's gate and up projections by one of twice
the width: one GEMM reads its input once instead of three (two) times. The key projection
has no bias in DINOv3; its third of the fused bias is zero, so the sums are the same
products (equal within float rounding). Scoring replicas on GPU use it; training and
weight export never see it (it changes the module names).

`patch_embedding_as_linear_` computes DINOv3's patch embedding, a convolution whose kernel
equals its stride, as one GEMM over the image cut into patches: the same products, summed
in another order. A convolution with 3 input channels keeps GPU convolution kernels far
below GEMM speed. GPU replicas use it too.
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


class PrecomputedRope(nn.Module):
    """DINOv3's rotary embedding with its eval-mode cos/sin for one input size kept as
    buffers; other sizes, and training (random coordinate jitter), compute them as usual."""

    def __init__(self, rope: nn.Module, image_size: int):
        super().__init__()
        self.rope = rope
        self.image_size = image_size
        ref = next(rope.buffers())
        pixels = torch.zeros(1, 3, image_size, image_size, device=ref.device)  # fp32: cast per call below
        was_training = rope.training
        with torch.no_grad():
            cos, sin = rope.eval()(pixels)  # [patches, head_dim]
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.train(was_training)  # a new module starts in training mode

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training or tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            return self.rope(pixel_values)
        return self.cos.to(pixel_values.dtype), self.sin.to(pixel_values.dtype)  # as the module casts


class PatchEmbeddingAsLinear(nn.Module):
    """A Conv2d with kernel = stride (no padding) as a Linear over flattened patches; same
    input [B, C, H, W] and output [B, hidden, H/p, W/p] (a view of the GEMM's result)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        kh, kw = conv.kernel_size
        if (kh, kw) != conv.stride or conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ValueError(f"not a patch embedding: {conv}")
        self.patch = (kh, kw)
        self.weight = nn.Parameter(conv.weight.detach().flatten(1), requires_grad=False)  # [hidden, C*kh*kw]
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixels.shape
        (kh, kw), gh, gw = self.patch, h // self.patch[0], w // self.patch[1]
        x = pixels[:, :, : gh * kh, : gw * kw].reshape(b, c, gh, kh, gw, kw)  # a remainder is dropped, as by the conv
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * kh * kw)  # [B, patches, C*kh*kw], the weight's order
        return F.linear(x, self.weight, self.bias).transpose(1, 2).unflatten(2, (gh, gw))  # [B, hidden, gh, gw]


def patch_embedding_as_linear_(backbone: nn.Module) -> bool:
    """Put PatchEmbeddingAsLinear in place of a DINOv3 backbone's patch convolution, in
    place; False for other families (DINOv2) or when already done."""
    embeddings = getattr(backbone, "embeddings", None)
    conv = getattr(embeddings, "patch_embeddings", None)
    if not isinstance(conv, nn.Conv2d):
        return False
    embeddings.patch_embeddings = PatchEmbeddingAsLinear(conv)
    return True


def precompute_rope_(backbone: nn.Module, image_size: int) -> bool:
    """Give a DINOv3 backbone cos/sin precomputed for image_size x image_size inputs, in
    place (after any dtype or device move); False for backbones without RoPE (DINOv2)."""
    rope = getattr(backbone, "rope_embeddings", None)
    if rope is None or isinstance(rope, PrecomputedRope):
        return False
    backbone.rope_embeddings = PrecomputedRope(rope, image_size)
    return True


def fuse_projections_(backbone: nn.Module) -> int:
    """Fuse the projections of every DINOv3 attention and gated MLP in place; returns how
    many modules were replaced. Other families (DINOv2) are left as they are (0)."""
    from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTAttention, DINOv3ViTGatedMLP

    kinds = {DINOv3ViTAttention: FusedQKVAttention, DINOv3ViTGatedMLP: FusedGatedMLP}
    targets = [(name, m) for name, m in backbone.named_modules() if type(m) in kinds]
    for name, module in targets:
        replace_submodule(backbone, name, kinds[type(module)](module))
    return len(targets)


def replace_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where root.get_submodule(name) was."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)
