"""The package's structure, checked: each layer imports only the layers below it (the import-linter contract in
pyproject.toml), a deliberately added upward import breaks the build, and no module imports another package's
private names (a name starting with ``_`` is its own package's business)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (dev extra)")


def _lint(cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_each_layer_imports_only_the_layers_below_it():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_an_upward_import_breaks_the_build(tmp_path):
    shutil.copytree(ROOT / "lm_plugin", tmp_path / "lm_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    graph = tmp_path / "lm_plugin" / "trace" / "graph.py"
    graph.write_text(graph.read_text() + "\nfrom ..cli import main  # an upward import, deliberately\n")
    out = _lint(tmp_path, PYTHONPATH=str(tmp_path))
    assert out.returncode != 0
    assert "lm_plugin.trace is not allowed to import lm_plugin.cli" in out.stdout, out.stdout


def _module(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _package(parts: list[str]) -> str:
    """``lm_plugin.<subpackage or module>`` for the library; the top folder (``benchmarks``, ``tests``) otherwise."""
    return ".".join(parts[:2]) if parts[0] == "lm_plugin" else parts[0]


def test_no_module_imports_another_packages_private_names():
    offenders = []
    for folder in ("lm_plugin", "benchmarks", "examples", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            module = _module(path)
            here = module if path.name == "__init__.py" else module[:-1]
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom):
                    continue
                if node.level:
                    target = here[: len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
                else:
                    target = (node.module or "").split(".")
                ours = target[0] == "lm_plugin" or (ROOT / folder / f"{target[0]}.py").is_file()  # a sibling script
                if not ours:
                    continue  # other libraries' private names are their business (torch's is noted where used)
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private and _package(target) != _package(module):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {'.'.join(target)} {private}")
    assert not offenders, "private names imported across packages:\n" + "\n".join(offenders)
