"""protocol/ has a curated public API (protocol/__init__.py names it) and nothing outside the
package imports its private modules (`protocol._*`). tests/protocol/ is the package's own
white-box test suite and may look inside; everything else (the daemons, bench, the other
tests) uses only the public modules."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import protocol

REPO = Path(__file__).resolve().parents[2]
CHECKED = ("bridge_server", "bridge_client", "bench", "tests")
WHITE_BOX = REPO / "tests" / "protocol"


def _private_imports(path: Path) -> list[str]:
    """Every `protocol...._name` module that `path` imports, in any import form."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "protocol" else [f"protocol.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "protocol" and any(p.startswith("_") for p in parts[1:]):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    return found


def test_nothing_outside_protocol_imports_its_private_modules() -> None:
    offenders = [
        hit
        for folder in CHECKED
        for path in sorted((REPO / folder).rglob("*.py"))
        if WHITE_BOX not in path.parents and ".venv" not in path.parts
        for hit in _private_imports(path)
    ]
    assert offenders == [], "import the public module instead (protocol/__init__.py lists them)"


def test_the_public_api_names_exist_and_are_public() -> None:
    for name in protocol.__all__:
        assert not name.startswith("_")
        assert hasattr(protocol, name), name
    for module in protocol.PUBLIC_MODULES:
        assert not any(part.startswith("_") for part in module.split("."))
        imported = importlib.import_module(module)
        for name in getattr(imported, "__all__", ()):
            assert hasattr(imported, name), f"{module}.__all__ names a missing {name}"


def _names_imported_from_protocol(path: Path) -> list[tuple[str, str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        (node.module, alias.name, node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
        if node.module == "protocol" or node.module.startswith("protocol.")
        for alias in node.names
    ]


def test_code_outside_protocol_uses_only_public_names_of_public_modules() -> None:
    """A module's `__all__`, where it has one, is its whole public surface."""
    offenders = []
    for folder in CHECKED:
        for path in sorted((REPO / folder).rglob("*.py")):
            if WHITE_BOX in path.parents or ".venv" in path.parts:
                continue
            for module, name, line in _names_imported_from_protocol(path):
                where = f"{path.relative_to(REPO)}:{line}: from {module} import {name}"
                if module == "protocol":
                    ok = name in protocol.__all__ or f"protocol.{name}" in protocol.PUBLIC_MODULES
                elif module in protocol.PUBLIC_MODULES:
                    exported = getattr(importlib.import_module(module), "__all__", None)
                    ok = not name.startswith("_") and (exported is None or name in exported)
                else:
                    ok = module.startswith("protocol._") or "._" in module  # reported by the test above
                if not ok:
                    offenders.append(where)
    assert offenders == []


def test_every_public_module_is_listed() -> None:
    on_disk = {
        f"protocol.{p.stem}" for p in (REPO / "protocol").glob("*.py") if not p.stem.startswith("_")
    } | {f"protocol.runtime.{p.stem}" for p in (REPO / "protocol" / "runtime").glob("*.py")}
    on_disk -= {"protocol.runtime.__init__"}
    assert on_disk == set(protocol.PUBLIC_MODULES)
