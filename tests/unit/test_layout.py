"""The package layout's direction: protocol and privacy at the bottom, client and coordinator
above them, simulations and the CLI on top; no import cycles between modules, function-level
imports included (read from the source, nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"protocol": 0, "privacy": 0, "client": 1, "coordinator": 2, "simulations": 3, "cli": 4}
# protocol and privacy are both at the bottom; privacy may use protocol, never the reverse.
ALLOWED_SAME_LEVEL = {("privacy", "protocol")}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = f
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or ({node.module} & known)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & known
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(f, set(mods)) - {m} for m, f in mods.items()}


def test_packages_import_only_downwards() -> None:
    bad = []
    for mod, targets in _graph().items():
        src = mod.split(".")[0]
        for t in targets:
            dst = t.split(".")[0]
            if src == dst or (src, dst) in ALLOWED_SAME_LEVEL:
                continue
            if LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{mod} -> {t}")
    assert bad == []


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_checks_see_the_imports() -> None:
    graph = _graph()
    assert "coordinator.pipeline" in graph["coordinator.rounds"]
    assert "simulations.runner" in graph["cli.main"]  # a function-level import
