"""GPU decode mode: JPEG bytes -> the official crop, decoded, resized and cropped on a CUDA device.

Opt-in (`PreprocessConfig.gpu_decode`). nvJPEG, through torchvision's `decode_jpeg`,
decodes a batch; each image is then resized as the exact path does (short side to 512 when
larger, bicubic with PIL's filter: torch's antialiased bicubic, horizontal pass first and
rounded to 8 bits between the passes as Pillow does) and centre-cropped (zero padding,
round-half-even offsets). Not bit-exact against the CPU path: nvJPEG's IDCT and chroma
upsampling differ from libjpeg-turbo's; the benchmark reports the score deviation.

torchvision is an optional extra (`gpu-decode`): without it, or without CUDA, there is no
device decoder and every image takes the CPU path, recorded as such per row.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .config import PreprocessConfig
from .preprocess import short_side_size

Decoder = Callable[[list[torch.Tensor]], list[torch.Tensor]]  # 1-D uint8 CPU tensors -> [3, H, W] uint8


@functools.lru_cache(maxsize=None)
def torchvision_decode_available() -> bool:
    """Whether torchvision's `decode_jpeg` imports here (the optional `gpu-decode` extra)."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:  # not installed, or built against another torch
        return False
    return True


def device_jpeg_decoder(device: str | torch.device) -> Decoder | None:
    """torchvision's batched nvJPEG decode onto `device`, or None when this process cannot
    run one (not a CUDA device, or torchvision missing or built against another torch)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not torchvision_decode_available():
        return None
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(payloads: list[torch.Tensor]) -> list[torch.Tensor]:
        return decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device)

    return decode


def _resize_axis(image: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """One antialiased bicubic pass along H (dim=-2) or W (dim=-1), rounded to 8 bits."""
    h, w = image.shape[-2:]
    target = (size, w) if dim == -2 else (h, size)
    out = F.interpolate(image[None].float(), size=target, mode="bicubic", antialias=True, align_corners=False)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def official_crop(image: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 [3, H, W] (any device) -> uint8 [crop, crop, 3]: the official resize and crop."""
    _, h, w = image.shape
    new_size = short_side_size((w, h), cfg.resize_short_side)
    if new_size is not None:
        new_w, new_h = new_size
        image = _resize_axis(image, new_w, -1) if new_w != w else image
        image = _resize_axis(image, new_h, -2) if new_h != h else image
    size = cfg.crop_size
    _, h, w = image.shape
    if h < size or w < size:
        pad_h, pad_w = max(size - h, 0), max(size - w, 0)
        image = F.pad(image, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        _, h, w = image.shape
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    return image[:, top : top + size, left : left + size].permute(1, 2, 0)


def decode_crops(payloads: Sequence[bytes], cfg: PreprocessConfig, decoder: Decoder, device: torch.device
                 ) -> tuple[torch.Tensor, list[str | None]]:
    """JPEG bytes -> (uint8 [n, crop, crop, 3] on `device`, per image None or why the device
    decoder refused it). A refused image leaves a zero crop for the caller's CPU path."""
    crops = torch.zeros((len(payloads), cfg.crop_size, cfg.crop_size, 3), dtype=torch.uint8, device=device)
    refused: list[str | None] = [None] * len(payloads)
    encoded = [torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in payloads]
    try:
        images: list[torch.Tensor | None] = list(decoder(encoded))
    except Exception:  # one bad image fails the batched call: find it image by image
        images = []
        for i, one in enumerate(encoded):
            try:
                images.append(decoder([one])[0])
            except Exception as err:
                images.append(None)
                refused[i] = f"{type(err).__name__}: {err}"
    for i, image in enumerate(images):
        if image is not None:
            crops[i] = official_crop(image, cfg)
    return crops, refused
