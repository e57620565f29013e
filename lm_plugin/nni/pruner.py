"""``LayerMergePruner`` as an ``nni.compression`` pruner: NNI's config_list, evaluator and compress() contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn as nn
from nni.compression.base.compressor import Pruner
from nni.compression.utils import Evaluator

from .. import pruner as _core
from ..budget import DEFAULT_BUDGET, Budget
from ..errors import ArgumentTypeError, ConfigurationError, LayerMergeError, UnsupportedError
from ..plan import Plan
from ..trace import Chain
from .config import ignored_convs, normalize_config_list
from .importance import EvaluatorImportance
from .training import train_with_evaluator

Output = Literal["trainable", "merged"]


class LayerMergePruner(Pruner):
    """LayerMerge depth compression behind NNI's ``Pruner`` interface.

    ``config_list`` chooses which ``Conv2d`` layers may take part, with NNI's own selection keys; every conv it
    does not select is kept exactly as it is (never merged into a neighbour, never pruned). The latency target
    is ``budget``: NNI's config schema has no key for it.

    ``compress()`` searches the best plan for the budget, builds it, optionally fine-tunes it with the
    evaluator, and returns ``(model, {})``: the model is already structurally compressed (layers are gone, not
    masked), so there are no masks to apply and no ``ModelSpeedup`` to run.

    Args:
        model: the network to compress. Like every NNI compressor, the pruner wraps the selected convs until
            ``compress()``; afterwards ``model`` is unwrapped and unchanged, and the compressed network is a
            new module.
        config_list: NNI configs selecting the participating convs (``op_types``, ``op_names``,
            ``op_names_re``, ``exclude_op_types``, ``exclude_op_names``, ``exclude_op_names_re``). Default:
            every ``Conv2d``.
        evaluator: an NNI evaluator (``TorchEvaluator``). It supplies ``example_inputs`` (its
            ``dummy_input``), trains the ``finetune`` importance estimator, fine-tunes in ``compress`` and,
            without ``eval_data``, scores candidates with its ``evaluating_func``.
        budget: latency budget (keyword, NNI's config schema has no key for it): a fraction of the original
            network's measured latency (``0.6``, default 0.7) or a time (``"12.5ms"``).
        example_inputs: an input batch; defaults to the evaluator's ``dummy_input``.
        output: what ``compress()`` returns: ``"trainable"`` (default; fine-tune it, then :meth:`merge`) or
            ``"merged"`` (deploy form: one conv per block, BatchNorm folded).
        existed_wrappers: NNI's hook for fusing compressors; not supported (LayerMerge rewrites the graph).
        **layermerge_kwargs: any keyword of :class:`lm_plugin.LayerMergePruner` (``importance``,
            ``importance_settings``, ``eval_data``, ``train_data``, ``backend``, ``profiler_settings``,
            ``cache_dir``, ``mode``, ``max_kernel``, ``rewrite``, ``progress`` ...). ``importance`` defaults to
            ``"finetune"`` trained by the evaluator when there is one, for as many steps per entry as the core's
            default estimator takes (``importance_settings={"steps": n}`` to change).

    Raises:
        ValueError: bad ``config_list`` (sparsity keys), or neither ``example_inputs`` nor an evaluator with
            a ``dummy_input``.
        schema.SchemaError: ``config_list`` breaks NNI's schema.

    Example:
        >>> pruner = LayerMergePruner(model, [{"op_types": ["Conv2d"], "exclude_op_names": ["conv1"]}],
        ...                           evaluator, budget=0.6, importance_settings={"steps": 20})
        >>> trainable, masks = pruner.compress(max_steps=500)   # fine-tuned 500 steps by the evaluator
        >>> deployed = pruner.merge(trainable)
    """

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[dict[str, Any]] | None = None,
        evaluator: Evaluator | None = None,
        *,
        budget: float | str | Budget = DEFAULT_BUDGET,
        example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
        output: Output = "trainable",
        existed_wrappers: dict[str, Any] | None = None,
        **layermerge_kwargs: Any,
    ) -> None:
        if isinstance(config_list, (int, float, str, Budget)):
            raise ConfigurationError(
                f"the second argument is NNI's config_list, not the budget (got {config_list!r}): write "
                f"LayerMergePruner(model, config_list, evaluator, budget={config_list!r})")
        if existed_wrappers:
            raise UnsupportedError(
                "LayerMergePruner cannot be fused with another compressor (from_compressor): it rewrites the "
                "network's graph. Run it on its own, then apply other compressors to the model it returns.")
        if output not in ("trainable", "merged"):
            raise ConfigurationError(f"output must be 'trainable' or 'merged', got {output!r}")
        if "ignored_layers" in layermerge_kwargs:
            raise ArgumentTypeError("the NNI face selects layers with config_list: use exclude_op_names=[...] in a "
                            "config instead of ignored_layers")
        wrapped = [name for name, m in model.named_modules() if hasattr(m, "_nni_wrapper")]
        if wrapped:
            raise ConfigurationError(f"the model is wrapped by another NNI compressor ({wrapped[:3]} ...): call that "
                             "compressor's unwrap_model() (or compress() it first) before LayerMergePruner")
        configs = normalize_config_list(config_list)
        if example_inputs is None and evaluator is not None:
            example_inputs = evaluator.get_dummy_input()
        if example_inputs is None:
            raise ConfigurationError("LayerMerge needs an input batch: pass example_inputs=torch.randn(...) or an "
                             "evaluator built with dummy_input=...")
        self.output: Output = output
        self.plan: Plan | None = None  # the plan compress() chose (NNI compressors keep their result)
        known = frozenset(name for name, _ in model.named_parameters())
        self._known_parameters = known
        importance = self._importance(evaluator, known, layermerge_kwargs)
        # The core pruner traces a copy of the *unwrapped* model, so it is built before NNI wraps it.
        self.layermerge = _core.LayerMergePruner(
            model, budget, example_inputs, ignored_layers=ignored_convs(model, configs), importance=importance,
            **layermerge_kwargs)
        super().__init__(model, configs, evaluator)

    @staticmethod
    def _importance(evaluator: Evaluator | None, known: frozenset[str], kwargs: dict[str, Any]) -> Any:
        """Route ``finetune`` / ``zero_shot`` through the evaluator when it is what supplies data."""
        spec = kwargs.pop("importance", "finetune" if evaluator is not None else "distill")
        if evaluator is None or not isinstance(spec, str):
            return spec
        uses_evaluator = (spec == "finetune" and kwargs.get("train_data") is None) or \
                         (spec == "zero_shot" and kwargs.get("eval_data") is None)
        if not uses_evaluator:
            return spec
        settings = dict(kwargs.pop("importance_settings", None) or {})
        settings.pop("max_lr", None)  # the evaluator's optimizers set the learning rate
        if spec == "zero_shot":
            settings["steps"] = 0
        return EvaluatorImportance(evaluator=evaluator, eval_data=kwargs.pop("eval_data", None),
                                   known_parameters=known, **settings)

    # ------------------------------------------------------------------------------ the core pruner's view
    @property
    def chain(self) -> Chain:
        """The compressible conv chain (``lm_plugin.Chain``); excluded convs sit between breaks."""
        return self.layermerge.chain

    def search(self, budget: float | str | Budget | None = None) -> _core.SearchResult:
        """The best plan for ``budget`` (default: the constructor's); see :meth:`lm_plugin.LayerMergePruner.search`."""
        return self.layermerge.search(budget)

    def merge(self, trainable: fx.GraphModule) -> fx.GraphModule:
        """Deploy form of a (fine-tuned) trainable model: one conv per block, BatchNorm folded."""
        return self.layermerge.merge(trainable)

    def predict_latency(self, plan: Plan | None = None) -> float:
        """Predicted latency (ms) of ``plan`` (default: the plan ``compress()`` chose)."""
        plan = plan or self.plan
        if plan is None:
            raise LayerMergeError("no plan yet: call compress() or search() first, or pass a plan")
        return self.layermerge.predict_latency(plan)

    def measure_latency(self, model: nn.Module) -> float:
        """Measured latency (ms) of any model with the latency table's backend and settings."""
        return self.layermerge.measure_latency(model)

    # ------------------------------------------------------------------------------------- NNI contract
    def _single_compress(self, max_steps: int | None, max_epochs: int | None) -> None:
        raise UnsupportedError("LayerMergePruner overrides compress()")

    def compress(self, max_steps: int | None = None,
                 max_epochs: int | None = None) -> tuple[nn.Module, dict[str, dict[str, torch.Tensor]]]:
        """Search, rewrite, optionally fine-tune: NNI's ``(model, masks)`` contract.

        Args:
            max_steps: fine-tune the compressed network for this many optimizer steps with the evaluator's
                training function (None and no ``max_epochs``: no fine-tuning).
            max_epochs: or for this many epochs.

        Returns:
            ``(model, masks)``: ``model`` is a new ``torch.fx.GraphModule`` in the form chosen by ``output``
            (the trainable form by default); ``masks`` is empty, because nothing is left to mask.
            ``self.bound_model`` becomes that model and the pruner holds no wrappers afterwards.

        Raises:
            InfeasibleBudgetError: no plan meets the budget (the message gives the lowest achievable).
            ValueError: fine-tuning asked for without an evaluator.
        """
        if len(self.fused_compressors) > 1:
            raise UnsupportedError("LayerMergePruner cannot run fused with other compressors")
        if (max_steps or max_epochs) and self.evaluator is None:
            raise ConfigurationError("compress(max_steps=..., max_epochs=...) fine-tunes with the evaluator: construct "
                             "LayerMergePruner with evaluator=TorchEvaluator(...), or call compress() and "
                             "fine-tune the returned model yourself")
        # The rewrite replaces modules, which NNI only allows while the model is unwrapped.
        if self._is_wrapped:
            self.unwrap_model()
        plan = self.plan = self.search().plan
        model: nn.Module = self.layermerge.apply(plan)
        if max_steps or max_epochs:
            train_with_evaluator(self.evaluator, model, self._known_parameters, max_steps=max_steps,
                                 max_epochs=max_epochs)
        if self.output == "merged":
            model = self.merge(model.eval())
        # The old wrappers point into the original model; the compressed one has no masked modules.
        self.bound_model = model
        self._module_wrappers, self._target_spaces = {}, {}
        return model, {}
