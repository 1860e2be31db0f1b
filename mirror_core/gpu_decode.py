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
from .errors import error_text
from .preprocess import official_crop_plan
from .resample import AxisTaps, resize_window, run_passes, to_8bit

Decoder = Callable[[list[torch.Tensor]], list[torch.Tensor]]  # 1-D uint8 CPU tensors -> [3, H, W] uint8
DECODE_BYTES = 2 << 30  # decoded RGB bytes of the images one batched decoder call takes at once
RESIZE_BYTES = 1 << 30  # float64 input windows of the images one batched resize takes at once


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
        # nvJPEG writes its outputs from a stream of its own that does not wait for this
        # one, into blocks the caching allocator may just have recycled from tensors that
        # kernels queued here still read (the previous group's resize): let them finish.
        torch.cuda.current_stream(device).synchronize()
        return decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device)

    return decode


@functools.lru_cache(maxsize=1024)
def _weights_on(taps: AxisTaps, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(taps.weights.astype("float64")).to(device)  # [length, span]


def _pass(x: torch.Tensor, taps: AxisTaps) -> torch.Tensor:
    """[..., span] -> float64 [..., length]: one resize pass along the last dim (dense: a GPU
    multiplies the zeros faster than it would skip them)."""
    return to_8bit(x.to(torch.float64) @ _weights_on(taps, x.device).T)


def resized_windows(images: torch.Tensor, new_size: tuple[int, int], top: int, left: int,
                    height: int, width: int) -> torch.Tensor:
    """uint8 [n, C, H, W] -> uint8 [n, C, height, width]: output rows top.. and columns
    left.. of Pillow's BICUBIC resize to new_size (w, h), exactly (`resample`)."""
    _, _, h, w = images.shape
    window = resize_window((w, h), new_size, top, left, height, width)
    (r0, r1), (c0, c1) = window.rows, window.cols
    return run_passes(images[:, :, r0:r1, c0:c1], window, _pass).to(torch.uint8)


def official_crops(images: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 [n, 3, H, W] of one size (any device) -> uint8 [n, crop, crop, 3]: the official
    resize (short side to `resize_short_side` when larger, Pillow's bicubic) and centre
    crop, resampling only the pixels the crop keeps."""
    _, _, h, w = images.shape
    plan = official_crop_plan((w, h), cfg)
    if plan.new_size is not None:
        out = resized_windows(images, plan.new_size, plan.top, plan.left, plan.height, plan.width)
    else:
        out = images[:, :, plan.top : plan.top + plan.height, plan.left : plan.left + plan.width]
    if plan.padded:
        (top, bottom), (left, right) = plan.pads
        out = F.pad(out, (left, right, top, bottom))
    return out.permute(0, 2, 3, 1)


def images_per_resize(shape: tuple[int, int, int], cfg: PreprocessConfig) -> int:
    """How many [C, H, W] images of one size a batched resize takes at once: their float64
    input windows within RESIZE_BYTES (a block of 24-megapixel photos would need ~19 GB)."""
    c, h, w = shape
    plan = official_crop_plan((w, h), cfg)
    if plan.new_size is None:
        return 1 << 20  # a crop only: no float64 copy
    window = resize_window((w, h), plan.new_size, plan.top, plan.left, plan.height, plan.width)
    per_image = 8 * c * (window.rows[1] - window.rows[0]) * (window.cols[1] - window.cols[0])
    return max(1, RESIZE_BYTES // per_image)


def official_crop(image: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 [3, H, W] (any device) -> uint8 [crop, crop, 3]: the official resize and crop."""
    return official_crops(image[None], cfg)[0]


def decode_groups(sizes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Consecutive indices of images of these (width, height) in groups whose decoded RGB
    pixels stay within DECODE_BYTES (a single larger image is a group of its own)."""
    groups: list[list[int]] = [[]]
    total = 0
    for i, (w, h) in enumerate(sizes):
        size = 3 * w * h
        if groups[-1] and total + size > DECODE_BYTES:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def _decode(encoded: list[torch.Tensor], decoder: Decoder) -> tuple[list[torch.Tensor | None], list[str | None]]:
    """One batched decoder call; when it fails (one bad image fails it all), image by image."""
    try:
        return list(decoder(encoded)), [None] * len(encoded)
    except Exception:
        images: list[torch.Tensor | None] = []
        refused: list[str | None] = []
        for one in encoded:
            try:
                images.append(decoder([one])[0])
                refused.append(None)
            except Exception as err:
                images.append(None)
                refused.append(error_text(err))
        return images, refused


def decode_crops(payloads: Sequence[bytes], sizes: Sequence[tuple[int, int]], cfg: PreprocessConfig,
                 decoder: Decoder, device: torch.device) -> tuple[torch.Tensor, list[str | None]]:
    """JPEG bytes and their (width, height) as their headers say (the decode stage read
    them) -> (uint8 [n, crop, crop, 3] on `device`, per image None or why the device decoder
    refused it). A refused image leaves a zero crop for the caller's CPU path.
    Decoded in groups within DECODE_BYTES, each group's images resized before the next
    group is decoded, so a block of very large photos never sits decoded all at once."""
    crops = torch.zeros((len(payloads), cfg.crop_size, cfg.crop_size, 3), dtype=torch.uint8, device=device)
    refused: list[str | None] = [None] * len(payloads)
    for group in decode_groups(sizes):
        images, why = _decode([torch.frombuffer(bytearray(payloads[i]), dtype=torch.uint8) for i in group], decoder)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for j, (image, reason) in enumerate(zip(images, why)):
            refused[group[j]] = reason
            if image is not None:
                by_size.setdefault(tuple(image.shape), []).append(j)
        for size, members in by_size.items():  # batched resizes per distinct image size, memory bounded
            step = images_per_resize(size, cfg)
            for part in (members[k : k + step] for k in range(0, len(members), step)):
                rows = torch.tensor([group[j] for j in part], device=device)
                crops[rows] = official_crops(torch.stack([images[j] for j in part]), cfg)
    return crops, refused
