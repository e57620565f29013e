"""Every exception lm_plugin raises on purpose is a ``LayerMergeError`` (with builtin bases callers rely on)."""

from __future__ import annotations

import ast
import builtins
import importlib
import pkgutil
from pathlib import Path

import lm_plugin
from lm_plugin.errors import ConfigurationError, LayerMergeError, UnknownNameError

#: Raised on purpose but not errors of the package: a CLI's exit status.
ALLOWED = {SystemExit}


def _raised(module) -> list[tuple[str, int]]:
    """``(name, line)`` of every ``raise Name(...)`` / ``raise Name`` in the module's source."""
    tree = ast.parse(Path(module.__file__).read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(target, ast.Name):
                out.append((target.id, node.lineno))
    return out


def test_every_raised_exception_class_derives_from_layermerge_error():
    offenders = []
    for info in pkgutil.walk_packages(lm_plugin.__path__, "lm_plugin."):
        if info.name.endswith("__main__"):  # importing it runs the CLI
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional extra that is not installed
            continue
        for name, line in _raised(module):
            cls = getattr(module, name, getattr(builtins, name, None))
            if name.startswith("_") or (name == "LookupError" and info.name.endswith("canonical")):
                continue  # private signals, caught where they are raised
            if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in ALLOWED \
                    and not issubclass(cls, LayerMergeError):
                offenders.append(f"{info.name}:{line} raises {name}")
    assert not offenders, "\n".join(offenders)


def test_package_errors_keep_the_builtin_bases_callers_catch():
    assert issubclass(ConfigurationError, ValueError) and issubclass(UnknownNameError, KeyError)
    assert str(UnknownNameError("unknown dataset 'x'")) == "unknown dataset 'x'"  # not KeyError's quoted repr
