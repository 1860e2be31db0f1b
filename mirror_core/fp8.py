"""FP8 (e4m3) GEMMs for the backbone's Linear layers: the opt-in "fp8" precision.

Not exact (scans record the precision, the benchmark reports the deviation): each weight
row (output channel) is scaled into e4m3's range once; each activation row (token) is
scaled at run time; `torch._scaled_mm` multiplies in FP8 with fp32 accumulation and
returns bf16 with the bias added. Everything else runs as "bf16-weights" does. On a GPU
this needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper and later).
"""
from __future__ import annotations

import torch
from torch import nn

from .fused import replace_submodule

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALE = 1e-12  # an all-zero row keeps a finite scale (its products are 0 anyway)
ALIGN = 16  # _scaled_mm wants both weight dimensions to be multiples of 16


def fp8_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (e4m3 [M, K], fp32 scale [M, 1]) with x ~ q * scale, each row's max at 448."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=MIN_SCALE) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


class Fp8Linear(nn.Module):
    """y = x W^T + b with W and x in e4m3 (row-wise scales); bf16 output."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_rows(linear.weight.detach())  # [out, in], [out, 1]
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [M, in]
        q, scale = quantize_rows(rows)
        out = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias,
                               out_dtype=torch.bfloat16)  # [M, out]
        return out.view(*x.shape[:-1], self.out_features)


def fp8_linears_(backbone: nn.Module) -> int:
    """Replace the Linear layers of the backbone's transformer blocks by Fp8Linear, in place
    (after the model is in bf16 and on its device); returns how many were replaced. Layers
    whose dimensions are not multiples of 16 stay as they are."""
    targets = [(name, m) for name, m in backbone.named_modules()
               if isinstance(m, nn.Linear) and m.in_features % ALIGN == 0 and m.out_features % ALIGN == 0]
    for name, module in targets:
        replace_submodule(backbone, name, Fp8Linear(module))
    return len(targets)
