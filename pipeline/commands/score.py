"""`mirror score`: a few images scored in this process by the scan's own stages (the same
reads, limits, error rows and scores), a line each, with no Ray cluster and no output
folder: a first look at a bundle, or at the images a scan flagged."""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

from pipeline.scan.config import ScanConfig


def refuse_folders(images: list[str]) -> None:
    """A folder is a scan's input: say so instead of giving it an error row."""
    for image in images:
        if os.path.isdir(image):
            raise ValueError(f"{image} is a folder: `mirror scan --input {image} --output OUT` scores a folder's "
                             "images; `mirror score` takes image files")


GLOB_CHARACTERS = ("*", "?", "[")


def expand_patterns(images: list[str]) -> list[str]:
    """Each image, a pattern replaced by the files it matches, in order (`s3://b/dir/*.jpg`:
    no shell expands a bucket's names; a local pattern quoted, or from a script). A pattern
    matching nothing is an error; a name that holds such characters and exists is a name."""
    import fsspec

    from mirror_core.uri import is_web_url
    from pipeline.scan.listing import full_uri

    expanded = []
    for image in images:
        fs, path = fsspec.core.url_to_fs(image)
        if is_web_url(image) or not any(c in path for c in GLOB_CHARACTERS) or fs.exists(path):
            expanded.append(image)
            continue
        found = sorted(p for p in fs.glob(path) if not fs.isdir(p))
        if not found:
            raise ValueError(f"no file matches {image}")
        expanded += [full_uri(fs, p) for p in found]
    return expanded


def score_device(device: str | None) -> str:
    """The device asked for (None: a GPU when there is one, else the CPU), checked."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise ValueError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch sees no CUDA device")
    return device


def score_images(model: str, images: list[str], cfg: ScanConfig = ScanConfig(),
                 device: str | None = None) -> Iterator[dict[str, Any]]:
    """Each image (path or URI), in order, as a scan's output row under the scan settings
    `cfg` (batch size, threshold, precision, alignment, reads): its signals and `pred`, or
    its `error`; rows come a model batch at a time."""
    import pyarrow as pa

    from mirror_core.bundle import load_bundle
    from pipeline.scan.commit import assemble_rows
    from pipeline.scan.decode import decode_rows, numpy_batch
    from pipeline.scan.reads import fetch_all
    from pipeline.scan.run import effective_config
    from pipeline.scan.scorer import Scorer
    from pipeline.storage import name_as_text

    images = expand_patterns(images)
    refuse_folders(images)
    device = score_device(device)
    bundle = load_bundle(model)
    config = effective_config(bundle, cfg)
    precision = cfg.scoring_precision(device.startswith("cuda"))
    scorer = Scorer(bundle.weights.to_numpy(), config.to_dict(), bundle.model_id, device=device, precision=precision,
                    batch_size=cfg.batch_size)
    run = {"model_id": bundle.model_id, "preprocess": config.preprocess.name, "threshold": config.threshold,
           "precision": precision}
    payloads = fetch_all(images, cfg.fetch_threads, cfg.max_file_mb * 2**20)
    for start in range(0, len(images), cfg.batch_size):
        chunk = images[start : start + cfg.batch_size]
        decoded = decode_rows("score", start, chunk, [next(payloads) for _ in chunk], config.preprocess)
        yield from assemble_rows(pa.table({"uri": [name_as_text(u) for u in chunk]}), scorer(numpy_batch(decoded)), run).to_pylist()


def score_line(row: dict[str, Any], as_json: bool = False) -> str:
    """A row as JSON, or as `prob_fake verdict uri` (its error instead of the scores)."""
    if as_json:
        return json.dumps(row, sort_keys=True)
    if row["error"] is not None:
        return f"{'-':>9}  {'error':<5}  {row['uri']}: {row['error']}"
    return f"{row['prob_fake']:9.4f}  {('real', 'fake')[row['pred']]:<5}  {row['uri']}"
