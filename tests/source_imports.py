"""Reading the gateway's imports from its source, for the tests that pin its shape
(test_layers: the import graph; test_surface: what each module takes from another)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

__all__ = ["GATEWAY", "from_imports", "module_name"]

GATEWAY = Path(__file__).parent.parent / "gateway"


def module_name(path: Path) -> str:
    parts = path.relative_to(GATEWAY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def from_imports(path: Path) -> Iterator[tuple[str, list[str]]]:
    """Each ``from X import a, b`` anywhere in the file (under ``TYPE_CHECKING`` and inside
    functions too), as (X resolved to an absolute module name, [a, b])."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        yield source, [a.name for a in node.names]
