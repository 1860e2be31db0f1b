"""A folder's files, streamed in sorted order.

`iter_files(root)` yields exactly what `sorted(fs.find(base))` returns, without
holding the listing: a folder of a hundred million images plans in bounded memory.
The order follows from one rule: a directory's entries sorted with a directory
named by its path plus '/', each directory expanded in place (every path below
`d/` sorts against any other path as `d/` does).

- Object stores (S3): a directory is listed page by page; its subdirectories are
  listed flat (no delimiter: keys come in key order, pages of S3_PAGE_KEYS) in
  background threads, PREFIXES_AHEAD of them at once, PAGES_AHEAD pages each, so a
  bucket of many prefixes lists in parallel and memory holds a few pages.
- Local disks: a depth-first walk by `os.scandir` (no stat per file); other
  filesystems: the same walk by `fs.ls`. One directory is listed at a time (memory: the
  largest directory's names).
"""
from __future__ import annotations

import collections
import os
import queue
import threading
from typing import Iterator

import fsspec

S3_PAGE_KEYS = 1000  # the most S3 returns per request
PREFIXES_AHEAD = 16  # subdirectories listed at once (request latency, not bandwidth)
PAGES_AHEAD = 4  # pages each one reads ahead of the consumer
ENTRIES_AHEAD = 10_000  # root entries held while waiting for PREFIXES_AHEAD subdirectories


def iter_files(root: str) -> Iterator[str]:
    """Every file below a folder (filesystem paths, as `fs.find` gives them), sorted."""
    fs, base = fsspec.core.url_to_fs(root)
    if "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) and hasattr(fs, "_call_s3"):
        return _s3_files(fs, base)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return _local_walk(base.rstrip("/") or "/")
    return _walk(fs, base.rstrip("/"))


# --- a local disk -----------------------------------------------------------------
def _local_walk(path: str) -> Iterator[str]:
    with os.scandir(path) as entries:  # a directory (or a link to one) is one to walk
        keyed = sorted((e.name + "/" if e.is_dir() else e.name) for e in entries)
    parent = path.rstrip("/") + "/"  # '/' itself ends with one
    for name in keyed:
        if name.endswith("/"):
            yield from _local_walk(parent + name[:-1])
        else:
            yield parent + name


# --- any fsspec filesystem ------------------------------------------------------
def _walk(fs, path: str) -> Iterator[str]:
    entries = fs.ls(path, detail=True)
    fs.invalidate_cache(path)  # a cached listing would hold the whole tree by the end
    keyed = sorted((e["name"].rstrip("/") + ("/" if e["type"] == "directory" else ""), e["type"] == "directory")
                   for e in entries)
    del entries
    for name, is_dir in keyed:
        if is_dir:
            yield from _walk(fs, name.rstrip("/"))
        else:
            yield name


# --- S3 --------------------------------------------------------------------------
def _s3_pages(fs, bucket: str, prefix: str, delimiter: bool, stop: threading.Event | None = None
              ) -> Iterator[list[tuple[str, bool]]]:
    """Pages of (key, is_prefix) below `prefix`, sorted within and across pages (S3 lists
    in key order). Each page is one request through s3fs (its retries and credentials)."""
    kwargs = dict(Bucket=bucket, Prefix=prefix, MaxKeys=S3_PAGE_KEYS, **fs.req_kw)
    if delimiter:
        kwargs["Delimiter"] = "/"
    while stop is None or not stop.is_set():
        try:
            out = fsspec.asyn.sync(fs.loop, fs._call_s3, "list_objects_v2", **kwargs)
        except PermissionError as err:
            raise PermissionError(f"access denied listing s3://{bucket}/{prefix} ({err})") from None
        page = [(c["Key"], False) for c in out.get("Contents", []) if not c["Key"].endswith("/")]
        page += [(p["Prefix"], True) for p in out.get("CommonPrefixes", [])]
        page.sort()
        yield page
        if not out.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = out["NextContinuationToken"]


class _FlatListing:
    """One prefix listed flat by a background thread, at most PAGES_AHEAD pages ahead."""

    _END = object()

    def __init__(self, fs, bucket: str, prefix: str, stop: threading.Event):
        self.pages: queue.Queue = queue.Queue(maxsize=PAGES_AHEAD)
        self.stop = stop
        threading.Thread(target=self._run, args=(fs, bucket, prefix), daemon=True).start()

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                return self.pages.put(item, timeout=0.2)
            except queue.Full:
                continue

    def _run(self, fs, bucket: str, prefix: str) -> None:
        try:
            for page in _s3_pages(fs, bucket, prefix, delimiter=False, stop=self.stop):
                self._put(page)
            self._put(self._END)
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self.pages.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield from (key for key, _ in item)


def _s3_files(fs, base: str) -> Iterator[str]:
    bucket, key, _ = fs.split_path(base)
    prefix = key.strip("/") + "/" if key.strip("/") else ""
    stop = threading.Event()
    ahead: collections.deque = collections.deque()  # (key, None) for a file, (prefix, _FlatListing)
    listing = 0  # subdirectories in `ahead`

    def release():
        nonlocal listing
        name, flat = ahead.popleft()
        if flat is None:
            yield f"{bucket}/{name}"
            return
        listing -= 1
        yield from (f"{bucket}/{k}" for k in flat)

    try:
        for page in _s3_pages(fs, bucket, prefix, delimiter=True):
            for name, is_prefix in page:
                ahead.append((name, _FlatListing(fs, bucket, name, stop) if is_prefix else None))
                listing += is_prefix
                while listing >= PREFIXES_AHEAD or len(ahead) > ENTRIES_AHEAD:
                    yield from release()
        while ahead:
            yield from release()
    finally:
        stop.set()  # an abandoned listing ends its threads
