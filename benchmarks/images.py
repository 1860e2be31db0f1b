"""Synthetic test images for the harness (smooth noise, photo-like to a JPEG encoder)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg(size, seed=0, quality=90) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def heic(size, seed=0, quality=80) -> bytes:
    """The same picture as `jpeg(size, seed)`, encoded as a phone would (HEVC in HEIF)."""
    import mirror_core.preprocess  # noqa: F401  (registers the HEIF plugin with Pillow)

    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg(size, seed))).save(buf, format="HEIF", quality=quality)
    return buf.getvalue()


def write_repeated_shards(folder, payloads: list[bytes], n_images: int, rows_per_group: int,
                          groups_per_file: int) -> None:
    """Parquet shards (uri, bytes) of `n_images` rows cycling through `payloads`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    per_file = rows_per_group * groups_per_file
    for f, start in enumerate(range(0, n_images, per_file)):
        rows = range(start, min(start + per_file, n_images))
        table = pa.table({"uri": [f"synthetic://{i:08d}.jpg" for i in rows],
                          "bytes": pa.array([payloads[i % len(payloads)] for i in rows], pa.binary())})
        pq.write_table(table, folder / f"shard-{f:05d}.parquet", row_group_size=rows_per_group)
