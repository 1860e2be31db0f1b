"""A folder's files, streamed in sorted order.

`iter_files(root)` yields what `sorted(fs.find(base))` returns, without
holding the listing: a folder of a hundred million images plans in bounded memory.
The order follows from one rule: a directory's entries sorted with a directory
named by its path plus '/', each directory expanded in place (every path below
`d/` sorts against any other path as `d/` does).

- Object stores (S3): the folder is listed with a delimiter (its files and
  subdirectories), each subdirectory flat (no delimiter: keys come in key order),
  PREFIXES_AHEAD subdirectories ahead of the consumer. Every listing is split into key
  ranges as it goes (`S3Lister`), so one prefix of millions of keys, as much as many
  prefixes, lists as many pages at a time as the s3fs client holds connections (10 by
  default, `storage.s3_connections`); memory holds about 2 x PAGES_AHEAD pages.
- Local disks: a depth-first walk by `os.scandir`, into linked folders too (unlike
  `fs.find`; a link back to a folder above is a loop, not walked again); other
  filesystems: the same walk by `fs.ls`. One directory is listed at a time (memory: the
  largest directory's names).

`iter_files(root, versions=True)` yields (path, version) pairs instead: the version
(`storage.listed_version`) changes when a file is written again, which `--update` checks.
An S3 listing holds it (the ETag); a local disk costs a stat per file (many at once where
they are slow: a network filesystem); other filesystems give what their listing entries hold.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import fsspec

from pipeline.storage import S3_CONNECTIONS, listed_version, s3_connections

S3_PAGE_KEYS = 1000  # the most S3 returns per request
RANGES_PER_LISTING = 256  # key ranges one prefix's listing is split into at most
PAGES_AHEAD = 32  # pages listed ahead of the consumer: in the folder's listing, and in its subdirectories'
PREFIXES_AHEAD = 16  # subdirectories whose listing starts ahead of the consumer
ENTRIES_AHEAD = 10_000  # root entries held while waiting for PREFIXES_AHEAD subdirectories


def iter_files(root: str, versions: bool = False) -> Iterator[str] | Iterator[tuple[str, str]]:
    """Every file below a folder (filesystem paths, as `fs.find` gives them), sorted;
    `versions`: (path, version) pairs."""
    fs, base = fsspec.core.url_to_fs(root)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "s3" in protocols and hasattr(fs, "_call_s3"):
        files = _s3_files(fs, base)
    elif "file" in protocols:
        files = _local_files(base.rstrip("/") or "/", versions)
    else:
        files = _walk(fs, base.rstrip("/"))
    return files if versions else (path for path, _ in files)


# --- a local disk -----------------------------------------------------------------
STAT_CHUNK = 256  # files stat'ed in one go (a thread's task)
# A directory whose first chunk took longer than this a file (a network filesystem: NFS,
# Lustre) has the rest stat'ed by STAT_THREADS threads at once, hiding the latency; on a
# local disk (a few microseconds a file) threads would only contend for the GIL.
SLOW_STAT_S = 50e-6
STAT_THREADS = 16


def _local_files(base: str, versions: bool) -> Iterator[tuple[str, str | None]]:
    pool = ThreadPoolExecutor(STAT_THREADS) if versions else None
    try:
        yield from _local_walk(base, pool, frozenset({_identity(base)}))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link to itself, or a chain too long: listed as a file, whose read says so
        return False


def _local_walk(path: str, pool: ThreadPoolExecutor | None,
                above: frozenset[tuple[int, int]]) -> Iterator[tuple[str, str | None]]:
    """`above`: the directories on the way down to `path` (itself included), by device and
    inode: a link back to one of them is a loop, walked once and not again."""
    with os.scandir(path) as entries:  # a directory (or a link to one) is one to walk
        dirs, files = [], []
        for e in entries:
            (dirs if _is_dir(e) else files).append(e)
    loops = [e.path for e in dirs if e.is_symlink() and _identity(e.path) in above]
    if loops:
        logging.getLogger("mirror").warning("%s links back to a folder above it (a loop): not walked again",
                                            loops[0] + (f" and {len(loops) - 1} more" if len(loops) > 1 else ""))
        dirs = [e for e in dirs if e.path not in loops]
    versions = _stat_versions(files, pool) if pool is not None else [None] * len(files)
    keyed = sorted([(e.name + "/", None) for e in dirs] + [(e.name, v) for e, v in zip(files, versions)])
    del dirs, files, versions
    parent = path.rstrip("/") + "/"  # '/' itself ends with one
    for name, version in keyed:
        if name.endswith("/"):
            child = parent + name[:-1]
            yield from _local_walk(child, pool, above | {_identity(child)})
        else:
            yield parent + name, version


def _stat_versions(files: list[os.DirEntry], pool: ThreadPoolExecutor) -> list[str | None]:
    t = time.perf_counter()
    first = [_stat_version(e) for e in files[:STAT_CHUNK]]
    if len(files) <= STAT_CHUNK or time.perf_counter() - t <= SLOW_STAT_S * len(first):
        return first + [_stat_version(e) for e in files[STAT_CHUNK:]]
    chunks = [files[i:i + STAT_CHUNK] for i in range(STAT_CHUNK, len(files), STAT_CHUNK)]
    return first + [v for chunk in pool.map(lambda c: [_stat_version(e) for e in c], chunks) for v in chunk]


def _stat_version(entry: os.DirEntry) -> str | None:
    try:
        st = entry.stat()  # of a link's target: what a read of it reads
    except OSError:  # gone since listed, or a dangling link: its read will say so
        return None
    return listed_version({"mtime": st.st_mtime, "size": st.st_size})


# --- any fsspec filesystem ------------------------------------------------------
def _walk(fs, path: str) -> Iterator[tuple[str, str]]:
    entries = fs.ls(path, detail=True)
    fs.invalidate_cache(path)  # a cached listing would hold the whole tree by the end
    keyed = sorted((e["name"].rstrip("/") + ("/" if e["type"] == "directory" else ""), e["type"] == "directory",
                    listed_version(e)) for e in entries)
    del entries
    for name, is_dir, version in keyed:
        if is_dir:
            yield from _walk(fs, name.rstrip("/"))
        else:
            yield name, version


# --- S3 --------------------------------------------------------------------------
SPLIT_FIRST, SPLIT_LAST = 0x21, 0x7E  # a split key's own characters are printable ASCII


def key_between(low: str, high: str | None, keep: int = 0) -> str | None:
    """A key m with low < m < high (high None: no bound) that starts with low's first
    `keep` characters; None when none does whose new character is printable ASCII.
    Bisects the first character where low and high differ, so repeated splits of a
    range converge on where its keys are."""
    out, i = low[:keep], keep
    if high is not None and high[:keep] != low[:keep]:
        high = None  # high is above every key that starts so
    while True:
        a = ord(low[i]) if i < len(low) else -1  # -1: low has ended; any character is above it
        b = SPLIT_LAST + 1 if high is None else ord(high[i])  # high is longer than what they share
        if a == b:
            out, i = out + low[i], i + 1
            continue
        lo, hi = max(a, SPLIT_FIRST - 1), min(b, SPLIT_LAST + 1)
        mid = (lo + hi) // 2
        if lo < mid < hi:
            return out + chr(mid)
        if a < 0:
            return None
        out, high, i = out + low[i], None, i + 1  # below high from here on: only above low matters


@dataclass(eq=False)
class _KeyRange:
    """Keys in (after, upto] of a prefix (None: from its first, to its last), listed page by
    page with S3's continuation token; pages wait in `pages` for the consumer."""

    after: str | None
    upto: str | None
    token: str | None = None
    pages: collections.deque = field(default_factory=collections.deque)  # entry lists, or an error
    busy: bool = False  # a request is in flight
    done: bool = False  # nothing more to request
    wanted: bool = False  # the consumer waits on it: listed whatever is buffered ahead of it


