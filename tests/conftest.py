import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # ``make test`` runs one worker per core (pytest-xdist): a worker with several intra-op threads would contend
    # with the others for the same cores.
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: on small shared CI machines it beats two contended ones."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# backend="auto" means ONNX Runtime on a CPU-only machine where it is installed; tests that do not name a backend
# time in eager PyTorch (ONNX Runtime exports every entry, which makes the suite slower without testing more).
# Tests of the auto rule and of ONNX Runtime set or clear this themselves.
os.environ.setdefault("LM_PLUGIN_BACKEND", "cpu")
