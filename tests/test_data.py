"""lm_plugin.data: image folders on disk (scikit-learn digits written as PNGs), users' loaders, model/data checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lm_plugin
from lm_plugin.data import (
    DataError,
    DataSplits,
    DataUnavailableError,
    as_data_splits,
    check_image_folder,
    check_model_fits,
    data_splits,
    image_folder,
    list_datasets,
    output_width,
    register_dataset,
)
from lm_plugin.data.datasets import digits, digits_image_folder
from lm_plugin.errors import LayerMergeError


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """train/ val/ test/ with 10 digit classes: 30 / 10 / 10 PNGs each, 16×16 grayscale."""
    return digits_image_folder(tmp_path_factory.mktemp("digits") / "images", size=16, per_class=(30, 10, 10))


@pytest.fixture
def copy(tree, tmp_path):
    """A private copy of the tree to break."""
    return Path(shutil.copytree(tree, tmp_path / "images"))


def _files(loader: DataLoader) -> list[str]:
    """The image files a loader reads (through a Subset, if any)."""
    ds = loader.dataset
    if isinstance(ds, torch.utils.data.Subset):
        return [ds.dataset.samples[i][0] for i in ds.indices]
    return [path for path, _ in ds.samples]


def test_image_folder_reads_resizes_and_normalises_with_the_folders_classes(tree):
    splits = image_folder(tree, (1, 12, 12), normalize="data", batch_size=32, val_size=25)
    assert splits.input_shape == (1, 12, 12) and splits.num_classes == 10 and splits.test_name == "test"
    assert splits.classes == tuple(str(d) for d in range(10))
    x, y = next(iter(splits.train))
    assert x.shape == (32, 1, 12, 12) and y.dtype == torch.long
    # Normalisation computed on the training images (all 300 here): the training split has mean 0, std 1.
    pixels = torch.cat([x for x, _ in splits.train])
    assert pixels.mean().item() == pytest.approx(0, abs=1e-4) and pixels.std().item() == pytest.approx(1, abs=1e-3)
    # Importance on 25 images of val/, accuracy on all of test/: disjoint image sets.
    scored, reported = _files(splits.val), _files(splits.test)
    assert len(scored) == 25 and all("/val/" in p for p in scored)
    assert len(reported) == 100 and all("/test/" in p for p in reported)
    # A label is the index of the image's class folder.
    for (_, label), path in zip(splits.test.dataset, reported[:30]):
        assert splits.classes[label] == Path(path).parent.name
    assert any("computed on 300 training images" in note for note in splits.notes)


def test_without_a_test_folder_accuracy_is_on_val_and_importance_on_training_images(copy):
    shutil.rmtree(copy / "test")
    splits = image_folder(copy, (3, 16, 16), normalize=([0.5], [0.25]), val_size=40)
    assert splits.test_name == "val"
    scored, reported = _files(splits.val), _files(splits.test)
    assert len(scored) == 40 and all("/train/" in p for p in scored)
    assert sorted(reported) == sorted(str(p) for p in (copy / "val").rglob("*.png"))
    x, _ = next(iter(splits.test))
    assert x.shape[1] == 3  # RGB from grayscale files
    # Given normalisation: the black background (0) becomes (0 - 0.5) / 0.25.
    assert x.min().item() == pytest.approx(-2.0)
    assert any("accuracy reported on val/" in note for note in splits.notes)
    assert any("(given)" in note for note in splits.notes)


@pytest.mark.parametrize("damage, message", [
    (lambda root: shutil.rmtree(root / "val"), "has no val/ folder"),
    (lambda root: shutil.rmtree(root / "train" / "3"), "val/ has 3 that train/ lacks"),
    (lambda root: shutil.rmtree(root / "test" / "7"), "test/ lacks 7"),
    (lambda root: [p.unlink() for p in (root / "val" / "5").iterdir()], "hold no images"),
    (lambda root: shutil.rmtree(root), "does not exist"),
])
def test_bad_layouts_are_refused_with_the_expected_layout(copy, damage, message):
    damage(copy)
    with pytest.raises(DataError, match=message) as info:
        check_image_folder(copy)
    assert "layout" in str(info.value) or "every split" in str(info.value)
    with pytest.raises(DataError):  # image_folder checks the same before decoding anything
        image_folder(copy, (1, 16, 16))


@pytest.mark.parametrize("shape, normalize, message", [
    ((4, 16, 16), None, "C 1 \\(grayscale\\) or 3"),
    ((16, 16), None, "C,H,W"),
    ((1, 16, 16), ([0.1, 0.2], [0.3, 0.3]), "does not fit 1-channel"),
    ((3, 16, 16), ([0.5], [0.0]), "positive stds"),
    ((1, 16, 16), ("a", "b"), "as numbers"),
])
def test_bad_shapes_and_normalisations_are_refused(tree, shape, normalize, message):
    with pytest.raises(DataError, match=message):
        image_folder(tree, shape, normalize=normalize)


def _digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader, DataLoader]:
    return digits(batch_size, train=True), digits(256, train=False, shuffle=False), digits(128, train=False)


def test_a_factorys_loaders_become_splits():
    train, val, test = _digits_loaders()
    three = as_data_splits({"train": train, "val": val, "test": test})
    assert (three.train, three.val, three.test, three.input_shape, three.test_name) == (train, val, test, (1, 8, 8),
                                                                                         "test")
    two = as_data_splits((train, val), val_size=100, seed=1)
    assert two.test is val and two.test_name == "val"
    assert len(two.val.dataset) == 100 and two.val.dataset.dataset is train.dataset  # importance on training images
    given = DataSplits(train, val, test, (1, 8, 8), num_classes=10)
    assert as_data_splits(given) is given


def test_a_factory_without_a_subsettable_training_loader_says_importance_and_accuracy_share_images():
    train, val, _ = _digits_loaders()
    batches = [(x, y) for x, y in train]  # a list of batches: re-iterable, but no dataset to take a subset of
    splits = as_data_splits([batches, val])
    assert splits.val is val and splits.test is val
    assert "SAME" in splits.notes[0]


@pytest.mark.parametrize("returned, message", [
    (nn.Linear(2, 2), "mine:make returned a Linear: return a lm_plugin.data.DataSplits, a dict"),
    ({"train": 1, "validation": 2}, "dict with keys \\['train', 'validation'\\]: return a lm_plugin.data.DataSplits"),
    ((1, 2, 3, 4), "returned a tuple: return .* a tuple \\(train, val\\[, test\\]\\) of DataLoaders"),
    ((TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4).long()),) * 2, "wrap a dataset in a .*DataLoader"),
    ((iter([1]), iter([2])), "one-pass iterator, but it is read once per epoch"),
    (([torch.zeros(2, 3)], [torch.zeros(2, 3)]), "not a pair of tensors \\(images, labels\\)"),
    (([(torch.zeros(2, 1, 4, 4), torch.zeros(2))],) * 2, "expected images .* and integer class labels"),
    (([], []), "yields no batches: give it a non-empty dataset"),
    (([(torch.zeros(2, 1, 4, 4), torch.zeros(2).long())], [(torch.zeros(2, 1, 5, 5), torch.zeros(2).long())]),
     "different shapes .*resize in the loaders"),
])
def test_bad_factory_results_are_refused_with_the_expected_form(returned, message):
    with pytest.raises(DataError, match=message):
        as_data_splits(returned, source="mine:make")


def test_data_splits_with_a_wrong_input_shape_are_refused():
    train, val, test = _digits_loaders()
    with pytest.raises(DataError, match="input_shape=\\(1, 28, 28\\)"):
        as_data_splits(DataSplits(train, val, test, (1, 28, 28)))


def test_the_heads_width_is_found_by_running_the_model():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(7)).train()
    assert output_width(model, (1, 8, 8)) == 7
    assert model.training  # the mode is restored
    assert output_width(nn.Conv2d(1, 4, 3), (1, 8, 8)) is None  # a feature map: no class count to compare
    with pytest.raises(DataError, match="does not run on inputs of shape 3×8×8"):
        output_width(nn.Conv2d(1, 4, 3), (3, 8, 8))


def test_a_head_that_does_not_match_the_classes_is_refused():
    train, val, test = _digits_loaders()
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    with pytest.raises(DataError, match=r"head has 5 outputs but digits has 10 classes.*num_classes=N"):
        check_model_fits(net, DataSplits(train, val, test, (1, 8, 8), num_classes=10), "digits")
    with pytest.raises(DataError, match=r"labels 0\.\.9 but the model's head has 5 outputs"):
        check_model_fits(net, as_data_splits((train, val, test)), "mine")  # class count unknown: labels checked
    check_model_fits(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), DataSplits(train, val, test, (1, 8, 8), 10))


def test_named_datasets_and_the_registry():
    assert {"digits", "fashion_mnist"} <= set(list_datasets())
    splits = data_splits("digits", val_size=100)
    assert splits.num_classes == 10 and splits.input_shape == (1, 8, 8) and len(splits.val.dataset) == 100
    train, val, test = _digits_loaders()
    register_dataset("digits_again", lambda root, bs, vs, seed: DataSplits(train, val, test, (1, 8, 8)))
    assert data_splits("digits_again").train is train
    with pytest.raises(KeyError, match=r"registered: .*digits"):
        data_splits("imagenet")
    with pytest.raises(DataError, match="identifier"):
        register_dataset("my:data", lambda *a: splits)


def test_one_import_and_one_source_of_truth():
    import lm_plugin.data.datasets as workload_data

    assert lm_plugin.DataSplits is workload_data.DataSplits is lm_plugin.data.DataSplits
    assert lm_plugin.data_splits is workload_data.data_splits and lm_plugin.image_folder is image_folder
    assert issubclass(DataUnavailableError, LayerMergeError) and issubclass(DataUnavailableError, RuntimeError)
    assert issubclass(DataError, LayerMergeError) and issubclass(DataError, ValueError)
