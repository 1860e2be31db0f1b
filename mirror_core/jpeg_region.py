"""Exact decode of a rectangle of a JPEG: the rows and columns a crop reads, nothing else.

The official policy keeps a 224x224 crop of an image resized to short side 512, which
of a 1080p photo reads about a quarter of the columns and half of the rows. The
`mirror_core._jpegregion` extension (csrc/jpeg_region.cpp) asks libjpeg to skip the rows
above the rectangle (entropy decoding only), decode a band of columns, and stop after its
last row. Its pixels equal Pillow's decode of the whole file: the same library and the
same settings, and the band is widened where libjpeg's partial decode differs at its
edges. A start-up probe checks that on this machine (the extension links the system's
libjpeg, Pillow its own copy); where the extension is missing or the probe fails, callers
decode whole images with Pillow.
"""
from __future__ import annotations

import functools
import io
import logging

import numpy as np

from .extensions import extension

log = logging.getLogger(__name__)

# Probe files: every chroma subsampling Pillow writes, a progressive file, greyscale; the
# rectangle touches no image edge, so both the skip and the band are exercised.
PROBE_SIZE = (97, 83)  # (w, h): not a multiple of any iMCU
PROBE_RECT = ((35, 61), (37, 70))  # rows, columns
PROBE_OPTIONS = ({"subsampling": 2}, {"subsampling": 1}, {"subsampling": 0}, {"progressive": True}, {"mode": "L"})


def _native():
    return extension("_jpegregion")


def decode_region(data: bytes, rows: tuple[int, int], cols: tuple[int, int], native=None) -> np.ndarray | None:
    """uint8 [rows, cols, 3] (RGB) of a JPEG file, or None where this decoder declines (no
    extension, an unsupported colour space, any libjpeg error or warning: a corrupt or
    truncated file is Pillow's to decode)."""
    native = native or _native()
    if native is None:
        return None
    got = native.decode_region(data, rows[0], rows[1], cols[0], cols[1])
    if got is None:
        return None
    pixels, first_row, first_col, n_rows, n_cols = got
    band = np.frombuffer(pixels, dtype=np.uint8).reshape(n_rows, n_cols, 3)
    return band[rows[0] - first_row :, cols[0] - first_col : cols[1] - first_col]


def probe_files() -> list[bytes]:
    from PIL import Image

    w, h = PROBE_SIZE
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(0).integers(-40, 41, (h, w, 3))
    rgb = np.clip(np.stack([x * 2, y * 3, (x + y) * 2], axis=-1) + noise, 0, 255).astype(np.uint8)
    files = []
    for options in PROBE_OPTIONS:
        options = dict(options)
        img = Image.fromarray(rgb).convert(options.pop("mode", "RGB"))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90, **options)
        files.append(buf.getvalue())
    return files


def agrees_with_pillow(native) -> bool:
    """Whether `native` decodes the probe rectangles exactly as Pillow decodes the files."""
    from PIL import Image

    rows, cols = PROBE_RECT
    for data in probe_files():
        want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[rows[0] : rows[1], cols[0] : cols[1]]
        got = decode_region(data, rows, cols, native)
        if got is None or not np.array_equal(got, want):
            return False
    return True


@functools.cache
def region_decoder():
    """The extension module where it is built and decodes as this process's Pillow does;
    else None (with one warning naming why)."""
    native = _native()
    if native is None:
        log.warning("mirror_core._jpegregion is not built (no libjpeg headers at install?): exact preprocessing "
                    "decodes whole JPEGs with Pillow (same pixels, slower)")
        return None
    if not agrees_with_pillow(native):
        log.warning("the system libjpeg (%s) decodes differently from Pillow's: exact preprocessing decodes whole "
                    "JPEGs with Pillow", native.library_version())
        return None
    return native
