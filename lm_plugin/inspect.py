"""What of a model LayerMerge can compress, before any table is built: ``inspect_model(model, x)``.

It traces the model and extracts its chain exactly as :class:`~lm_plugin.LayerMergePruner` does (no latency or
importance table is built, so it takes seconds), then reports how many convolutions the chain covers, how many
activations a plan may remove and convs it may drop, and *why* the rest is out of reach: every break position
of the chain, grouped into readable categories (``SE multiply ×16, concat ×4, pooling ×3``).

A model the library refuses (untraceable, no chain) gives a report that says so and why; nothing is raised.

Example:
    >>> report = inspect_model(torchvision.models.mobilenet_v3_small(), torch.randn(1, 3, 224, 224))
    >>> print(report.summary())
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArgumentTypeError, ConfigurationError, LayerMergeError

__all__ = ["CompressibilityReport", "break_category", "inspect_model"]

# --------------------------------------------------------------------------------------- break categories
# Op names as the chain spells them in "next op: A, B" (module class names, function and method names).
_POOL = re.compile(r"(pool|^mean$|^amax$|^amin$|^sum$)", re.IGNORECASE)
_MUL = {"mul", "mul_", "__mul__", "matmul", "bmm", "einsum"}
_GATE = {"sigmoid", "sigmoid_", "hardsigmoid", "hard_sigmoid", "hardsigmoid_", "gate", "softmax", "tanh"}
_CONCAT = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
_ADD = {"add", "add_", "iadd", "__add__", "sub", "sub_"}
_DROP = {"stochastic_depth", "stochasticdepth", "droppath", "drop_path", "dropout", "dropout2d", "dropblock2d"}
_SHAPE = {"view", "reshape", "permute", "transpose", "flatten", "contiguous", "chunk", "split", "getitem",
          "unflatten", "squeeze", "unsqueeze", "channel_shuffle", "pixel_shuffle", "narrow", "roll", "expand",
          "size", "getattr", "unbind", "split_with_sizes", "tensor_split"}
_HEAD = {"output", "linear", "classifierhead", "normmlpclassifierhead", "selectadaptivepool2d"}
_NORM = re.compile(r"(norm|^bn|batchnorm|layernorm|groupnorm|instancenorm|frozenbatchnorm)", re.IGNORECASE)
_PAD = {"pad", "constantpad2d", "zeropad2d", "reflectionpad2d", "replicationpad2d"}
_RESIZE = {"upsample", "upsamplingnearest2d", "upsamplingbilinear2d", "interpolate", "upsample_nearest2d",
           "upsample_bilinear2d", "pixelshuffle", "pixelunshuffle"}
_ACT = re.compile(r"(relu|gelu|silu|swish|mish|elu|hardswish|hardtanh|softplus|celu|selu|prelu|"
                  r"hard_swish|quickgelu|activation)", re.IGNORECASE)
_CONV = re.compile(r"(conv|linear)", re.IGNORECASE)

#: Break reasons every chain has at its two ends; not a limitation of the model, so not counted.
CHAIN_ENDS = ("chain input", "chain output")


def _ops(reason: str) -> list[str]:
    return [op.strip() for op in reason.split(":", 1)[1].split(",") if op.strip()]


def break_category(reason: str | None) -> str:
    """The readable category of one raw break reason (``ChainPosition.break_reason``).

    ``"next op: AdaptiveAvgPool2d, mul"`` (the value feeds a squeeze-excite gate and its multiply) is
    ``"SE multiply"``, ``"next op: cat"`` is ``"concat"``, ``"next op: MaxPool2d"`` is ``"pooling"``, and so
    on; a reason no rule knows is kept as ``"other: <reason>"`` so nothing is hidden.
    """
    if not reason:
        return "unknown"
    text = reason.strip()
    low = text.lower()
    if low in CHAIN_ENDS:
        return "chain end"
    if low.startswith("next op:"):
        ops = _ops(text)
        names = {op.lower() for op in ops}
        bare = {re.sub(r"[^a-z0-9_]", "", n) for n in names}
        if names & _CONCAT:
            return "concat"
        if bare & _MUL and (any(_POOL.search(n) for n in names) or bare & _GATE):
            return "SE multiply"
        if bare & _MUL:
            return "multiply (gating)"
        if bare & _GATE or any("excit" in n for n in names):
            return "SE gate (sigmoid)"
        if any(_POOL.search(n) for n in names):
            return "pooling"
        if bare & _ADD:
            return "unfolded residual add"
        if bare & _DROP:
            return "stochastic depth / dropout"
        if bare & _SHAPE:
            return "reshape / permute / split"
        if bare & _PAD:
            return "explicit padding"
        if bare & _RESIZE:
            return "upsample / resize"
        if any(_NORM.search(n) for n in names):
            return "normalisation (not foldable)"
        if bare & _HEAD:
            return "head / output"
        if any(_ACT.search(n) for n in names):
            return "activation kept as an op"
        if any(_CONV.search(n) for n in names):
            return "conv outside the chain"
        return f"other op: {', '.join(ops)}"
    if "parallel conv" in low:
        return "parallel branches"
    if "crossing residual" in low or "residual" in low:
        return "unfoldable residual"
    if "ignored_layers" in low:
        return "ignored layer"
    if "value unused" in low:
        return "value unused"
    if "segment boundary" in low:
        return "segment boundary"
    return f"other: {text}"


def _format_counts(counts: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{name} ×{n}" for name, n in counts) or "none"


# ------------------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class CompressibilityReport:
    """What LayerMerge can compress in one model, at one input shape (see :func:`inspect_model`).

    Counts are of the chain the pruner would work on. A refused model (``refused`` true) has zero chain counts
    and says why in ``refusal``.
    """

    #: Class name of the model.
    model: str
    #: Shapes of the example inputs, batch included.
    input_shapes: tuple[tuple[int, ...], ...]
    #: ``nn.Conv2d`` modules in the model (subclasses such as timm's ``Conv2dSame`` included).
    conv_modules: int
    #: Conv call sites in the traced graph (a module called twice counts twice; ``F.conv2d`` calls included);
    #: None when tracing failed.
    conv_calls: int | None = None
    #: Convolutions on the chain (the ones a plan may merge or drop).
    chain_convs: int = 0
    #: Activations a plan may remove (``len(chain.mergeable_positions)``).
    removable_activations: int = 0
    #: Chain convs that may be dropped (become an identity).
    prunable_convs: int = 0
    #: Residual connections the chain can fold into merged kernels.
    residuals: int = 0
    #: Candidate blocks the search would consider.
    candidates: int = 0
    #: Seconds to trace the model, extract the chain and enumerate candidates.
    seconds: float = 0.0
    #: Break positions grouped into readable categories, most frequent first (chain ends not counted).
    break_categories: tuple[tuple[str, int], ...] = ()
    #: Every break position with its raw reason, ``(position, reason)``.
    break_reasons: tuple[tuple[int, str], ...] = ()
    #: The chain's notes: parts of the model that were left out, and why.
    notes: tuple[str, ...] = ()
    #: Whether the model was refused at construction.
    refused: bool = False
    #: Exception class name of the refusal (``NoChainError``, ``UntraceableModelError`` ...).
    refusal_type: str | None = None
    #: The refusal message (what went wrong and what to do).
    refusal: str | None = None
    #: ``chain.summary()``: the per-conv table, when the model was not refused.
    chain_summary: str | None = field(default=None, repr=False)

    @property
    def compressible(self) -> bool:
        """True when a plan can change something (an activation to remove or a conv to drop)."""
        return not self.refused and (self.removable_activations > 0 or self.prunable_convs > 0)

    @property
    def coverage(self) -> float | None:
        """Fraction of the model's conv call sites that lie on the chain (None when unknown)."""
        total = self.conv_calls if self.conv_calls is not None else self.conv_modules
        return self.chain_convs / total if total else None

    def break_summary(self) -> str:
        """``"SE multiply ×16, concat ×4, pooling ×3"`` (``"none"`` without breaks)."""
        return _format_counts(self.break_categories)

    def summary(self, chain: bool = False) -> str:
        """A readable text of the report; ``chain=True`` appends the chain's per-conv table."""
        shapes = ", ".join("×".join(map(str, s)) for s in self.input_shapes)
        head = f"{self.model} at {shapes}"
        calls = f", {self.conv_calls} conv call sites" if self.conv_calls is not None else ""
        if self.refused:
            lines = [f"{head}: REFUSED ({self.refusal_type})", f"  convs in the model: {self.conv_modules}{calls}",
                     "  reason: " + (self.refusal or "").strip().replace("\n", "\n          ")]
            return "\n".join(lines)
        cov = f" ({self.coverage:.0%})" if self.coverage is not None else ""
        verdict = "compressible" if self.compressible else "nothing to compress"
        lines = [
            f"{head}: {verdict}",
            f"  convs in the model:    {self.conv_modules} modules{calls}",
            f"  chain convs:           {self.chain_convs}{cov}",
            f"  removable activations: {self.removable_activations}",
            f"  prunable convs:        {self.prunable_convs}",
            f"  folded residuals:      {self.residuals}",
            f"  candidate blocks:      {self.candidates}",
            f"  breaks:                {self.break_summary()}",
            f"  construction:          {self.seconds:.2f} s",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        if chain and self.chain_summary:
            lines += ["", self.chain_summary]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (plus ``compressible``, ``coverage`` and ``break_summary``)."""
        out = asdict(self)
        out["input_shapes"] = [list(s) for s in self.input_shapes]
        out["break_categories"] = dict(self.break_categories)
        out["break_reasons"] = [[i, r] for i, r in self.break_reasons]
        out["notes"] = list(self.notes)
        out.update(compressible=self.compressible, coverage=self.coverage, break_summary=self.break_summary())
        return out

    # ------------------------------------------------------------------------------------------- builders
    @classmethod
    def from_pruner(cls, pruner: Any, seconds: float = 0.0, model: nn.Module | None = None
                    ) -> CompressibilityReport:
        """The report of an already constructed :class:`~lm_plugin.LayerMergePruner`."""
        model = model if model is not None else pruner.model
        chain = pruner.chain
        ends = {0: CHAIN_ENDS[0], chain.length: CHAIN_ENDS[1]}
        reasons = tuple((p.index, p.break_reason or "unknown") for p in chain.positions if p.is_break)
        counted = [break_category(r) for i, r in reasons if ends.get(i) != r]
        counts = Counter(c for c in counted if c != "chain end")
        return cls(
            model=type(model).__name__,
            input_shapes=tuple(tuple(t.shape) for t in pruner.example_inputs),
            conv_modules=count_conv_modules(model),
            conv_calls=count_conv_calls(pruner.graph_module),
            chain_convs=chain.length,
            removable_activations=len(chain.mergeable_positions),
            prunable_convs=len(chain.prunable),
            residuals=len(chain.residuals),
            candidates=len(pruner.candidates),
            seconds=seconds,
            break_categories=tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
            break_reasons=reasons,
            notes=tuple(chain.notes),
            chain_summary=chain.summary(),
        )

    @classmethod
    def from_refusal(cls, model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor],
                     error: BaseException, seconds: float = 0.0) -> CompressibilityReport:
        """The report of a model whose pruner construction raised ``error`` (a ``LayerMergeError``)."""
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        return cls(model=type(model).__name__,
                   input_shapes=tuple(tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)),
                   conv_modules=count_conv_modules(model), seconds=seconds, refused=True,
                   refusal_type=type(error).__name__, refusal=str(error) or type(error).__name__)


def count_conv_modules(model: nn.Module) -> int:
    """``nn.Conv2d`` modules (subclasses included) of ``model``."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


_CONV_FUNCTIONS = (F.conv2d, torch.conv2d)


def count_conv_calls(gm: torch.fx.GraphModule) -> int:
    """2-D conv call sites of a traced graph: ``nn.Conv2d`` module calls and ``F.conv2d`` calls."""
    modules = dict(gm.named_modules())
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Conv2d):
            n += 1
        elif node.op == "call_function" and (node.target in _CONV_FUNCTIONS or
                                             getattr(node.target, "__name__", "") in ("conv2d", "_conv_forward")):
            n += 1
    return n


