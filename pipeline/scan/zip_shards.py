"""Zip archives as shards of samples, read as tar shards are (`webdataset.py`).

A zip's central directory, at its end, lists every member with the offset of its local
header: indexing reads that directory only (and the small label / .json members, where a
sample has them), never the images. A member's span is [local header offset, compressed
size, method, CRC-32, size]; a decode task reads its sample's members with one range read
from the first local header on, finds each member's data past its local header (whose
extra field the directory does not size, hence HEADER_SLACK), inflates it and checks its
CRC. Stored and deflated members are read (what zip tools write for images); an encrypted
member, or one compressed by another method, is an error record. An archive whose central
directory cannot be read (truncated, not a zip) is one error record, as a tar shard that
cannot be read from its start is.
"""
from __future__ import annotations

import struct
import zipfile
import zlib
from typing import Callable

from mirror_core.errors import error_text

STORED, DEFLATED = zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED
LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length: 30 bytes
LOCAL_SIGNATURE = b"PK\x03\x04"
HEADER_SLACK = 4096  # bytes read past a sample's last member for its local header's name and extra field


class ZipMemberError(Exception):
    """A member that cannot be read as the central directory describes it (its text is the row's error)."""


def is_zip(uri: str) -> bool:
    return uri.lower().endswith(".zip")


def member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a member will not be read, known from the directory alone (None: it will)."""
    if info.flag_bits & 0x1:
        return f"zip member encrypted: {info.filename}"
    if info.compress_type not in (STORED, DEFLATED):
        return (f"zip member compressed with method {info.compress_type}: {info.filename} (only stored and "
                "deflated members are read)")
    return None


def index_zip(f, read_now: Callable[[str], bool]) -> tuple[list[tuple[str, list[int], str | None]],
                                                           dict[str, bytes], str | None]:
    """An open zip -> (its files: name, span, why it cannot be read or None; the content of
    the files `read_now(name)` asks for; why the archive cannot be read at all, or None)."""
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return [], {}, error_text(err)
    members, content = [], {}
    for info in archive.infolist():
        if info.is_dir():
            continue
        problem = member_problem(info)
        members.append((info.filename, [info.header_offset, info.compress_size, info.compress_type, info.CRC,
                                        info.file_size], problem))
        if problem is None and read_now(info.filename):
            try:
                content[info.filename] = archive.read(info)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
                members[-1] = (*members[-1][:2], f"zip member unreadable: {info.filename}: {error_text(err)}")
    return members, content, None


def span_end(span: list[int]) -> int:
    """Where a member's bytes end at the latest (its local header's name and extra field unknown)."""
    return span[0] + LOCAL_HEADER.size + span[1] + HEADER_SLACK


def read_members(fs, path: str, spans: dict[str, list[int]]) -> dict[str, bytes]:
    """A sample's members, inflated and checked, with one range read (a second for a member
    whose local header holds more than HEADER_SLACK). ZipMemberError when one cannot be read."""
    start = min(span[0] for span in spans.values())
    blob = fs.cat_file(path, start=start, end=max(span_end(span) for span in spans.values()))
    out = {}
    for ext, (offset, compressed, method, crc, size) in spans.items():
        at = offset - start
        if len(blob) < at + LOCAL_HEADER.size:
            raise ZipMemberError(f"zip member cut short: {path} ends inside the sample")
        signature, name_length, extra_length = LOCAL_HEADER.unpack_from(blob, at)
        if signature != LOCAL_SIGNATURE:
            raise ZipMemberError(f"zip member header not found at offset {offset} of {path}")
        data_at = at + LOCAL_HEADER.size + name_length + extra_length
        data = blob[data_at : data_at + compressed]
        if len(data) < compressed:
            data = fs.cat_file(path, start=start + data_at, end=start + data_at + compressed)
            if len(data) < compressed:
                raise ZipMemberError(f"zip member cut short: {path} ends inside the sample")
        if method == DEFLATED:
            try:
                data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, size + 1)
            except zlib.error as err:
                raise ZipMemberError(f"zip member corrupt: {error_text(err)}") from None
        if len(data) != size or zlib.crc32(data) != crc:
            raise ZipMemberError(f"zip member corrupt: its bytes at offset {offset} of {path} fail the archive's "
                                 "size or CRC check")
        out[ext] = data
    return out
