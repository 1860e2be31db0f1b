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


# The interpreter runs a kernel as Python, so it accepts what Triton's compiler refuses (a
# float global inside @triton.jit once passed here and failed on the first GPU). Triton
# compiles for a named GPU without one (its ptxas is in the wheel): every kernel goes
# through the whole compiler, to a cubin, for Hopper (H100 / H200) and Ampere (A100).
HOPPER, AMPERE = ("cuda", 90, 32), ("cuda", 80, 32)


def compile_for_gpu(kernel, pointers: dict, constexprs: dict, target=HOPPER, **options):
    """The kernel's cubin for `target`; pointers: the element type of each *_ptr argument
    (the other runtime arguments are i32), constexprs: every tl.constexpr argument."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mirror_core.kernels import FP_FUSION

    signature = {}
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = "*" + pointers[param.name]
        else:
            signature[param.name] = "i32"
    assert set(constexprs) == {p.name for p in kernel.params if p.is_constexpr}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"enable_fp_fusion": FP_FUSION, **options}
    return triton.compile(source, target=GPUTarget(*target), options=options).asm["cubin"]


def test_readout_kernel_compiles_for_gpus():
    from mirror_core.config import ENTROPY_EPS, MemoryConfig
    from mirror_core.kernels import METHODS, NUM_WARPS, _kernel

    bank = MemoryConfig()  # official sizes: a row of logits per prototype slot
    top_k = bank.top_k
    for method in METHODS:
        for dtype, target in (("bf16", HOPPER), ("fp16", AMPERE)):
            cubin = compile_for_gpu(_kernel(), {"x_ptr": dtype, "max_ptr": "fp32", "ent_ptr": "fp32"},
                                    {"TOP_K": top_k, "BLOCK_C": bank.num_slots, "BLOCK_R": 1, "EPS": ENTROPY_EPS,
                                     "BOUND_BLOCKS": top_k if method == "bounded" else 0, "RADIX": method == "radix"},
                                    target, num_warps=NUM_WARPS)
            assert len(cubin) > 1000, (method, dtype)


def test_gelu_gemm_kernel_compiles_for_gpus():
    from mirror_core.gelu_gemm import GPU_TILES, _kernel

    cases = [(tile, "bf16", True, HOPPER) for tile in GPU_TILES]
    cases += [(GPU_TILES[1], "bf16", False, HOPPER), (GPU_TILES[3], "fp16", True, AMPERE)]
    for tile, dtype, even_k, target in cases:
        cubin = compile_for_gpu(_kernel(), dict.fromkeys(("x_ptr", "w_ptr", "b_ptr", "y_ptr"), dtype),
                                {"HAS_BIAS": True, "DOT_IN_FP32": False, "EVEN_K": even_k, "BLOCK_M": tile.block_m,
                                 "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k, "GROUP_M": tile.group_m},
                                target, num_warps=tile.num_warps, num_stages=tile.num_stages)
        assert len(cubin) > 1000, tile
