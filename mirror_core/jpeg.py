"""The JPEG round trip: encode RGB pixels at a quality, decode them back.

Used for the evaluation's format alignment (q96), robustness perturbations and training
augmentation. `optimize` changes only the Huffman tables, never the decoded pixels; the
alignment keeps it on as the official code does.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg_round_trip(arr: np.ndarray, quality: int, optimize: bool = False) -> np.ndarray:
    """uint8 [H, W, 3] -> the same image after one JPEG encode/decode at `quality`."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality), optimize=optimize)
    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img.convert("RGB"))
