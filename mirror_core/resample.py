"""Pillow's bicubic resize of 8-bit images, computed for a crop window only, bit-exact.

`Image.resize(size, BICUBIC)` on an 8-bit image runs two separable passes, horizontal
first (over just the input rows the vertical pass reads), each output pixel a weighted sum
of its input taps with the weights held as 22-bit fixed point and the sum floored back to
8 bits. `AxisTaps` rebuilds those integer weights as Pillow computes them (same double
arithmetic, same order), restricted to a window of output indices; `resized_windows`
applies them with float64 matrix products, exact because every product and partial sum is
an integer far below 2**53. A resize followed by a centre crop then costs only the crop's
share of the work, on any device, and equals Pillow's pixels.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit resampling: 32 - 8 (pixel) - 2 (headroom)
BICUBIC_SUPPORT = 2.0
BICUBIC_A = -0.5


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5), evaluated in its operation order."""
    a = BICUBIC_A
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@dataclass(frozen=True, eq=False)  # hashed by identity: instances come from axis_taps' cache
class AxisTaps:
    """One axis of a resize from `in_size` to `out_size`, for output indices
    [start, start + length): the input span read and the fixed-point weights."""

    first: int  # first input index any output in the window reads
    weights: np.ndarray  # int64 [length, span]: Pillow's fixed-point weight of input first + j

    @property
    def span(self) -> int:
        return self.weights.shape[1]


@functools.lru_cache(maxsize=4096)
def axis_taps(in_size: int, out_size: int, start: int, length: int) -> AxisTaps:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for outputs start..start+length-1."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    ss = 1.0 / filterscale
    out = np.arange(start, start + length, dtype=np.float64)
    center = 0.0 + (out + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int): toward zero
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    k = _bicubic((taps[None, :] + xmin[:, None] - center[:, None] + 0.5) * ss)
    k = np.where(taps[None, :] < xmax[:, None], k, 0.0)
    ww = np.zeros(length)
    for t in range(ksize):  # summed in tap order, as Pillow does (no pairwise summation)
        ww = ww + k[:, t]
    k = np.where(ww[:, None] != 0.0, k / np.where(ww == 0.0, 1.0, ww)[:, None], k)
    scaled = k * (1 << PRECISION_BITS)
    fixed = np.where(scaled < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    first = int(xmin.min())
    span = int((xmin + xmax).max()) - first
    dense = np.zeros((length, span), dtype=np.int64)
    rows = np.repeat(np.arange(length), ksize).reshape(length, ksize)
    cols = (xmin[:, None] - first + taps[None, :])
    valid = taps[None, :] < xmax[:, None]
    dense[rows[valid], cols[valid]] = fixed[valid]
    return AxisTaps(first, dense)


@functools.lru_cache(maxsize=1024)
def _weights_on(taps: AxisTaps, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(taps.weights.astype(np.float64)).to(device)


def _apply(x: torch.Tensor, taps: AxisTaps) -> torch.Tensor:
    """float64 [..., span] -> [..., length]: one pass along the last dim, floored to 8 bits
    as Pillow's clip8 does ((sum + half) >> PRECISION_BITS, clamped)."""
    acc = x @ _weights_on(taps, x.device).T
    return torch.floor((acc + (1 << (PRECISION_BITS - 1))) / (1 << PRECISION_BITS)).clamp_(0, 255)


def resized_windows(images: torch.Tensor, new_size: tuple[int, int], top: int, left: int,
                    height: int, width: int) -> torch.Tensor:
    """uint8 [n, C, H, W] resized to new_size (w, h) as Pillow's BICUBIC resize would,
    returning only output rows top..top+height-1 and columns left..left+width-1:
    uint8 [n, C, height, width]. An axis whose size does not change is not resampled
    (Pillow skips that pass too)."""
    _, _, h, w = images.shape
    new_w, new_h = new_size
    vert = axis_taps(h, new_h, top, height) if new_h != h else None
    horiz = axis_taps(w, new_w, left, width) if new_w != w else None
    r0, r1 = (vert.first, vert.first + vert.span) if vert else (top, top + height)
    c0, c1 = (horiz.first, horiz.first + horiz.span) if horiz else (left, left + width)
    x = images[:, :, r0:r1, c0:c1].to(torch.float64)  # [n, C, rows read, cols read]
    if horiz is not None:
        x = _apply(x, horiz)  # [n, C, rows read, width]
    if vert is not None:
        x = _apply(x.transpose(-1, -2), vert).transpose(-1, -2)  # [n, C, height, width]
    return x.to(torch.uint8)
