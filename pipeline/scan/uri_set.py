"""A set of URIs held as 16-byte digests: what `--update` checks a new listing against,
for inputs of any size (a hundred million URIs in 1.6 GB, not the ~10 GB of their text).

A URI is in the set when its 128-bit BLAKE2b digest is: two different URIs sharing one
is as likely as a random 128-bit collision (about 1e-20 for 1e8 known and 1e8 new), so
a new file is never taken for a known one in practice.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np
import pyarrow as pa

DIGEST = np.dtype("V16")


def uri_digests(uris: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """One 16-byte digest per URI (a null URI: the digest of the empty string)."""
    blob = b"".join(hashlib.blake2b((u or "").encode(), digest_size=16).digest() for u in uris.to_pylist())
    return np.frombuffer(blob, dtype=DIGEST)


class UriSet:
    def __init__(self, batches: Iterable[pa.Array | pa.ChunkedArray] = ()):
        parts = [uri_digests(b) for b in batches]
        self.digests = np.sort(np.concatenate(parts)) if parts else np.empty(0, DIGEST)

    @classmethod
    def of_digests(cls, digests: np.ndarray) -> "UriSet":
        """The set of these digests (sorted, unique)."""
        made = cls()
        made.digests = np.unique(digests)
        return made

    def __len__(self) -> int:
        return len(self.digests)

    def positions(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each digest, where it is in the sorted set and whether it is there."""
        if not len(self.digests):
            return np.zeros(len(wanted), np.int64), np.zeros(len(wanted), bool)
        at = np.minimum(np.searchsorted(self.digests, wanted), len(self.digests) - 1)
        return at, self.digests[at] == wanted

    def contains(self, uris: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Whether each URI is in the set (a bool per URI)."""
        return self.positions(uri_digests(uris))[1]

    def check_listed(self, records: pa.Table) -> np.ndarray:
        """Whether each record of an input's new listing is known (its URI is in the set);
        `changes.KnownFiles` also notes what the listing says of the known ones."""
        return self.contains(records["uri"])
