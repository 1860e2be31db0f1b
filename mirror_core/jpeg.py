"""JPEG facts and the JPEG round trip (encode RGB pixels at a quality, decode them back).

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


JPEG_MAGIC = b"\xff\xd8\xff"
# Pillow modes of JPEGs that nvJPEG decodes as Pillow does (YCbCr / grayscale): GPU decode
# mode sends only these to the GPU; CMYK and the rest take the CPU path, whose colour
# conversion is the official one.
GPU_JPEG_MODES = ("RGB", "L")


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_MAGIC
