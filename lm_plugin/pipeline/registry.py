"""The stage registry: stage names to stage functions (:data:`STAGES`), and how stages are added."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..registry import Registry
from .contract import StageOutput

__all__ = ["STAGES", "Stage", "StageSpec", "list_stages", "register_stage"]

Stage = Callable[..., StageOutput]


@dataclass(frozen=True)
class StageSpec:
    """A registered stage.

    Attributes:
        fn: ``fn(model, ctx, **settings) -> StageOutput``.
        final: The output cannot be trained or traced again (quantised): nothing may follow the stage.
    """

    fn: Stage
    final: bool = False

    @property
    def defaults(self) -> dict[str, Any]:
        """The stage's settings and their defaults."""
        params = list(inspect.signature(self.fn).parameters.values())[2:]
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


#: Registered stages, by name (the built-in ones are registered by :mod:`lm_plugin.pipeline.stages`).
STAGES: Registry[StageSpec] = Registry("pipeline stage", builtins=(f"{__package__}.stages",))


def register_stage(name: str, fn: Stage | None = None, *, final: bool = False) -> Any:
    """Register ``fn`` as stage ``name`` (usable as a decorator: ``@register_stage("my_stage")``).

    Args:
        name: The name used in the stage list.
        fn: ``fn(model, ctx, *, setting=default, ...) -> StageOutput``; must not modify ``model``.
        final: True if its output is quantised (no stage may follow it).
    """

    def add(f: Stage) -> Stage:
        STAGES.register(name, StageSpec(f, final))  # the same function again is a no-op (equal specs)
        return f

    return add(fn) if fn is not None else add


def list_stages() -> list[str]:
    """Names of the registered stages."""
    return STAGES.names()

