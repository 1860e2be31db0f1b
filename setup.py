"""Build of the native pieces: the CPU top-k read-out (`csrc/topk_readout.cpp`), Pillow's
resize passes for a crop window (`csrc/resample_window.cpp`) and the JPEG region decoder
(`csrc/jpeg_region.cpp`, linked against the system's libjpeg).

Everything else is in pyproject.toml. The extensions are optional at install time: a
machine without a C++ compiler still installs, the read-out then uses torch.topk (with a
warning) and the window resize numpy (same pixels); without libjpeg's headers
(`libjpeg-turbo8-dev` / `libjpeg62-turbo-dev` / `libjpeg-turbo-devel`) the exact
preprocessing decodes whole JPEGs with Pillow (same pixels, slower). The test suite requires the read-out and the window resize, and the
region decoder wherever libjpeg's headers are installed.
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
        ),
        Extension(
            "mirror_core._resample",
            sources=["csrc/resample_window.cpp"],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17"],
            optional=True,
        ),
        Extension(
            "mirror_core._jpegregion",
            sources=["csrc/jpeg_region.cpp"],
            libraries=["jpeg"],
            language="c++",
            extra_compile_args=["-O2", "-std=c++17"],
            optional=True,
        ),
    ]
)