def inspect_model(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    ignored_layers: Iterable[nn.Module | str] = (),
    max_kernel: int | None = 7,
    **pruner_kwargs: Any,
) -> CompressibilityReport:
    """Report what LayerMerge can compress in ``model`` (traced at the shape of ``example_inputs``).

    Builds a :class:`~lm_plugin.LayerMergePruner` (no cache, no progress bars, no tables) and reads its chain
    and candidates. The model is not modified.

    Args:
        model: the network.
        example_inputs: a tensor (or tuple of tensors) shaped like one input batch.
        ignored_layers: conv modules (or qualified names) to keep as they are, as for the pruner.
        max_kernel: largest merged kernel a candidate may have, as for the pruner.
        **pruner_kwargs: further :class:`~lm_plugin.LayerMergePruner` arguments (``mode``, ``rewrite`` ...).

    Returns:
        The report. A model the library refuses (any :class:`~lm_plugin.errors.LayerMergeError` at
        construction: untraceable, no chain ...) gives a report with ``refused=True`` and the reason.

    Raises:
        ConfigurationError: bad arguments (the caller's mistake, not a refusal).
        ArgumentTypeError: arguments of the wrong type (also the caller's mistake).
        Exception: anything that is not a ``LayerMergeError`` is raised as it is (a bug, or the model failing on
            its inputs in a way the tracer does not catch).
    """
    from .pruner import LayerMergePruner  # late: keeps `import lm_plugin.inspect` light

    kwargs = {"cache_dir": None, "progress": False, **pruner_kwargs}
    start = time.perf_counter()
    try:
        pruner = LayerMergePruner(model, 0.7, example_inputs, ignored_layers=ignored_layers, max_kernel=max_kernel,
                                  **kwargs)
    except (ConfigurationError, ArgumentTypeError):
        raise  # the caller's arguments are wrong: not something the model is refused for
    except LayerMergeError as exc:
        return CompressibilityReport.from_refusal(model, example_inputs, exc, time.perf_counter() - start)
    return CompressibilityReport.from_pruner(pruner, time.perf_counter() - start, model)
