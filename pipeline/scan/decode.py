"""Decode stage: a unit of records -> typed Arrow batches of uint8 224x224 crops.

Runs as CPU tasks. Every record yields exactly one row: unreadable or
undecodable images become rows with `error` set and a zero crop.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from typing import Iterator

import numpy as np
import pyarrow as pa
from PIL import Image

from mirror_core.config import PreprocessConfig
from mirror_core.errors import error_text
from mirror_core.jpeg import GPU_JPEG_MODES, is_jpeg
from mirror_core.preprocess import ImageTooLargeError, Preprocessed, official_preprocess, wants_alignment
from pipeline.scan import faults, webdataset
from pipeline.scan.isolation import RECORD_TIMEOUT_S, RecordFailed, attempt
from pipeline.scan.reads import (
    DEFAULT_MAX_FILE_BYTES,
    ShardChangedError,
    fetch_planned,
    planned_errors,
    read_shard_unit,
    record_names,
    shard_payloads,
    shard_unit_uris,
)
from pipeline.scan.schema import (
    DECODE_SECONDS,
    DECODED_SCHEMA,
    ENCODED,
    IMAGE_FIELDS,
    INDEX,
    PIXELS,
    REGION_DECODED,
    ROW_PREPROCESS,
    SHA256,
    UNIT,
    UNIT_RECORDS,
    UNIT_TARGET,
    pack_records,
    without_bookkeeping,
)
from pipeline.scan.store import read_unit_records
from pipeline.scan.units import RECORD_KINDS, ColumnMap, Unit


def tensor_column(pixels: np.ndarray) -> pa.Array:
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(pixels)


def gpu_decodable(data: bytes, name: str | None, cfg: PreprocessConfig) -> tuple[int, int] | None:
    """GPU decode mode: (width, height) from the header of a JPEG the replica should decode
    on its GPU; None for what takes the CPU path (other formats, CMYK, alignment due)."""
    if not is_jpeg(data):
        return None
    with Image.open(io.BytesIO(data)) as img:
        (w, h), fmt, mode = img.size, img.format, img.mode
    if cfg.max_pixels is not None and w * h > cfg.max_pixels:
        raise ImageTooLargeError(f"{w}x{h} = {w * h:,} pixels exceeds the limit of {cfg.max_pixels:,}")
    if fmt != "JPEG" or mode not in GPU_JPEG_MODES or wants_alignment(cfg, name, fmt):
        return None
    return w, h


def decode_record(data: bytes, name: str | None, cfg: PreprocessConfig,
                  perturbation: str | None = None) -> Preprocessed | tuple[int, int]:
    """One record's decode (the native code that reads untrusted files runs here): its crop,
    or in GPU decode mode the (width, height) of a JPEG the replica decodes itself."""
    faults.before_decode(name)
    size = gpu_decodable(data, name, cfg) if cfg.gpu_decode and not perturbation else None
    return size if size is not None else official_preprocess(data, cfg, name=name, perturbation=perturbation)


def decode_error(err: Exception) -> str:
    """A failed decode's error-row text: in a child process (`RecordFailed`) the child's own
    text, or how the child died; in this one the exception's type and message."""
    return "decode failed: " + (err.text if isinstance(err, RecordFailed) else error_text(err))


def decode_rows(unit_id: str, start: int, names: list[str | None], payloads, cfg: PreprocessConfig,
                perturbation: str | None = None, records: bytes | None = None, target: str | None = None,
                decode=decode_record) -> pa.Table:
    """payloads: (bytes, None) or (None, error) per record -> one typed row each.
    `records` (the unit's packed records) and `target` ride on the first row when given.
    In GPU decode mode a plain JPEG leaves with its bytes (ENCODED) and a zero crop.
    `decode` runs decode_record (IsolatedCalls runs it in a child process)."""
    t0 = time.perf_counter()
    n = len(names)
    pixels = np.zeros((n, cfg.crop_size, cfg.crop_size, 3), np.uint8)
    cols = {name: [None] * n for name in [SHA256, ENCODED, ROW_PREPROCESS] + [f.name for f in IMAGE_FIELDS]}
    cols[REGION_DECODED] = [False] * n
    for i, (name, (data, error)) in enumerate(zip(names, payloads)):
        if data is not None:
            cols[SHA256][i] = hashlib.sha256(data).hexdigest()
            if not data:
                error = "empty file (0 bytes)"
            else:
                try:
                    got = decode(data, name, cfg, perturbation)
                    if isinstance(got, tuple):
                        cols[ENCODED][i] = data
                        cols["width"][i], cols["height"][i] = got
                        cols["format"][i], cols["aligned"][i] = "JPEG", False
                        continue
                    if cfg.gpu_decode:
                        cols[ROW_PREPROCESS][i] = cfg.cpu_name
                    pixels[i] = got.pixels
                    cols["width"][i], cols["height"][i], cols["format"][i] = got.width, got.height, got.format
                    cols["aligned"][i] = got.aligned
                    cols[REGION_DECODED][i] = got.region_decoded
                except Exception as err:  # the record becomes an error row
                    error = decode_error(err)
        cols["error"][i] = error
    seconds = (time.perf_counter() - t0) / max(n, 1)
    values = {UNIT: [unit_id] * n, INDEX: range(start, start + n), DECODE_SECONDS: [seconds] * n,
              UNIT_RECORDS: [records] + [None] * (n - 1) if n else [],
              UNIT_TARGET: [target] + [None] * (n - 1) if n else [], **cols}
    table = pa.Table.from_arrays([pa.array(values[f.name], f.type) for f in DECODED_SCHEMA], schema=DECODED_SCHEMA)
    return table.append_column(PIXELS, tensor_column(pixels)).append_column(ENCODED, pa.array(cols[ENCODED], pa.binary()))


