"""GPU decode mode: JPEG bytes -> the official crop, decoded, resized and cropped on a CUDA device.

Opt-in (`PreprocessConfig.gpu_decode`). nvJPEG, through torchvision's `decode_jpeg`,
decodes a batch; the images of each size are then resized as the exact path does (short
side to 512 when larger, Pillow's bicubic arithmetic in `resample`, computed for the crop's
pixels only) and centre-cropped (zero padding, round-half-even offsets). Not bit-exact
against the CPU path: nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's; the
benchmark reports the score deviation.

torchvision is an optional extra (`gpu-decode`): without it, or without CUDA, there is no
device decoder and every image takes the CPU path, recorded as such per row.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .config import PreprocessConfig
from .preprocess import crop_window, short_side_size
from .resample import resized_windows

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


def official_crops(images: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 [n, 3, H, W] of one size (any device) -> uint8 [n, crop, crop, 3]: the official
    resize (short side to `resize_short_side` when larger, Pillow's bicubic) and centre
    crop, resampling only the pixels the crop keeps."""
    _, _, h, w = images.shape
    new_size = short_side_size((w, h), cfg.resize_short_side)
    new_w, new_h = new_size or (w, h)
    top, height, pad_top = crop_window(new_h, cfg.crop_size)
    left, width, pad_left = crop_window(new_w, cfg.crop_size)
    if new_size is not None:
        out = resized_windows(images, new_size, top, left, height, width)
    else:
        out = images[:, :, top : top + height, left : left + width]
    if height < cfg.crop_size or width < cfg.crop_size:
        out = F.pad(out, (pad_left, cfg.crop_size - width - pad_left, pad_top, cfg.crop_size - height - pad_top))
    return out.permute(0, 2, 3, 1)


def official_crop(image: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 [3, H, W] (any device) -> uint8 [crop, crop, 3]: the official resize and crop."""
    return official_crops(image[None], cfg)[0]


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
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        if image is not None:
            by_size.setdefault(tuple(image.shape), []).append(i)
    for rows in by_size.values():  # one batched resize per distinct image size
        index = torch.tensor(rows, device=device)
        crops[index] = official_crops(torch.stack([images[i] for i in rows]), cfg)
    return crops, refused
