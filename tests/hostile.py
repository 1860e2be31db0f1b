"""Generated hostile and broken inputs (nothing big is committed)."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header(width: int, height: int, idat: bytes) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit grayscale) over the given IDAT stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    img = _noise(120, 60, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    return _encode(img, "JPEG", quality=90, exif=exif.tobytes())


def heic(img: Image.Image, lossless: bool = False) -> bytes:
    """HEIF/HEIC bytes (pillow-heif's encoder); lossless keeps every RGB value (4:4:4, identity matrix)."""
    import mirror_core.preprocess  # noqa: F401  (registers the HEIF plugin with Pillow)

    return _encode(img, "HEIF", **({"quality": -1, "chroma": 444, "matrix_coefficients": 0} if lossless else {}))


def hostile_files(max_file_bytes: int) -> dict[str, bytes]:
    """name -> bytes; every entry must still give exactly one output row."""
    jpeg = _encode(_noise(400, 300, seed=1), "JPEG", quality=90)
    phone = heic(_noise(320, 240, seed=5).convert("RGBA"))
    sixteen = Image.fromarray(np.random.default_rng(2).integers(0, 65535, (80, 90), dtype=np.uint16))
    return {
        "zero.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "page.jpg": b"<!doctype html><html><body>Not Found</body></html>",
        "noise.png": np.random.default_rng(4).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "bomb.png": png_with_header(100_000, 100_000, zlib.compress(b"\x00" * 100_001)),  # 10^10 pixels, ~150 bytes
        "too_many_pixels.png": png_with_header(12_000, 9_000, zlib.compress(b"\x00" * 12_001)),  # 108M pixels
        "lying_header.png": png_with_header(3_000, 2_000, zlib.compress(b"\x00" * 50)),  # data for far fewer rows
        "animated.gif": animated_gif(),
        "deep16.png": _encode(sixteen, "PNG"),
        "cmyk.jpg": _encode(_noise(100, 90).convert("CMYK"), "JPEG"),
        "one_pixel.png": _encode(_noise(1, 1), "PNG"),
        "strip_5000x3.png": _encode(_noise(5000, 3), "PNG"),
        "exif_rotated.jpg": exif_rotated_jpeg(),
        "phone.heic": phone,
        "truncated.heic": phone[: len(phone) // 2],  # pillow-heif would give a black image for it
        "oversized.jpg": jpeg + b"\x00" * (max_file_bytes + 1 - len(jpeg)),
    }


def write_hostile_corpus(root: Path, max_file_bytes: int) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in hostile_files(max_file_bytes).items():
        (root / name).write_bytes(data)
        paths[name] = root / name
    return paths


def sleepy_decode(data, name, cfg, perturbation):
    """A decode function for IsolatedCalls tests: the record named "hang" never finishes."""
    import time

    if name == "hang":
        time.sleep(600)
    return (len(data), 1)
