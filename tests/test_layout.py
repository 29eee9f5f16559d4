"""The module layout the README's module map describes: floors, no cycles.

Every import of an ingestd module counts, wherever it is written (top
level, inside a function, under ``TYPE_CHECKING``): a cycle hidden in any of
them still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ingestd"

pytestmark = pytest.mark.timeout(30)


def imports_of(path: Path) -> set[str]:
    """The ingestd modules ``path`` imports, by short name."""
    found: set[str] = set()
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "ingestd":
                found |= {alias.name for alias in node.names if alias.name in modules}
            elif node.module.startswith("ingestd."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {
                alias.name.split(".")[1]
                for alias in node.names
                if alias.name.startswith("ingestd.")
            }
    return found - {path.stem}


def graph() -> dict[str, set[str]]:
    return {path.stem: imports_of(path) for path in PACKAGE.glob("*.py")}


def cycle_in(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done:
                found = visit(nxt, [*path, nxt])
                if found:
                    return found
        done.add(node)
        return None

    for start in sorted(edges):
        if start not in done:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    assert cycle_in(graph()) is None, " -> ".join(cycle_in(graph()) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set()}) is None


def test_the_parent_auth_and_the_child_upload_engine_do_not_import_each_other() -> None:
    edges = graph()
    assert "blobupload" not in edges["auth"] and "auth" not in edges["blobupload"]
    assert "putblob" not in edges["auth"] and "auth" not in edges["putblob"]


def test_the_supervisor_imports_neither_metrics_nor_the_http_side() -> None:
    edges = graph()
    assert not edges["supervisor"] & {"metrics", "api", "server", "cli"}
    assert "supervisor" not in edges["status"] | edges["metrics"]


def test_the_children_never_import_the_http_side() -> None:
    edges = graph()
    http = {"api", "apiauth", "server", "cli", "metrics", "supervisor"}
    children = (
        "scanner",
        "uploader",
        "filesteps",
        "blobupload",
        "putblob",
        "childruntime",
        "leases",
    )
    for child in children:
        assert not edges[child] & http, (child, edges[child] & http)
