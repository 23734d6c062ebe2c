"""The dependency rule (DESIGN.md §2), read from the sources: ``server`` and ``channels`` → ``domain`` ←
``storage``; ``agentic`` → ``domain``; ``domain`` imports no aiohttp, socketio or SQLAlchemy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "domain": {"server", "channels", "storage", "agentic", "aiohttp", "socketio", "sqlalchemy", "asyncpg"},
    "channels": {"server", "storage", "agentic"},
    "storage": {"server", "channels", "agentic"},
    "agentic": {"server", "channels", "storage"},
}


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_the_rule_allows(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    broken = {str(f.relative_to(ROOT)): sorted(imports(f) & FORBIDDEN[package]) for f in files}
    assert {f: bad for f, bad in broken.items() if bad} == {}
