"""S3 listing harness (not a test): a flat prefix listed one request at a time, and as
`iter_files` lists it (key ranges split as pages arrive, a request per connection at once).

    python benchmarks/listing.py [--keys N] [--page-keys K] [--delay-s S] [--connections C] [--no-record]

Writes N empty objects directly below one prefix of a moto S3 server (half numbered
'00000042.jpg', half hashed hex names), lists it through a proxy that delays every
request by S (a distant store) in pages of K keys, checks both listings against the
sorted keys and prints one JSON object: keys_per_s and requests for an s3fs client of one
connection (`serial_*`) and of C (`split_*`, 10 by default as botocore's; set through
fsspec's configuration as a user would), their ratio, and the most requests the
proxy held at once. The moto server answers each list request in time that grows with the
bucket (its CPU, not the delay, bounds the split listing on a small machine): the ratio
shows the latency the split listing overlaps, not what a real object store would sustain.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from benchmarks.s3_store import moto_bucket, report  # noqa: E402


def flat_keys(n: int) -> list[str]:
    """Half numbered names (dense in a corner of the key space), half hashed (spread)."""
    return [f"flat/{hashlib.sha1(str(i).encode()).hexdigest() if i % 2 else f'{i:08d}'}.jpg" for i in range(n)]


def listing_figures(keys: int, page_keys: int, delay_s: float, connections: int) -> dict:
    import fsspec
    import s3fs
    from s3_faults import FaultProxy

    from pipeline.scan import listing

    names = flat_keys(keys)
    expected = sorted(f"listing/{k}" for k in names)
    result = {"keys": keys, "page_keys": page_keys, "delay_s": delay_s, "serial_pages": -(-keys // page_keys)}
    listing.S3_PAGE_KEYS = page_keys
    configured = fsspec.config.conf.get("s3")
    try:
        with moto_bucket("listing", names, lambda i: b"") as upstream, FaultProxy(upstream, delay_s=delay_s) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            for name, in_flight in (("serial", 1), ("split", connections)):
                fsspec.config.conf["s3"] = {"config_kwargs": {"max_pool_connections": in_flight}}
                s3fs.S3FileSystem.clear_instance_cache()
                proxy.listings.clear()
                proxy.max_in_flight = 0
                t = time.perf_counter()
                got = list(listing.iter_files("s3://listing/flat"))
                wall = time.perf_counter() - t
                if got != expected:
                    raise AssertionError(f"{name} listing differs from the sorted keys")
                result.update({f"{name}_s": round(wall, 2), f"{name}_keys_per_s": round(keys / wall),
                               f"{name}_requests": len(proxy.listings), f"{name}_max_in_flight": proxy.max_in_flight})
    finally:
        fsspec.config.conf.pop("s3", None)
        if configured is not None:
            fsspec.config.conf["s3"] = configured
    result["split_over_serial"] = round(result["split_keys_per_s"] / result["serial_keys_per_s"], 2)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=3000)
    p.add_argument("--page-keys", type=int, default=10, help="keys per list request (S3 gives at most 1,000)")
    p.add_argument("--delay-s", type=float, default=0.4, help="added to every request")
    p.add_argument("--connections", type=int, default=10, help="the s3fs client's connections (botocore's default 10)")
    p.add_argument("--no-record", action="store_true", help="do not append to the performance log")
    args = p.parse_args(argv)
    report(listing_figures(args.keys, args.page_keys, args.delay_s, args.connections),
           f"listing a flat S3 prefix of {args.keys:,} keys (moto, {args.delay_s} s a request)",
           record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
