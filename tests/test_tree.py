"""The tree is the architecture: module sizes and the import directions between the packages.

- ``dynamo_rt`` is the library every role uses; its core never imports a role package (``frontend``,
  ``workers``, ``planner``, ``deploy``). Only ``dynamo_rt.local`` (dev tooling: ``dynamo-rt up``) and the
  ``dynamo-rt`` console script may know the roles.
- ``workers/<engine>/`` imports ``workers.common`` and the library, never another engine's folder.
- No module is over 700 lines, and the median stays at most 250 (measured over the serving packages).
"""

from __future__ import annotations

import ast
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("dynamo_rt", "frontend", "workers", "planner", "deploy")
ROLE_PACKAGES = {"frontend", "workers", "planner", "deploy"}
MAX_LINES = 700
MAX_MEDIAN = 250


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module name ``path`` imports (absolute imports; ours use no relative ones)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_module_is_over_the_size_limit() -> None:
    big = {str(p.relative_to(REPO)): _lines(p) for p in _modules() if _lines(p) > MAX_LINES}
    assert big == {}


def test_median_module_size() -> None:
    sizes = [_lines(p) for p in _modules() if p.name != "__init__.py" or _lines(p) > 20]
    assert statistics.median(sizes) <= MAX_MEDIAN


def test_the_library_core_imports_no_role() -> None:
    bad: dict[str, list[str]] = {}
    for p in (REPO / "dynamo_rt").rglob("*.py"):
        rel = p.relative_to(REPO)
        if rel.parts[1] == "local" or rel.name == "cli.py":
            continue
        roles = sorted(m for m in _imports(p) if m.split(".")[0] in ROLE_PACKAGES)
        if roles:
            bad[str(rel)] = roles
    assert bad == {}


def test_no_engine_adapter_imports_another() -> None:
    bad: dict[str, list[str]] = {}
    for folder in (REPO / "workers").iterdir():
        if not folder.is_dir() or folder.name in ("common", "__pycache__"):
            continue
        for p in folder.rglob("*.py"):
            others = sorted(m for m in _imports(p) if m.startswith("workers.")
                            and m.split(".")[1] not in (folder.name, "common", "registry"))
            if others:
                bad[str(p.relative_to(REPO))] = others
    assert bad == {}


def test_every_package_init_says_what_it_holds() -> None:
    missing = [str(p.relative_to(REPO)) for p in _modules() if p.name == "__init__.py"
               and ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []
