"""A check of GPU decode's stream ordering, run as a script on a CUDA machine:

    python tests/gpu_decode_check.py

nvJPEG writes its outputs from a stream of its own; a decode group's outputs can be blocks
the caching allocator just recycled from tensors the previous group's resize kernels, still
queued, read. A block decoded in many small groups (each decode following a resize) must
give the crops of the same images decoded one call at a time, with the device idle between.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.images import jpeg  # noqa: E402
from mirror_core import gpu_decode  # noqa: E402
from mirror_core.config import PreprocessConfig  # noqa: E402

SIZES = ((1920, 1080), (1280, 720), (1080, 1350), (800, 600), (3000, 2000))


def main() -> None:
    device = torch.device("cuda")
    decoder = gpu_decode.device_jpeg_decoder(device)
    assert decoder is not None, "no device JPEG decoder (torchvision's decode_jpeg with CUDA)"
    cfg = PreprocessConfig(gpu_decode=True)
    payloads = [jpeg(SIZES[i % len(SIZES)], seed=i, quality=92) for i in range(40)]
    sizes = [SIZES[i % len(SIZES)] for i in range(40)]
    alone = []
    for data, size in zip(payloads, sizes):  # one image per call, the device idle in between
        crops, refused = gpu_decode.decode_crops([data], [size], cfg, decoder, device)
        torch.cuda.synchronize()
        assert refused == [None], refused
        alone.append(crops[0].cpu())
    gpu_decode.DECODE_BYTES = 3 * 1920 * 1080  # about one image per group: decode after resize, 40 times
    for attempt in range(5):
        side = torch.cuda.Stream(device)
        with torch.cuda.stream(side):  # as a replica decodes: on a side stream, the model busy on its own
            busy = torch.randn(4096, 4096, device=device)
            for _ in range(20):
                busy = busy @ busy.T / 4096
            crops, refused = gpu_decode.decode_crops(payloads, sizes, cfg, decoder, device)
        side.synchronize()
        bad = [i for i in range(len(payloads)) if not torch.equal(crops[i].cpu(), alone[i])]
        assert not bad, f"attempt {attempt}: crops {bad} differ from the images decoded alone"
    print(f"gpu decode stream order: ok ({len(payloads)} images x 5, one decode group each)")


if __name__ == "__main__":
    main()
