"""The Python blocks of README.md and docs/quickstart.md run as written (in a scratch folder, with a fresh cache)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def blocks(name: str) -> list[str]:
    return BLOCK.findall((ROOT / name).read_text())


@pytest.mark.parametrize("name", ["README.md", "docs/quickstart.md"])
def test_python_blocks_run_as_written(name, tmp_path, monkeypatch, capsys):
    code = blocks(name)
    assert code, f"{name} has no python block"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LM_PLUGIN_CACHE", str(tmp_path / "cache"))
    namespace: dict = {"__name__": "__docs__"}
    for block in code:  # one namespace: later blocks continue the first, as a reader would
        exec(compile(block, name, "exec"), namespace)
    out = capsys.readouterr().out
    assert "measured speed-up" in out and "exact" in out, out
    result = namespace["result"]
    assert result.exact and result.accuracy["compressed"] > 20  # it ran end to end (chance is 10 %); quality is
    # measured by benchmarks/, not here


def test_readme_and_quickstart_need_at_most_two_imports():
    for name in ("README.md", "docs/quickstart.md"):
        imports = [line for line in blocks(name)[0].splitlines() if line.startswith(("import ", "from "))]
        assert len(imports) <= 2, (name, imports)
