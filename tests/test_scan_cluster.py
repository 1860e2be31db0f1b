"""A scan on a real multi-node Ray cluster (a head and two worker nodes on this machine)
into a real S3 protocol server: every row exactly once, parts written by workers."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_image

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(s3_server):
    """Started after the S3 server, so every node's workers inherit AWS_ENDPOINT_URL."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head schedules no work
    workers = [c.add_node(num_cpus=2) for _ in range(2)]
    c.wait_for_nodes()
    yield c, {n.node_id for n in workers}
    c.shutdown()


def test_multi_node_scan_to_s3_commits_on_workers(cluster, s3_bucket, parity_bundle, tmp_path):
    import fsspec

    c, worker_nodes = cluster
    for i in range(24):
        write_image(tmp_path / "src" / ("0_real" if i % 2 else "1_fake") / f"{i:02d}.png", seed=i)
    fs = fsspec.filesystem("s3")
    fs.put(str(tmp_path / "src"), f"{s3_bucket}/images", recursive=True)
    out = f"s3://{s3_bucket}/scan"
    env = {**os.environ, "RAY_ADDRESS": c.address}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.commands.cli", "scan", "--model", str(parity_bundle),
                             "--input", f"s3://{s3_bucket}/images", "--output", out, "--unit-size", "4",
                             "--actors", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "24/24 rows: 24 scored, 0 errors" in stdout

    parts = sorted(fs.find(f"{s3_bucket}/scan/scores"))
    assert len(parts) == 6  # one per unit
    writers, uris = [], []
    for path in parts:
        with fs.open(path, "rb") as f:
            part = pq.read_table(f)
        uris += part["uri"].to_pylist()
        writers.append(json.loads(part.schema.metadata[b"mirror_writer"]))
    assert sorted(uris) == sorted(f"s3://{s3_bucket}/images/{p.parent.name}/{p.name}"
                                  for p in (tmp_path / "src").rglob("*.png"))  # every row exactly once
    assert all(w["pid"] != proc.pid for w in writers)  # never the driver process
    assert {w["node"] for w in writers} <= worker_nodes  # worker nodes (the head runs no tasks)
    summary = json.loads(fs.cat(f"{s3_bucket}/scan/summary.json"))
    assert set(summary["this_run"]["writers"]["nodes"]) <= worker_nodes
    assert sum(summary["this_run"]["writers"]["nodes"].values()) == 6
    ids = pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in parts])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 24
