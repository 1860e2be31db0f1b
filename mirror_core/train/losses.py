"""Losses of the two training phases."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..memory import MemoryBank
from ..model import MirrorModel, to_pixels


def orthogonality_penalty(memory: torch.Tensor) -> torch.Tensor:
    """||normalize(M) normalize(M)^T - I||_F: keeps memory slots diverse."""
    m = F.normalize(memory, dim=-1)
    gram = m @ m.T
    return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype))


def phase1_loss(model: MirrorModel, images: torch.Tensor, ortho_weight: float = 0.01,
                bank: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Reconstruction of frozen backbone features from memory: MSE(F^, F) + lambda * ortho.
    `bank`: the memory bank to call (a data-parallel wrapper of `model.memory_bank`)."""
    with torch.no_grad():
        _, tokens = model.features(to_pixels(images))
    memory: MemoryBank = model.memory_bank
    recon = F.mse_loss((bank or memory)(tokens).reference, tokens)
    ortho = orthogonality_penalty(memory.memory)
    return {"loss": recon + ortho_weight * ortho, "reconstruction": recon.detach(), "orthogonality": ortho.detach()}


def phase2_loss(model: MirrorModel, images: torch.Tensor, labels: torch.Tensor,
                label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    out = model(images)
    loss = F.cross_entropy(out.logits, labels, label_smoothing=label_smoothing)
    return {"loss": loss, "prob_fake": out.prob_fake.detach()}
