"""The import graph of the product: no cycle, and every arrow points down the layers.

    devkit                      development kit: may import anything; nothing imports it
    pipeline.cli                the command line
    agents                      the stages and the one runtime that binds them to faust
    pipeline.collector          opencode daemons -> Kafka
    pipeline.kafka, .clients    Kafka plumbing; the HTTP clients of opencode, scrubber, panel
    pipeline.sampling, .delivery
                                pure rules: sampling policies; breaker, retry, signing
    pipeline.config             the one typed configuration (its sections are the rules' settings)
    pipeline.model              records and their pure rules
    pipeline, .errors, .clock, .topics, .metrics, .health, .logs
                                the foundations every layer may use

A module may import from a lower layer or from its own package; anything else (an arrow up,
or sideways into another package of its layer) fails here, with the arrow named.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.fixtures import REPO

LAYERS: list[tuple[str, ...]] = [
    ("pipeline", "pipeline.errors", "pipeline.clock", "pipeline.topics", "pipeline.metrics", "pipeline.health",
     "pipeline.logs"),
    ("pipeline.model",),
    ("pipeline.config",),
    ("pipeline.sampling", "pipeline.delivery"),
    ("pipeline.kafka", "pipeline.clients"),
    ("pipeline.collector",),
    ("agents",),
    ("pipeline.cli",),
    ("devkit",),
]
OURS = ("pipeline", "agents", "devkit")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in OURS for p in (REPO / top).rglob("*.py")}


def imports(path: Path, known: set[str]) -> Iterator[str]:
    """Every module of ours that `path` imports, at module level or inside a function."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name in known:
                yield name


def group(module: str) -> tuple[int, str]:
    """(layer index, the package it belongs to): the longest prefix named in LAYERS."""
    best: tuple[int, str] | None = None
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: set(imports(path, known)) - {name} for name, path in found.items()}


def test_every_module_is_in_a_layer() -> None:
    for name in modules():
        group(name)


def test_arrows_point_down() -> None:
    wrong = []
    for source, targets in graph().items():
        s_layer, s_pkg = group(source)
        for target in targets:
            t_layer, t_pkg = group(target)
            if target == "pipeline" or (t_layer < s_layer) or (t_pkg == s_pkg and s_pkg != "pipeline"):
                continue
            wrong.append(f"{source} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt):], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_production_never_imports_the_devkit() -> None:
    bad = [f"{s} -> {t}" for s, ts in graph().items() if not s.startswith("devkit") for t in ts
           if t.startswith("devkit")]
    assert not bad, bad


def test_the_checker_sees_an_arrow_up() -> None:
    assert group("pipeline.model.records") < group("pipeline.delivery.signing")
    assert group("devkit.stubs.panel")[0] == len(LAYERS) - 1
    assert "pipeline.model.records" in graph()["pipeline.delivery.signing"]
