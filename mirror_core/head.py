"""DualBranchHead: perplexity evidence + residual evidence + CLS -> real/fake logits."""
from __future__ import annotations

import torch
from torch import nn

from .config import HeadConfig


class DualBranchHead(nn.Module):
    # Module indices match the official state dict: perplexity_mlp.0,
    # residual_mlp.{0,3}, head.{0,3}.
    def __init__(self, dim: int, cfg: HeadConfig):
        super().__init__()
        self.perplexity_mlp = nn.Sequential(nn.Linear(2, cfg.perplexity_dim), nn.ReLU())
        self.residual_mlp = nn.Sequential(
            nn.Linear(dim, cfg.residual_hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.residual_hidden, cfg.residual_dim),
        )
        self.head = nn.Sequential(
            nn.Linear(cfg.perplexity_dim + cfg.residual_dim + dim, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.num_classes),
        )

    def forward(
        self,
        max_score: torch.Tensor,  # [B]
        entropy: torch.Tensor,  # [B]
        residual: torch.Tensor,  # [B, D] mean over tokens of F - F^
        cls: torch.Tensor,  # [B, D]
    ) -> torch.Tensor:  # [B, 2]
        dtype = self.perplexity_mlp[0].weight.dtype
        perplexity = torch.stack([max_score, entropy], dim=-1).to(dtype)
        v_per = self.perplexity_mlp(perplexity)
        v_res = self.residual_mlp(residual.to(dtype))
        return self.head(torch.cat([v_per, v_res, cls.to(dtype)], dim=-1))
