"""Input records and output rows: the column contract, in one place.

A *record* is one image to score: `uri` (where it came from), optional `id`,
`label` (0 real / 1 fake), `subset`, and either inline `bytes` or nothing (then
`uri` is fetched). Any other input columns are carried to the output unchanged.

An output *row* is the record plus OUTPUT_COLUMNS. `error` is null exactly when
the image was scored; `pred` and the scores are null exactly when it is set.
"""
from __future__ import annotations

import collections
import json

import pyarrow as pa
import pyarrow.compute as pc

from mirror_core.errors import error_kind
from mirror_core.signals import SIGNALS

# Internal bookkeeping columns (never written): which unit a record belongs to
# and its position there, so each unit's rows can be committed exactly once.
UNIT = "_unit"
INDEX = "_index"
# A folder's file version as planned (storage.listed_version): what --update compares.
VERSION = "_version"
# Why the plan already knows a record cannot be read (a folder's file whose name is not
# UTF-8): its row is this error, and nothing is read for it.
RECORD_ERROR = "_record_error"
PLAN_BOOKKEEPING = (UNIT, INDEX, VERSION, RECORD_ERROR)  # what planning adds to a unit's stored records
PIXELS = "_pixels"
DECODE_SECONDS = "_decode_s"
SCORE_SECONDS = "_score_s"
READOUT = "_readout"  # which read-out the replica ran: reported in summary.json
# The unit's input records (Arrow IPC, bytes dropped) on the first row of its block, so
# the commit stage can assemble output rows without asking the driver.
UNIT_RECORDS = "_unit_records"
# Where the unit's part goes (JSON: store, unit_id, run columns), also on the first row:
# one pipeline can serve several scans (a benchmark run's benchmarks x perturbations).
UNIT_TARGET = "_unit_target"
REPLICA = "_replica"  # which scoring replica scored the row: counts the replicas a run built
# GPU decode mode: a JPEG's bytes, left for the scoring replica to decode on its GPU (null
# where the decode stage produced the crop itself) ...
ENCODED = "_encoded"
# ... and the policy a row was decoded under when it is not the run's (GPU mode's CPU
# fallback: other formats, JPEGs the GPU decoder refuses). Null: the run's policy.
ROW_PREPROCESS = "_row_preprocess"
# Whether the decode stage decoded the row's JPEG only where its crop reads (the exact
# path's region decoder): counted in summary.json, where nodes without it would show.
REGION_DECODED = "_region_decoded"
INTERNAL = (UNIT, INDEX, PIXELS, DECODE_SECONDS, SCORE_SECONDS, READOUT, UNIT_RECORDS, UNIT_TARGET, REPLICA,
            ENCODED, ROW_PREPROCESS, REGION_DECODED)



def shard_changed(shard: str, why: str) -> str:
    """The error of every row of a unit whose shard (tar or Parquet) is not the file it was
    planned from: its rows are never scored from another file's bytes."""
    return f"shard changed: {shard} {why}; mirror scan --update plans it again"


def without_bookkeeping(records: pa.Table) -> pa.Table:
    """A unit's stored records as the input gave them (planning's columns dropped)."""
    return records.drop_columns([c for c in PLAN_BOOKKEEPING if c in records.column_names])


RECORD_FIELDS = [
    pa.field("uri", pa.string()),
    pa.field("id", pa.string()),
    pa.field("label", pa.int64()),
    pa.field("subset", pa.string()),
]
PRED = "pred"  # 1 when prob_fake is above the threshold
SCORE_FIELDS = [pa.field(name, pa.float64()) for name in SIGNALS] + [pa.field(PRED, pa.int64())]
IMAGE_FIELDS = [
    pa.field("width", pa.int64()),
    pa.field("height", pa.int64()),
    pa.field("format", pa.string()),
    pa.field("aligned", pa.bool_()),
    pa.field("error", pa.string()),
]
RUN_FIELDS = [
    pa.field("model_id", pa.string()),
    pa.field("preprocess", pa.string()),
    pa.field("threshold", pa.float64()),
    pa.field("precision", pa.string()),  # how the model computed the row (mirror_core.detector.PRECISIONS)
]
OUTPUT_FIELDS = RECORD_FIELDS + SCORE_FIELDS + IMAGE_FIELDS + RUN_FIELDS

# Between stages: what the decode stage emits per record besides the pixels (the image
# fields are the output's own; sha256 of the bytes becomes the id where none is given).
SHA256 = "sha256"
DECODED_SCHEMA = pa.schema([pa.field(UNIT, pa.string()), pa.field(INDEX, pa.int64()), pa.field(SHA256, pa.string())]
                           + IMAGE_FIELDS + [pa.field(DECODE_SECONDS, pa.float64()), pa.field(UNIT_RECORDS, pa.binary()),
                                             pa.field(UNIT_TARGET, pa.string()), pa.field(ROW_PREPROCESS, pa.string()),
                                             pa.field(REGION_DECODED, pa.bool_())])
# What a scored batch adds to the input record to make an output row.
STAGE_RESULT_FIELDS = IMAGE_FIELDS + SCORE_FIELDS
OUTPUT_COLUMNS = [f.name for f in OUTPUT_FIELDS]
RESERVED = set(OUTPUT_COLUMNS) | set(INTERNAL) | {"bytes"}


def conform(table: pa.Table) -> pa.Table:
    """Order and type the known columns; extra (carried) columns follow, unchanged."""
    columns, fields = [], []
    for f in OUTPUT_FIELDS:
        col = table[f.name] if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        columns.append(col.cast(f.type))
        fields.append(f)
    for name in table.column_names:
        if name not in RESERVED:
            columns.append(table[name])
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def scored_labeled(rows: pa.Table) -> pa.Table:
    """Output rows that benchmark metrics count: scored (no error) and labeled."""
    return rows.filter(pc.and_(rows["error"].is_null(), rows["label"].is_valid()))


def flagged_count(rows: pa.Table) -> int:
    """Output rows the threshold decides are fake (pred 1)."""
    return int(pc.sum(pc.equal(rows[PRED], 1)).as_py() or 0)


def error_kind_counts(rows: pa.Table) -> str:
    """How many error rows of each kind (`mirror_core.errors.error_kind`) the rows hold, as
    JSON ('{"read failed: FileNotFoundError": 3}'): what a part reports for the summary."""
    counts = collections.Counter(error_kind(m) for m in rows["error"].drop_null().to_pylist())
    return json.dumps(dict(sorted(counts.items())))


def pack_records(table: pa.Table) -> bytes:
    """A unit's records as Arrow IPC bytes (what travels with its block between stages)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def unpack_records(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()
