"""Paths below a local directory or an fsspec URI (s3://...), spelled one way."""
from __future__ import annotations


def join_uri(base: str, *parts: str) -> str:
    """'s3://b/x/' + 'y', '/z.json' -> 's3://b/x/y/z.json' (no doubled or trailing slashes)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
