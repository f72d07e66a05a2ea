"""The package's imports run down its layers, with no cycle (docs/layout.md).

Every ``import`` of every module is read with :mod:`ast`, the lazy ones inside functions included,
so a check cannot hide an upward import by deferring it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dlmdistill"

#: rooms (a top-level module or subpackage of dlmdistill) from the bottom up; a room may import only rooms
#: of a lower layer (and itself), never one of its own layer. docs/layout.md says what each holds.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),                              # 0 the error types
    ("config",),                              # 1 the dataclass / YAML / command-line machinery
    ("configs",),                             # 2 the configurations: declarations and value checks
    ("tasks", "models"),                      # 3 data, prompts and verifiers; backbones and tokenizers
    ("convert", "data", "diffusion", "sampling", "flops", "estimate", "score", "report", "show"),  # 4
    ("losses", "evaluation", "training"),     # 5 pure losses; evaluation harness; the training loop
    ("methods",),                             # 6 one recipe per method
    ("analysis", "api"),                      # 7 analyses of trained models; the Python API
    ("__init__", "demo"),                     # 8 the package's own namespace; the demo
    ("integrations",),                        # 9 lm-evaluation-harness
    ("cli",),                                 # 10
]
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (at any depth of its code)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:  # a submodule imported by name is an edge to it, not to its package
                    sub = f"{target}.{alias.name}"
                    if sub in files:
                        graph[mod].add(sub)
                    elif target in files:
                        graph[mod].add(target)
            elif isinstance(node, ast.Import):
                graph[mod].update(a.name for a in node.names if a.name in files)
        graph[mod].discard(mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_room_has_a_layer():
    assert {room(m) for m in import_graph()} <= set(RANK), "add the new module to LAYERS (and docs/layout.md)"


def test_imports_run_down_the_layers():
    upward = [f"{a} -> {b}" for a, targets in import_graph().items() for b in sorted(targets)
              if room(a) != room(b) and RANK[room(b)] >= RANK[room(a)]]
    assert upward == [], "imports against the layering (docs/layout.md):\n" + "\n".join(upward)


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_configs_import_no_runtime_module():
    runtime = [f"{a} -> {b}" for a, targets in import_graph().items() if room(a) == "configs"
               for b in sorted(targets) if room(b) not in ("configs", "config", "errors")]
    assert runtime == []


def test_the_checks_see_a_planted_upward_import_and_cycle():
    graph = import_graph()
    graph["dlmdistill.configs.model"] = graph["dlmdistill.configs.model"] | {"dlmdistill.models.loading"}
    assert any("dlmdistill.configs.model" in c for c in cycles(graph))
    assert RANK[room("dlmdistill.models.loading")] > RANK[room("dlmdistill.configs.model")]


def test_a_long_module_says_why():
    """No source file over 500 lines without a reason in its docstring ("Why one file of this length")."""
    long = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
            if len(p.read_text().splitlines()) > 500 and "Why one file of this length" not in (ast.get_docstring(
                ast.parse(p.read_text())) or "")]
    assert long == []
