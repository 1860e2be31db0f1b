"""Scans on a real multi-node Ray cluster (a head and two worker nodes on this machine):
into a real S3 protocol server, every row exactly once, parts written by workers; and a
worker node lost mid-scan, every row still exactly once."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_image

pytestmark = pytest.mark.slow


def start_cluster(cpus: int = 2):
    """A head that schedules no work and two worker nodes of `cpus` CPUs: (cluster, workers)."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [c.add_node(num_cpus=cpus) for _ in range(2)]
    c.wait_for_nodes()
    return c, workers


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc): a raylet's workers and theirs."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def lose_node(c, node) -> None:
    """A node gone at once, as a preempted instance goes: every worker process of its raylet
    killed first (Ray's own removal kills the raylet, and its busy workers may still finish
    a unit or two while they notice), then the node removed."""
    raylet = node.all_processes["raylet"][0].process.pid
    for pid in descendants(raylet) + [raylet]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    c.remove_node(node, allow_graceful=False)


@pytest.fixture
def cluster(s3_server):
    """Started after the S3 server, so every node's workers inherit AWS_ENDPOINT_URL."""
    c, workers = start_cluster()
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


def test_a_worker_node_lost_mid_scan_loses_no_row(parity_bundle, tmp_path):
    """A worker node dies mid-scan, as a preempted spot instance does: the node that wrote
    the first part is killed (its raylet and every process on it: a writer, decode tasks,
    perhaps a scoring replica, and the blocks in its object store). Ray restarts the actors
    on the surviving node and resubmits the tasks whose outputs were lost; the scan ends
    with every row exactly once, the survivor writing the parts the lost node no longer
    can (a writer of the lost node may still finish the part it was renaming as it died)."""
    import pyarrow.parquet as pq

    for i in range(48):  # 12 units: parts are committed a few at once, so many stay to do at the loss
        write_image(tmp_path / "src" / ("0_real" if i % 2 else "1_fake") / f"{i:02d}.png", seed=i)
    out = tmp_path / "out"
    # 3 CPUs a node: the survivor holds both replicas (the lost one restarted there) and
    # still has a CPU for the decode tasks that redo lost blocks
    c, workers = start_cluster(cpus=3)
    proc = None
    try:
        # slowed (2 s per model call of 2 images) so that most units are still to score when the
        # loss is done, even on a loaded machine where finding the first part and killing a node are slow
        env = {**os.environ, "RAY_ADDRESS": c.address, "MIRROR_FAULT_SCORE_DELAY_S": "2"}
        # the console goes to files: a pipe nobody reads fills and stalls the driver
        with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.commands.cli", "scan", "--model",
                                     str(parity_bundle), "--input", str(tmp_path / "src"), "--output", str(out),
                                     "--unit-size", "4", "--actors", "2", "--batch-size", "2"],
                                    env=env, stdout=stdout, stderr=stderr)
        deadline = time.monotonic() + 300
        while not glob.glob(str(out / "scores" / "*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        first = glob.glob(str(out / "scores" / "*.parquet"))
        assert proc.poll() is None and first, "the scan ended, or never started, before the loss"
        lost = json.loads(pq.read_schema(first[0]).metadata[b"mirror_writer"])["node"]
        lose_node(c, next(w for w in workers if w.node_id == lost))
        before = set(glob.glob(str(out / "scores" / "*.parquet")))  # the lost node wrote none after this
        assert len(before) < 12, "the scan was over before the loss"
        proc.wait(timeout=300)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        c.shutdown()
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()[-3000:]
    assert "48/48 rows: 48 scored, 0 errors" in (tmp_path / "stdout").read_text()
    parts = sorted(glob.glob(str(out / "scores" / "*.parquet")))
    assert len(parts) == 12  # one per unit
    rows = pa.concat_tables([pq.read_table(p) for p in parts])
    assert sorted(rows["uri"].to_pylist()) == sorted(str(p) for p in (tmp_path / "src").rglob("*.png"))
    after = [json.loads(pq.read_schema(p).metadata[b"mirror_writer"])["node"] for p in parts if p not in before]
    assert any(node != lost for node in after), after


SHARED_PATH_CHECK = """
import json, os, sys
import ray
from pipeline.cluster import require_shared_paths, unseen_paths
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
os.dup2(os.open(sys.argv[1], os.O_RDONLY), 987)
private = "/proc/self/fd/987"  # a path this process alone sees: no other holds that descriptor
found = {"shared": unseen_paths([sys.argv[1]]), "private": unseen_paths([sys.argv[1], private])}
require_shared_paths({sys.argv[1]: "--input"}, {sys.argv[1]: "--output"})  # shared: a probe file in it is seen
try:  # the same folder through this process's own descriptor: the probe file made in it is not seen
    require_shared_paths({}, {private: "--output"})
except ValueError as err:
    found["error"] = str(err)
found["probes_left"] = [n for n in os.listdir(sys.argv[1]) if n.startswith(".mirror")]
print(json.dumps(found))
"""


def test_a_local_path_that_other_nodes_do_not_see_is_refused_naming_them(tmp_path):
    """Before a scan starts on several nodes, each other node looks for its local --input
    and for a new file in its local --output: a path on the driver's disk alone would make
    their tasks fail to read, or write parts no one finds."""
    c, workers = start_cluster()
    try:
        proc = subprocess.run([sys.executable, "-c", SHARED_PATH_CHECK, str(tmp_path)], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": c.address})
    finally:
        c.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["shared"] == {}  # one machine: every node sees the test's folder
    private = "/proc/self/fd/987"
    assert list(found["private"]) == [private] and len(found["private"][private]) == 2  # both worker nodes
    assert found["probes_left"] == []
    assert found["error"].startswith(f"--output {private} is a local path that 2 node(s) of the cluster do not see")
    assert all(w.node_id[:8] in found["error"] for w in workers)
