"""Web-link reads harness (not a test): images named by http URLs, read as a decode task
reads a manifest's links (`fetch_all`, 16 threads) and as fsspec's `open` reads them.

    python benchmarks/web_reads.py [--images N] [--kb K] [--delay-s S] [--threads T] [--no-record]

Serves N files of K KB from a local HTTP server (tests/web_server.py) that delays every
request by S (a distant server), reads them both ways and prints one JSON object:
images_per_s and requests per image for each, and their ratio. fsspec's `open` asks for
the size first (HEAD) and then GETs; `fetch_all` sends one ranged GET.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from benchmarks.s3_store import report  # noqa: E402

MAX_BYTES = 256 * 2**20


def read_by_open(url: str) -> bytes:
    import fsspec

    with fsspec.open(url, "rb") as f:
        return f.read(MAX_BYTES + 1)


def web_figures(images: int, kb: int, delay_s: float, threads: int) -> dict:
    from web_server import ImageServer

    from pipeline.scan.reads import fetch_all
    from pipeline.scan.web_addresses import PRIVATE_HOSTS_ENV

    result = {"images": images, "kb": kb, "delay_s": delay_s, "threads": threads}
    with tempfile.TemporaryDirectory() as root:
        bodies = [os.urandom(kb * 1024) for _ in range(images)]
        for i, body in enumerate(bodies):
            Path(root, f"{i:06d}.jpg").write_bytes(body)
        # the server is on 127.0.0.1: allowed while it serves
        with mock.patch.dict(os.environ, {PRIVATE_HOSTS_ENV: "allow"}), ImageServer(root, delay_s=delay_s) as server:
            urls = [f"{server.url}/files/{i:06d}.jpg" for i in range(images)]

            def by_open() -> list[bytes]:
                with ThreadPoolExecutor(threads) as pool:
                    return list(pool.map(read_by_open, urls))

            ways = {"open": by_open, "fetch_all": lambda: [d for d, _ in fetch_all(urls, threads, MAX_BYTES)]}
            for name, read in ways.items():
                server.log.clear()
                t = time.perf_counter()
                got = read()
                wall = time.perf_counter() - t
                if got != bodies:
                    raise AssertionError(f"{name}: bytes differ from the served files")
                result.update({f"{name}_images_per_s": round(images / wall, 1),
                               f"{name}_requests_per_image": round(len(server.log) / images, 2)})
    result["fetch_all_over_open"] = round(result["fetch_all_images_per_s"] / result["open_images_per_s"], 2)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=800)
    p.add_argument("--kb", type=int, default=200, help="size of each image file")
    p.add_argument("--delay-s", type=float, default=0.05, help="added to every request")
    p.add_argument("--threads", type=int, default=16, help="reads at once (a decode task's fetch_threads)")
    p.add_argument("--no-record", action="store_true", help="do not append to the performance log")
    args = p.parse_args(argv)
    report(web_figures(args.images, args.kb, args.delay_s, args.threads),
           f"reading {args.images:,} web links of {args.kb} KB ({args.delay_s} s a request, "
           f"{args.threads} at once)",
           record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
