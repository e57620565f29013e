"""Screened search: the optimistic lift, the loop that scores only what the plans need, and the pruner's face of
it — on the real DP and on a trained network with real estimators."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torchvision
from scipy.optimize import linprog
from test_importance import trained  # noqa: F401 - the fixture

from lm_plugin import ConfigurationError, LayerMergePruner, ScreenedSearch
from lm_plugin.solve import Entry, calibration_sample, envelope_lift, median_lift, no_lift, screened_values, solve
from lm_plugin.tables.estimators import SCREEN_SETTINGS, TailDistillImportance, ZeroShotImportance


def _lift_at(screen, exact, x):
    """The lift an unscored entry of screening value -x gets."""
    probe = ("probe",)
    return envelope_lift({**screen, probe: -x}, exact)[probe] + x


def _lp(points, x):
    """min L0 + L1·x  s.t.  L0 + L1·a >= g for every point, L0, L1 >= 0 (scipy's LP solver)."""
    res = linprog([1.0, x], A_ub=[[-1.0, -a] for a, _ in points], b_ub=[-g for _, g in points],
                  bounds=[(0, None), (0, None)], method="highs")
    assert res.status == 0
    return res.fun


@pytest.mark.parametrize("seed", range(8))
def test_the_lift_is_the_smallest_concave_nondecreasing_bound_of_the_gaps(seed):
    rng = random.Random(seed)
    screen = {(i,): -rng.choice([0.0, rng.uniform(0, 2), rng.uniform(0, 40)]) for i in range(60)}
    scored = rng.sample(sorted(screen), 12)
    exact = {k: screen[k] + rng.uniform(-3, 1) * (1 + abs(screen[k]) * rng.uniform(0, 0.6)) for k in scored}
    points = [(abs(screen[k]), exact[k] - screen[k]) for k in scored]
    values = envelope_lift(screen, exact)
    assert all(values[k] == exact[k] for k in scored)  # exact where scored
    grid = [0.0, 0.3, 1.0, 2.5, 7.0, 15.0, 39.0, 80.0]
    lifts = [_lift_at(screen, exact, x) for x in grid]
    for x, lift in zip(grid, lifts):
        assert lift == pytest.approx(_lp(points, x), abs=1e-7)  # the LP optimum
    assert all(b >= a - 1e-9 for a, b in zip(lifts, lifts[1:]))  # non-decreasing
    for a, g in points:  # above every gap: an unscored twin of a scored entry is credited at least its value
        assert _lift_at(screen, exact, a) >= g - 1e-9


def test_no_scored_entry_means_no_lift_and_a_screen_that_never_under_rates_gets_none():
    screen = {(0,): -1.0, (1,): -5.0}
    assert envelope_lift(screen, {}) == screen
    over_rated = envelope_lift(screen, {(0,): -2.0})  # the screen said -1, the truth is worse: no reason to lift
    assert over_rated == {(0,): -2.0, (1,): -5.0}


def _problem(seed, n_layers=14):
    """Random DP entries on a chain of ``n_layers`` (every block with one subset), exact values and a screen."""
    rng = random.Random(seed)
    entries, exact = [], {}
    for st in range(n_layers):
        for end in range(st + 1, min(n_layers, st + 4) + 1):
            key = (st, end)
            kept = (end,) if end - st == 1 else tuple(sorted(rng.sample(range(st + 1, end + 1), rng.randint(1, 2))))
            exact[key] = 0.0 if end - st == 1 else -rng.uniform(0, 10) * (end - st - 1)
            entries.append(Entry(st, end, kept, rng.uniform(0.2, 1.0) * len(kept) + 0.1, exact[key], key))
    scored = {k: v for k, v in exact.items() if k[1] - k[0] > 1}
    return entries, exact, scored, rng


def _pick(entries, n_layers, budget):
    """A screened search's ``pick`` (entries and objective of the DP's plan) and the plan's entries alone."""
    def pick(values):
        items = [Entry(e.st, e.end, e.kept, e.latency_ms, values.get(e.key, 0.0), e.key) for e in entries]
        solution = solve(items, n_layers, budget, 0.01)
        return [e.key for e in solution.entries], solution.objective

    def plan(values):
        return pick(values)[0]
    return pick, plan


@pytest.mark.parametrize("seed", range(6))
def test_where_the_lift_bounds_the_screens_errors_the_plan_is_the_optimum_and_fewer_entries_are_scored(seed):
    entries, exact, scored, rng = _problem(seed)
    screen = {k: v + rng.uniform(0, 3) for k, v in scored.items()}  # over-rates: the truth is never better
    pick, plan = _pick(entries, 14, budget=sum(e.latency_ms for e in entries if e.end - e.st == 1) * 0.6)
    calls = []

    def rescore(keys):
        calls.append(list(keys))
        return {k: scored[k] for k in keys}

    found = screened_values(screen, rescore, pick, calibration=3, seed=seed, lift="envelope", tolerance=0)
    optimum = plan(exact)
    chosen = plan(found.values)
    assert all(k in found.exact for k in chosen if k in scored)  # the plan is all exact
    assert sum(exact[k] for k in chosen) == pytest.approx(sum(exact[k] for k in optimum))
    flat = [k for keys in calls for k in keys]
    assert len(flat) == len(set(flat)) == len(found.exact) < len(scored)  # each entry once, not all of them
    assert found.rounds <= len(scored) + 1


def test_a_screen_that_under_rates_is_corrected_by_what_the_search_scores():
    entries, exact, scored, rng = _problem(11)
    screen = {k: v * rng.uniform(1.0, 1.8) - rng.uniform(0, 1) for k, v in scored.items()}  # pessimistic
    pick, plan = _pick(entries, 14, budget=sum(e.latency_ms for e in entries if e.end - e.st == 1) * 0.6)
    found = screened_values(screen, lambda keys: {k: scored[k] for k in keys}, pick, calibration=4, lift="envelope")
    chosen = plan(found.values)
    assert all(k in found.exact for k in chosen if k in scored)
    gaps = [found.exact[k] - screen[k] for k in found.exact]
    assert max(gaps) > 0  # it saw under-rated entries, and lifted the rest accordingly
    unscored = [k for k in screen if k not in found.exact]
    assert all(found.values[k] >= screen[k] for k in unscored)
    assert sum(exact[k] for k in chosen) <= sum(exact[k] for k in plan(exact)) + 1e-9


def test_the_calibration_sample_is_seeded_and_from_the_better_half():
    screen = {(i,): -float(i) for i in range(40)}
    a, b = calibration_sample(screen, 8, seed=3), calibration_sample(screen, 8, seed=3)
    assert a == b and len(set(a)) == 8 and all(k[0] < 20 for k in a)
    assert calibration_sample(screen, 8, seed=4) != a
    assert len(calibration_sample(screen, 100)) == 40


@pytest.mark.parametrize("seed", range(4))
def test_without_a_lift_only_the_plans_entries_are_scored_and_the_unscored_keep_their_screen_values(seed):
    entries, exact, scored, rng = _problem(seed)
    screen = {k: v * rng.uniform(1.0, 1.8) - rng.uniform(0, 1) for k, v in scored.items()}  # noisy, pessimistic
    pick, plan = _pick(entries, 14, budget=sum(e.latency_ms for e in entries if e.end - e.st == 1) * 0.6)
    calls = []

    def rescore(keys):
        calls.append(list(keys))
        return {k: scored[k] for k in keys}

    bare = screened_values(screen, rescore, pick, calibration=0, lift="none")
    chosen = plan(bare.values)
    assert all(k in bare.exact for k in chosen if k in scored)  # the plan is all exact
    assert bare.values == no_lift(screen, bare.exact)  # nothing lifted: the screen where not scored
    assert set(calls[0]) <= set(plan(screen))  # it started from the screen's own plan
    flat = [k for keys in calls for k in keys]
    assert len(flat) == len(set(flat)) == len(bare.exact)  # each entry once
    envelope = screened_values(screen, lambda keys: {k: scored[k] for k in keys}, pick, calibration=0,
                               lift="envelope")
    assert len(bare.exact) <= len(envelope.exact)  # a lift only adds entries to try
    assert sum(exact[k] for k in chosen) <= sum(exact[k] for k in plan(exact)) + 1e-9


def test_the_median_lift_puts_the_screen_on_the_exact_scale_learned_from_the_calibration_sample_only():
    screen = {(0,): -10.0, (1,): -20.0, (2,): -4.0, (3,): -0.2, (4,): -30.0}
    calibration = {(0,): -6.0, (1,): -10.0, (2,): -3.0}  # relative under-ratings 0.4, 0.5, 0.25: median 0.4
    picked = {**calibration, (4,): -29.0}  # an entry a plan picked (over-rated): not used to fit the scale
    values = median_lift(screen, picked, calibration)
    assert values == pytest.approx({(0,): -6.0, (1,): -10.0, (2,): -3.0, (4,): -29.0,
                                    (3,): -0.2 + 0.4 * 1.0})  # |screen| < 1 is lifted as if it were 1 %p
    assert median_lift(screen, picked, {}) == no_lift(screen, picked)  # no sample, no lift
    over_rating = median_lift(screen, {(0,): -12.0}, {(0,): -12.0})  # the screen was optimistic: no lift down
    assert over_rating[(1,)] == screen[(1,)]


def test_the_median_lift_corrects_a_screen_on_another_scale_where_no_lift_sticks_to_what_it_scored():
    ratios = {"none": [], "median": []}  # each plan's exact objective over the optimum's (1 = optimal)
    for seed in range(8):
        entries, exact, scored, rng = _problem(seed, n_layers=30)
        screen = {k: v * rng.uniform(1.5, 2.5) for k, v in scored.items()}  # losses doubled, give or take
        pick, plan = _pick(entries, 30, budget=sum(e.latency_ms for e in entries if e.end - e.st == 1) * 0.6)
        optimum = sum(exact[k] for k in plan(exact))
        for lift in ratios:
            found = screened_values(screen, lambda keys, s=scored: {k: s[k] for k in keys}, pick, calibration=4,
                                    seed=seed, lift=lift, tolerance=0)
            chosen = plan(found.values)
            assert all(k in found.exact for k in chosen if k in scored)  # the plan is all exact
            ratios[lift].append(sum(exact[k] for k in chosen) / optimum)
    assert max(ratios["median"]) < 1.1
    assert all(m <= n + 1e-9 for m, n in zip(ratios["median"], ratios["none"]))
    assert sum(ratios["median"]) < sum(ratios["none"])  # scored entries no longer win for being scored
    with pytest.raises(ConfigurationError, match="calibration sample"):
        screened_values({(0, 2): -1.0}, dict, pick, calibration=0, lift="median")


@pytest.mark.parametrize("seed", range(6))
def test_with_a_tolerance_a_bounded_search_stops_within_it_of_the_optimum_and_scores_fewer(seed):
    """Branch and bound: with true bounds (an over-rating screen, the envelope lift), stopping once the incumbent
    is within ``tolerance × |incumbent|`` of the lifted optimum loses at most that much."""
    entries, exact, scored, rng = _problem(seed, n_layers=30)
    screen = {k: v + rng.uniform(0, 3) for k, v in scored.items()}
    pick, plan = _pick(entries, 30, budget=sum(e.latency_ms for e in entries if e.end - e.st == 1) * 0.6)
    optimum = sum(exact[k] for k in plan(exact))

    def rescore(keys):
        return {k: scored[k] for k in keys}

    full = screened_values(screen, rescore, pick, calibration=3, seed=seed, lift="envelope", tolerance=0)
    for tolerance in (0.05, 0.2):
        found = screened_values(screen, rescore, pick, calibration=3, seed=seed, lift="envelope", tolerance=tolerance)
        chosen = plan(found.values)
        assert all(k in found.exact for k in chosen if k in scored)  # the plan is all exact
        value = sum(exact[k] for k in chosen)
        assert value >= optimum - tolerance * abs(value) - 1e-9
        assert len(found.exact) <= len(full.exact)
        assert found.gap <= tolerance * abs(value) + 1e-9
        if found.gap > 0:  # stopped on the incumbent: the unscored entries are out of the final solve
            assert all(v == -math.inf for k, v in found.values.items() if k not in found.exact)


def test_the_tolerance_saves_entries_where_plans_are_nearly_tied():
    spent = {0.0: 0, 0.1: 0}
    for seed in range(8):
        entries, _, scored, rng = _problem(seed, n_layers=30)
        screen = {k: v * rng.uniform(1.5, 2.5) for k, v in scored.items()}
        pick, _ = _pick(entries, 30, budget=sum(e.latency_ms for e in entries if e.end - e.st == 1) * 0.6)
        for tolerance in spent:
            found = screened_values(screen, lambda keys, s=scored: {k: s[k] for k in keys}, pick, calibration=4,
                                    seed=seed, tolerance=tolerance)
            spent[tolerance] += len(found.exact)
    assert spent[0.1] < spent[0.0]


@pytest.mark.parametrize("tolerance", [-0.1, math.inf, math.nan, "0.1"])
def test_a_bad_tolerance_is_refused(tolerance):
    with pytest.raises(ConfigurationError, match="tolerance must be a finite fraction"):
        screened_values({(0, 2): -1.0}, dict, lambda values: ([], 0.0), tolerance=tolerance)


def test_an_unknown_lift_is_refused():
    with pytest.raises(ConfigurationError, match="no screening lift named"):
        screened_values({(0, 2): -1.0}, dict, lambda values: [], lift="half")


# ------------------------------------------------------------------------------------------ the pruner


def _pruners(model, train, test, tmp_path, **screen):
    def make(**extra):
        return LayerMergePruner(model, 0.6, example_inputs=torch.randn(1, 1, 8, 8), backend="macs",
                                importance=ZeroShotImportance(eval_data=test), cache_dir=tmp_path, progress=False,
                                **extra)
    cheap = TailDistillImportance(train_data=train, eval_data=test, steps=1, eval_images=64)
    return make(screen=ScreenedSearch(cheap, **screen)), make()


def test_a_screened_search_scores_part_of_the_table_and_its_plan_is_exact(trained, tmp_path):  # noqa: F811
    model, train, test = trained
    before = copy.deepcopy(model.state_dict())
    screened, complete = _pruners(model, train, test, tmp_path, calibration=1)
    found = screened.search()
    assert screened.scorer.evaluated == found.scored_entries < found.table_entries
    assert len(complete.scorer.missing()) == found.table_entries - found.scored_entries
    table = complete.importance_table()  # shares the cache: only the entries the search did not score are run
    assert table.evaluated == found.table_entries - found.scored_entries
    keys = [e.key for e in found.solution.entries]
    assert found.objective == pytest.approx(sum(table.values[k] for k in keys))  # exact values, not optimistic
    assert found.objective <= complete.search().objective + 1e-9
    assert complete.search().scored_entries is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is not touched


def test_a_screened_search_without_a_lift_or_with_the_median_one_scores_only_what_its_plans_pick(trained, tmp_path):  # noqa: F811
    model, train, test = trained
    bare, complete = _pruners(model, train, test, tmp_path / "bare", lift="none", calibration=0)
    found = bare.search()
    assert 0 < found.scored_entries == bare.scorer.evaluated < found.table_entries
    table = complete.importance_table().values
    assert found.objective == pytest.approx(sum(table[e.key] for e in found.solution.entries))
    assert found.objective <= complete.search().objective + 1e-9
    assert bare.screen_summary(found)["lift"] == "none"
    envelope, _ = _pruners(model, train, test, tmp_path / "envelope", lift="envelope", calibration=0)
    assert found.scored_entries <= envelope.search().scored_entries
    median, _ = _pruners(model, train, test, tmp_path / "median", lift="median", calibration=2)
    on_scale = median.search()
    assert on_scale.objective == pytest.approx(sum(table[e.key] for e in on_scale.solution.entries))
    assert median.screen_summary(on_scale)["lift"] == "median" and 2 <= on_scale.scored_entries


def test_auto_screens_distill_on_a_large_table_only(trained, tmp_path):  # noqa: F811
    """A screened search of a small table scores a good part of it for a less certain plan: auto keeps it whole."""
    from lm_plugin.pruner import AUTO_SCREEN_MIN_ENTRIES

    model, train, test = trained
    kwargs = dict(backend="macs", importance="distill", train_data=train, eval_data=test, cache_dir=tmp_path,
                  progress=False)
    small = LayerMergePruner(model, 0.6, torch.randn(1, 1, 8, 8), **kwargs)
    assert sum(not c.uncompressed for c in small.candidates) < AUTO_SCREEN_MIN_ENTRIES and small.screen is None
    large = LayerMergePruner(torchvision.models.mobilenet_v2(num_classes=10), 0.6, torch.randn(1, 3, 32, 32), **kwargs)
    assert sum(not c.uncompressed for c in large.candidates) >= AUTO_SCREEN_MIN_ENTRIES
    assert large.screen is not None and large.screen.name == "tail_distill"
    forced = LayerMergePruner(model, 0.6, torch.randn(1, 1, 8, 8), screen="tail_distill", **kwargs)
    assert forced.screen is not None


def test_screen_by_name_takes_the_screening_settings_and_the_estimators_data(trained, tmp_path):  # noqa: F811
    model, train, test = trained
    pruner = LayerMergePruner(model, 0.6, example_inputs=torch.randn(1, 1, 8, 8), backend="macs",
                              importance="zero_shot", train_data=train, eval_data=test, screen="tail_distill",
                              cache_dir=tmp_path, progress=False)
    settings = pruner.screen.settings()
    assert all(settings[k] == v for k, v in SCREEN_SETTINGS["tail_distill"].items() if k in settings)
    assert pruner.screen.steps == 3 and pruner.screen.eval_images == 250 and pruner.screen.fit_batch_size == 16
    assert pruner.screen.train_data is train and pruner.screen.eval_data is test
    custom = LayerMergePruner(model, 0.6, example_inputs=torch.randn(1, 1, 8, 8), backend="macs",
                              importance="zero_shot", train_data=train, eval_data=test,
                              screen=ScreenedSearch("tail_distill", settings={"steps": 2}), cache_dir=tmp_path,
                              progress=False)
    assert custom.screen.steps == 2 and custom.screen.eval_images == 250


@pytest.mark.parametrize("kwargs, match", [
    ({"screen": ZeroShotImportance(), "settings": {"steps": 2}}, "carries its own settings"),
    ({"calibration": -1}, "calibration must be an int"),
    ({"lift": "half"}, "no screening lift named .half.; registered: envelope"),
    ({"lift": "median", "calibration": 0}, "learned from the calibration"),
    ({"screen": "no_such_estimator"}, "no importance estimator named"),
])
def test_bad_screen_configurations_say_what_to_do(trained, kwargs, match):  # noqa: F811
    model, train, test = trained
    with pytest.raises(ConfigurationError, match=match):  # refused when the object is made, before any pruner
        ScreenedSearch(**kwargs)
    with pytest.raises(ConfigurationError, match="no importance estimator named"):
        LayerMergePruner(model, 0.6, example_inputs=torch.randn(1, 1, 8, 8), backend="macs", train_data=train,
                         eval_data=test, cache_dir=None, progress=False, screen="no_such_estimator")


def test_screen_table_without_a_screen_is_an_error(trained):  # noqa: F811
    model, _, test = trained
    pruner = LayerMergePruner(model, 0.6, example_inputs=torch.randn(1, 1, 8, 8), backend="macs",
                              importance=ZeroShotImportance(eval_data=test), cache_dir=None, progress=False)
    with pytest.raises(ConfigurationError, match="no screen"):
        pruner.screen_table()


def test_a_screened_search_on_torchvision_resnet18_is_exact_where_it_matters(tmp_path):
    """A zoo network: the plan's objective is the complete table's, never an optimistic value."""
    from torch.utils.data import DataLoader
    from torchvision.transforms import ToTensor

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    data = DataLoader(torchvision.datasets.FakeData(48, (3, 16, 16), 10, transform=ToTensor(), random_offset=0),
                      batch_size=16)

    def make(**extra):
        return LayerMergePruner(model, 0.6, example_inputs=torch.randn(1, 3, 16, 16), backend="macs",
                                importance=ZeroShotImportance(eval_data=data), cache_dir=tmp_path, progress=False,
                                **extra)

    screened = make(screen=ScreenedSearch(ZeroShotImportance(eval_data=data, eval_images=16), calibration=4))
    complete = make()
    found, best = screened.search(), complete.search()
    table = complete.importance_table().values
    assert found.objective == pytest.approx(sum(table[e.key] for e in found.solution.entries))
    assert found.objective <= best.objective + 1e-9
    assert found.scored_entries < found.table_entries
    assert found.predicted_ms <= found.budget_ms
