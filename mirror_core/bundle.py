"""Model bundles: one directory (local or fsspec URI) with JSON + safetensors, no pickle.

    mirror.json            architecture, preprocessing policy, threshold, provenance, model_id
    backbone.safetensors   base backbone weights (HF names, installed transformers layout)
    lora.safetensors       LoRA A/B per adapted layer (kept apart so training can continue)
    mirror.safetensors     normalisation, memory bank, dual-branch head
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .config import MirrorConfig
from .uri import join_uri
from .weights import MirrorWeights

BUNDLE_FORMAT = "mirror-bundle/1"
CONFIG_FILE = "mirror.json"
WEIGHT_FILES = {"backbone": "backbone.safetensors", "lora": "lora.safetensors", "mirror": "mirror.safetensors"}
ARCHITECTURE_KEYS = ("backbone", "lora", "memory", "head")


@dataclass
class Bundle:
    config: MirrorConfig
    weights: MirrorWeights
    model_id: str
    provenance: dict[str, Any] = field(default_factory=dict)
    uri: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 (verified)


def library_versions() -> dict[str, str]:
    import numpy
    import PIL
    import safetensors
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in (transformers, safetensors, numpy, PIL):
        versions[mod.__name__] = getattr(mod, "__version__", "?")
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:  # peft is only needed to merge or train LoRA
        pass
    return versions


def compute_model_id(config: MirrorConfig, file_sha256: dict[str, str]) -> str:
    """Identity of what computes the scores: architecture + exact weight bytes."""
    arch = {k: v for k, v in config.to_dict().items() if k in ARCHITECTURE_KEYS}
    blob = json.dumps({"architecture": arch, "files": file_sha256}, sort_keys=True).encode()
    return "mirror-" + hashlib.sha256(blob).hexdigest()[:16]


def save_bundle(uri: str, config: MirrorConfig, weights: MirrorWeights, provenance: dict[str, Any] | None = None) -> str:
    """Write a bundle; returns its model_id."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    fs.makedirs(root, exist_ok=True)
    hashes = {}
    for group, tensors in weights.groups().items():
        data = save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
        hashes[WEIGHT_FILES[group]] = hashlib.sha256(data).hexdigest()
        with fs.open(join_uri(root, WEIGHT_FILES[group]), "wb") as f:
            f.write(data)
    model_id = compute_model_id(config, hashes)
    doc = {
        "format": BUNDLE_FORMAT,
        "model_id": model_id,
        "config": config.to_dict(),
        "files": hashes,
        "provenance": {**(provenance or {}), "libraries": library_versions()},
    }
    with fs.open(join_uri(root, CONFIG_FILE), "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
    return model_id


IMPORT_HINT = ("convert official weights once: mirror import-official --checkpoint checkpoint-*.pth --memory "
               "mirror_phase1.pth --backbone DINOV3_DIR --output BUNDLE, then give BUNDLE")


def _what_it_is(fs, root: str) -> str:
    """What a path given for a bundle is instead, when it is official weights or a backbone."""
    if root.endswith((".pth", ".pt")):
        return f": a PyTorch checkpoint; {IMPORT_HINT}"
    if not fs.isdir(root):
        return "" if fs.exists(root) else ": it does not exist"
    names = [n.rsplit("/", 1)[-1] for n in fs.ls(root, detail=False)]
    if any(n.endswith((".pth", ".pt")) for n in names):
        return f": it holds PyTorch checkpoints; {IMPORT_HINT}"
    if "config.json" in names:
        return f": a Hugging Face model directory (a DINOv3 backbone?); {IMPORT_HINT}"
    return ""


def load_bundle(uri: str) -> Bundle:
    """Read and verify a bundle: unknown format, edited weights or config are errors."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(uri))
    config_path = join_uri(root, CONFIG_FILE)
    if not fs.exists(config_path):
        raise FileNotFoundError(f"{uri} is not a MIRROR bundle (no {CONFIG_FILE}){_what_it_is(fs, root)}")
    with fs.open(config_path, "r") as f:
        doc = json.load(f)
    if doc.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{uri}: unsupported bundle format {doc.get('format')!r} (expected {BUNDLE_FORMAT})")
    config = MirrorConfig.from_dict(doc["config"])
    groups, hashes = {}, {}
    for group, name in WEIGHT_FILES.items():
        with fs.open(join_uri(root, name), "rb") as f:
            data = f.read()
        hashes[name] = hashlib.sha256(data).hexdigest()
        if hashes[name] != doc["files"].get(name):
            raise ValueError(f"{uri}/{name}: sha256 {hashes[name]} does not match {CONFIG_FILE}")
        groups[group] = load_safetensors(data)
    model_id = compute_model_id(config, hashes)
    if model_id != doc["model_id"]:
        raise ValueError(f"{uri}: model_id {doc['model_id']} does not match its contents ({model_id})")
    return Bundle(config, MirrorWeights(**groups), model_id, doc.get("provenance", {}), str(uri), hashes)


def inspect_bundle(uri: str) -> dict[str, Any]:
    """Everything a bundle says about itself, after verifying it (what `mirror inspect` shows)."""
    bundle = load_bundle(uri)
    counts = bundle.weights.num_params()
    return {
        "uri": str(uri),
        "format": BUNDLE_FORMAT,
        "model_id": bundle.model_id,
        "architecture": {k: v for k, v in bundle.config.to_dict().items() if k in ARCHITECTURE_KEYS},
        "preprocessing": {**bundle.config.to_dict()["preprocess"], "name": bundle.config.preprocess.name},
        "threshold": bundle.config.threshold,
        "parameters": {**counts, "total": sum(counts.values())},
        "files": bundle.files,
        "provenance": bundle.provenance,
        "summary": describe_model(bundle.config, bundle.weights),
    }


def describe_model(config: MirrorConfig, weights: MirrorWeights) -> list[str]:
    """Human summary lines: backbone, memory bank, LoRA, parameter counts."""
    bb = config.backbone
    counts = weights.num_params()
    return [
        f"backbone: {bb.family} ({bb.model_type}), width {bb.hidden_size}, depth {bb.num_layers}, "
        f"{bb.num_register_tokens} register tokens, patch {bb.patch_size}",
        f"memory bank: K={config.memory.num_slots} slots, {config.memory.num_heads} heads, top_k={config.memory.top_k}",
        f"LoRA: rank {config.lora.rank}, alpha {config.lora.alpha:g}, targets {config.lora.targets or 'q/k/v'} (merged when scoring)",
        "parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + f", total {sum(counts.values()):,}",
        f"preprocessing: {config.preprocess.name}, threshold {config.threshold:g}",
    ]
