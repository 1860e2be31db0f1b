"""Import official MIRROR `.pth` files: safe unpickling, key mapping, strict checks.

Official files are pickles. We only ever unpickle them with
`torch.load(weights_only=True)`, allowing the one harmless class they carry
(`argparse.Namespace` for the training args). Anything else is refused.
"""
from __future__ import annotations

import argparse
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backbone import (
    build_backbone,
    lora_shapes,
    read_backbone_config,
    read_backbone_weights,
    resolve_key,
    transformers4_key,
)
from .config import LoraSettings, MemoryConfig, MirrorConfig, PreprocessConfig
from .head import DualBranchHead
from .memory import MemoryBank
from .model import Normalize
from .weights import MirrorWeights

SAFE_GLOBALS = [argparse.Namespace]
ENVELOPE_KEYS = ("model", "state_dict", "model_state_dict")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_[AB])\.default\.weight$")
_LAYER_PREFIX = re.compile(r"^((?:encoder\.)?layer\.\d+\.)(.*)$")
_SWIGLU_IN = re.compile(r"^(?P<prefix>.+\.mlp)\.weights_in\.(?P<kind>weight|bias)$")


class UnsafeCheckpointError(ValueError):
    """The file needs something other than plain tensors and allowlisted classes."""


class CheckpointMismatchError(ValueError):
    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = ["checkpoint does not match the model:"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  wrong shape: {k}" for k in mismatched]
        super().__init__("\n".join(lines))


def safe_torch_load(path: str | Path) -> Any:
    """torch.load with weights_only=True; refuses (never falls back) on anything unsafe."""
    import pickle

    import fsspec

    with fsspec.open(str(path), "rb") as f:
        data = f.read()
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = found.group(1) if found else "an object that is not a tensor"
        raise UnsafeCheckpointError(
            f"refusing to load {path}: unpickling it would call {what}, which is not allowed. "
            "Official MIRROR checkpoints hold only tensors, numbers and argparse.Namespace; "
            "this file is not one of them (it was not executed)."
        ) from None


def unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside an official file, with any `module.` prefix removed."""
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a dict, found {type(obj).__name__}")
    for key in ENVELOPE_KEYS:
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{source}: no state dict found (non-tensor entries: {not_tensors[:5]})")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def training_args(obj: Any) -> dict[str, Any]:
    args = obj.get("args") if isinstance(obj, dict) else None
    return vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})


@dataclass
class ImportReport:
    config: MirrorConfig
    weights: MirrorWeights
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    memory_sources: dict[str, str] = field(default_factory=dict)  # MemoryConfig field -> file / flag / default


def map_backbone_key(rest: str, backbone_known: dict, lora_known: dict) -> tuple[str, str] | None:
    """'…base_model.model.…' official backbone key -> ('backbone'|'lora', bundle key)."""
    rest = rest.replace("base_model.model.", "")
    lora = _LORA_KEY.match(rest)
    if lora:
        module = resolve_key(lora["module"] + ".weight", backbone_known)
        if module is None:
            return None
        key = f"{module[: -len('.weight')]}.{lora['part']}.weight"
        return ("lora", key) if key in lora_known else None
    resolved = resolve_key(rest.replace(".base_layer.", "."), backbone_known)
    return ("backbone", resolved) if resolved else None


def map_official_state(
    state: dict[str, torch.Tensor], backbone_known: dict, lora_known: dict
) -> tuple[MirrorWeights, list[str]]:
    """Sort official keys into bundle groups; returns (weights, unexpected keys)."""
    weights, unexpected = MirrorWeights(), []
    for key, tensor in state.items():
        if key in ("norm.mean", "norm.std"):
            weights.mirror["normalize." + key.split(".")[1]] = tensor
        elif key.startswith(("memory_bank.", "detector.")):
            weights.mirror[key] = tensor
        elif key.startswith("backbone.dino."):
            rest = key[len("backbone.dino.") :].replace("base_model.model.", "")
            swiglu = _SWIGLU_IN.match(rest)
            if swiglu:  # DINOv2 SwiGLU: fused gate+up, split as transformers 5 does
                gate, up = tensor.chunk(2, dim=0)
                for name, part in (("gate_proj", gate), ("up_proj", up)):
                    mapped = resolve_key(f"{swiglu['prefix']}.{name}.{swiglu['kind']}", backbone_known)
                    if mapped is None:
                        unexpected.append(key)
                        break
                    weights.backbone[mapped] = part
                continue
            target = map_backbone_key(rest, backbone_known, lora_known)
            if target is None:
                unexpected.append(key)
            else:
                getattr(weights, target[0])[target[1]] = tensor
        else:
            unexpected.append(key)
    return weights, unexpected


def expected_shapes(cfg: MirrorConfig) -> tuple[dict, dict, dict]:
    """Shapes every group must have, from meta-device modules (no memory, no init cost)."""
    with torch.device("meta"):
        backbone = build_backbone(cfg.backbone)
        mirror = {f"normalize.{k}": v.shape for k, v in Normalize().state_dict().items()}
        mirror.update({f"memory_bank.{k}": v.shape for k, v in MemoryBank(cfg.dim, cfg.memory).state_dict().items()})
        mirror.update({f"detector.{k}": v.shape for k, v in DualBranchHead(cfg.dim, cfg.head).state_dict().items()})
    backbone_shapes = {k: v.shape for k, v in backbone.state_dict().items()}
    return backbone_shapes, {k: torch.Size(v) for k, v in lora_shapes(backbone, cfg.lora).items()}, mirror


def check_strict(weights: MirrorWeights, expected: tuple[dict, dict, dict], unexpected: list[str]) -> None:
    """`expected`: the (backbone, lora, mirror) shapes from `expected_shapes`."""
    missing, mismatched = [], []
    for group, shapes in zip(("backbone", "lora", "mirror"), expected):
        got = getattr(weights, group)
        unexpected += [f"{group}:{k}" for k in sorted(set(got) - set(shapes))]
        for key, shape in shapes.items():
            if key not in got:
                missing.append(f"{group}:{key} {list(shape)}")
            elif got[key].shape != shape:
                mismatched.append(f"{group}:{key} checkpoint {list(got[key].shape)} vs model {list(shape)}")
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched)


def read_memory_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Phase 1 file -> ('memory_bank.*' tensors, memory_config dict or {})."""
    obj = safe_torch_load(path)
    state = unwrap_state_dict(obj, str(path))
    tensors = {k if k.startswith("memory_bank.") else f"memory_bank.{k}": v for k, v in state.items()}
    return tensors, dict(obj.get("memory_config") or {}) if isinstance(obj, dict) else {}


# What official files call each memory setting (memory_config and training args alike).
_RECORDED_MEMORY_KEYS = {"feature_dim": "feature_dim", "mem_slots": "num_slots", "num_heads": "num_heads",
                         "top_k": "top_k"}
MEMORY_FLAGS = {"num_heads": "--memory-heads", "top_k": "--top-k"}


def recorded_memory_values(sources: list[tuple[str, dict]]) -> dict[str, tuple[int, str]]:
    """{MemoryConfig field or 'feature_dim': (value, where)} from the files' own records.

    Two records that disagree about one field are an error: neither can be trusted."""
    found: dict[str, tuple[int, str]] = {}
    for where, record in sources:
        for key, name in _RECORDED_MEMORY_KEYS.items():
            if record.get(key) is None:
                continue
            value = int(record[key])
            if name in found and found[name][0] != value:
                raise ValueError(f"{key} is {found[name][0]} in {found[name][1]} but {value} in {where}")
            found.setdefault(name, (value, where))
    return found


def resolve_memory_config(
    recorded: dict[str, tuple[int, str]], tensor_slots: int, width: int, flags: dict[str, int | None]
) -> tuple[MemoryConfig, dict[str, str]]:
    """The memory bank's settings and where each came from (file, flag or default).

    What the files record is authoritative: the number of heads cannot be read from
    tensor shapes, so a flag that contradicts the record would change the math silently."""
    if "feature_dim" in recorded and recorded["feature_dim"][0] != width:
        value, where = recorded["feature_dim"]
        raise ValueError(f"feature_dim is {value} in {where} but the backbone width is {width}")
    if "num_slots" in recorded and recorded["num_slots"][0] != tensor_slots:
        value, where = recorded["num_slots"]
        raise ValueError(f"mem_slots is {value} in {where} but the memory tensor has {tensor_slots} rows")
    values, sources = {"num_slots": tensor_slots}, {"num_slots": "memory tensor rows"}
    for name, flag in MEMORY_FLAGS.items():
        asked = flags.get(name)
        if name in recorded:
            value, where = recorded[name]
            if asked is not None and int(asked) != value:
                raise ValueError(f"{name} is {value} in {where} but {flag} is {asked}; "
                                 f"the file's value is authoritative (drop {flag} or pass {value})")
            values[name], sources[name] = value, where
        elif asked is not None:
            values[name], sources[name] = int(asked), f"flag {flag}"
        else:
            values[name], sources[name] = getattr(MemoryConfig, name), "default"
    if not 1 <= values["top_k"] <= tensor_slots:
        raise ValueError(f"top_k={values['top_k']} ({sources['top_k']}) must be between 1 and "
                         f"mem_slots={tensor_slots}")
    if values["num_heads"] < 1 or width % values["num_heads"]:
        raise ValueError(f"feature_dim={width} is not divisible by num_heads={values['num_heads']} "
                         f"({sources['num_heads']})")
    return MemoryConfig(**values), sources


def import_official(
    checkpoint: str | Path,
    backbone_dir: str | Path,
    memory: str | Path | None = None,
    alignment: str = "by-extension",
    lora_alpha: float | None = None,
    memory_heads: int | None = None,
    top_k: int | None = None,
) -> ImportReport:
    """Read official files into a config + bundle-grouped weights, strictly."""
    notes: list[str] = []
    raw = safe_torch_load(checkpoint)
    state = unwrap_state_dict(raw, str(checkpoint))
    args = training_args(raw)
    backbone_cfg = read_backbone_config(backbone_dir)

    memory_tensors, memory_config = ({}, {})
    if memory is not None:
        memory_tensors, memory_config = read_memory_file(memory)
    in_checkpoint = {k for k in state if k.startswith("memory_bank.")}
    if memory is not None and in_checkpoint:
        notes.append(f"memory bank: {len(in_checkpoint)} tensors from the detector checkpoint override the memory file")
    merged_state = {**memory_tensors, **state}  # the detector checkpoint wins

    if "memory_bank.memory" not in merged_state:
        raise CheckpointMismatchError(["mirror:memory_bank.memory (pass --memory)"], [], [])
    checkpoint_name = Path(str(checkpoint)).name
    recorded = recorded_memory_values([
        (f"memory_config in {Path(str(memory)).name}", memory_config),
        (f"memory_config in {checkpoint_name}", dict(raw.get("memory_config") or {})),
        (f"args in {checkpoint_name}", args),
    ])
    memory_cfg, memory_sources = resolve_memory_config(
        recorded, int(merged_state["memory_bank.memory"].shape[0]), backbone_cfg.hidden_size,
        {"num_heads": memory_heads, "top_k": top_k},
    )
    notes.append("memory: " + ", ".join(f"{name}={getattr(memory_cfg, name)} ({memory_sources[name]})"
                                        for name in ("num_slots", "num_heads", "top_k")))

    rank = int(args.get("lora_r") or _lora_rank(state) or LoraSettings.rank)
    cfg = MirrorConfig(
        backbone=backbone_cfg,
        lora=LoraSettings(rank=rank, alpha=float(lora_alpha or args.get("lora_alpha") or 2 * rank)),
        memory=memory_cfg,
        preprocess=PreprocessConfig(alignment=alignment),
    )
    expected = expected_shapes(cfg)
    weights, unexpected = map_official_state(merged_state, expected[0], expected[1])
    if not weights.backbone:
        # Checkpoints that saved only trainable tensors: the official model keeps the
        # directory's weights for the backbone, and so do we, loudly.
        weights.backbone = read_backbone_weights(backbone_dir)
        notes.append(f"backbone base weights: none in the checkpoint, taken from {backbone_dir}")
    check_strict(weights, expected, unexpected)
    return ImportReport(config=cfg, weights=weights, notes=notes, memory_sources=memory_sources)


def _lora_rank(state: dict[str, torch.Tensor]) -> int | None:
    for key, tensor in state.items():
        if key.endswith("lora_A.default.weight"):
            return int(tensor.shape[0])
    return None


def file_sha256(path: str | Path) -> str:
    import hashlib

    import fsspec

    digest = hashlib.sha256()
    with fsspec.open(str(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_provenance(checkpoint, backbone_dir, memory=None) -> dict[str, Any]:
    """Which files a bundle came from, by name and sha256."""
    sources = {"checkpoint": checkpoint, "memory": memory}
    out: dict[str, Any] = {
        role: {"file": Path(str(p)).name, "sha256": file_sha256(p)} for role, p in sources.items() if p is not None
    }
    backbone_files = sorted(p for p in Path(backbone_dir).iterdir() if p.is_file())
    out["backbone"] = {"dir": Path(backbone_dir).name, "files": {p.name: file_sha256(p) for p in backbone_files}}
    return {"imported_from": "official", "sources": out}


def import_official_bundle(checkpoint, backbone_dir, out: str, memory=None, **options) -> tuple[str, ImportReport]:
    """import_official + save_bundle; returns (model_id, report)."""
    from .bundle import save_bundle

    report = import_official(checkpoint, backbone_dir, memory, **options)
    report.provenance = {**source_provenance(checkpoint, backbone_dir, memory), "memory_config_from": report.memory_sources}
    model_id = save_bundle(out, report.config, report.weights, report.provenance)
    return model_id, report


def export_official_state(config: MirrorConfig, weights: MirrorWeights) -> dict[str, torch.Tensor]:
    """Bundle tensors in the official checkpoint layout: transformers 4 names, one PEFT
    wrapper per layer. The inverse of `map_official_state` (used by `mirror demo`)."""

    def wrapped(key: str) -> str:  # 'layer.3.attention.q_proj' -> 'layer.3.base_model.model.attention.q_proj'
        m = _LAYER_PREFIX.match(key)
        return f"{m.group(1)}base_model.model.{m.group(2)}" if m else key

    family = config.backbone.family
    adapted = {k.rsplit(".lora_", 1)[0] for k in weights.lora}
    state = {"norm.mean": weights.mirror["normalize.mean"], "norm.std": weights.mirror["normalize.std"]}
    for key, tensor in weights.backbone.items():
        module, _, leaf = key.rpartition(".")
        name = transformers4_key(module, family) + (".base_layer." if module in adapted else ".") + leaf
        state[f"backbone.dino.{wrapped(name)}"] = tensor
    for key, tensor in weights.lora.items():
        module, _, part = key.rpartition(".lora_")
        state[f"backbone.dino.{wrapped(transformers4_key(module, family))}.lora_{part[0]}.default.weight"] = tensor
    state.update({k: v for k, v in weights.mirror.items() if not k.startswith("normalize.")})
    return state