class _PrefixListing:
    """One prefix's entries, (name, is_prefix, version), in key order, from ranges the
    lister fills (a subdirectory's version: None)."""

    def __init__(self, lister: "S3Lister", prefix: str, delimiter: bool):
        self.lister, self.prefix, self.delimiter = lister, prefix, delimiter
        self.ranges = [_KeyRange(None, None)]

    def __iter__(self) -> Iterator[tuple[str, bool]]:
        lister = self.lister
        try:
            while True:
                with lister.lock:
                    page = None
                    while page is None and self.ranges:
                        first = self.ranges[0]
                        if first.pages:
                            page = first.pages.popleft()
                            lister.work.notify()  # room for another page
                        elif first.done:
                            self.ranges.pop(0)
                        else:
                            if not first.wanted:
                                first.wanted = True
                                lister.work.notify()
                            lister.arrived.wait()
                    if page is None:
                        return
                if isinstance(page, BaseException):
                    raise page
                yield from page
        finally:
            lister.forget(self)


class S3Lister:
    """Lists S3 prefixes for one consumer with a worker thread per connection of the s3fs
    client (`storage.s3_connections`: more requests at once would only queue).

    A listing starts as one key range. A page that comes back truncated while a worker is
    idle splits the rest of its range at `key_between`: the range keeps the lower part, a
    new range lists the upper part from a StartAfter key. So a prefix of many keys is soon
    listed in as many places at once as there are workers, wherever its keys are.

    Workers take the first range in reading order (listings in the order made, ranges in
    key order) that is not in flight, not done, and has fewer than PAGES_AHEAD pages
    listed before it and in it (the folder's own listing, and its subdirectories' listings
    together, each within that bound), or that the consumer waits on. Memory stays
    bounded, and the pages listed are those the consumer reads next. An error is raised to
    the consumer where it happened in the order."""

    def __init__(self, fs, bucket: str):
        self.fs, self.bucket = fs, bucket
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)  # workers wait here for a range to list
        self.arrived = threading.Condition(self.lock)  # the consumer waits here for a page
        self.listings: list[_PrefixListing] = []
        self.in_flight = 0
        self.stopped = False
        self.workers = s3_connections(fs) or S3_CONNECTIONS
        for _ in range(self.workers):
            threading.Thread(target=self._work, daemon=True).start()

    def listing(self, prefix: str, delimiter: bool) -> _PrefixListing:
        with self.lock:
            listing = _PrefixListing(self, prefix, delimiter)
            self.listings.append(listing)
            self.work.notify()
        return listing

    def forget(self, listing: _PrefixListing) -> None:
        with self.lock:
            if listing in self.listings:
                self.listings.remove(listing)  # a request in flight for it is dropped on return
                listing.ranges = []
                self.work.notify()

    def close(self) -> None:
        """Ends the workers (one in a request ends when it returns)."""
        with self.lock:
            self.stopped = True
            self.work.notify_all()
            self.arrived.notify_all()

    def _reading_order(self) -> Iterator[tuple[_PrefixListing, _KeyRange, int]]:
        """Every range in reading order, with the pages buffered or in flight up to and
        including it: in the folder's own listing, or in its subdirectories' together."""
        listed = {True: 0, False: 0}
        for listing in self.listings:
            for r in listing.ranges:
                listed[listing.delimiter] += len(r.pages) + r.busy
                yield listing, r, listed[listing.delimiter]

    def _next(self) -> tuple[_PrefixListing, _KeyRange] | None:
        for listing, r, through in self._reading_order():
            if not (r.busy or r.done) and (r.wanted or through < PAGES_AHEAD):
                return listing, r
        return None

    def _pages_through(self, r: _KeyRange) -> int:
        return next(through for _, rng, through in self._reading_order() if rng is r)

    def _work(self) -> None:
        while True:
            with self.lock:
                job = None
                while not self.stopped and (job := self._next()) is None:
                    self.work.wait()
                if self.stopped:
                    return
                listing, r = job
                r.busy = True
                self.in_flight += 1
                if self._next() is not None:
                    self.work.notify()  # more to list: another worker takes it
            try:
                entries, token = self._request(listing, r)
            except BaseException as err:  # handed to the consumer, raised there
                entries, token = err, None
            with self.lock:
                r.busy = False
                if listing in self.listings:
                    self._take(listing, r, entries, token)
                self.in_flight -= 1
                self.arrived.notify_all()
                self.work.notify()

    def _request(self, listing: _PrefixListing, r: _KeyRange) -> tuple[list[tuple[str, bool, str | None]], str | None]:
        """One page of `r`: its entries in key order, and the token of the next (None: last)."""
        kwargs = dict(Bucket=self.bucket, Prefix=listing.prefix, MaxKeys=S3_PAGE_KEYS, **self.fs.req_kw)
        if listing.delimiter:
            kwargs["Delimiter"] = "/"
        if r.token is not None:
            kwargs["ContinuationToken"] = r.token
        elif r.after is not None:
            kwargs["StartAfter"] = r.after
        try:
            out = fsspec.asyn.sync(self.fs.loop, self.fs._call_s3, "list_objects_v2", **kwargs)
        except PermissionError as err:
            raise PermissionError(f"access denied listing s3://{self.bucket}/{listing.prefix} ({err})") from None
        page = [(c["Key"], False, listed_version(c)) for c in out.get("Contents", []) if not c["Key"].endswith("/")]
        page += [(p["Prefix"], True, None) for p in out.get("CommonPrefixes", [])]
        page.sort()
        return page, out.get("NextContinuationToken") if out.get("IsTruncated") else None

    def _take(self, listing: _PrefixListing, r: _KeyRange, entries, token: str | None) -> None:
        """A page of `r` (or its error) arrives: kept within the range, which may split."""
        if isinstance(entries, BaseException):
            r.pages.append(entries)
            r.done = True
            return
        # With a delimiter, a range starting inside a subdirectory is given that
        # subdirectory again: the range holding its name has it.
        kept = [e for e in entries if (r.after is None or e[0] > r.after) and (r.upto is None or e[0] <= r.upto)]
        if kept:
            r.pages.append(kept)
        # past the range's bound (or at it): the next range lists the rest
        if token is None or (entries and r.upto is not None and entries[-1][0] >= r.upto):
            r.done = True
            return
        r.token = token
        if (entries and self.in_flight < self.workers and len(listing.ranges) < RANGES_PER_LISTING
                and self._pages_through(r) < PAGES_AHEAD):  # ranges further on wait their turn
            # Split one character above where this page's keys vary: the lower part holds
            # about as many pages as one character's worth of such pages, wherever the
            # range's keys are (a first bisection of the whole key space mostly misses them).
            first, last = entries[0][0], entries[-1][0]
            keep = max(len(listing.prefix), len(os.path.commonprefix([first, last])) - 1)
            split = key_between(last, r.upto, keep)
            if split is not None:
                listing.ranges.insert(listing.ranges.index(r) + 1, _KeyRange(split, r.upto))
                r.upto = split


