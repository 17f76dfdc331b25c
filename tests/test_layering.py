"""The import contract: floors import only downward (core <- hooks <- analyses <- app), no cycles.

A short AST walk over every ``.py`` under ``src/lensdyn``. Every import counts, wherever it sits:
module level, inside a function (a lazy import that reaches up is still a floor reaching up), under
``if TYPE_CHECKING:``, and ``importlib.import_module("lensdyn....")`` with a literal (or f-string
prefix) module name. Relative imports are resolved against the importing module's package.

Floors, by path: ``app/`` 3, ``analyses/`` 2, ``hooks/`` 1, everything else (top-level modules,
``adapters/``) core 0. The package facade ``lensdyn/__init__.py`` re-exports the public API from
every floor and is exempt as an importer; as a target it stands for that whole API (the top floor),
except its own metadata (``from lensdyn import __version__``), which it defines before importing any
floor.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "lensdyn"
FACADE = "lensdyn"
FLOORS = {"app": 3, "analyses": 2, "hooks": 1}  # first package below lensdyn -> floor; anything else is core
NAMES = {0: "core", 1: "hooks", 2: "analyses", 3: "app"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _floor(module: str) -> int:
    """Floor of a lensdyn module by name; the facade counts as the top (it re-exports every floor)."""
    if module == FACADE:
        return max(FLOORS.values())
    return FLOORS.get(module.split(".")[1], 0)


def _existing(module: str, known=MODULES) -> str:
    """The longest prefix of ``module`` that is a module of the tree (an import of a missing name still lands there)."""
    parts = module.split(".")
    while ".".join(parts) not in known and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _dynamic_target(call: ast.Call) -> str | None:
    """``importlib.import_module("lensdyn.x")`` / ``__import__(...)``: the literal name, or an f-string's literal prefix."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        text = arg.value
    elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        text = str(arg.values[0].value).rsplit(".", 1)[0]  # f"lensdyn.analyses.{name}" -> lensdyn.analyses
    else:
        return None
    return text if text == FACADE or text.startswith(FACADE + ".") else None


def imports(module: str) -> list[tuple[int, str, str]]:
    """``(line, target module, source text)`` for every lensdyn import in ``module``, anywhere in the file."""
    path = MODULES[module]
    return parse_imports(path.read_text(encoding="utf-8"), module, path.name == "__init__.py", MODULES, str(path))


def parse_imports(source: str, module: str, is_package: bool, known, filename="<src>") -> list[tuple[int, str, str]]:
    """The lensdyn imports of ``source`` (module ``module``, a package's ``__init__`` if ``is_package``)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    lines = source.splitlines()

    def seen(node: ast.stmt | ast.expr, target: str) -> None:
        text = " ".join(line.strip() for line in lines[node.lineno - 1: node.end_lineno])
        found.append((node.lineno, target, text))

    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == FACADE or alias.name.startswith(FACADE + "."):
                    seen(node, _existing(alias.name, known))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin != FACADE and not origin.startswith(FACADE + "."):
                continue
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                if submodule in known:
                    seen(node, submodule)
                elif origin == FACADE and alias.name.startswith("__") and alias.name.endswith("__"):
                    continue  # the facade's own metadata (__version__), defined before it imports any floor
                else:
                    seen(node, _existing(origin, known))
        elif isinstance(node, ast.Call) and (target := _dynamic_target(node)):
            seen(node, _existing(target, known))
    return sorted(found)


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(SRC.parent)}:{line}"


def test_the_tree_has_every_floor():
    """The walk sees the tree it is meant to police (a moved or renamed floor would make the test vacuous)."""
    floors = {_floor(m) for m in MODULES if m != FACADE}
    assert floors == set(NAMES), f"floors found under {PACKAGE}: {sorted(NAMES[f] for f in floors)}"
    assert "lensdyn.hooks.capture" in MODULES and "lensdyn.app.cli" in MODULES


def test_relative_imports_resolve():
    """Relative imports land on the modules they name; lazy, facade and dynamic imports are all seen."""
    source = ("from . import compat\n"
              "from ..ops import f\n"
              "from .. import analyses, __version__\n"
              "def g():\n"
              "    from ..app.cli import main\n"
              "    import lensdyn.analyses.norms as norms\n"
              "    importlib.import_module(f'lensdyn.analyses.{name}')\n"
              "    from lensdyn import capture\n")
    found = parse_imports(source, "lensdyn.hooks.capture", False, MODULES)
    assert [(line, target) for line, target, _ in found] == [
        (1, "lensdyn.hooks.compat"), (2, "lensdyn.ops"), (3, "lensdyn.analyses"), (5, "lensdyn.app.cli"),
        (6, "lensdyn.analyses.norms"), (7, "lensdyn.analyses"), (8, FACADE)]
    assert [t for _, t, _ in parse_imports("from .capture import Capture\n", "lensdyn.hooks", True, MODULES)] \
        == ["lensdyn.hooks.capture"]


def test_floors_import_only_downward():
    """No module imports a floor above its own (the facade ``lensdyn/__init__.py`` is exempt)."""
    offences = []
    for module in MODULES:
        if module == FACADE:
            continue
        floor = _floor(module)
        for line, target, text in imports(module):
            if _floor(target) > floor:
                above = "the facade (every floor)" if target == FACADE else NAMES[_floor(target)]
                offences.append(f"{_where(module, line)}: {NAMES[floor]} imports {above}: {' '.join(text.split())}")
    assert not offences, f"{len(offences)} upward import(s):\n" + "\n".join(offences)


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported lensdyn module: first line}; the facade's own re-exports are left out."""
    graph: dict[str, dict[str, int]] = {}
    for module in MODULES:
        edges = graph.setdefault(module, {})
        if module == FACADE:
            continue
        for line, target, _ in imports(module):
            if target != module and target in MODULES:
                edges.setdefault(target, line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        members = set(component)
        start = min(component)
        # breadth-first search back to start inside the component: the shortest cycle through it
        parents = {start: None}
        queue = [start]
        closing = None
        while queue and closing is None:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    closing = v
                    break
                if w in members and w not in parents:
                    parents[w] = v
                    queue.append(w)
        path = [start]
        v = closing
        while v is not None and v != start:
            path.insert(1, v)
            v = parents[v]
        cycles.append(path + [start])
    return cycles


def test_cycle_finder_names_the_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycle():
    """The lensdyn import graph (every import, lazy ones included) has no cycle."""
    graph = _graph()
    cycles = _cycles(graph)
    lines = []
    for cycle in cycles:
        steps = [f"{a} ({_where(a, graph[a][b])}) -> {b}" for a, b in zip(cycle, cycle[1:])]
        lines.append(" -> ".join(cycle) + "\n    " + "\n    ".join(steps))
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(lines)
