"""Deterministic image perturbations for robustness sweeps (applied before preprocessing).

Spec strings: 'jpeg:75' (re-encode at quality 75), 'blur:2' (Gaussian blur,
sigma 2 px), 'resize:0.5' (bicubic rescale by 0.5). Pure functions of the pixels.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from .jpeg import jpeg_round_trip

KINDS = ("jpeg", "blur", "resize")


def parse_perturbation(spec: str) -> tuple[str, float]:
    kind, sep, value = spec.partition(":")
    if kind not in KINDS or not sep:
        raise ValueError(f"perturbation {spec!r}: expected one of {', '.join(k + ':VALUE' for k in KINDS)}")
    try:
        amount = float(value)
    except ValueError:
        raise ValueError(f"perturbation {spec!r}: {value!r} is not a number") from None
    if kind == "jpeg" and not 1 <= amount <= 100:
        raise ValueError(f"perturbation {spec!r}: JPEG quality must be 1-100")
    if kind in ("blur", "resize") and amount <= 0:
        raise ValueError(f"perturbation {spec!r}: value must be > 0")
    return kind, amount


def expand_sweep(args: list[str]) -> list[str]:
    """['jpeg:95,75', 'blur:1'] -> ['jpeg:95', 'jpeg:75', 'blur:1'] (validated)."""
    specs = []
    for arg in args:
        kind, _, values = arg.partition(":")
        for value in values.split(","):
            spec = f"{kind}:{value.strip()}"
            parse_perturbation(spec)
            specs.append(spec)
    return specs


def apply_perturbation(img: Image.Image, spec: str) -> Image.Image:
    kind, amount = parse_perturbation(spec)
    img = img.convert("RGB")
    if kind == "jpeg":
        return Image.fromarray(jpeg_round_trip(np.asarray(img), int(amount)))
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=amount))
    w, h = img.size
    return img.resize((max(1, round(w * amount)), max(1, round(h * amount))), Image.BICUBIC)