def _s3_files(fs, base: str) -> Iterator[tuple[str, str]]:
    bucket, key, _ = fs.split_path(base)
    prefix = key.strip("/") + "/" if key.strip("/") else ""
    lister = S3Lister(fs, bucket)
    # (key, version, None) for a file, (prefix, None, its listing's iterator)
    ahead: collections.deque = collections.deque()
    listing = 0  # subdirectories in `ahead`

    def release():
        nonlocal listing
        name, version, flat = ahead.popleft()
        if flat is None:
            yield f"{bucket}/{name}", version
            return
        listing -= 1
        yield from ((f"{bucket}/{k}", v) for k, _, v in flat)

    try:
        for name, is_prefix, version in lister.listing(prefix, delimiter=True):
            ahead.append((name, version, iter(lister.listing(name, delimiter=False)) if is_prefix else None))
            listing += is_prefix
            while listing >= PREFIXES_AHEAD or len(ahead) > ENTRIES_AHEAD:
                yield from release()
        while ahead:
            yield from release()
    finally:
        lister.close()  # an abandoned listing ends its threads


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def full_uri(fs, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def list_files(root: str) -> list[str]:
    """Every file below a folder (local or fsspec), sorted, as a scan of the folder lists
    them (`listing.iter_files`: linked folders walked): one listing serves a plan."""
    return list(iter_files(root))
