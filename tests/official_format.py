"""Test helpers: tiny models in the OFFICIAL checkpoint layout, and the official
math written plainly (dense masked softmax, unmerged LoRA via hooks), kept
independent of mirror_core's fast paths and key mapping."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch.nn import functional as F

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

# transformers 5 name -> transformers 4 name (what official checkpoints carry)
TO_TF4 = {"dinov3": [(r"^model\.layer\.", "layer.")], "dinov2": [
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
]}


def tf4_name(key: str, kind: str) -> str:
    for pattern, repl in TO_TF4[kind]:
        key = re.sub(pattern, repl, key)
    return key


def tiny_backbone(kind: str, dim: int = 32, layers: int = 2, seed: int = 0):
    from transformers import Dinov2Config, Dinov2Model, DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    common = dict(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * dim,
                  image_size=224, patch_size=16)
    if kind == "dinov2":
        return Dinov2Model(Dinov2Config(**common)).eval()
    return DINOv3ViTModel(DINOv3ViTConfig(num_register_tokens=4, **common)).eval()


@dataclass
class OfficialParts:
    backbone: torch.nn.Module  # base weights, installed layout
    lora: dict  # module name -> (A [r, in], B [out, r])
    memory: dict  # memory, q_proj.weight, ...
    head: dict  # perplexity_mlp.0.weight, ...
    kind: str = "dinov3"
    rank: int = 8
    alpha: float = 16.0
    num_heads: int = 8
    top_k: int = 128


def make_parts(kind: str, dim: int = 32, slots: int = 512, seed: int = 0, top_k: int = 128) -> OfficialParts:
    backbone = tiny_backbone(kind, dim, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    rnd = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s  # noqa: E731
    lora = {}
    for name, module in backbone.named_modules():
        if re.search(r"attention\.(q_proj|k_proj|v_proj)$", name):
            lora[name] = (rnd(8, module.in_features), rnd(module.out_features, 8))
    memory = {"memory": rnd(slots, dim, s=1.0), "q_proj.weight": rnd(dim, dim), "k_proj.weight": rnd(dim, dim),
              "v_proj.weight": rnd(dim, dim), "out_proj.weight": rnd(dim, dim), "out_proj.bias": rnd(dim)}
    head = {"perplexity_mlp.0.weight": rnd(64, 2), "perplexity_mlp.0.bias": rnd(64),
            "residual_mlp.0.weight": rnd(512, dim), "residual_mlp.0.bias": rnd(512),
            "residual_mlp.3.weight": rnd(256, 512, s=0.05), "residual_mlp.3.bias": rnd(256),
            "head.0.weight": rnd(512, 64 + 256 + dim, s=0.05), "head.0.bias": rnd(512),
            "head.3.weight": rnd(2, 512, s=0.05), "head.3.bias": rnd(2)}
    return OfficialParts(backbone, lora, memory, head, kind=kind, top_k=top_k)


def to_official_state(parts: OfficialParts) -> dict[str, torch.Tensor]:
    """The state dict the official training script saves (transformers 4 names)."""
    state = {"norm.mean": MEAN.clone(), "norm.std": STD.clone()}
    layer_re = re.compile(r"^((?:encoder\.)?layer\.\d+\.)(.*)$")
    for key, tensor in parts.backbone.state_dict().items():
        module = key.rsplit(".", 1)[0]
        key = tf4_name(key, parts.kind)
        m = layer_re.match(key)
        if m:  # one PEFT wrapper per layer
            inner = m.group(2)
            if module in parts.lora:
                inner = re.sub(r"\.(weight|bias)$", r".base_layer.\1", inner)
            key = f"{m.group(1)}base_model.model.{inner}"
        state[f"backbone.dino.{key}"] = tensor.clone()
    for module, (a, b) in parts.lora.items():
        name = tf4_name(module + ".weight", parts.kind)[: -len(".weight")]
        m = layer_re.match(name)
        base = f"backbone.dino.{m.group(1)}base_model.model.{m.group(2)}"
        state[f"{base}.lora_A.default.weight"] = a.clone()
        state[f"{base}.lora_B.default.weight"] = b.clone()
    state.update({f"memory_bank.{k}": v.clone() for k, v in parts.memory.items()})
    state.update({f"detector.{k}": v.clone() for k, v in parts.head.items()})
    return state


@torch.no_grad()
def reference_logits(parts: OfficialParts, images_uint8: torch.Tensor) -> torch.Tensor:
    """The official forward, plainly: unmerged LoRA, per-batch memory k/v, dense masked softmax."""
    scale = parts.alpha / parts.rank
    hooks = []
    for name, (a, b) in parts.lora.items():
        layer = parts.backbone.get_submodule(name)
        hooks.append(layer.register_forward_hook(lambda mod, inp, out, a=a, b=b: out + scale * (inp[0] @ a.T @ b.T)))
    try:
        x = images_uint8.permute(0, 3, 1, 2).float() / 255.0
        hidden = parts.backbone(pixel_values=(x - MEAN) / STD).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    cls, feats = hidden[:, 0], hidden[:, 1:]
    ref, max_score, entropy = reference_memory(parts.memory, feats, parts.num_heads, parts.top_k)
    return reference_head(parts.head, max_score, entropy, (feats - ref).mean(1), cls)


def reference_memory(mem: dict, feats: torch.Tensor, heads: int, top_k: int):
    b, n, d = feats.shape
    hd = d // heads
    split = lambda t: t.view(t.shape[0], -1, heads, hd).transpose(1, 2)  # noqa: E731
    q = split(feats @ mem["q_proj.weight"].T)
    k = split((mem["memory"] @ mem["k_proj.weight"].T)[None])
    v = split((mem["memory"] @ mem["v_proj.weight"].T)[None])
    logits = q @ k.transpose(-1, -2) * hd**-0.5  # [B, H, N, K]
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    attn = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
    max_score = attn.max(-1).values.mean((1, 2))
    entropy = (-(attn * torch.log(attn + 1e-9)).sum(-1)).mean((1, 2))
    out = (attn @ v).transpose(1, 2).reshape(b, n, d)
    return out @ mem["out_proj.weight"].T + mem["out_proj.bias"], max_score, entropy


def reference_head(h: dict, max_score, entropy, residual, cls):
    lin = lambda x, name: F.linear(x, h[f"{name}.weight"], h[f"{name}.bias"])  # noqa: E731
    v_per = F.relu(lin(torch.stack([max_score, entropy], -1), "perplexity_mlp.0"))
    v_res = lin(F.relu(lin(residual, "residual_mlp.0")), "residual_mlp.3")
    return lin(F.relu(lin(torch.cat([v_per, v_res, cls], -1), "head.0")), "head.3")


def save_official(path, state: dict, envelope: str | None = "model", prefix: str = "", **extra) -> None:
    state = {prefix + k: v for k, v in state.items()}
    torch.save({envelope: state, **extra} if envelope else state, path)
