"""Merging LoRA for scoring: plain math, bit-identical to peft's own merge."""
import copy

import pytest
import torch

from mirror_core.backbone import (
    LoraMismatchError,
    attach_lora,
    build_backbone,
    load_lora_,
    lora_shapes,
    lora_target_modules_wrapped,
    merge_lora_,
)
from mirror_core.config import BackboneConfig, LoraSettings
from mirror_core.smoke import DEMO_BACKBONE


def _backbone_and_lora(settings: LoraSettings):
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(dict(DEMO_BACKBONE))).eval()
    gen = torch.Generator().manual_seed(1)
    lora = {k: torch.randn(*s, generator=gen) * 0.1 for k, s in lora_shapes(backbone, settings).items()}
    return backbone, lora


@pytest.mark.parametrize("settings", [LoraSettings(), LoraSettings(rank=4, alpha=7.0)])
def test_merge_equals_peft_merge_bit_for_bit(settings):
    backbone, lora = _backbone_and_lora(settings)
    by_peft = copy.deepcopy(backbone)
    wrapped = attach_lora(by_peft, settings)
    load_lora_(wrapped, lora)
    for name in lora_target_modules_wrapped(wrapped):
        module = wrapped.get_submodule(name)
        module.merge()
        parent, _, leaf = name.rpartition(".")
        setattr(wrapped.get_submodule(parent), leaf, module.get_base_layer())
    merge_lora_(backbone, lora, settings)
    ours, theirs = backbone.state_dict(), wrapped.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_merge_refuses_missing_extra_and_misshaped_tensors():
    settings = LoraSettings()
    backbone, lora = _backbone_and_lora(settings)
    first = sorted(lora)[0]
    with pytest.raises(LoraMismatchError, match="missing LoRA tensors"):
        merge_lora_(backbone, {k: v for k, v in lora.items() if k != first}, settings)
    with pytest.raises(LoraMismatchError, match="unexpected LoRA tensors"):
        merge_lora_(backbone, {**lora, "x.lora_A.weight": torch.zeros(1)}, settings)
    with pytest.raises(ValueError, match="has shape"):
        merge_lora_(backbone, {**lora, first: lora[first][:1]}, settings)
