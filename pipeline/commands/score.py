"""`mirror score`: a few images scored in this process by the scan's own stages (the same
reads, limits, error rows and scores), a line each, with no Ray cluster and no output
folder: a first look at a bundle, or at the images a scan flagged."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass(frozen=True)
class ScoreSettings:
    device: str | None = None  # None: a GPU when there is one, else the CPU
    precision: str | None = None  # None: as a scan's, bf16 on GPU and fp32 on CPU
    batch_size: int = 32
    threshold: float | None = None  # None: the bundle's
    alignment: str | None = None  # None: the bundle's
    fetch_threads: int = 16


def refuse_folders(images: list[str]) -> None:
    """A folder is a scan's input: say so instead of giving it an error row."""
    for image in images:
        if os.path.isdir(image):
            raise ValueError(f"{image} is a folder: `mirror scan --input {image} --output OUT` scores a folder's "
                             "images; `mirror score` takes image files")


def score_images(model: str, images: list[str], settings: ScoreSettings = ScoreSettings()) -> Iterator[dict[str, Any]]:
    """Each image (path or URI), in order, as a scan's output row: its signals and `pred`,
    or its `error`; rows come a model batch at a time."""
    import pyarrow as pa
    import torch

    from mirror_core.bundle import load_bundle
    from pipeline.scan.commit import assemble_rows
    from pipeline.scan.decode import decode_rows, numpy_batch
    from pipeline.scan.scorer import Scorer
    from pipeline.scan.sources import DEFAULT_MAX_FILE_BYTES, fetch_all

    refuse_folders(images)
    bundle = load_bundle(model)
    config = bundle.config.with_overrides(alignment=settings.alignment, threshold=settings.threshold)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = settings.precision or ("bf16" if device.startswith("cuda") else "fp32")
    scorer = Scorer(bundle.weights.to_numpy(), config.to_dict(), bundle.model_id, device=device, precision=precision,
                    batch_size=settings.batch_size)
    run = {"model_id": bundle.model_id, "preprocess": config.preprocess.name, "threshold": config.threshold}
    payloads = fetch_all(images, settings.fetch_threads, DEFAULT_MAX_FILE_BYTES)
    for start in range(0, len(images), settings.batch_size):
        chunk = images[start : start + settings.batch_size]
        decoded = decode_rows("score", start, chunk, [next(payloads) for _ in chunk], config.preprocess)
        yield from assemble_rows(pa.table({"uri": chunk}), scorer(numpy_batch(decoded)), run).to_pylist()


def score_line(row: dict[str, Any], as_json: bool = False) -> str:
    """A row as JSON, or as `prob_fake verdict uri` (its error instead of the scores)."""
    if as_json:
        return json.dumps(row, sort_keys=True)
    if row["error"] is not None:
        return f"{'-':>9}  {'error':<5}  {row['uri']}: {row['error']}"
    return f"{row['prob_fake']:9.4f}  {('real', 'fake')[row['pred']]:<5}  {row['uri']}"