def numpy_batch(decoded: pa.Table) -> dict[str, np.ndarray]:
    """A decoded block as the scoring stage receives it from Ray (its numpy batch format):
    for calling the stage in this process."""
    batch = {c: decoded[c].to_numpy(zero_copy_only=False) for c in decoded.column_names if c != PIXELS}
    batch[PIXELS] = decoded[PIXELS].combine_chunks().to_numpy()
    return batch


def placeholder_records(unit: Unit) -> pa.Table:
    """Records for a shard unit that cannot be read: positions only (every row an error)."""
    return pa.table({"uri": shard_unit_uris(unit)})


def unit_inputs(unit: Unit, records: pa.Table | None, columns: ColumnMap, fetch_threads: int,
                max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, planned_errors: list[str | None] | None = None):
    """(records without bytes, names, payload iterator) for a unit; a shard that cannot be
    read fails every row. Inline units bring their records from the plan, and
    `planned_errors`: a record the plan knows cannot be read is that error, not read."""
    if unit.kind == "inline":
        uris = records["uri"].to_pylist()
        return records, uris, fetch_planned(uris, planned_errors, fetch_threads, max_file_bytes)
    if unit.kind == "samples":  # tar samples: members by range reads, carried by extension
        members, names, payloads = webdataset.read_samples(records, fetch_threads, max_file_bytes, unit.version)
        records = records.drop_columns([webdataset.MEMBERS, webdataset.IMAGE_MEMBER, webdataset.PLAN_ERROR])
        for name, column in members.items():
            records = records.append_column(name if name not in records.column_names else f"member_{name}", column)
        return records, names, iter(payloads)
    try:
        records = read_shard_unit(unit, columns, with_bytes=True)
    except ShardChangedError as err:  # not a storage error another try heals: --update plans it again
        return placeholder_records(unit), [None] * unit.rows, iter([(None, str(err))] * unit.rows)
    except Exception as err:
        msg = f"shard read failed: {error_text(err)}"
        return placeholder_records(unit), [None] * unit.rows, iter([(None, msg)] * unit.rows)
    if "bytes" not in records.column_names:
        msg = f"shard {unit.file} has no {columns.bytes!r} column"
        return records, [None] * unit.rows, iter([(None, msg)] * unit.rows)
    payloads = shard_payloads(records, unit.file, fetch_threads, max_file_bytes)
    return records.drop_columns(["bytes"]), record_names(records), iter(payloads)


def decode_units(
    batch: dict, *, preprocess: dict, columns: dict, fetch_threads: int = 16, rows_per_batch: int = 64,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, attempts=None, timeout_s: float = RECORD_TIMEOUT_S,
) -> Iterator[pa.Table]:
    """Ray map_batches function over unit descriptors (one per call): the unit's rows,
    decoded in chunks (with the descriptor's perturbation, if any), its packed records and
    target on the first row. The descriptor's `key` names the unit within the pipeline.
    `attempts` (a DecodeAttempts actor): a unit whose earlier attempt died is decoded one
    record per child process, so that a record crashing its decoder becomes an error row;
    a record's decode that takes over `timeout_s` ends its process (then the same)."""
    cfg = PreprocessConfig(**preprocess)
    colmap = ColumnMap(**columns)
    for i in range(len(batch["unit"])):
        key = batch["key"][i]
        unit = Unit(**json.loads(batch["unit"][i]))
        # inline and sample units read their records from the plan (shard units read their
        # row group below; their empty slot may reach a numpy batch as NaN)
        stored = read_unit_records(batch["records"][i], unit.row_group) if unit.kind in RECORD_KINDS else None
        records = without_bookkeeping(stored) if stored is not None else None
        known = planned_errors(stored) if stored is not None else None
        with attempt(attempts, key, decode_record, timeout_s) as decode:
            records, names, payloads = unit_inputs(unit, records, colmap, fetch_threads, max_file_bytes, known)
            perturbation = batch["perturbation"][i] or None
            for start in range(0, unit.rows, rows_per_batch):
                chunk = [next(payloads) for _ in range(min(rows_per_batch, unit.rows - start))]
                first = start == 0
                yield decode_rows(key, start, names[start : start + len(chunk)], chunk, cfg, perturbation,
                                  pack_records(records) if first else None, batch["target"][i] if first else None,
                                  decode=decode)
