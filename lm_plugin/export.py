"""Taking a compressed model home: :func:`save` / :func:`load` keep it and its plan for Python, and TorchScript and
ONNX exports (each checked against PyTorch) take it where people run it."""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigurationError
from .latency.backends.ort import CLASSIC_EXPORTER

__all__ = ["FORMAT", "export_onnx", "export_torchscript", "load", "onnx_error", "save"]

#: What :func:`save` writes, so that :func:`load` refuses anything else with a clear message.
FORMAT = "lm_plugin.model/1"


def save(model: nn.Module, path: str | Path) -> Path:
    """Save a trainable or merged model with the plan it was made from; returns the path.

    ``torch.save(model)`` keeps the weights but not the plan (an fx GraphModule drops its ``meta`` when pickled),
    and ``torch.load`` refuses pickled modules by default. Load the file with :func:`load`.

    Example:
        ```python
        lm_plugin.save(result.merged, "merged.pt")
        deployed = lm_plugin.load("merged.pt")
        Plan.of(deployed)            # the plan survives
        ```
    """
    info = getattr(model, "meta", {}).get("lm_plugin") if hasattr(model, "meta") else None
    out = Path(path)
    torch.save({"format": FORMAT, "model": model, "lm_plugin": copy.deepcopy(info)}, out)
    return out


def load(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model written by :func:`save`, its plan attached again (:meth:`Plan.of` works on it).

    The file holds a pickled module: load only files you trust (as with ``torch.load(..., weights_only=False)``).

    Raises:
        ConfigurationError: the file was not written by :func:`save`.
    """
    data = torch.load(Path(path), map_location=map_location, weights_only=False)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigurationError(f"{path} was not written by lm_plugin.save (expected format {FORMAT!r}); load "
                                 "other checkpoints with torch.load")
    model = data["model"]
    if data.get("lm_plugin") is not None and hasattr(model, "meta"):
        model.meta["lm_plugin"] = data["lm_plugin"]
    return model


def _eager_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu().float().eval()


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Trace ``model`` on ``example`` and save it; returns the path. Load it with ``torch.jit.load``."""
    module = _eager_copy(model)
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is still what C++/mobile runtimes load.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module, example.cpu().float())
    out = Path(path)
    traced.save(str(out))
    return out


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = 17) -> Path:
    """Export ``model`` to ONNX with a dynamic batch dimension; returns the path.

    Uses the TorchScript-based exporter (``dynamo=False`` where torch has the keyword): the dynamo exporter needs
    extra packages and
    the merged networks are plain conv/activation graphs that the classic exporter handles exactly.
    """
    module = _eager_copy(model)
    out = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (example.cpu().float(),), str(out), opset_version=opset, **CLASSIC_EXPORTER,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return out


def onnx_error(path: str | Path, model: nn.Module, example: torch.Tensor) -> float | None:
    """Max relative difference between the ONNX file run in onnxruntime and ``model`` in PyTorch.

    Returns None when onnxruntime is not installed (``pip install lm-plugin[onnx]``).
    """
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = example.cpu().float()
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = _eager_copy(model)(x)
    return float((torch.from_numpy(got) - want).norm() / want.norm().clamp_min(1e-30))
