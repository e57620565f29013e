"""One registry for every kind of named thing: duplicates refused, unknown names listed, built-ins declared."""

from __future__ import annotations

import pytest

from lm_plugin.errors import ConfigurationError, UnknownNameError
from lm_plugin.registry import Registry


def test_a_registry_adds_by_decorator_refuses_a_second_object_and_lists_what_it_has():
    losses: Registry[object] = Registry("loss")

    @losses.register("l2")
    def l2(a, b):
        return (a - b) ** 2

    assert losses["l2"] is l2 and "l2" in losses and list(losses) == ["l2"] and len(losses) == 1
    assert losses.register("l2", l2) is l2  # the same object again: a re-imported module is harmless
    with pytest.raises(ConfigurationError, match="already registered"):
        losses.register("l2", lambda a, b: 0)
    with pytest.raises(UnknownNameError, match=r"no loss named 'l22' \(did you mean l2\?\); registered: l2") as info:
        losses["l22"]
    assert isinstance(info.value, KeyError) and isinstance(info.value, ConfigurationError)
    with pytest.raises(ConfigurationError, match="non-empty name"):
        losses.register("", l2)
    assert losses.unregister("l2") is l2 and "l2" not in losses


def test_built_ins_are_loaded_on_the_first_lookup_and_checks_refuse_bad_names():
    seen: list[str] = []
    reg: Registry[int] = Registry("thing", builtins=("json",), check=lambda name, _: seen.append(name))
    assert reg.names() == []  # importing json registers nothing here, but the import ran once
    reg.register("a", 1)
    assert seen == ["a"] and reg.get("b") is None


@pytest.mark.parametrize("where, name", [
    ("lm_plugin.latency.registry", "BACKENDS"),
    ("lm_plugin.tables.estimators", "ESTIMATORS"),
    ("lm_plugin.solve.screen", "LIFTS"),
    ("lm_plugin.data.splits", "DATASETS"),
    ("lm_plugin.workloads.models", "MODELS"),
    ("lm_plugin.pipeline.registry", "STAGES"),
])
def test_every_kind_of_named_thing_is_one_registry_with_its_built_ins(where, name):
    import importlib

    registry = getattr(importlib.import_module(where), name)
    assert isinstance(registry, Registry) and len(registry) >= 2
    first = registry.names()[0]
    with pytest.raises(ConfigurationError, match=r"already registered|reserved"):
        registry.register(first, object())
    with pytest.raises(UnknownNameError, match=f"registered: {first}"):
        registry["no_such_name"]
