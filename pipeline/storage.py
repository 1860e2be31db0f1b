"""A place to write results: a local directory or any fsspec URI (s3://...).

`Location` holds the I/O every command's output needs (atomic local writes, whole
PUTs on object stores, JSON / Parquet helpers, access errors that name the URI).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mirror_core.uri import SCHEME_PATTERN, join_uri

T = TypeVar("T")
R = TypeVar("R")


def relative_paths(uris: pa.Array | pa.ChunkedArray, root: str) -> pa.Array:
    """Each URI's path below the folder `root` ('s3://b/in' and 's3://b/in/a/x.jpg' ->
    'a/x.jpg'); null where a URI is not below it."""
    prefix = root.rstrip("/") + "/"
    uris = uris.combine_chunks() if isinstance(uris, pa.ChunkedArray) else uris
    below = pc.starts_with(uris, prefix)
    return pc.if_else(below, pc.utf8_slice_codeunits(uris, len(prefix)), pa.scalar(None, pa.string()))


def resolve_relative(uris: pa.Array | pa.ChunkedArray, folder: str) -> pa.Array:
    """Each URI with neither a scheme nor a leading slash joined to `folder` ('imgs/a.jpg',
    './imgs/a.jpg' below 's3://b/lists' -> 's3://b/lists/imgs/a.jpg'); the others as they are."""
    uris = uris.combine_chunks() if isinstance(uris, pa.ChunkedArray) else uris
    absolute = pc.or_(pc.starts_with(uris, "/"), pc.match_substring_regex(uris, SCHEME_PATTERN))
    prefix, empty = pa.scalar(folder.rstrip("/") + "/", uris.type), pa.scalar("", uris.type)
    joined = pc.binary_join_element_wise(prefix, pc.replace_substring_regex(uris, r"^(\./)+", ""), empty)
    return pc.if_else(absolute, uris, joined)


S3_CONNECTIONS = 10  # botocore's max_pool_connections: what an s3fs client holds unless configured


def s3_connections(fs) -> int | None:
    """Requests an s3fs filesystem serves at once: its client's connection pool (10 unless
    its config_kwargs raise max_pool_connections, e.g. through fsspec's configuration:
    FSSPEC_S3='{"config_kwargs": {"max_pool_connections": 64}}'); more only queue. None
    for other filesystems."""
    if not hasattr(fs, "_call_s3"):
        return None
    return max(1, int((getattr(fs, "config_kwargs", None) or {}).get("max_pool_connections", S3_CONNECTIONS)))


def file_version(entry: dict) -> str:
    """What changes when a file is written again, from a listing entry or a write's answer:
    an object store's ETag, a disk's modification time, a Hugging Face repository file's
    git blob id ('' where none is given; the keys are those of s3fs, gcsfs, adlfs,
    fsspec's local filesystem and huggingface_hub's HfFileSystem)."""
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "blob_id"):
        if entry.get(key):
            return str(entry[key])
    return ""


def listed_version(entry: dict) -> str:
    """An input file's version as a folder's listing records it: `file_version` and the
    size (a coarse modification time alone could miss a rewrite within its resolution)."""
    return f"{file_version(entry)}:{entry.get('size', entry.get('Size', ''))}"


def opened_version(f) -> str:
    """`listed_version` of a file being read (an fsspec file object): what its opening
    found where that tells a version (an object store's HEAD), else what its filesystem
    tells (a disk's stat; a web server's HEAD: an HTTP file's opening keeps only its
    size); the same string a listing of its folder, or `current_version`, gives."""
    details = getattr(f, "details", None)
    return listed_version(details if details and file_version(details) else f.fs.info(f.path))


def current_version(uri: str) -> str:
    """`listed_version` of a file as its store tells it now (no cached listing)."""
    fs, path = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache(path)
    return listed_version(fs.info(path))


def parquet_schema(uri: str) -> pa.Schema:
    """A Parquet file's schema, from its footer alone."""
    with fsspec.open(uri, "rb") as f:
        return pq.read_schema(f)


def read_ahead(read: Callable[[T], R], items: Iterable[T], threads: int, ahead: int | None = None) -> Iterator[R]:
    """read(item) for each item by `threads` threads, results in the items' order, at most
    `ahead` (4 per thread by default) read and not yet taken: an object store's latency
    is hidden while memory stays bounded, however many items there are."""
    ahead = ahead or 4 * threads
    pool = ThreadPoolExecutor(max_workers=max(1, threads))
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(read, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also when the consumer stops early: reads not yet started are dropped
        pool.shutdown(wait=False, cancel_futures=True)


def name_as_text(name: str) -> str:
    """A name from the disk (or a tar) as text a column can hold: bytes that are not UTF-8
    escaped ('caf\\xe9.png')."""
    return name if is_utf8(name) else os.fsencode(name).decode("utf-8", "backslashreplace")


def is_utf8(name: str) -> bool:
    """Whether a name from the disk (or an archive) is text (a name that is not UTF-8 comes with surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def local_spool(path: str) -> str:
    """Where a local file is written before it is renamed into place: beside it, hidden
    (a leading '.'), so that a process killed mid-write leaves nothing a reader of the
    folder takes for data (Arrow's and DuckDB's dataset readers skip hidden files)."""
    folder, _, name = path.rpartition("/")
    return f"{folder}/.{name}{SPOOL_MARK}{uuid.uuid4().hex}"


SPOOL_MARK = ".tmp-"


def is_spool(name: str) -> bool:
    """Whether a file's name is that of a `local_spool` (a half-written file, where its
    writer was killed)."""
    return name.startswith(".") and SPOOL_MARK in name


class Location:
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.local and "://" not in self.uri:
            # Ray workers resolve a relative path against their own working directory, which
            # on other nodes (or under `ray job submit`) is not this process's
            self.uri = os.path.abspath(self.uri)

    def path(self, *parts: str) -> str:
        return join_uri(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        return join_uri(self.uri, *parts)

    def names(self, rel: str = "") -> list[str]:
        """Names of what lies directly below `rel` (files and folders), listed afresh: other
        processes (Ray workers) write here, so a listing cached by this process's
        filesystem would be stale."""
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self._listing(rel))

    def file_entries(self, rel: str = "") -> list[tuple[str, int, str]]:
        """(name, bytes, version) of each file directly below `rel`, sorted by name, listed
        afresh. The version changes when a file is written again: an object store's ETag,
        a disk's modification time ('' where the filesystem gives neither)."""
        return sorted((e["name"].rstrip("/").rsplit("/", 1)[-1], int(e.get("size") or 0), file_version(e))
                      for e in self._listing(rel) if e.get("type") != "directory")

    def _listing(self, rel: str) -> list[dict]:
        path = self.path(rel) if rel else self.root
        self.fs.invalidate_cache(path)
        if not self.fs.exists(path):
            return []
        return self.fs.ls(path, detail=True)

    def exists(self) -> bool:
        """Whether anything is here (on object stores: any object below this prefix)."""
        self.fs.invalidate_cache(self.root)
        return self.fs.exists(self.root)

    def remove(self) -> None:
        """Everything here, gone (what a failed command made and must not leave behind)."""
        if self.exists():
            self.fs.rm(self.root, recursive=True)

    def remove_spools(self, rels: tuple[str, ...] = ("",)) -> list[str]:
        """Removes the spools (`local_spool`) that killed writers left directly below
        `rels`; only while nothing else writes here. Returns their paths below this location.
        Spools exist on local disks only: elsewhere nothing is listed. Names only (no stat
        per file): a scan's `scores/` holds a part per unit."""
        if not self.local:
            return []
        spools = [join_uri(rel, name) if rel else name for rel in rels if os.path.isdir(self.path(rel))
                  for name in os.listdir(self.path(rel)) if is_spool(name)]
        self.remove_files(spools)
        return spools

    def remove_files(self, rels: list[str]) -> None:
        """These files, gone (one request per thousand on S3)."""
        if rels:
            self.fs.rm([self.path(rel) for rel in rels])

    def write_bytes(self, rel: str, data: bytes) -> str | None:
        """Writes the file whole; returns its version as `file_entries` will list it, where
        the write tells it (a disk's mtime, an S3 PUT's ETag), else None."""
        try:
            return self._write_bytes(rel, data)
        except PermissionError as err:
            raise PermissionError(f"access denied writing {self.uri_of(rel)} ({err})") from None

    def _write_bytes(self, rel: str, data: bytes) -> str | None:
        path = self.path(rel)
        if self.local:  # atomic on POSIX: readers never see half a file
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            tmp = local_spool(path)
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
            return file_version(self.fs.info(path)) or None
        # Object stores publish a PUT whole or not at all, and have no directories: one
        # request per file (a write is latency-bound), the bucket made only when missing.
        try:
            response = self.fs.pipe_file(path, data)
        except FileNotFoundError:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            response = self.fs.pipe_file(path, data)
        # s3fs answers a single PUT with its response (ETag); other stores and multipart
        # uploads tell nothing, and their files count as unknown
        return (file_version(response) or None) if isinstance(response, dict) else None

    def read_bytes(self, rel: str) -> bytes | None:
        path = self.path(rel)
        try:
            if not self.fs.exists(path):
                return None
            with self.fs.open(path, "rb") as f:
                return f.read()
        except PermissionError as err:
            raise PermissionError(f"access denied reading {self.uri_of(rel)} ({err})") from None

    def write_json(self, rel: str, doc: dict) -> None:
        self.write_bytes(rel, json.dumps(doc, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> dict | None:
        data = self.read_bytes(rel)
        return None if data is None else json.loads(data)

    def write_parquet(self, rel: str, table: pa.Table) -> tuple[int, str | None]:
        """Writes the table as one Parquet file; returns its bytes and version (`write_bytes`)."""
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.tell(), self.write_bytes(rel, buf.getvalue())

    @contextmanager
    def parquet_writer(self, rel: str, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
        """A Parquet file written a table at a time (one larger than memory, spooled to
        local disk), published whole when the block ends: a rename beside it, or one upload
        to an object store. An error inside the block publishes nothing."""
        path = self.path(rel)
        if self.local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        spool = local_spool(path) if self.local else tempfile.mkstemp(suffix=".parquet")[1]
        try:
            with pq.ParquetWriter(spool, schema) as writer:
                yield writer
            try:
                if self.local:
                    self.fs.mv(spool, path)
                else:
                    self.fs.put_file(spool, path)
            except PermissionError as err:
                raise PermissionError(f"access denied writing {self.uri_of(rel)} ({err})") from None
        finally:
            if os.path.exists(spool):
                os.remove(spool)

    def read_parquet(self, rel: str, columns=None) -> pa.Table | None:
        data = self.read_bytes(rel)
        return None if data is None else pq.read_table(io.BytesIO(data), columns=columns)
