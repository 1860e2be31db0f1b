"""A real cluster: `ray start --head`, then `ray job submit ... jobs/scan.py`."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
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
    head = subprocess.Popen(
        [bin_dir / "ray", "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats", *agent_ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        probe = subprocess.run([bin_dir / "ray", "job", "list", "--address", address], env=env, capture_output=True)
        if probe.returncode == 0:
            break
        time.sleep(1)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail("ray head did not come up")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def test_ray_job_submit_scan(ray_cluster, parity_bundle, parity_dir, tmp_path):
    address, env = ray_cluster
    out = tmp_path / "job-out"
    runtime_env = {"excludes": [".venv", ".git", "tests", "*.egg-info"]}
    cmd = [Path(sys.executable).parent / "ray", "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "jobs/scan.py", "--model", str(parity_bundle), "--input", str(parity_dir / "data"),
           "--output", str(out), "--unit-size", "16", "--actors", "2"]
    deadline = time.time() + 90
    while True:  # the head answers before its job agent is up: retry only that answer
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in proc.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "48/48 rows: 48 scored, 0 errors" in proc.stdout
    assert "succeeded" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == 48 and summary["metrics"]["ALL"]["n"] == 48
