"""The Triton read-out kernel in Triton's interpreter (CPU). On a CUDA machine the same
checks run natively with `python tests/kernel_check.py cuda` (done on an H100)."""
import os
import subprocess
import sys
from pathlib import Path

CHECK = Path(__file__).with_name("kernel_check.py")


def run_check(device: str, interpret: bool) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0"}
    out = subprocess.run([sys.executable, str(CHECK), device], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"kernel checks passed on {device}" in out.stdout


def test_kernel_in_triton_interpreter():
    import triton  # noqa: F401  (the test extra installs it: missing is a failure, not a skip)
    run_check("cpu", interpret=True)

