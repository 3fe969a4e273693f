"""The package's import graph: no cycle, Ray only under launch/, lower layers never import higher ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "galaxalign_dist"
MAX_LINES = 450
# Which sub-packages each layer may import (docs/design.md#layers). train's per-epoch validation uses the
# evaluation protocol's metrics, a leaf module (numpy and scikit-learn only).
ALLOWED = {
    "data": {"data"},
    "train": {"data", "train", "evaluation.metrics"},
    "evaluation": {"data", "train", "evaluation"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """Every module named by an import statement anywhere in the file (function-level imports included).

    `from pkg import name` depends on the module pkg.name when that is one of `modules`, else on pkg.
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {
        name: {m for m in _imports(path, set(mods)) if m in mods and m != name} for name, path in mods.items()
    }


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_ray_only_under_launch():
    offenders = [
        name
        for name, path in _modules().items()
        if not name.startswith("galaxalign_dist.launch")
        and not name.startswith("galaxalign_dist.cli")
        and any(m == "ray" or m.startswith("ray.") for m in _imports(path))
    ]
    assert offenders == [], f"Ray imported outside galaxalign_dist/launch/: {offenders}"


def test_lower_layers_do_not_import_higher_ones():
    bad = []
    for name, deps in _graph().items():
        layer = name.split(".")[1] if name.count(".") >= 1 else ""
        if layer not in ALLOWED:
            continue
        for dep in deps:
            sub = dep.split(".", 1)[1] if "." in dep else dep
            top = sub.split(".")[0]
            if top in ("config", "paths", "__init__") or dep == "galaxalign_dist":
                continue
            allowed = ALLOWED[layer]
            if top not in allowed and not any(sub == a or sub.startswith(a + ".") for a in allowed):
                bad.append(f"{name} imports {dep}")
    assert bad == [], "\n".join(bad)


def test_no_library_file_over_the_limit():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"files over {MAX_LINES} lines: {long}"


def test_every_module_opens_with_a_docstring():
    missing = [
        name for name, path in _modules().items() if ast.get_docstring(ast.parse(path.read_text())) is None
    ]
    assert missing == [], missing
