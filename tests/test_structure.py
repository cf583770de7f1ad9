"""The house stays one-way: no import cycle, the core knows nothing above it, no private reach.

Every module of ``graceful/`` is parsed (nothing is imported), and every import counts, at any
depth: module level, inside functions, under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "graceful"

CORE = {
    "graceful._aio",
    "graceful._checks",
    "graceful._deadline",
    "graceful._diagnostics",
    "graceful._lifecycle",
    "graceful._listeners",
    "graceful._settings",
    "graceful._sockets",
}
"""The core: ``Lifecycle``, listeners, the deadline and its clock, and their helpers (``_sockets``:
what ``Lifecycle.listen()`` loads on first use)."""

CORE_ORDER = [
    "graceful._lifecycle",
    "graceful._deadline",
    "graceful._diagnostics",
    "graceful._settings",
    "graceful._listeners",
    "graceful._aio",
    "graceful._sockets",
    "graceful._checks",
]
"""The core from top to bottom: what each module may import is below it in this list."""

# A private attribute of a library that offers no public way to do what the adapter must do.
# (module, attribute) -> why.
THIRD_PARTY_PRIVATE = {
    ("graceful.adapters.aiohttp", "_shutdown_timeout"): "aiohttp AppRunner: its cleanup's own grace",
    ("graceful.adapters.aiohttp", "_handle_signals"): "aiohttp AppRunner: refuse one that handles signals",
    ("graceful.adapters.grpc._tracking", "_replace"): "namedtuple._replace (public API despite the _)",
    ("graceful.adapters.http", "_handle_request_noblock"): "socketserver: serve one request at a time",
    ("graceful.adapters.rq", "_shutdown_requested_date"): "rq Worker: a warm shutdown without a signal",
    ("graceful.adapters.rq", "_stop_requested"): "rq Worker: a warm shutdown without a signal",
    ("graceful.adapters.rq", "_install_signal_handlers"): "rq Worker: its signal handling off",
    (
        "graceful._celery_messages",
        "_in_poll",
    ): "kombu Redis channel: a BRPOP in flight, read before a forced exit",
}


STDLIB_PRIVATE = {
    "_current_frames": "sys._current_frames: the stacks in a report (documented, underscore by convention)",
    "_exit": "os._exit: the force quit's exit (documented, underscore by convention)",
}


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]  # relative to the package holding the module
    base = base[: len(base) - (node.level - 1)] if node.level else []
    return ".".join([*base, node.module] if node.module else base)


def _imports(module: str) -> set[str]:
    """Every graceful module that ``module`` imports, at any depth."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("graceful"))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node) if node.level else (node.module or "")
            if not target.startswith("graceful"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module) for module in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
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
            if len(component) > 1:
                found.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    return found


def test_there_is_no_import_cycle() -> None:
    """No module reaches itself through imports, counting deferred and TYPE_CHECKING ones."""
    assert _cycles() == []


def test_the_core_imports_nothing_above_it() -> None:
    """Lifecycle, listeners, force quit, clock and status import only each other."""
    assert set(MODULES) >= CORE
    reach = {module: sorted(GRAPH[module] - CORE) for module in sorted(CORE)}
    assert reach == {module: [] for module in sorted(CORE)}


def test_only_the_public_face_and_integrations_know_the_default_lifecycle() -> None:
    """``_current`` is imported by the public face and the integrations, never by the core."""
    users = sorted(module for module, imports in GRAPH.items() if "graceful._current" in imports)
    assert not set(users) & CORE
    assert "graceful._signals" not in users  # the router needs a lifecycle, knows no default


def _defined_private_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            pass
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                if isinstance(item, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "__slots__" for t in item.targets
                ):
                    names.update(
                        elt.value
                        for elt in ast.walk(item.value)
                        if isinstance(elt, ast.Constant) and isinstance(elt.value, str)
                    )
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def test_no_module_reaches_into_another_modules_private_attributes() -> None:
    """``x._name`` only for a name defined in the same module (or a listed library's)."""
    trees = {module: ast.parse(path.read_text()) for module, path in MODULES.items()}
    defined = {module: _defined_private_names(tree) for module, tree in trees.items()}
    reaches: list[str] = []
    for module, tree in trees.items():
        others = set().union(*(names for other, names in defined.items() if other != module))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, node) if node.level else (node.module or "")
                reaches.extend(
                    f"{module}: from {target} import {alias.name}"
                    for alias in node.names
                    if target.startswith("graceful")
                    and alias.name.startswith("_")
                    and not alias.name.startswith("__")
                    and f"{target}.{alias.name}" not in MODULES
                )
            if (
                not isinstance(node, ast.Attribute)
                or not node.attr.startswith("_")
                or node.attr.startswith("__")
            ):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if (module, node.attr) in THIRD_PARTY_PRIVATE or node.attr in STDLIB_PRIVATE:
                continue
            if node.attr in defined[module] and node.attr not in others:
                continue  # the module's own private name, on an object of its own
            reaches.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert reaches == []


def test_the_core_imports_point_down_its_declared_order() -> None:
    """The core is one stack, top to bottom: each module imports only modules below it."""
    order = CORE_ORDER
    assert set(order) == CORE
    upward = [
        f"{module} -> {target}"
        for module in order
        for target in GRAPH[module] & CORE
        if order.index(target) <= order.index(module)
    ]
    assert upward == []


def test_every_module_opens_with_its_reason() -> None:
    """One concept a file, said at its top: every module starts with a docstring of a few lines
    (what it is, and why it is built that way), not with code."""
    missing = []
    for module, path in MODULES.items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if doc is None or len(doc.strip().splitlines()) < 3:
            missing.append(module)
    assert missing == []
