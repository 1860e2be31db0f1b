"""MirrorModel: pixels -> logits and the signals worth storing."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.initialization import no_init_weights

from .backbone import attach_lora, build_backbone, load_lora_, merge_lora_, resolve_key
from .config import MirrorConfig
from .head import DualBranchHead
from .memory import MemoryBank
from .weights import MirrorWeights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class MirrorOutput:
    logits: torch.Tensor  # [B, 2] (real, fake)
    prob_fake: torch.Tensor  # [B]
    max_score: torch.Tensor  # [B]
    entropy: torch.Tensor  # [B]
    residual_norm: torch.Tensor  # [B] L2 norm of the mean residual r
    token_residual: torch.Tensor | None = None  # [B, gh, gw] per-patch ||F - F^||


class Normalize(nn.Module):
    """ImageNet normalisation; mean/std are state (the official file stores them)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] or float [B, 3, H, W] in [0, 1] -> float [B, 3, H, W]."""
    if images.dtype == torch.uint8:
        return images.permute(0, 3, 1, 2).float().div(255.0)
    return images.float()


class MirrorModel(nn.Module):
    def __init__(self, cfg: MirrorConfig, backbone: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.normalize = Normalize()
        self.backbone = backbone if backbone is not None else build_backbone(cfg.backbone)
        self.memory_bank = MemoryBank(cfg.dim, cfg.memory)
        self.detector = DualBranchHead(cfg.dim, cfg.head)

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS [B, D] and all other tokens F [B, N, D] (registers included, as official)."""
        x = self.normalize(pixels).to(self.backbone_dtype)
        hidden = self.backbone(pixel_values=x).last_hidden_state  # already layer-normed
        return hidden[:, 0], hidden[:, 1:]

    @property
    def backbone_dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def forward(self, images: torch.Tensor, token_residuals: bool = False) -> MirrorOutput:
        pixels = to_pixels(images)
        cls, tokens = self.features(pixels)
        mem = self.memory_bank(tokens)
        diff = tokens - mem.reference  # [B, N, D]
        residual = diff.mean(dim=1)  # [B, D]
        logits = self.detector(mem.max_score, mem.entropy, residual, cls).float()
        out = MirrorOutput(
            logits=logits,
            prob_fake=torch.softmax(logits, dim=-1)[:, 1],
            max_score=mem.max_score,
            entropy=mem.entropy,
            residual_norm=residual.float().norm(dim=-1),
        )
        if token_residuals:
            out.token_residual = self.patch_grid(diff.float().norm(dim=-1), pixels.shape[-2:])
        return out

    def patch_grid(self, per_token: torch.Tensor, size) -> torch.Tensor:
        """[B, N] over registers + patches -> [B, gh, gw] over patches only."""
        patch = self.cfg.backbone.patch_size
        gh, gw = size[0] // patch, size[1] // patch
        return per_token[:, -gh * gw :].reshape(-1, gh, gw)



def assemble_model(cfg: MirrorConfig, weights: MirrorWeights, merge_lora: bool = True) -> MirrorModel:
    """A MirrorModel holding exactly `weights` (strict); LoRA merged for scoring.

    With merge_lora=False the backbone keeps trainable peft adapters instead.
    """
    with no_init_weights():  # every tensor is overwritten below; skip random init
        model = MirrorModel(cfg)
    known = model.backbone.state_dict()
    state = {f"backbone.{resolve_key(k, known) or k}": v for k, v in weights.backbone.items()}
    model.load_state_dict({**state, **weights.mirror}, strict=True)
    lora = {}
    for key, tensor in weights.lora.items():  # follow the installed layout, like the backbone
        module, _, part = key.rpartition(".lora_")
        mapped = resolve_key(module + ".weight", known)
        lora[f"{mapped[: -len('.weight')] if mapped else module}.lora_{part}"] = tensor
    if merge_lora:
        merge_lora_(model.backbone, lora, cfg.lora)
    else:
        load_lora_(attach_lora(model.backbone, cfg.lora), lora)
    return model.eval()
