"""The test suite is self-contained: the third-party schemas it validates against are vendored (tests/schemas/,
sources and versions in its README), no test reads outside the repository, and no test skips for want of
something the test extra or the repository provides.

Skips are allowed only where the thing cannot run on a CPU-only CI machine without its own venv: the vLLM
module (``make test-vllm`` runs it), the ``gpu`` marker and an x86-only compiler-flag check.
"""

from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "tests" / "schemas"
# file (relative to tests/) -> the only skip construct it may hold
ALLOWED_SKIPS = {
    "engines/test_vllm.py": {"skipif"},
    "workers/test_reference_native.py": {"skipif"},  # the AVX2 build check needs an x86 CPU (every CI machine is)
}
SKIP_CALLS = {"skip", "skipif", "importorskip", "xfail"}


def test_vendored_schemas_match_their_recorded_checksums() -> None:
    readme = (SCHEMAS / "README.md").read_text()
    recorded = {name: digest for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.M)}
    present = {str(p.relative_to(SCHEMAS)) for p in SCHEMAS.rglob("*") if p.suffix in (".yaml", ".json")}
    assert set(recorded) == present
    assert len(present) == 6  # five RBG CRDs and the Compose schema
    for name, digest in recorded.items():
        assert hashlib.sha256((SCHEMAS / name).read_bytes()).hexdigest() == digest, name


def _tests() -> list[Path]:
    return sorted(p for p in (REPO / "tests").rglob("*.py") if p.name != "test_schemas.py")


def test_no_test_reads_outside_the_repository() -> None:
    bad = [str(p.relative_to(REPO)) for p in _tests()
           if re.search(r"REPO\.parent\b|parents\[\d\] / \"shared\"|\.\./shared", p.read_text())]
    assert bad == []


def test_no_test_skips_for_a_missing_dependency() -> None:
    found: dict[str, set[str]] = {}
    for p in _tests():
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if not (isinstance(node, ast.Attribute) and node.attr in SKIP_CALLS):
                continue
            base = node.value
            # pytest.skip(...), pytest.importorskip(...), pytest.mark.skipif(...), @mark.xfail ...
            if (isinstance(base, ast.Name) and base.id in ("pytest", "mark")) or (
                    isinstance(base, ast.Attribute) and base.attr == "mark"):
                found.setdefault(str(p.relative_to(REPO / "tests")), set()).add(node.attr)
    assert found == ALLOWED_SKIPS
