"""kapify's modules stand on floors: a module imports only from its own floor or lower ones, and no
imports (lazy ones inside functions and type-checking ones included) go round in a circle. The floors
are the README's layout table, lowest first."""

import ast
from pathlib import Path
from typing import Dict, List, Set

from tests.helpers import ROOT

# lowest first; a module belongs to the floor of the longest prefix that names it
FLOORS: List[Set[str]] = [
    {
        "kapify.files",
        "kapify.heap",
        "kapify.versions",
        "kapify.distributed",
        "kapify.options",
        "kapify.precision",
        "kapify.model_source",
    },
    {"kapify.layers"},
    {"kapify.surgery"},
    {"kapify.models"},
    {"kapify.data", "kapify.attacks", "kapify.serialization", "kapify.reporting"},
    {"kapify.evaluation"},
    {"kapify.training"},
    {"kapify", "kapify.cli", "kapify.extend"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> Dict[str, Set[str]]:
    """module -> the kapify modules it imports (at the top, in functions, or for type checking)."""
    graph: Dict[str, Set[str]] = {}
    for path in sorted((ROOT / "kapify").rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == "kapify")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.split(".")[0] != "kapify":
                    continue
                for alias in node.names:  # `from .pkg import submodule` imports the submodule
                    sub = f"{module}.{alias.name}"
                    targets.add(sub if _is_module(sub) else module)
        targets.discard(name)
    return graph


def floor_of(module: str) -> int:
    best = max((p for floor in FLOORS for p in floor if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, floor in enumerate(FLOORS) if best in floor)


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_floor():
    for module in import_graph():
        floor_of(module)  # raises for a module no floor names


def test_no_module_imports_from_a_higher_floor():
    climbs = [
        f"{module} (floor {floor_of(module)}) imports {target} (floor {floor_of(target)})"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if floor_of(target) > floor_of(module)
    ]
    assert climbs == []


def test_no_imports_go_round_in_a_circle():
    assert cycles(import_graph()) == []


def test_the_checks_see_a_climb_and_a_circle():
    graph = {"kapify.layers.a": {"kapify.surgery.b"}, "kapify.surgery.b": {"kapify.layers.a"}}
    assert floor_of("kapify.surgery.b") > floor_of("kapify.layers.a")
    assert cycles(graph) == [["kapify.layers.a", "kapify.surgery.b"]]
    # relative, lazy and package imports are resolved to the modules they name
    graph = import_graph()
    assert {"kapify.surgery.config", "kapify.layers.input_stage"} <= graph["kapify.surgery.fold"]
    assert "kapify.surgery.scripting" in graph["kapify.surgery.kap_conv"]  # imported inside a method
