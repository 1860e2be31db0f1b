"""A real cluster: `ray start --head`, then `ray job submit ... jobs/scan.py`."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path):
    """A head node in its own process group (so stopping it touches no other Ray),
    with token auth as Ray 2.60 requires for job submission."""
    bin_dir = Path(sys.executable).parent
    # A per-test token in the environment (not ~/.ray/auth_token): nothing outside the test changes.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    # Every agent port explicit: another Ray on this machine (the suite's local one) may
    # already hold the defaults, and the job agent would then never come up.
    agent_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port")]
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [bin_dir / "ray", "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4", "--include-dashboard=true",
         f"--temp-dir={temp_dir}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats", *agent_ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 300  # a head, its dashboard and job agent: minutes on 2 busy cores
    while time.time() < deadline:
        probe = subprocess.run([bin_dir / "ray", "job", "list", "--address", address], env=env, capture_output=True)
        if probe.returncode == 0:
            break
        time.sleep(1)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail("ray head did not come up")
    yield address, env, temp_dir
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)  # a head that ignores SIGTERM this long is killed
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_scan_with_the_documented_runtime_env(ray_cluster, parity_bundle, parity_dir, tmp_path):
    """The README's command: configs/runtime_env.yaml installs the project on the node,
    which compiles the C++ read-out there; the replicas report using it."""
    address, env, temp_dir = ray_cluster
    out = tmp_path / "job-out"
    cmd = [Path(sys.executable).parent / "ray", "job", "submit", "--address", address,
           "--runtime-env", "configs/runtime_env.yaml", "--",
           "python", "jobs/scan.py", "--model", str(parity_bundle), "--input", str(parity_dir / "data"),
           "--output", str(out), "--unit-size", "16", "--actors", "2"]
    proc = submit(cmd, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "48/48 rows: 48 scored, 0 errors" in proc.stdout
    assert "succeeded" in proc.stdout
    assert "core_worker.cc" not in proc.stdout + proc.stderr  # a clean console in the job's log too
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 48 and summary["metrics"]["ALL"]["n"] == 48
    readouts = summary["this_run"]["replica_readout"]
    assert readouts and all(r.startswith("extension (") for r in readouts), readouts
    # built on the node by the runtime env's pip install (the checkout's .so is not uploaded)
    built = list(temp_dir.glob("session_*/runtime_resources/pip/*/virtualenv/lib/python*/site-packages/mirror_core/_readout*"))
    assert built, "the runtime env did not build the extension on the node"
    # the export as a job too, after the scan (the runtime env is built already)
    export = submit(cmd[: cmd.index("jobs/scan.py")] + ["jobs/export.py", "--scan", str(out), "--output",
                                                       str(tmp_path / "export"), "--only", "scored"], env)
    assert export.returncode == 0 and f"exported 48 rows (scored) of 3 parts of {out} into 1 file" in export.stdout


def submit(cmd: list, env: dict) -> subprocess.CompletedProcess:
    """`ray job submit`, again while the head is not ready: it answers before its job agent
    is up, and its dashboard has refused a connection once on a loaded CI machine after
    answering (only those answers are retried)."""
    deadline = time.time() + 90
    retry = ("No available agent to submit job", "Failed to connect to Ray at address")
    while True:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        if not any(answer in proc.stderr for answer in retry) or time.time() > deadline:
            return proc
        time.sleep(2)
