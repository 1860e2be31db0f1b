"""Training augmentations of the official recipe, seeded (numpy Generator), uint8 in and out.

Phase 1 (real images): one of centre crop / direct resize / random crop /
rescale-then-crop to 224, then JPEG at a random quality in [50, 100].
Phase 2: fakes are format-aligned (JPEG q96, as at evaluation), then the same
random JPEG augmentation applies to all images.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from ..jpeg import jpeg_round_trip
from ..preprocess import center_crop, resized_window_of

CROP = 224
VIEW_MODES = ("center_crop", "resize", "random_crop", "rescale_crop")


def random_view(img: Image.Image, rng: np.random.Generator, size: int = CROP) -> np.ndarray:
    """One of the four official views of an RGB image, as uint8 [size, size, 3]."""
    img = img.convert("RGB")
    mode = VIEW_MODES[int(rng.integers(len(VIEW_MODES)))]
    if mode == "resize":
        return np.asarray(img.resize((size, size), Image.BICUBIC))
    if mode == "rescale_crop":  # a random crop of the rescaled image, resampling only its pixels
        short = min(img.size)
        scale = rng.uniform(size / short, max(size / short, 1.0) * 1.5) if short else 1.0
        new_w, new_h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        top, left = int(rng.integers(new_h - size + 1)), int(rng.integers(new_w - size + 1))
        return resized_window_of(img, (new_w, new_h), top, left, size, size)
    arr = np.asarray(img)
    if mode == "center_crop" or arr.shape[0] < size or arr.shape[1] < size:
        return center_crop(arr, size)
    top = int(rng.integers(arr.shape[0] - size + 1))
    left = int(rng.integers(arr.shape[1] - size + 1))
    return arr[top : top + size, left : left + size]


def phase1_augment(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    return jpeg_round_trip(np.ascontiguousarray(random_view(img, rng)), int(rng.integers(50, 101)))


def phase2_augment(img: Image.Image, label: int, rng: np.random.Generator, jpeg_prob: float = 0.5) -> np.ndarray:
    arr = np.ascontiguousarray(random_view(img, rng))
    if label == 1:
        arr = jpeg_round_trip(arr, 96, optimize=True)  # format alignment: fakes are often PNG, reals JPEG
    if rng.random() < jpeg_prob:
        arr = jpeg_round_trip(arr, int(rng.integers(50, 101)))
    return arr
