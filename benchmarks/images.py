"""Synthetic test images for the harness (smooth noise, photo-like to a JPEG encoder)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg(size, seed=0, quality=90) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
