"""Saving the deploy form where people run it: TorchScript and ONNX, each checked against PyTorch."""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn

from .latency.backends.ort import CLASSIC_EXPORTER

__all__ = ["export_onnx", "export_torchscript", "onnx_error"]


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
