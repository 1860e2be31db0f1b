"""Pillow's bicubic resize of 8-bit images, computed for a crop window only, bit-exact.

`Image.resize(size, BICUBIC)` on an 8-bit image runs two separable passes (the first over
just the input rows or columns the second reads), each output pixel a weighted sum of its
input taps with the weights held as 22-bit fixed point and the sum floored back to 8 bits;
which pass runs first depends on the Pillow version and the sizes (`vertical_first`).
`AxisTaps` rebuilds those integer weights as Pillow computes them (same double arithmetic,
same order), restricted to a window of output indices. Applied with float64 matrix
products they are exact (every product and partial sum is an integer far below 2**53), so
a resize followed by a centre crop costs only the crop's share of the work and equals
Pillow's pixels: `resized_window` here (the CPU decode path: the `mirror_core._resample`
extension, csrc/resample_window.cpp, in Pillow's own integer arithmetic; numpy where it is
not built), the same passes in torch for batches on a GPU (`gpu_decode`). No torch here:
CPU decode workers never load it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .extensions import extension

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit resampling: 32 - 8 (pixel) - 2 (headroom)
BICUBIC_SUPPORT = 2.0
BICUBIC_A = -0.5
BAND = 16  # outputs per band on CPU: each band multiplies only the inputs it reads
LINES = 256  # lines a CPU pass holds in float64 at a time


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

    @functools.cached_property
    def bands(self) -> list[tuple[slice, slice, np.ndarray]]:
        """The weights in bands of BAND outputs: (outputs, the inputs they read relative to
        `first`, float64 [inputs, outputs]). The dense matrix is mostly zeros."""
        out = []
        for start in range(0, self.weights.shape[0], BAND):
            band = self.weights[start : start + BAND]
            used = np.flatnonzero(band.any(axis=0))
            lo, hi = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 1)
            out.append((slice(start, start + len(band)), slice(lo, hi), band[:, lo:hi].T.astype(np.float64)))
        return out

    @functools.cached_property
    def native(self) -> tuple[bytes, bytes, bytes, int]:
        """The weights for the extension: per output the first input it reads (relative to
        `first`) and how many, the weights from there (int32 [outputs, ksize], zero-padded),
        and ksize."""
        nonzero = self.weights != 0
        used = nonzero.any(axis=1)
        starts = np.where(used, nonzero.argmax(axis=1), 0)
        ends = np.where(used, self.span - nonzero[:, ::-1].argmax(axis=1), 0)
        counts = ends - starts
        ksize = max(1, int(counts.max()))
        taps = np.arange(ksize)
        cols = np.minimum(starts[:, None] + taps[None, :], self.span - 1)
        weights = np.where(taps[None, :] < counts[:, None], np.take_along_axis(self.weights, cols, axis=1), 0)
        return (starts.astype(np.int32).tobytes(), counts.astype(np.int32).tobytes(),
                weights.astype(np.int32).tobytes(), ksize)


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


class ResizeWindow(NamedTuple):
    """What a window of a resize reads and computes."""

    rows: tuple[int, int]  # input rows read, [first, last)
    cols: tuple[int, int]  # input columns read
    vertical: AxisTaps | None  # None: the height does not change (Pillow runs no such pass)
    horizontal: AxisTaps | None
    vertical_first: bool


def resize_window(size: tuple[int, int], new_size: tuple[int, int], top: int, left: int, height: int,
                  width: int) -> ResizeWindow:
    """Output rows top..top+height-1 and columns left..left+width-1 of a resize of a
    (w, h) image to new_size (w, h)."""
    return _window(size, new_size, top, left, height, width, vertical_first(size, new_size))


def _window(size: tuple[int, int], new_size: tuple[int, int], top: int, left: int, height: int, width: int,
            vertical_pass_first: bool) -> ResizeWindow:
    (w, h), (new_w, new_h) = size, new_size
    vert = axis_taps(h, new_h, top, height) if new_h != h else None
    horiz = axis_taps(w, new_w, left, width) if new_w != w else None
    rows = (vert.first, vert.first + vert.span) if vert else (top, top + height)
    cols = (horiz.first, horiz.first + horiz.span) if horiz else (left, left + width)
    return ResizeWindow(rows, cols, vert, horiz, vertical_pass_first)


def to_8bit(acc):
    """Fixed-point sums -> 8-bit values as Pillow's clip8 does ((sum + half) >> PRECISION_BITS,
    clamped; exact in float64: the scale is a power of two). A numpy array is rounded in
    place; a torch tensor (the GPU path) into a new one."""
    half, scale = float(1 << (PRECISION_BITS - 1)), 2.0**-PRECISION_BITS
    if isinstance(acc, np.ndarray):
        acc += half
        acc *= scale
        return np.clip(np.floor(acc, out=acc), 0, 255, out=acc)
    return ((acc + half) * scale).floor().clamp(0, 255)


def run_passes(x, window: ResizeWindow, one_pass):
    """x [..., rows read, cols read] -> [..., height, width]: the window's passes in Pillow's
    order, `one_pass(x, taps)` resampling along the last axis (numpy here, torch for GPU
    batches in `gpu_decode`)."""
    def horizontal(x):
        return one_pass(x, window.horizontal)

    def vertical(x):
        return one_pass(x.swapaxes(-1, -2), window.vertical).swapaxes(-1, -2)

    passes = [p for p, taps in ((horizontal, window.horizontal), (vertical, window.vertical)) if taps is not None]
    for resample in reversed(passes) if window.vertical_first else passes:
        x = resample(x)
    return x


def _pass(x: np.ndarray, taps: AxisTaps) -> np.ndarray:
    """[..., lines, span] (uint8 or float64) -> float64 [..., lines, length]: one pass along
    the last axis, band by band, LINES lines at a time in float64 (small memory on very
    large images)."""
    out = np.empty(x.shape[:-1] + (taps.weights.shape[0],))
    for start in range(0, x.shape[-2], LINES):
        lines = x[..., start : start + LINES, :]
        if lines.dtype != np.float64:  # the first pass: 8-bit pixels
            lines = np.ascontiguousarray(lines, dtype=np.float64)
        acc = out[..., start : start + LINES, :]
        for outputs, inputs, weights in taps.bands:
            acc[..., outputs] = lines[..., inputs] @ weights
        to_8bit(acc)
    return out


def _native():
    return extension("_resample")


def resized_window(region: np.ndarray, window: ResizeWindow, native=True) -> np.ndarray:
    """uint8 [rows, cols, C], the input rows and columns `window` reads -> uint8 [height,
    width, C]: those output pixels of Pillow's BICUBIC resize, exactly. RGB goes to the
    extension where it is built (`native=False`: numpy, the same pixels)."""
    ext = _native() if native and region.ndim == 3 and region.shape[2] == 3 else None
    if ext is None:
        x = run_passes(region.transpose(2, 0, 1), window, _pass)  # [C, height, width]
        return np.ascontiguousarray(x.transpose(1, 2, 0), dtype=np.uint8)
    rows, cols = region.shape[:2]
    out = ext.resample_window(np.ascontiguousarray(region, dtype=np.uint8), rows, cols,
                              window.vertical and window.vertical.native, window.horizontal and window.horizontal.native,
                              window.vertical_first)
    height = window.vertical.weights.shape[0] if window.vertical else rows
    width = window.horizontal.weights.shape[0] if window.horizontal else cols
    return np.frombuffer(out, dtype=np.uint8).reshape(height, width, 3)


def resized_full(arr: np.ndarray, new_size: tuple[int, int], native=True) -> np.ndarray:
    """uint8 [H, W, C] -> the whole BICUBIC resize to new_size (w, h)."""
    window = resize_window((arr.shape[1], arr.shape[0]), new_size, 0, 0, new_size[1], new_size[0])
    (r0, r1), (c0, c1) = window.rows, window.cols
    return resized_window(arr[r0:r1, c0:c1], window, native)


PASS_ORDERS = ("by-size", "horizontal-first")  # Pillow 13; earlier releases
# Probe resizes of a 40x40 image: vertical first by size, both sides of that rule's boundary
# (2 x 10 = 40 - 20 is horizontal first), a vertical upscale, a horizontal upscale.
PROBE_SIZES = ((39, 20), (30, 20), (31, 20), (20, 45), (45, 20))


def _by_size(size: tuple[int, int], new_size: tuple[int, int]) -> bool:
    (w, h), (new_w, new_h) = size, new_size
    return new_h < h and 2 * (w - new_w) < h - new_h


@functools.cache
def pillow_pass_order() -> str | None:
    """How the installed Pillow orders its two passes (one of PASS_ORDERS), found by probe
    resizes it must reproduce exactly; None when neither rule does (a Pillow resizing in
    some other way: callers needing exact pixels then let Pillow resize)."""
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    want = {new: np.asarray(Image.fromarray(arr).resize(new, Image.BICUBIC)) for new in PROBE_SIZES}
    for order in PASS_ORDERS:
        if all(np.array_equal(resized_window(arr, _window((40, 40), new, 0, 0, new[1], new[0],
                                                          order == "by-size" and _by_size((40, 40), new))), want[new])
               for new in PROBE_SIZES):
            return order
    return None


def vertical_first(size: tuple[int, int], new_size: tuple[int, int]) -> bool:
    """Whether Pillow resizes (w, h) to new_size with the vertical pass first. Pillow 13,
    measured on ~1,900 size pairs that the two orders tell apart: when the height shrinks
    and it loses more than twice the pixels the width loses."""
    return _by_size(size, new_size) and pillow_pass_order() == "by-size"
