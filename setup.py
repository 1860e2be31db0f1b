"""Build of the one native piece: the CPU top-k read-out (`csrc/topk_readout.cpp`).

Everything else is in pyproject.toml. The extension is optional at install time (a
machine without a C++ compiler still installs, and the read-out then uses torch.topk,
with a warning); the test suite requires it, so CI cannot pass without it.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mirror_core._readout",
            sources=["csrc/topk_readout.cpp"],
            depends=["csrc/readout_row.h"],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17", "-fno-math-errno"],
            optional=True,
        )
    ]
)
