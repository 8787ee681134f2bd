"""The package layout holds: every import (those inside functions included) points down the layer
order that cancernet/__init__.py declares, or stays inside its own component; no import circle."""

import ast
from pathlib import Path

import cancernet

PACKAGE = Path(cancernet.__file__).parent


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The cancernet modules `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name and target != "cancernet":
                out.add(target)
    return out


def component(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(comp: str) -> int:
    for i, layer in enumerate(cancernet.LAYERS):
        if comp in layer:
            return i
    raise AssertionError(f"cancernet.{comp} is in no layer of cancernet.LAYERS")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items() if name != "cancernet"}


def upward_edges(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, targets in edges.items():
        for target in targets:
            a, b = component(name), component(target)
            if a != b and layer_of(b) >= layer_of(a):
                bad.append(f"{name} -> {target}")
    return sorted(bad)


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_belongs_to_a_layer():
    for name in graph():
        layer_of(component(name))


def test_imports_point_down_the_layers():
    assert upward_edges(graph()) == []


def test_no_import_circle():
    assert circles(graph()) == []


def test_the_check_finds_what_it_forbids():
    """An upward import and a circle, planted in a copy of the graph, are both reported."""
    edges = graph()
    edges["cancernet.data.formats"] = edges["cancernet.data.formats"] | {"cancernet.config"}
    assert "cancernet.data.formats -> cancernet.config" in upward_edges(edges)
    assert any("cancernet.data.formats" in c and "cancernet.config" in c for c in circles(edges))
    inside = {"cancernet.data.packed": {"cancernet.data.kaggle"}, "cancernet.data.kaggle": {"cancernet.data.packed"}}
    assert circles(inside)
