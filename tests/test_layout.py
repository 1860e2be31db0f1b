"""The codebase's shape: no import cycles among product modules, lazy imports included."""
import ast

from conftest import REPO

PACKAGES = ("mirror_core", "pipeline", "benchmarks")


def module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> first-party modules it imports anywhere (top level or inside functions)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "mirror_core.kernels" in graph["mirror_core.readout"]  # imported inside a function
    assert "mirror_core.config" in graph["mirror_core.kernels"]  # relative, at the top
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_core_never_imports_the_pipeline():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("mirror_core"):
            assert not {t for t in targets if t.startswith(("pipeline", "benchmarks"))}, name


def test_cpu_stage_modules_do_not_import_torch():
    """Decode, commit, ingest and audit-filter tasks run in many CPU worker processes:
    importing torch (and transformers) there costs seconds and hundreds of MB per process."""
    import subprocess
    import sys

    # and the command line itself: `mirror --help`, a flag or config error, must not wait for them
    modules = ("pipeline.scan.decode", "pipeline.scan.commit", "pipeline.commands.ingest", "pipeline.audit.filtered",
               "pipeline.commands.cli")
    code = (f"import sys; import {', '.join(modules)}; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
