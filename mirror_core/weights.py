"""The tensors of a MIRROR model, grouped the way a bundle stores them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MirrorWeights:
    """backbone: HF names of the base backbone (installed transformers layout);
    lora: '{module}.lora_A.weight' / '.lora_B.weight';
    mirror: 'normalize.*', 'memory_bank.*', 'detector.*'."""

    backbone: dict[str, torch.Tensor] = field(default_factory=dict)
    lora: dict[str, torch.Tensor] = field(default_factory=dict)
    mirror: dict[str, torch.Tensor] = field(default_factory=dict)

    def groups(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"backbone": self.backbone, "lora": self.lora, "mirror": self.mirror}

    def num_params(self) -> dict[str, int]:
        return {name: sum(t.numel() for t in group.values()) for name, group in self.groups().items()}
