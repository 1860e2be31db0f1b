"""The MIRROR forward written the way the official code computes it, for speed comparisons:
LoRA left unmerged (peft adapters), memory keys/values projected on every batch, a dense
masked softmax over all K slots, max and entropy over the dense matrix."""
from __future__ import annotations

import copy

import torch
from torch import nn

from mirror_core.backbone import attach_lora, load_lora_
from mirror_core.model import MirrorModel, to_pixels


class OfficialStyleMirror(nn.Module):
    def __init__(self, model: MirrorModel, lora: dict[str, torch.Tensor]):
        super().__init__()
        self.inner = copy.deepcopy(model)  # base weights, LoRA not merged
        load_lora_(attach_lora(self.inner.backbone, model.cfg.lora), lora)
        self.inner.eval()

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.inner
        cls, feats = m.features(to_pixels(images))
        bank = m.memory_bank
        b, n, d = feats.shape
        q = bank._split(bank.q_proj(feats))
        k = bank._split(bank.k_proj(bank.memory))  # every batch, as official
        v = bank._split(bank.v_proj(bank.memory))
        logits = torch.matmul(q, k.transpose(-1, -2)) * bank.scale
        kth = logits.topk(bank.cfg.top_k, dim=-1).values[..., -1:]
        attn = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        max_score = attn.amax(-1).mean((1, 2))
        entropy = (-(attn * torch.log(attn + 1e-9)).sum(-1)).mean((1, 2))
        ref = bank.out_proj(torch.matmul(attn, v).transpose(1, 2).reshape(b, n, d))
        return m.detector(max_score, entropy, (feats - ref).mean(1), cls)
