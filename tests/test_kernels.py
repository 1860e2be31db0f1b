"""The Triton read-out kernel: in Triton's interpreter on CPU, natively where CUDA is."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECK = Path(__file__).with_name("kernel_check.py")


def run_check(device: str, interpret: bool) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0"}
    out = subprocess.run([sys.executable, str(CHECK), device], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"kernel checks passed on {device}" in out.stdout


def test_kernel_in_triton_interpreter():
    pytest.importorskip("triton")  # installed by the test extra
    run_check("cpu", interpret=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_kernel_on_cuda():
    run_check("cuda", interpret=False)
