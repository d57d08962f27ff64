"""The gateway's import graph: acyclic, and its arrows point one way.

Read from the source (every import, including those under ``TYPE_CHECKING`` and inside
functions, which is where cycles used to hide), so that a cycle is caught even when the import
order of a test run happens to work.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest
from source_imports import GATEWAY, from_imports, module_name

# module -> modules (or packages, ending in ".") it must never import
FORBIDDEN = {
    "gateway.auth": ("gateway.api.", "gateway.app", "gateway.jobs", "gateway.pipeline"),
    "gateway.jobs": ("gateway.api.", "gateway.app", "gateway.auth", "gateway.server"),
    "gateway.pipeline": ("gateway.api.", "gateway.app", "gateway.auth", "gateway.jobs"),
    # Shared PostgreSQL plumbing: psycopg and anyio only.
    "gateway._pg": ("gateway.",),
    "gateway.cluster": (
        "gateway.api.",
        "gateway.app",
        "gateway.jobs",
        "gateway.pipeline",
        "gateway.engines.",
        "gateway.store",
    ),
    "gateway.sources": (
        "gateway.api.",
        "gateway.app",
        "gateway.jobs",
        "gateway.pipeline",
        "gateway.engines.",
    ),
    "gateway.api.common": (
        "gateway.api.native",
        "gateway.api.aymurai",
        "gateway.api.openai_compat",
        "gateway.app",
        "gateway.auth",
    ),
    "gateway.api.native": ("gateway.api.aymurai", "gateway.api.openai_compat", "gateway.app"),
    "gateway.api.aymurai": ("gateway.api.native", "gateway.api.openai_compat", "gateway.app"),
    "gateway.api.openai_compat": ("gateway.api.native", "gateway.api.aymurai", "gateway.app"),
}


def _imports(path: Path) -> set[str]:
    """The gateway modules ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gateway"))
    for module, names in from_imports(path):
        if module.startswith("gateway"):
            found.add(module)
            # `from . import x` and `from .api import native` name submodules.
            found.update(f"{module}.{n}" for n in names)
    return found


def _graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in GATEWAY.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        # A module's own packages (`from . import __version__`, `from . import _upstream`) are
        # loaded before it whatever it imports: not an edge.
        graph[name] = {m for m in _imports(path) if m in paths and not name.startswith(m + ".")}
        graph[name].discard(name)
    return graph


def test_the_import_graph_has_no_cycle() -> None:
    graph = _graph()
    assert {"gateway.jobs", "gateway.sources", "gateway.api.common"} <= graph.keys()
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
    assert (
        order.index("gateway.pipeline") < order.index("gateway.jobs") < order.index("gateway.app")
    )


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_arrows_point_one_way(module: str) -> None:
    imported = _graph()[module]
    wrong = sorted(m for m in imported for f in FORBIDDEN[module] if m == f or m.startswith(f))
    assert not wrong, f"{module} imports {wrong}"
