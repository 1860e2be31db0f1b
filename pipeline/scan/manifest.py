"""Manifests: files that list images by URI, in the forms corpora ship them.

.csv, .tsv, .txt (one URI a line, no header) and .jsonl (one JSON object a line), each
also compressed (.gz, .bz2, .zst, .lz4: pyarrow's own codecs), and .parquet. Records come
a batch at a time, so a manifest of any length is read in bounded memory. Text formats
give every column as text (an empty CSV cell or a JSON null: null): read in blocks, a
column's type could only be guessed from its first block, and a later value that does not
fit it ('real' below a thousand '0's) would fail the planning midway.
"""
from __future__ import annotations

import io
import json
from contextlib import contextmanager
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mirror_core.uri import image_name

TEXT_KINDS = (".csv", ".tsv", ".txt", ".jsonl")
KIND_ALIASES = {".ndjson": ".jsonl"}  # other names of a text kind
CODECS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}
# Where a URI is found when the manifest has no `uri` column (and `columns.uri` is left as
# it is), the first present in any case: img2dataset's and LAION's link column ('url',
# 'URL'), a Hugging Face image folder's metadata ('file_name'), then the names lists of
# images usually give theirs (Kaggle's CSVs: 'image', 'image_name', 'img', 'file').
URI_FALLBACKS = ("url", "file_name", "image_url", "image_path", "img_path", "filepath", "file_path", "path", "filename",
                 "image", "image_name", "image_file", "img", "file")
_NO_DELIMITER = "\x1f"  # a .txt line is one value: split at a character no URI holds


def manifest_kind(uri: str) -> tuple[str, str | None] | None:
    """('.csv', 'gzip') for 'list.csv.gz', ('.parquet', None), or None: no manifest name
    (a web link's query is no part of it: 'https://host/list.csv?dl=1' is a CSV)."""
    low, codec = image_name(uri).lower(), None
    for ext, name in CODECS.items():
        if low.endswith(ext):
            low, codec = low[: -len(ext)], name
            break
    for kind in (*TEXT_KINDS, *KIND_ALIASES) if codec else (*TEXT_KINDS, *KIND_ALIASES, ".parquet"):
        if low.endswith(kind):
            return KIND_ALIASES.get(kind, kind), codec
    return None


def is_manifest_name(uri: str) -> bool:
    return manifest_kind(uri) is not None


def is_text_manifest(uri: str) -> bool:
    kind = manifest_kind(uri)
    return kind is not None and kind[0] != ".parquet"


def is_listed_manifest(path: str) -> bool:
    """Whether a file found in an input folder counts as one of its manifests: a text
    manifest, but a plain .txt only when compressed (a README.txt or NOTES.txt lists no images)."""
    kind = manifest_kind(path)
    return kind is not None and kind[0] != ".parquet" and kind != (".txt", None)


def uri_column(names: list[str], configured: str, source: str) -> str:
    """The column holding the URIs: the configured one, else (when `uri` is left as it is)
    the first of URI_FALLBACKS present in any case."""
    if configured in names:
        return configured
    if configured == "uri":
        by_lower = {n.lower(): n for n in reversed(names)}
        for fallback in ("uri", *URI_FALLBACKS):  # 'URI' too
            if fallback in by_lower:
                return by_lower[fallback]
    tried = f"{configured!r}" + (f" nor {' / '.join(URI_FALLBACKS)}" if configured == "uri" else "")
    shown = ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    hint = next((f"; a CSV separated by {sep!r}? only ',' separates a .csv (tab a .tsv)"
                 for sep in (";", "|", "\t") if len(names) == 1 and sep in names[0]), "")
    raise ValueError(f"manifest {source} has no {tried} column (its columns: {shown}{hint}; set columns.uri)")


@contextmanager
def _decoded(uri: str, codec: str | None) -> Iterator[pa.NativeFile]:
    with fsspec.open(uri, "rb") as f:
        raw = pa.PythonFile(f, mode="r")
        yield pa.CompressedInputStream(raw, codec) if codec else raw


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # what Windows tools ("Unicode text") start UTF-16 text with


