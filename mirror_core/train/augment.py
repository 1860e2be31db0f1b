"""Training augmentations of the official recipe, seeded (numpy Generator), uint8 in and out.

Phase 1 (real images): one of centre crop / direct resize / random crop /
rescale-then-crop to 224, then JPEG at a random quality in [50, 100].
Phase 2: fakes are format-aligned (JPEG q96, as at evaluation), then the same
random JPEG augmentation applies to all images.
"""
from __future__ import annotations

import numpy as np

from ..jpeg import jpeg_round_trip
from ..preprocess import ImageRegions, crop_plan

CROP = 224
VIEW_MODES = ("center_crop", "resize", "random_crop", "rescale_crop")


def random_view(image: ImageRegions, rng: np.random.Generator, size: int = CROP) -> np.ndarray:
    """One of the four official views of an image, as uint8 [size, size, 3]. Each view reads
    only the pixels it keeps (a JPEG is decoded only there; see ImageRegions), with the
    pixels and random draws of the recipe computed on the whole decoded image."""
    mode = VIEW_MODES[int(rng.integers(len(VIEW_MODES)))]
    w, h = image.size
    if mode == "resize":
        return image.resized_window((size, size), 0, 0, size, size)
    if mode == "rescale_crop":  # a random crop of the rescaled image
        short = min(w, h)
        scale = rng.uniform(size / short, max(size / short, 1.0) * 1.5) if short else 1.0
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        top, left = int(rng.integers(new_h - size + 1)), int(rng.integers(new_w - size + 1))
        return image.resized_window((new_w, new_h), top, left, size, size)
    if mode == "center_crop" or h < size or w < size:
        return image.crop(crop_plan((w, h), None, size))
    top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
    return image.read((top, top + size), (left, left + size))


def phase1_augment(image: ImageRegions, rng: np.random.Generator) -> np.ndarray:
    return jpeg_round_trip(np.ascontiguousarray(random_view(image, rng)), int(rng.integers(50, 101)))


def phase2_augment(image: ImageRegions, label: int, rng: np.random.Generator, jpeg_prob: float = 0.5
                   ) -> np.ndarray:
    arr = np.ascontiguousarray(random_view(image, rng))
    if label == 1:
        arr = jpeg_round_trip(arr, 96, optimize=True)  # format alignment: fakes are often PNG, reals JPEG
    if rng.random() < jpeg_prob:
        arr = jpeg_round_trip(arr, int(rng.integers(50, 101)))
    return arr
