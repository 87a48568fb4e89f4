"""Every third-party module geosmtp imports is installed by requirements.txt alone.

The README's first command installs requirements.txt, not requirements-test.txt: a runtime
import that only a test dependency brings in (cryptography came with trustme) works in the
test suite and fails on an operator's machine.
"""
import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_top_levels() -> set[str]:
    names = set()
    for path in (ROOT / "geosmtp").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("geosmtp", "__future__")}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_runtime_imports_are_in_requirements_txt():
    pinned = {normalized(line.split("==")[0].split("[")[0]) for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    owners = packages_distributions()
    missing = {}
    for module in imported_top_levels():
        dists = {normalized(d) for d in owners.get(module, [])}
        assert dists, f"geosmtp imports {module}, which no installed distribution provides"
        if not dists & pinned:
            missing[module] = sorted(dists)
    assert missing == {}, f"imported by geosmtp but not pinned in requirements.txt: {missing}"
