"""lm_plugin.train: the package's single training loop, on real data (scikit-learn digits)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lm_plugin.train import distillation_loss, evaluate, fit, predict_logits
from lm_plugin.workloads import digits, small_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = small_cnn()
    fit(model, digits(64), epochs=8, progress=False, seed=0)
    return model


def _count_train_forwards(model: nn.Module) -> list[int]:
    calls = [0]

    def hook(module, inputs, output):
        if module.training:
            calls[0] += 1

    model.register_forward_hook(hook)
    return calls


def test_fit_learns_digits(trained_cnn):
    assert evaluate(trained_cnn, digits(256, train=False)) > 90.0


def test_fit_returns_same_model_and_restores_mode():
    model = small_cnn().eval()
    out = fit(model, digits(64), steps=2, progress=False)
    assert out is model
    assert not model.training


def test_fractional_epochs_and_steps():
    loader = digits(64)  # 1347 images -> 22 batches
    model = small_cnn()
    calls = _count_train_forwards(model)
    fit(model, loader, epochs=0.5, progress=False)
    assert calls[0] == 11
    calls[0] = 0
    fit(model, loader, epochs=1.5, progress=False)  # crosses an epoch boundary
    assert calls[0] == 33
    calls[0] = 0
    fit(model, loader, steps=5, epochs=3.0, progress=False)  # steps wins
    assert calls[0] == 5


def test_seed_makes_runs_reproducible():
    torch.manual_seed(1)
    a = small_cnn()
    b = copy.deepcopy(a)
    fit(a, digits(64, seed=3), steps=10, progress=False, seed=7)
    fit(b, digits(64, seed=3), steps=10, progress=False, seed=7)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_a_seeded_run_does_not_depend_on_what_the_loader_served_before():
    """A loader with its own shuffling generator (as the workload's) advances it every epoch: a seeded fit re-seeds
    it for the run and puts it back, so the same seed trains alike whatever ran before, and leaves no trace."""
    torch.manual_seed(1)
    start = small_cnn()
    loader = digits(64, seed=3)
    assert isinstance(loader.generator, torch.Generator)
    runs = []
    for before in (0, 2):
        for _ in range(before):  # other work on the same loader first (another run, an importance table ...)
            for _batch in loader:
                pass
        state = loader.generator.get_state()
        model = copy.deepcopy(start)
        fit(model, loader, epochs=1.5, progress=False, seed=7)
        assert torch.equal(loader.generator.get_state(), state)
        runs.append(model)
    for pa, pb in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(pa, pb)

def test_distillation_moves_student_towards_teacher(trained_cnn):
    teacher = trained_cnn
    before = copy.deepcopy(teacher.state_dict())
    teacher.train()  # fit must run the teacher in eval mode and give its mode back
    torch.manual_seed(2)
    student = small_cnn()
    test = digits(256, train=False)
    fit(student, digits(64), epochs=3, teacher=teacher, distill_alpha=1.0, progress=False, seed=0)
    assert teacher.training
    teacher.eval()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher tensor {k} changed"
    s_logits, _ = predict_logits(student, test)
    t_logits, _ = predict_logits(teacher, test)
    agreement = (s_logits.argmax(1) == t_logits.argmax(1)).float().mean().item()
    assert agreement > 0.8


def test_distillation_loss_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(8, 10)
    assert distillation_loss(logits, logits).abs().item() < 1e-6
    assert distillation_loss(logits, torch.randn(8, 10)).item() > 0.0
    with pytest.raises(ValueError):
        distillation_loss(logits, logits, temperature=0.0)


def test_custom_loss_and_metric(trained_cnn):
    test = digits(256, train=False)
    model = small_cnn()
    seen = []

    def loss_fn(outputs, targets):
        seen.append(outputs.shape)
        return nn.functional.cross_entropy(outputs, targets)

    fit(model, digits(64), steps=3, loss_fn=loss_fn, progress=False)
    assert len(seen) == 3
    outputs, targets = predict_logits(trained_cnn, test)
    manual = 100.0 * (outputs.argmax(1) == targets).float().mean().item()
    assert evaluate(trained_cnn, test) == pytest.approx(manual)
    errors = evaluate(trained_cnn, test, metric=lambda o, t: float((o.argmax(1) != t).sum()))
    assert errors == pytest.approx(len(targets) * (1 - manual / 100.0), abs=0.5)


def test_bad_arguments_raise_clear_errors():
    model = small_cnn()
    loader = digits(64)
    with pytest.raises(ValueError, match="teacher"):
        fit(model, loader, steps=1, distill_alpha=0.5, progress=False)
    with pytest.raises(ValueError, match="distill_alpha"):
        fit(model, loader, steps=1, teacher=small_cnn(), distill_alpha=1.5, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        fit(model, loader, epochs=0, progress=False)
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        fit(model, empty, epochs=1, progress=False)
    with pytest.raises(TypeError, match="inputs, targets"):
        fit(model, [torch.zeros(4, 1, 8, 8)], steps=1, progress=False)
    with pytest.raises(ValueError, match="metric"):
        evaluate(model, loader, metric="top5")


def test_fit_until_plateau_stops_when_validation_stops_improving_and_keeps_the_best_epoch():
    from lm_plugin.train import fit_until_plateau

    torch.manual_seed(0)
    model = small_cnn()
    train, val = digits(64), digits(256, train=False)
    seen: list[tuple[int, float, bool]] = []
    done = fit_until_plateau(model, train, val, max_epochs=8, patience=1, min_delta=0.5, max_lr=0.1, seed=0,
                             progress=False, on_epoch=lambda e, m, v: seen.append((e, v, m.training)))
    assert [e for e, _, _ in seen] == list(range(1, done.epochs + 1)) and not any(t for _, _, t in seen)
    assert done.history == tuple(v for _, v, _ in seen)
    assert done.best == max(done.history)
    assert evaluate(model, val) == pytest.approx(done.best)  # the best epoch's weights, not the last one's
    if done.stopped == "plateau":  # the last epoch gained less than min_delta over the best before it
        assert done.history[-1] < max(done.history[:-1]) + 0.5
    else:
        assert done.epochs == 8
    capped = fit_until_plateau(small_cnn(), train, val, max_epochs=2, patience=5, progress=False, seed=0)
    assert capped.epochs == 2 and capped.stopped == "cap"
    with pytest.raises(ValueError, match="max_epochs"):
        fit_until_plateau(small_cnn(), train, val, max_epochs=0)
