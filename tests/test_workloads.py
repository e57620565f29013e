"""lm_plugin.workloads: data loaders, reference models, registry, and the cached trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.resnet import BasicBlock

from lm_plugin.data import datasets as data_mod
from lm_plugin.workloads import (
    MODELS,
    DataUnavailableError,
    create_model,
    digits,
    fashion_mnist,
    list_models,
    mbv2_fm,
    resnet_fm,
    small_cnn,
    trained,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_split_is_fixed_stratified_and_normalised():
    train, test = digits(2000, train=True, shuffle=False), digits(2000, train=False)
    (x_tr, _y_tr), (x_te, y_te) = next(iter(train)), next(iter(test))
    assert x_tr.shape == (1347, 1, 8, 8) and x_te.shape == (450, 1, 8, 8)
    assert abs(x_tr.mean().item()) < 1e-4 and abs(x_tr.std().item() - 1) < 1e-3
    assert torch.bincount(y_te).min() >= 40  # stratified: every class in the test split
    x_again, _ = next(iter(digits(2000, train=False)))
    assert torch.equal(x_te, x_again)
    # no test image is also a training image
    train_rows = {tuple(r.tolist()) for r in x_tr.flatten(1)}
    assert sum(tuple(r.tolist()) in train_rows for r in x_te.flatten(1)) < 5  # digits has a few true duplicates


def test_reference_models_follow_the_workload_spec():
    x = torch.randn(2, 1, 28, 28)
    r = resnet_fm().eval()
    assert r(x).shape == (2, 10)
    blocks = [m for m in r.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 6
    assert [b.conv1.out_channels for b in blocks] == [16, 16, 32, 32, 64, 64]
    assert [b.conv1.stride[0] for b in blocks] == [1, 1, 2, 1, 2, 1]
    assert [b.downsample is not None for b in blocks] == [False, False, True, False, True, False]
    assert r.conv1.stride == (1, 1) and r.conv1.in_channels == 1 and r.fc.in_features == 64

    m = mbv2_fm().eval()
    stem = m.features[0][0]
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding) == (
        1,
        16,
        (3, 3),
        (1, 1),
        (1, 1),
    )
    assert stem.bias is None
    assert m(x).shape == (2, 10)
    assert small_cnn()(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_registry():
    assert {"resnet_fm", "mbv2_fm", "small_cnn"} <= set(list_models())
    assert isinstance(create_model("small_cnn"), torch.nn.Module)
    assert MODELS["resnet_fm"].input_shape == (1, 28, 28)
    with pytest.raises(KeyError, match=r"no workload model named .* registered: .*resnet_fm"):
        create_model("resnet9000")


def test_trained_caches_the_checkpoint(tmp_path: Path):
    first = trained("small_cnn", cache_dir=tmp_path, epochs=2, progress=False)
    files = list(tmp_path.glob("small_cnn_*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    second = trained("small_cnn", cache_dir=tmp_path, epochs=2, progress=False)
    assert files[0].stat().st_mtime_ns == stamp  # loaded, not retrained
    assert second.test_accuracy == first.test_accuracy > 50.0
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


needs_fm = pytest.mark.skipif(
    not (data_mod.DEBIAN_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)


@needs_fm
def test_fashion_mnist_from_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LM_PLUGIN_DATA", str(tmp_path))
    test = fashion_mnist(train=False, batch_size=10000)
    x, y = next(iter(test))
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert (tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()
    # normalised with the workload's constants: mean ~0, std ~1
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1.0) < 0.05
    assert torch.bincount(y).tolist() == [1000] * 10
    sub = fashion_mnist(train=False, batch_size=64, subset=100, seed=1)
    assert len(sub.dataset) == 100


def test_missing_fashion_mnist_raises_with_instructions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "not-installed")
    # an unreachable mirror stands in for a machine without internet access
    monkeypatch.setattr(FashionMNIST, "mirrors", [(tmp_path / "no-mirror").as_uri() + "/"])
    with pytest.raises(DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(root=tmp_path / "data", train=False)
