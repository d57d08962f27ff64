"""The public surface: ``gateway.__all__`` is pinned, every module declares its own ``__all__``,
and inside the package one module takes from another only what that one exports.

A name left out of a module's ``__all__`` is the module's private business; importing it from
elsewhere couples two modules behind the seam that should separate them.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from source_imports import GATEWAY, from_imports, module_name

import gateway

MODULES = sorted(GATEWAY.rglob("*.py"))


def test_the_package_surface_is_pinned() -> None:
    assert sorted(gateway.__all__) == [
        "Config",
        "ConfigError",
        "Done",
        "Engine",
        "EngineUpdate",
        "Failed",
        "GatewayError",
        "GatewayState",
        "Progress",
        "Queued",
        "Segment",
        "Session",
        "SessionOptions",
        "Transcript",
        "Word",
        "__version__",
        "create_app",
        "load_config",
    ]


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_every_module_declares_what_it_exports(path: Path) -> None:
    module = importlib.import_module(module_name(path))
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list), f"{module.__name__} has no __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{module.__name__}.__all__ names what it lacks: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_modules_import_only_exported_names_from_each_other(path: Path) -> None:
    wrong = []
    for source, names in from_imports(path):
        if not source.startswith("gateway"):
            continue
        target = importlib.import_module(source)
        package = GATEWAY.parent / source.replace(".", "/")
        for alias in names:
            if hasattr(target, "__path__") and (package / f"{alias}.py").exists():
                continue  # a submodule
            if alias not in target.__all__:
                wrong.append(f"{alias} from {source}")
    assert not wrong, f"{module_name(path)} imports unexported names: {wrong}"


def test_tests_import_no_private_names() -> None:
    """Tests use what modules export. Engine internals in ``_``-prefixed modules (the pure wire
    protocols, the replay ledger, the pacer) are imported through their ``__all__``, as the
    adapters they are; a ``_name`` inside any module is never reached for."""
    wrong = []
    for path in sorted((GATEWAY.parent / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gateway"):
                module = importlib.import_module(node.module or "")
                for alias in node.names:
                    submodule = getattr(module, alias.name, None)
                    if isinstance(submodule, type(module)):
                        continue
                    private = alias.name.startswith("_") and not alias.name.endswith("__")
                    if private or alias.name not in module.__all__:
                        wrong.append(f"{path.name}: {alias.name} from {node.module}")
    assert not wrong, wrong
