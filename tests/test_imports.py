"""The import graph: no module imports another's private names (anywhere, deferred imports included), and the SDK
(cocoon_faas/, without the gateway, runtime and kernels installed beside it) has no import cycle at import time
(module-level imports; a deferred import inside a function is how an optional dependency is reached)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

SDK = ROOT / "cocoon_faas"
FOLDERS = {"cocoon_faas": SDK, "cocoon_faas.gateway": ROOT / "gateway", "cocoon_faas.runtime": ROOT / "runtime"}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for prefix, folder in FOLDERS.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts]) if parts else prefix
            if prefix == "cocoon_faas" and parts and parts[0] in ("gateway", "runtime", "kernels"):
                continue
            out[name] = f
    return out


def _top_level(tree: ast.Module) -> list[ast.stmt]:
    """Statements run at import time: the module body and its try/if blocks, not `if TYPE_CHECKING:`."""
    out: list[ast.stmt] = []
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            todo.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            todo.extend(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])
    return out


def _imports(path: Path, mods: dict[str, Path], deferred: bool = True) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every `import` / `from ... import` of our own modules in `path` (only those
    run at import time unless `deferred`)."""
    out = []
    tree = ast.parse(path.read_text())
    for node in (ast.walk(tree) if deferred else _top_level(tree)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in mods:
                out.append((node.module, [a.name for a in node.names]))
            for a in node.names:  # `from cocoon_faas import confidential_client as cc`
                if f"{node.module}.{a.name}" in mods:
                    out.append((f"{node.module}.{a.name}", []))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names if a.name in mods)
    return out


def test_no_module_imports_anothers_private_names() -> None:
    mods = _modules()
    bad = [f"{name} imports {target}.{n}" for name, path in mods.items() for target, names in _imports(path, mods)
           for n in names if n.startswith("_") and target != name]
    assert bad == []


def test_the_sdk_has_no_import_cycle() -> None:
    mods = {k: v for k, v in _modules().items() if not k.startswith(("cocoon_faas.gateway", "cocoon_faas.runtime"))}
    graph = {name: {t for t, _ in _imports(path, mods, deferred=False) if t != name and not name.startswith(t + ".")}
             for name, path in mods.items()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(n: str, path: list[str]) -> None:
        seen[n] = 1
        for m in sorted(graph.get(n, ())):
            if seen.get(m) == 1:
                cycles.append(path[path.index(m):] + [m] if m in path else [n, m])
            elif m not in seen:
                visit(m, path + [m])
        seen[n] = 2

    for n in sorted(graph):
        if n not in seen:
            visit(n, [n])
    assert cycles == []


def test_tenant_side_imports_leave_the_client_out() -> None:
    """The sandbox child and tenant code (`import cocoon_faas as cocoon`) start on every deploy: they must not pull
    in the HTTP client, settings or the confidential client (~0.35 s of a ~0.5 s replica start before)."""
    import subprocess
    import sys

    code = ("import sys, cocoon_faas, cocoon_faas.runtime.sandbox_child, cocoon_faas.runtime.executor; "
            "print(sorted(m for m in sys.modules if m in ('cocoon_faas.client', 'cocoon_faas.settings', "
            "'cocoon_faas.confidential_client', 'httpx')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    lazy = subprocess.run([sys.executable, "-c", "import cocoon_faas as c; print(c.Client.__module__)"],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    assert lazy.stdout.strip() == "cocoon_faas.client"
