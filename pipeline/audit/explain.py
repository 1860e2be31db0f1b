"""Explanations: the per-token residual-norm grid as a heatmap over the 224x224 crop."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def heatmap_overlay(crop: np.ndarray, grid: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """crop uint8 [S, S, 3], grid [gh, gw] -> RGB overlay [S, S]: red where the
    reconstruction from real-image memory misses most."""
    size = crop.shape[:2][::-1]
    g = grid.astype(np.float64)
    g = (g - g.min()) / (g.max() - g.min() + 1e-12)
    heat = np.asarray(Image.fromarray((g * 255).astype(np.uint8)).resize(size, Image.BILINEAR), np.float64) / 255
    colour = np.stack([heat, 0.25 * (1 - np.abs(2 * heat - 1)), 1 - heat], axis=-1) * 255  # blue -> red
    out = (1 - alpha) * crop.astype(np.float64) + alpha * colour
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
