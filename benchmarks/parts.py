"""Committed-parts harness (not a test): what reading a finished scan's parts costs on an
object store, where a large scan has tens of thousands of them.

    python benchmarks/parts.py [--parts N] [--rows R] [--delay-s S] [--no-record]

Writes N parts of R output rows each (an unlabeled corpus's, with a few error rows) to a
moto S3 server, then through a proxy that delays every request by S (a distant store)
times the readers of every part: the summary a scan writes at its end (`summarize`) when
every part is new and its counts were not reported (`summary_*`), and again with nothing
new, as after a `--update` that found nothing (`summary_again_*`: the counts kept by the
first); both for the same parts labeled (`labeled_summary_*`, `labeled_summary_again_*`:
the metrics need every scored labeled row, kept by the first in one file); the summary of a run that committed every part, its writers reporting each part's
counts, size and version (`summary_reported_*`, as a scan's first run); the stream the audit
reads (`scores_by_unit`, its columns) and `--retry-errors`' search for read failures
(`units_with_transient_errors`), and an export of every row into a few large files in the
plan's order (`export_*`: read, written to the same store). Each is checked against the rows written and reported as
seconds, parts/s, requests per part and the most requests held at once.
moto's CPU answers every request here too: read the figures as round trips overlapped,
not as what a real object store would sustain.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from benchmarks.s3_store import moto_bucket, report  # noqa: E402

ERRORS_PER_PART = 3  # rows with an error: the last one a read failure, so every part is retried


def part_bytes(rows: int, seed: int, labeled: bool = False) -> bytes:
    """One committed part: output rows of an unlabeled corpus (`labeled`: a labeled one's,
    in two subsets), a few of them errors."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.scan.schema import OUTPUT_FIELDS

    rng = np.random.default_rng(seed)
    prob = rng.random(rows)
    scored = np.arange(rows) >= ERRORS_PER_PART
    columns = {f.name: pa.nulls(rows, f.type) for f in OUTPUT_FIELDS}
    columns.update(
        uri=pa.array([f"s3://corpus/{seed}/{i:05d}.jpg" for i in range(rows)]),
        prob_fake=pa.array(np.where(scored, prob, np.nan), mask=~scored),
        pred=pa.array((prob > 0.5).astype(np.int64), mask=~scored),
        error=pa.array(["cannot identify image"] * (ERRORS_PER_PART - 1) + ["read failed: timeout"]
                       + [None] * (rows - ERRORS_PER_PART)),
    )
    if labeled:
        columns.update(label=pa.array(rng.integers(0, 2, rows)), subset=pa.array(["genA", "genB"][seed % 2:][:1] * rows))
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def parts_figures(parts: int, rows: int, delay_s: float) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs
    from s3_faults import FaultProxy

    from pipeline.scan.export import export_scores
    from pipeline.scan.store import ScanStore
    from pipeline.scan.summary import PART_TALLIES, TALLY_SCHEMA, summarize
    from pipeline.scan.units import Plan, Unit

    bodies = [part_bytes(rows, seed, labeled=False) for seed in range(4)]  # parts differ; four are enough
    bodies += [part_bytes(rows, seed, labeled=True) for seed in range(4)]
    flagged = [pq.read_table(io.BytesIO(body))["pred"].to_pylist().count(1) for body in bodies[:4]]  # per part
    keys = [f"{scan}/scores/part-{i:08d}.parquet" for scan in ("scan", "labeled") for i in range(parts)]
    result = {"parts": parts, "rows_per_part": rows, "part_kb": round(len(bodies[0]) / 1024, 1), "delay_s": delay_s}
    with moto_bucket("scans", keys, lambda i: bodies[i % 4 + 4 * (i >= parts)]) as upstream, \
            FaultProxy(upstream, delay_s=delay_s) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        s3fs.S3FileSystem.clear_instance_cache()
        out = ScanStore("s3://scans/scan")

        def timed(name, read, check):
            proxy.requests.clear()
            proxy.max_in_flight = 0
            t = time.perf_counter()
            got = read()
            wall = time.perf_counter() - t
            if not check(got):
                raise AssertionError(f"{name}: wrong result {str(got)[:200]}")
            result.update({f"{name}_s": round(wall, 2), f"{name}_parts_per_s": round(parts / wall, 1),
                           f"{name}_requests_per_part": round(len(proxy.requests) / parts, 2),
                           f"{name}_max_in_flight": proxy.max_in_flight})

        def right(s):
            return s["rows_out"] == parts * rows and s["errors"] == parts * ERRORS_PER_PART and \
                s["flagged"] == sum(flagged[i % 4] for i in range(parts))

        timed("summary", lambda: summarize(out, parts * rows, 0, {}, written=None), right)
        timed("summary_again", lambda: summarize(out, parts * rows, 0, {}, written=None), right)
        listed = out.committed_parts()  # what the writers would have reported: the parts as written
        reported = pa.table({**{name: listed[name] for name in listed.column_names},
                             "rows": [rows] * parts, "errors": [ERRORS_PER_PART] * parts, "labeled": [0] * parts,
                             "flagged": [flagged[i % 4] for i in range(parts)],
                             "error_kinds": [json.dumps({"cannot identify image": ERRORS_PER_PART - 1, "read failed": 1})] * parts},
                            schema=TALLY_SCHEMA)
        out.fs.rm(out.path(PART_TALLIES))
        timed("summary_reported", lambda: summarize(out, parts * rows, 0, {}, written=reported), right)
        timed("audit_stream", lambda: sum(t.num_rows for _, t in out.scores_by_unit(["uri", "prob_fake", "error"])),
              lambda n: n == parts * rows)
        timed("retry_search", lambda: out.units_with_transient_errors(out.done_units()), lambda u: len(u) == parts)
        # the plan an export follows: the parts' units, in an order other than their ids'
        units = [Unit(f"{i:08d}", "shard", rows, f"s3://corpus/shard-{i}.parquet", 0) for i in reversed(range(parts))]
        out.write_json("_scan.json", {"input": "s3://corpus", "model_id": "m"})
        out.save_plan(Plan("s3://corpus", "parquet", units, pa.table({})))
        timed("export", lambda: export_scores(out.uri, "s3://scans/export"), lambda r: r.rows == parts * rows
              and r.parts == parts and len(r.files) == -(-parts * rows // 1_000_000))
        labeled = ScanStore("s3://scans/labeled")  # the same parts, labeled: the metrics need their scored rows

        def metrics_right(s):
            return right(s) and s["metrics"]["ALL"]["n"] == parts * (rows - ERRORS_PER_PART)

        timed("labeled_summary", lambda: summarize(labeled, parts * rows, 0, {}, written=None), metrics_right)
        timed("labeled_summary_again", lambda: summarize(labeled, parts * rows, 0, {}, written=None), metrics_right)
    result["labeled_again_over_first"] = round(result["labeled_summary_again_parts_per_s"]
                                               / result["labeled_summary_parts_per_s"], 1)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", type=int, default=400)
    p.add_argument("--rows", type=int, default=1024, help="rows per part (configs/s3-cluster.yaml's unit_size)")
    p.add_argument("--delay-s", type=float, default=0.03, help="added to every request")
    p.add_argument("--no-record", action="store_true", help="do not append to the performance log")
    args = p.parse_args(argv)
    report(parts_figures(args.parts, args.rows, args.delay_s),
           f"reading {args.parts:,} committed parts of {args.rows:,} rows on S3 (moto, "
           f"{args.delay_s} s a request)",
           record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
