"""Single-process training steps for both phases (Ray Train wraps these per worker)."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..model import MirrorModel
from ..weights import MirrorWeights
from .losses import phase1_loss, phase2_loss


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    total_steps: int = 1000
    grad_accum: int = 1


def cosine_with_warmup(opt: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def freeze_for_phase(model: MirrorModel, phase: int) -> list[torch.nn.Parameter]:
    """Phase 1: only the memory bank trains. Phase 2: LoRA adapters + head (memory frozen)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if phase == 1:
        trainable = list(model.memory_bank.parameters())
    else:
        trainable = [p for n, p in model.backbone.named_parameters() if "lora_" in n]
        trainable += list(model.detector.parameters())
        if not any("lora_" in n for n, _ in model.backbone.named_parameters()):
            raise ValueError("phase 2 needs a backbone with LoRA adapters (assemble_model(..., merge_lora=False))")
    for p in trainable:
        p.requires_grad_(True)
    return trainable


class PhaseTrainer:
    """AdamW + warm-up/cosine + gradient accumulation over one model, one phase."""

    def __init__(self, model: MirrorModel, phase: int, optim: OptimConfig, label_smoothing: float = 0.0,
                 ortho_weight: float = 0.01, wrap=None, amp_dtype: torch.dtype | None = None,
                 ema_decay: float | None = None):
        self.model, self.phase, self.optim_cfg = model, phase, optim
        self.label_smoothing, self.ortho_weight = label_smoothing, ortho_weight
        self.amp_dtype = amp_dtype  # mixed precision on GPU (bf16 / fp16 autocast)
        params = freeze_for_phase(model, phase)
        # Data parallel: `wrap` (e.g. Ray Train's prepare_model: DDP, bucketed all-reduce
        # overlapped with backward) wraps the module whose forward reaches every trained
        # tensor: the memory bank in phase 1 (the frozen backbone runs outside it, without
        # gradients), the whole model in phase 2 (LoRA + head; the bank is frozen there).
        wrap = wrap or (lambda module: module)
        self.trained_module = wrap(model.memory_bank if phase == 1 else model)
        self.params = params
        self.ema_decay = ema_decay  # exponential moving average of the trained weights, if set
        self.ema = [p.detach().clone() for p in params] if ema_decay else None
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
        self.scheduler = cosine_with_warmup(self.optimizer, optim)
        self.micro = 0

    def loss(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.phase == 1:
            return phase1_loss(self.model, images, self.ortho_weight, bank=self.trained_module)
        return phase2_loss(self.trained_module, images, labels, self.label_smoothing)

    def step(self, images: torch.Tensor, labels: torch.Tensor | None = None, weight: float = 1.0) -> dict[str, float]:
        """One micro-step; `weight` scales its loss (0: a step that only keeps data-parallel
        workers in step, its gradients zero)."""
        self.model.train()
        self.model.backbone.eval()  # frozen backbone: no dropout / drop-path noise
        device = images.device.type
        stepping = (self.micro + 1) % self.optim_cfg.grad_accum == 0
        # under DDP, only the micro-step that ends an accumulation all-reduces
        no_sync = getattr(self.trained_module, "no_sync", None)
        with (contextlib.nullcontext() if stepping or no_sync is None else no_sync()):
            with torch.autocast(device, dtype=self.amp_dtype, enabled=self.amp_dtype is not None and device == "cuda"):
                out = self.loss(images, labels)
            (out["loss"] * weight / self.optim_cfg.grad_accum).backward()
        self.micro += 1
        if stepping:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            if self.ema is not None:
                with torch.no_grad():
                    for shadow, p in zip(self.ema, self.params):
                        shadow.lerp_(p.detach(), 1 - self.ema_decay)
        return {k: float(v.detach().mean()) for k, v in out.items() if v.dim() == 0}

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue this one exactly: the live trained
        weights, gradients accumulated towards the next step, the EMA shadow, optimizer and
        schedule state, the micro-step count."""
        return {"params": [p.detach().cpu().clone() for p in self.params],
                "grads": [None if p.grad is None else p.grad.detach().cpu().clone() for p in self.params],
                "ema": None if self.ema is None else [s.detach().cpu().clone() for s in self.ema],
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        """Strict: the same trained tensors (count and shapes) and the same EMA setting."""
        shapes = [tuple(t.shape) for t in state["params"]]
        if shapes != [tuple(p.shape) for p in self.params]:
            raise ValueError(f"checkpoint holds {len(shapes)} trained tensors that do not fit this model's "
                             f"{len(self.params)}")
        if (state["ema"] is None) != (self.ema is None):
            raise ValueError("checkpoint and run disagree on EMA (--ema): resume with the setting it was saved with")
        with torch.no_grad():
            for p, value, grad in zip(self.params, state["params"], state["grads"]):
                p.copy_(value)
                p.grad = None if grad is None else grad.to(p.device, p.dtype)
            for shadow, value in zip(self.ema or [], state["ema"] or []):
                shadow.copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro = int(state["micro"])

    @contextlib.contextmanager
    def averaged(self):
        """Inside: the model holds the EMA weights (validation, export); restored after."""
        if self.ema is None:
            yield
            return
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, shadow in zip(self.params, self.ema):
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, live):
                    p.copy_(value)


def trained_weights(base: MirrorWeights, trainable: dict[str, torch.Tensor]) -> MirrorWeights:
    """Bundle weights after training: the base's, with what training changed (a
    `trainable_state`, as checkpoints hold it) put in; the base backbone is unchanged."""
    lora, mirror = dict(base.lora), dict(base.mirror)
    for key, tensor in trainable.items():
        if key.startswith("backbone."):  # peft '{module}.lora_A.default.weight' -> bundle '{module}.lora_A.weight'
            module, _, part = key[len("backbone."):].rpartition(".lora_")
            lora[f"{module}.lora_{part[0]}.weight"] = tensor
        else:
            mirror[key] = tensor
    return MirrorWeights(backbone=dict(base.backbone), lora=lora, mirror=mirror)


def trainable_state(model: MirrorModel, phase: int) -> dict[str, torch.Tensor]:
    """What a phase changes (what its checkpoints hold): the memory bank, or LoRA + head."""
    state = model.state_dict()
    if phase == 1:
        return {k: v.detach().cpu().clone() for k, v in state.items() if k.startswith("memory_bank.")}
    return {k: v.detach().cpu().clone() for k, v in state.items() if "lora_" in k or k.startswith("detector.")}
