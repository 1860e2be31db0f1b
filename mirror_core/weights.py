"""The tensors of a MIRROR model, grouped the way a bundle stores them."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
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

    def to_numpy(self) -> dict[str, dict[str, np.ndarray]]:
        """Plain arrays by group: what goes into Ray's object store, shared by replicas."""
        return {g: {k: v.detach().cpu().numpy() for k, v in t.items()} for g, t in self.groups().items()}

    @classmethod
    def from_numpy(cls, arrays: dict[str, dict[str, np.ndarray]]) -> "MirrorWeights":
        """Zero-copy views of `to_numpy` arrays (object-store buffers are read-only:
        nothing writes to them; load_state_dict copies them into the model)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return cls(**{g: {k: torch.from_numpy(v) for k, v in t.items()} for g, t in arrays.items()})
