"""The package's floors (written in ``trio_jobs/__init__.py``): nothing imports upward, the
lifecycle core imports no HTTP, client, store or persistence code, and the package's
modules have no import circle. Imports inside functions and under ``TYPE_CHECKING`` count
too (only type-only imports of the store contract, ``_stores._base``, are allowed below)."""

from __future__ import annotations

import ast
from pathlib import Path

import trio_jobs

ROOT = Path(trio_jobs.__file__).parent

FLOORS: dict[str, int] = {
    "_exceptions": 0,
    "_models": 0,
    "_signals": 0,
    "_json": 0,
    "_receive": 0,
    "_channel": 1,
    "_narration": 1,
    "_job": 2,
    "_registry": 3,
    "_runner": 4,
    "_stream": 4,
    "_stores": 5,
    "_persist": 6,
    "_run": 7,
    "http": 8,
    "_client": 8,
    "testing": 8,
    "__init__": 9,
}
LIFECYCLE = 4
FORBIDDEN_BELOW = ("httpx", "httpx_sse", "quart", "quart_trio", "hypercorn", "trio_websocket")
FORBIDDEN_PARTS = ("_client", "_persist", "_stores", "http", "servers")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _floor(module: str) -> int:
    return FLOORS[module.split(".")[0]]


def _imports(path: Path) -> list[tuple[str, bool, bool]]:
    """``(target, type_only, top_level)`` of every import in the file; package-internal
    targets as dotted names relative to ``trio_jobs``, others as their top package."""
    tree = ast.parse(path.read_text())
    me = _module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    out: list[tuple[str, bool, bool]] = []

    def visit(node: ast.AST, type_only: bool, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.body:
                    visit_one(sub, True, top)
                for sub in child.orelse:
                    visit_one(sub, type_only, top)
                continue
            visit_one(child, type_only, top)

    def visit_one(child: ast.AST, type_only: bool, top: bool) -> None:
        if isinstance(child, ast.Import):
            for alias in child.names:
                name = alias.name
                if name.startswith("trio_jobs."):
                    out.append((name.removeprefix("trio_jobs."), type_only, top))
                else:
                    out.append((name.split(".")[0], type_only, top))
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                base = package[: len(package) - (child.level - 1)]
                target = ".".join([p for p in base if p] + ([child.module] if child.module else []))
                out.append((target, type_only, top))
            elif child.module and child.module.startswith("trio_jobs"):
                out.append((child.module.removeprefix("trio_jobs").lstrip("."), type_only, top))
            elif child.module:
                out.append((child.module.split(".")[0], type_only, top))
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            visit(child, type_only, False)
        else:
            visit(child, type_only, top)

    visit(tree, False, True)
    return out


def _internal(target: str) -> bool:
    return target.split(".")[0] in FLOORS and target != ""


def test_nothing_imports_upward() -> None:
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        floor = _floor(module)
        for target, type_only, _ in _imports(path):
            if type_only and target == "_stores._base":
                continue  # the store contract, for annotations only
            if _internal(target):
                assert _floor(target) <= floor, f"{module} (floor {floor}) imports {target}"


def test_the_lifecycle_core_imports_no_http_client_store_or_persistence() -> None:
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        if _floor(module) > LIFECYCLE:
            continue
        for target, type_only, _ in _imports(path):
            assert target.split(".")[0] not in FORBIDDEN_BELOW, f"{module} imports {target}"
            head = target.split(".")[0]
            if head in FORBIDDEN_PARTS:
                assert type_only and target == "_stores._base", f"{module} imports {target}"


def test_no_import_circle_among_the_modules() -> None:
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        graph[module] = {
            target
            for target, type_only, top in _imports(path)
            if _internal(target) and not type_only and top and target != module
        }
    modules = set(graph)

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    edges = {m: {r for t in ts if (r := resolve(t)) and r != m} for m, ts in graph.items()}
    # a package's __init__ re-exporting its children is not a circle with them
    for module, targets in edges.items():
        edges[module] = {t for t in targets if not module.startswith(t + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path, nxt]))
            if nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            walk(module)


def test_the_floors_are_written_in_the_package_header() -> None:
    header = trio_jobs.__doc__ or ""
    for name in ("_job", "_registry", "_runner", "_stores/", "_persist/", "_run", "_client/"):
        assert f"``{name}``" in header, name
