"""Dependencies that fit: what the product imports is what pyproject.toml installs."""
import ast
import re
import sys
from importlib.metadata import packages_distributions

import pytest
import tomllib
from conftest import REPO

PRODUCT = ("mirror_core", "pipeline", "jobs")
FIRST_PARTY = {"mirror_core", "pipeline", "benchmarks"}
# Core dependencies used without an import statement of their own.
IMPLICIT = {"s3fs": "fsspec loads it for s3:// URIs"}
# Optional modules: extra -> (module, the function that checks it, the files importing it).
OPTIONAL = {"gpu": ("triton", "mirror_core.kernels.triton_available", {"mirror_core/kernels.py",
                                                                       "mirror_core/gelu_gemm.py"}),
            "gpu-decode": ("torchvision", "mirror_core.gpu_decode.torchvision_decode_available",
                           {"mirror_core/gpu_decode.py"})}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~ ;]", name, maxsplit=1)[0]).lower()


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def imported_modules() -> dict[str, set[str]]:
    """Top-level third-party module -> files importing it (lazy imports in functions included)."""
    found: dict[str, set[str]] = {}
    for package in PRODUCT:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_imported_module_is_a_core_dependency_or_a_checked_extra():
    core = {normalize(d) for d in project()["dependencies"]}
    extras = {name: {normalize(d) for d in deps} for name, deps in project()["optional-dependencies"].items()}
    dists = packages_distributions()
    optional_modules = {module for module, *_ in OPTIONAL.values()}
    for module, files in sorted(imported_modules().items()):
        owners = {normalize(d) for d in dists.get(module, [module])}
        if module in optional_modules:
            extra, (_, _, place) = next((e, spec) for e, spec in OPTIONAL.items() if spec[0] == module)
            assert owners & extras[extra], f"{module} should be in the [{extra}] extra"
            assert files == place, f"{module} imported outside its checked places: {files}"
            continue
        assert owners & core, f"{module} (imported by {sorted(files)}) is not a core dependency"


def test_every_core_dependency_is_used():
    dists = packages_distributions()
    used = {normalize(d) for m in imported_modules() for d in dists.get(m, [m])}
    for dep in project()["dependencies"]:
        name = normalize(dep)
        assert name in used or name in IMPLICIT, f"{name} is a dependency that the product never imports"


def test_extras_hold_only_what_is_optional():
    assert set(project()["optional-dependencies"]) == {"gpu", "gpu-decode", "test"}


def test_optional_modules_are_checked_where_used(monkeypatch):
    """Without triton, the check says so and the read-out falls back (no ImportError)."""
    import importlib

    import torch

    from mirror_core import readout
    from mirror_core.gelu_gemm import gelu_epilogue_

    checks = []
    for module, checker, _ in OPTIONAL.values():
        owner, func = checker.rsplit(".", 1)
        checks.append(getattr(importlib.import_module(owner), func))
        monkeypatch.setitem(sys.modules, module, None)  # `import triton` now raises ImportError
    try:
        for check in checks:
            getattr(check, "cache_clear", lambda: None)()
            assert check() is False
        assert readout.gpu_readout_available(torch.randn(2, 3, 4, dtype=torch.bfloat16)) is False
        assert readout.inference_readout("cuda", autocast_16bit=True) == "dense masked softmax"
        with pytest.raises(RuntimeError, match=r"\[gpu\] extra"):
            gelu_epilogue_(torch.nn.Module())
    finally:
        for check in checks:
            getattr(check, "cache_clear", lambda: None)()


@pytest.mark.parametrize("path", ["Makefile", ".ci/run", "README.md"])
def test_one_pin_file_serves_make_ci_and_readme(path):
    text = (REPO / path).read_text()
    if path == ".ci/run":
        assert "make test" in text and "pip install" not in text
    else:
        assert "-c constraints.txt" in text
    pins = (REPO / "constraints.txt").read_text()
    assert re.search(r"^torch==\d", pins, re.M)
