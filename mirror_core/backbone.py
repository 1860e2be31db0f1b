"""The DINOv3 / DINOv2 backbone: building it, naming its tensors, LoRA on it.

The backbone is a plain `transformers` model. Its architecture comes only from
its HF config dict; weights come from a bundle or an official checkpoint.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .config import BackboneConfig, LoraSettings


class LoraMismatchError(ValueError):
    """LoRA tensors that do not fit the backbone's adapted layers (names or shapes)."""


# Key renames, per family, from transformers 4.x checkpoints (left) to the layouts
# transformers >= 5 builds (right). `from_pretrained` applies these to its own
# files; a foreign state dict (an official checkpoint) needs them applied here.
_RENAMES = {
    "dinov3": [(r"^layer\.(\d+)\.", r"model.layer.\1.", r"^model\.layer\.(\d+)\.", r"layer.\1.")],
    "dinov2": [
        (r"\.attention\.attention\.query\b", ".attention.q_proj", r"\.attention\.q_proj\b", ".attention.attention.query"),
        (r"\.attention\.attention\.key\b", ".attention.k_proj", r"\.attention\.k_proj\b", ".attention.attention.key"),
        (r"\.attention\.attention\.value\b", ".attention.v_proj", r"\.attention\.v_proj\b", ".attention.attention.value"),
        (r"\.attention\.output\.dense\b", ".attention.o_proj", r"\.attention\.o_proj\b", ".attention.output.dense"),
        (r"\.mlp\.weights_out\b", ".mlp.down_proj", r"\.mlp\.down_proj\b", ".mlp.weights_out"),
    ],
}


def _rename(key: str, family: str, reverse: bool) -> str:
    for old, new, old_rev, new_rev in _RENAMES[family]:
        key = re.sub(old_rev, new_rev, key) if reverse else re.sub(old, new, key)
    return key


# Default LoRA targets: the q/k/v projections, under whichever names the model uses.
_QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """An un-trained backbone of the described architecture (weights loaded later)."""
    from transformers import AutoConfig, AutoModel

    values = {k: v for k, v in cfg.hf_config.items() if k not in ("model_type", "transformers_version")}
    hf_config = AutoConfig.for_model(cfg.model_type, **values)
    model = AutoModel.from_config(hf_config, attn_implementation="sdpa")
    return model.eval()


def read_backbone_config(path: str | Path) -> BackboneConfig:
    """The architecture of a local HF backbone directory (its config.json)."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"backbone directory {path} has no config.json")
    cfg = _clean_config(AutoConfig.from_pretrained(str(path)).to_dict())
    cfg.family  # validates the model type
    return cfg


def read_backbone_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a local HF backbone directory, in the installed layout."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _clean_config(d: dict) -> BackboneConfig:
    drop = ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype", "_attn_implementation_autoset")
    return BackboneConfig(hf_config={k: v for k, v in d.items() if k not in drop})


def resolve_key(key: str, known: set[str] | dict) -> str | None:
    """Map a backbone key from any supported layout onto a name in `known`."""
    if key in known:
        return key
    for family in _RENAMES:
        for reverse in (False, True):
            candidate = _rename(key, family, reverse)
            if candidate in known:
                return candidate
    return None


def transformers4_key(key: str, family: str) -> str:
    """An installed-layout backbone key in the transformers 4 layout official files use."""
    return _rename(key, family, reverse=True)


def lora_target_modules(backbone: nn.Module, settings: LoraSettings) -> list[str]:
    """Full names of the Linear layers LoRA applies to, in module order."""
    linear_names = {n: m for n, m in backbone.named_modules() if isinstance(m, nn.Linear)}
    targets = settings.targets
    if targets is None:
        leaves = {n.rsplit(".", 1)[-1] for n in linear_names}
        targets = next((list(t) for t in _QKV_NAMES if set(t) <= leaves), None)
        if targets is None:
            raise ValueError("cannot find q/k/v projections in the backbone; set lora.targets")
    found = [n for n in linear_names if n.rsplit(".", 1)[-1] in targets and ".attention." in f".{n}"]
    if not found:
        raise ValueError(f"no Linear layers named {targets} in the backbone")
    return found


def lora_shapes(backbone: nn.Module, settings: LoraSettings) -> dict[str, tuple[int, ...]]:
    """Expected LoRA tensors: '{module}.lora_A.weight' [r, in], '{module}.lora_B.weight' [out, r]."""
    shapes = {}
    for name in lora_target_modules(backbone, settings):
        layer = backbone.get_submodule(name)
        shapes[f"{name}.lora_A.weight"] = (settings.rank, layer.in_features)
        shapes[f"{name}.lora_B.weight"] = (layer.out_features, settings.rank)
    return shapes


@torch.no_grad()
def merge_lora_(backbone: nn.Module, lora: dict[str, torch.Tensor], settings: LoraSettings) -> None:
    """Fold LoRA deltas into the base weights in place: W += (B @ A) * (alpha / r).

    Scoring then runs a plain backbone and pays nothing for the adapters. The same
    operations, in the same order, as peft's merge of a plain LoRA Linear (a test checks
    bit-equality), without importing peft, whose import alone is a large share of a replica's start.
    """
    expected = lora_shapes(backbone, settings)
    extra, missing = set(lora) - set(expected), set(expected) - set(lora)
    if extra:
        raise LoraMismatchError(f"unexpected LoRA tensors: {sorted(extra)}")
    if missing:
        raise LoraMismatchError(f"missing LoRA tensors: {sorted(missing)}")
    for key, shape in expected.items():
        if tuple(lora[key].shape) != shape:
            raise ValueError(f"LoRA tensor {key} has shape {tuple(lora[key].shape)}, expected {shape}")
    for key in expected:
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            weight = backbone.get_submodule(name).weight
            a, b = (lora[f"{name}.lora_{p}.weight"].to(weight.device, weight.dtype) for p in "AB")
            weight.data += (b @ a) * settings.scaling


def attach_lora(backbone: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap the target layers with trainable peft LoRA adapters (in place)."""
    from peft import LoraConfig, inject_adapter_in_model

    modules = lora_target_modules(backbone, settings)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=modules,
    )
    return inject_adapter_in_model(config, backbone, adapter_name="default")


def lora_target_modules_wrapped(backbone: nn.Module) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, m in backbone.named_modules() if isinstance(m, BaseTunerLayer)]


def load_lora_(wrapped: nn.Module, lora: dict[str, torch.Tensor]) -> None:
    """Copy '{module}.lora_X.weight' tensors into peft's 'default' adapter."""
    expected = set()
    for name in lora_target_modules_wrapped(wrapped):
        module = wrapped.get_submodule(name)
        for part in ("lora_A", "lora_B"):
            key = f"{name}.{part}.weight"
            expected.add(key)
            getattr(module, part)["default"].weight.data.copy_(lora[key])
    extra = set(lora) - expected
    if extra:
        raise LoraMismatchError(f"unexpected LoRA tensors: {sorted(extra)}")
