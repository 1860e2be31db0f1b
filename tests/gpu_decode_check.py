"""A check of GPU decode's stream ordering, run as a script on a CUDA machine:

    python tests/gpu_decode_check.py [cpu]  (cpu: the same steps with Pillow as the decoder,
                                             a check of the script itself)

nvJPEG writes its outputs from a stream of its own; a decode group's outputs can be blocks
the caching allocator just recycled from tensors the previous group's resize kernels, still
queued, read. A block decoded in many small groups (each decode following a resize) must
give the crops of the same images decoded one call at a time, with the device idle between.
"""
import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.images import jpeg  # noqa: E402
from mirror_core import gpu_decode  # noqa: E402
from mirror_core.config import PreprocessConfig  # noqa: E402

SIZES = ((1920, 1080), (1280, 720), (1080, 1350), (800, 600), (3000, 2000))


def pillow_decoder(encoded: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.asarray(Image.open(io.BytesIO(e.numpy().tobytes())).convert("RGB")).copy())
            .permute(2, 0, 1) for e in encoded]


def main(device_name: str) -> None:
    device = torch.device(device_name)
    decoder = gpu_decode.device_jpeg_decoder(device) if device.type == "cuda" else pillow_decoder
    assert decoder is not None, "no device JPEG decoder (torchvision's decode_jpeg with CUDA)"
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = PreprocessConfig(gpu_decode=True)
    payloads = [jpeg(SIZES[i % len(SIZES)], seed=i, quality=92) for i in range(40)]
    sizes = [SIZES[i % len(SIZES)] for i in range(40)]
    alone = []
    for data, size in zip(payloads, sizes):  # one image per call, the device idle in between
        crops, refused = gpu_decode.decode_crops([data], [size], cfg, decoder, device)
        sync()
        assert refused == [None], refused
        alone.append(crops[0].cpu())
    gpu_decode.DECODE_BYTES = 3 * 1920 * 1080  # about one image per group: decode after resize, 40 times
    for attempt in range(5):
        side = torch.cuda.Stream(device) if cuda else None
        # as a replica decodes: on a side stream, with kernels queued ahead of the decode
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            busy = torch.randn(1024 if cuda else 64, 1024 if cuda else 64, device=device)
            for _ in range(20):
                busy = busy @ busy.T / busy.shape[0]
            crops, refused = gpu_decode.decode_crops(payloads, sizes, cfg, decoder, device)
        sync()
        assert refused == [None] * len(payloads), refused
        bad = [i for i in range(len(payloads)) if not torch.equal(crops[i].cpu(), alone[i])]
        assert not bad, f"attempt {attempt}: crops {bad} differ from the images decoded alone"
    print(f"gpu decode stream order on {device}: ok ({len(payloads)} images x 5, one decode group each)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda")
