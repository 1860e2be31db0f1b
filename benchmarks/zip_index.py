"""Zip planning harness (not a test): one zip of N small images planned from S3, as a scan
plans it (`webdataset.index_shard`: the central directory read, never the members).

    python benchmarks/zip_index.py [--members N] [--delay-s S] [--no-record]

Writes a zip of N stored 2 KiB members (a labeled tree) to a moto S3 server, plans it
through a proxy that delays every request by S (a distant store), checks every member was
planned, and prints one JSON object: members_per_s, requests, and the peak memory per
member of a process planning the same zip.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from benchmarks.s3_store import moto_bucket, report  # noqa: E402


def zip_of(members: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for i in range(members):
            archive.writestr(f"{i % 2}_{'fake' if i % 2 else 'real'}/gen{i % 7}/img_{i:07d}.jpg",
                             b"\xff\xd8" + os.urandom(2046))
    return buf.getvalue()


def zip_figures(members: int, delay_s: float) -> dict:
    import s3fs
    from s3_faults import FaultProxy

    from pipeline.scan.webdataset import index_shard

    data = zip_of(members)
    with moto_bucket("zips", ["corpus.zip"], lambda i: data) as upstream, FaultProxy(upstream, delay_s=delay_s) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        s3fs.S3FileSystem.clear_instance_cache()
        proxy.requests.clear()
        t = time.perf_counter()
        records, no_image, _ = index_shard("s3://zips/corpus.zip")
        wall = time.perf_counter() - t
    if len(records) != members or no_image or any(r["label"] is None for r in records):
        raise AssertionError(f"planned {len(records)} records of {members} members")
    gets = sum(1 for method, _ in proxy.requests if method == "GET")
    return {"members": members, "zip_mib": round(len(data) / 2**20, 1), "delay_s": delay_s,
            "plan_s": round(wall, 2), "members_per_s": round(members / wall),
            "requests": len(proxy.requests), "get_requests": gets,
            "plan_memory_bytes_per_member": planning_memory(data, members)}


def planning_memory(data: bytes, members: int) -> int:
    """Peak memory growth of a fresh process planning the zip from local disk, per member
    (this process holds the archive, and the S3 server a copy of it)."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".zip") as f:
        f.write(data)
        f.flush()
        # VmRSS / VmHWM (KiB): getrusage's peak would keep this process's, across the exec
        child = ("import re, sys\n"
                 "from pipeline.scan.webdataset import index_shard\n"
                 "kib = lambda field: int(re.search(field + r':\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
                 "before = kib('VmRSS')\n"
                 "records = index_shard(sys.argv[1])[0]\n"
                 "print(kib('VmHWM') - before)\n")
        growth_kib = int(subprocess.run([sys.executable, "-c", child, f.name], cwd=REPO, check=True,
                                        capture_output=True, text=True).stdout.split()[-1])
    return round(growth_kib * 1024 / members)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=100_000)
    p.add_argument("--delay-s", type=float, default=0.03, help="added to every request")
    p.add_argument("--no-record", action="store_true", help="do not append to the performance log")
    args = p.parse_args(argv)
    report(zip_figures(args.members, args.delay_s),
           f"planning one zip of {args.members:,} images on S3 (moto, {args.delay_s} s a request)",
           record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