def _encoding(uri: str, codec: str | None) -> str:
    """A text manifest's encoding: UTF-16 where it starts with its byte order mark, else
    UTF-8 (whose BOM, as Excel and PowerShell write it, pyarrow's reader skips; 'utf8' keeps
    its native decoding, where any other name transcodes in Python)."""
    with _decoded(uri, codec) as f:
        return "utf-16" if f.read(2) in UTF16_BOMS else "utf8"


def _csv_batches(uri: str, codec: str | None, delimiter: str, batch_rows: int) -> Iterator[pa.Table]:
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char=False if delimiter != "," else '"')
    read = pacsv.ReadOptions(encoding=_encoding(uri, codec))
    with _decoded(uri, codec) as f:  # the header first, then every column read as text
        names = pacsv.open_csv(f, read_options=read, parse_options=parse).schema.names
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True,
                                   null_values=[""])
    with _decoded(uri, codec) as f:
        yield from _rebatched(pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert),
                              batch_rows)


def _txt_batches(uri: str, codec: str | None, batch_rows: int) -> Iterator[pa.Table]:
    read = pacsv.ReadOptions(column_names=["uri"], encoding=_encoding(uri, codec))
    parse = pacsv.ParseOptions(delimiter=_NO_DELIMITER, quote_char=False)
    convert = pacsv.ConvertOptions(column_types={"uri": pa.string()})
    with _decoded(uri, codec) as f:
        yield from _rebatched(pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert),
                              batch_rows)


def _rebatched(reader, batch_rows: int) -> Iterator[pa.Table]:
    for batch in reader:
        table = pa.Table.from_batches([batch])
        for start in range(0, table.num_rows, batch_rows):
            yield table.slice(start, batch_rows)


def _text_value(value) -> str | None:
    """A JSON value as text, spelled as JSON spells it (json.dumps alone is the slow way)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def _jsonl_batches(uri: str, codec: str | None, batch_rows: int) -> Iterator[pa.Table]:
    """Fields as text (numbers and booleans as JSON spells them, objects and lists as JSON);
    the columns are the fields of the first batch's lines: a later line with another field
    is refused, naming it (it would otherwise be dropped)."""
    names: list[str] | None = None
    known: set[str] = set()
    encoding = _encoding(uri, codec)
    with _decoded(uri, codec) as f:
        lines = io.TextIOWrapper(f, encoding="utf-8-sig" if encoding == "utf8" else encoding)
        rows: list[dict] = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ValueError(f"manifest {uri} line {number}: not JSON ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(f"manifest {uri} line {number}: not a JSON object")
            if names is not None and not row.keys() <= known:
                extra = sorted(set(row) - known)
                raise ValueError(f"manifest {uri} line {number}: field(s) {extra} absent from its first "
                                 f"{batch_rows:,} lines")
            rows.append(row)
            if len(rows) == batch_rows:
                names = names or list(dict.fromkeys(k for r in rows for k in r))
                known = set(names)
                yield _text_table(rows, names)
                rows = []
        if rows:
            yield _text_table(rows, names or list(dict.fromkeys(k for r in rows for k in r)))


def _text_table(rows: list[dict], names: list[str]) -> pa.Table:
    return pa.table({n: pa.array([_text_value(r.get(n)) for r in rows], pa.string()) for n in names})


def manifest_tables(uri: str, batch_rows: int) -> Iterator[pa.Table]:
    """A manifest's records as the file names its columns, `batch_rows` at most a table."""
    kind = manifest_kind(uri)
    if kind is None:
        raise ValueError(f"{uri} is no manifest ({', '.join(TEXT_KINDS)} or .parquet, the text ones "
                         f"also {', '.join(CODECS)}-compressed)")
    ext, codec = kind
    if ext == ".parquet":
        with fsspec.open(uri, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                yield pa.Table.from_batches([batch])
    elif ext == ".jsonl":
        yield from _jsonl_batches(uri, codec, batch_rows)
    elif ext == ".txt":
        yield from _txt_batches(uri, codec, batch_rows)
    else:
        yield from _csv_batches(uri, codec, "\t" if ext == ".tsv" else ",", batch_rows)
