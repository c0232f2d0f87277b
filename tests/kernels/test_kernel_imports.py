"""The kernel package's structure, read from the source (ast), not from what happens to be imported:
  * no import circle inside `kernels/` (imports inside functions count too);
  * no file imports another file's private (`_`-prefixed) names; a private module (`_common.py`) may be imported
    only by the files of its own package;
  * a backend imports no other backend: only the shared modules and its own files;
  * no module-level `__getattr__` shim.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
KERNELS = ROOT / "kernels"
BACKENDS_PKG = "kernels.hstu_attention.backends"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_path(name: str) -> pathlib.Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def is_package(name: str) -> bool:
    path = module_path(name)
    return path is not None and path.name == "__init__.py"


def resolve_relative(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def registry_modules() -> list[str]:
    """The backend modules `registry.py` imports by name (its `_BACKEND_MODULES` tuple of strings)."""
    tree = ast.parse((KERNELS / "hstu_attention" / "registry.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_BACKEND_MODULES" for t in node.targets):
            return [elt.value for elt in node.value.elts]
    return []


def scan() -> tuple[dict[str, set[str]], list[str]]:
    """(import graph over kernels/ modules, private-name violations)."""
    graph: dict[str, set[str]] = {}
    private: list[str] = []
    for path in sorted(KERNELS.rglob("*.py")):
        importer = module_name(path)
        edges = graph.setdefault(importer, set())
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name.startswith("kernels"))
            elif isinstance(node, ast.ImportFrom):
                source = resolve_relative(importer, node)
                if not source.startswith("kernels"):
                    continue
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    if module_path(target) is not None:
                        edges.add(target)
                        own_package = importer.rpartition(".")[0] if not is_package(importer) else importer
                        if alias.name.startswith("_") and source != own_package:
                            private.append(f"{importer} imports private module {target}")
                    else:
                        edges.add(source)
                        if alias.name.startswith("_"):
                            private.append(f"{importer} imports private name {alias.name} from {source}")
    graph["kernels.hstu_attention.registry"].update(registry_modules())
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import), Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def backend_group(name: str, backend_modules: list[str]) -> str | None:
    """The backend a module belongs to: backends/<name>[/...], or a registered module it extends by prefix."""
    if name.startswith(BACKENDS_PKG + "."):
        return ".".join(name.split(".")[:4])
    for module in backend_modules:
        if name == module or (name.startswith(module + "_") and not module.startswith(BACKENDS_PKG)):
            return module
    return None


def test_graph_sees_the_package():
    graph, _ = scan()
    assert "kernels.hstu_attention.api" in graph and "kernels.hstu_attention.registry" in graph
    assert "kernels.hstu_attention.registry" in graph["kernels.hstu_attention.api"]
    assert len(registry_modules()) >= 4, "registry._BACKEND_MODULES not found"
    assert all(module_path(m) is not None for m in registry_modules()), registry_modules()


def test_no_import_circle_in_kernels():
    graph, _ = scan()
    assert cycles(graph) == []


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_names_imported_across_files():
    _, private = scan()
    assert private == []


def test_backends_import_no_other_backend():
    graph, _ = scan()
    modules = registry_modules()
    crossing = []
    for importer, targets in graph.items():
        own = backend_group(importer, modules)
        for target in targets:
            other = backend_group(target, modules)
            if other is None or other == own:
                continue
            if importer in ("kernels.hstu_attention.registry",):
                continue
            crossing.append(f"{importer} -> {target}")
    assert crossing == []


@pytest.mark.parametrize("path", sorted(KERNELS.rglob("*.py")), ids=lambda p: str(p.relative_to(KERNELS)))
def test_no_module_getattr_shim(path):
    tree = ast.parse(path.read_text())
    assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body)
