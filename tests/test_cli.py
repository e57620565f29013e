"""The CLI end to end on a tiny configuration (scikit-learn digits, a small residual CNN), and its bad-input paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_plugin import Plan
from lm_plugin.cli import main
from lm_plugin.train import evaluate
from lm_plugin.workloads.data import digits

ort = pytest.importorskip("onnxruntime")

# The analytic MACs backend makes the tables (and so the chosen plan) deterministic: these tests check what the
# CLI writes, not how fast anything runs. Real timing backends are covered by test_latency.py.
FAST = ["--data", "digits", "--importance", "zero_shot", "--finetune-epochs", "0.5", "--rounds", "1",
        "--backend", "macs", "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One shared cache (checkpoints and tables) so the commands reuse each other's work, as users' runs do."""
    root = tmp_path_factory.mktemp("cli")
    mp = pytest.MonkeyPatch()
    mp.setenv("LM_PLUGIN_CACHE", str(root / "cache"))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def compressed(env, one_thread):
    out = env / "run"
    code = main(["compress", "--model", "lm_plugin:digits_resnet", "--train", "--budget", "0.6", *FAST,
                 "--output", str(out)])
    assert code == 0
    return out


def test_compress_writes_a_consistent_output_folder(compressed):
    names = {p.name for p in compressed.iterdir()}
    assert names == {"report.md", "report.json", "plan.json", "plan.png", "tradeoff.png", "trainable.pt",
                     "model.ts", "model.onnx"}
    report = json.loads((compressed / "report.json").read_text())
    plan = Plan.from_json(str(compressed / "plan.json"))
    assert Plan.from_dict(report["plan"]) == plan
    assert report["exact"] and report["merge_error"] <= 1e-10
    # Report numbers agree with the plan: one conv per block; nothing outside the chain in this model.
    assert report["cost"]["compressed"]["convs"] == len(plan.blocks())
    assert report["cost"]["original"]["convs"] == plan.length
    assert report["predicted_ms"]["compressed"] <= report["budget_ms"] + 1e-9
    assert report["speedup"] == pytest.approx(report["measured_ms"]["original"] / report["measured_ms"]["compressed"])
    assert 10.0 < report["accuracy"]["compressed"] <= 100.0
    md = (compressed / "report.md").read_text()
    assert f"{report['accuracy']['compressed']:.2f}" in md and "plan.png" in md


def test_exported_models_match_and_reproduce_the_reported_accuracy(compressed):
    report = json.loads((compressed / "report.json").read_text())
    scripted = torch.jit.load(str(compressed / "model.ts"))
    test = digits(512, train=False)
    assert evaluate(scripted, test) == pytest.approx(report["accuracy"]["compressed"], abs=1e-6)
    session = ort.InferenceSession(str(compressed / "model.onnx"), providers=["CPUExecutionProvider"])
    x, _ = next(iter(test))
    (got,) = session.run(None, {"input": x.numpy()})  # a batch size other than the exported one: dynamic axis
    with torch.no_grad():
        want = scripted(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_merge_command_rebuilds_the_same_deploy_form(compressed, env):
    out = env / "merged"
    code = main(["merge", "--model", "lm_plugin:digits_resnet", "--input-shape", "1,8,8", "--plan",
                 str(compressed / "plan.json"), "--trainable", str(compressed / "trainable.pt"), "--output", str(out),
                 "--no-progress"])
    assert code == 0
    a, b = torch.jit.load(str(compressed / "model.ts")), torch.jit.load(str(out / "model.ts"))
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert json.loads((out / "report.json").read_text())["merge_error"] <= 1e-10


def test_solve_and_profile_from_a_yaml_config_reuse_the_cached_tables(compressed, env):
    config = env / "config.yaml"
    config.write_text("model: lm_plugin:digits_resnet\ntrain: true\ndata: digits\nimportance: zero_shot\n"
                      "backend: macs\nbatch-size: 16\nbudget: 0.9\nprogress: false\n")
    code = main(["solve", "--config", str(config), "--budget", "0.6", "--output", str(env / "solve")])
    assert code == 0
    solved = Plan.from_json(str(env / "solve" / "plan.json"))
    # Same tables, same budget (the command line beat the file's 0.9): the same plan as compress chose.
    assert solved == Plan.from_json(str(compressed / "plan.json"))
    assert main(["profile", "--config", str(config), "--output", str(env / "profile")]) == 0
    table = json.loads((env / "profile" / "latency.json").read_text())
    report = json.loads((compressed / "report.json").read_text())
    assert len(table["entries"]) == report["chain"]["candidates"]
    assert table["original_ms"] == pytest.approx(report["predicted_ms"]["original"])


@pytest.mark.parametrize("args, message", [
    (["--model", "torchvision:no_such_net", "--input-shape", "3,32,32", "--data", "digits"], "no model"),
    (["--model", "nowhere.module:factory", "--data", "digits"], "cannot import"),
    (["--model", "lm_plugin:digits_resnet", "--input-shape", "3,-1", "--data", "digits"], "bad input shape"),
    (["--model", "lm_plugin:digits_resnet", "--data", "digits", "--budget", "1.5"], "budget"),
    (["--model", "lm_plugin:digits_resnet", "--data", "digits", "--budget", "fast"], "budget"),
    (["--model", "lm_plugin:digits_resnet", "--input-shape", "1,8,8"], "--data"),
    (["--model", "lm_plugin:digits_resnet", "--data", "imagenet"], "unknown dataset"),
])
def test_bad_input_exits_nonzero_with_advice_and_writes_nothing(env, capsys, args, message):
    out = env / "bad"
    assert main(["compress", *args, "--output", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert not list(env.glob(".bad.partial-*"))


def test_failed_run_keeps_the_previous_output(compressed, env, capsys):
    before = (compressed / "report.json").read_text()
    # No plan costs less than 100 MACs ("0.0001ms" with the MACs backend): the DP says so after the tables load.
    code = main(["compress", "--model", "lm_plugin:digits_resnet", "--train", *FAST, "--budget", "0.0001ms",
                 "--output", str(compressed), "--overwrite"])
    assert code == 2
    assert "smallest achievable" in capsys.readouterr().err
    assert (compressed / "report.json").read_text() == before
    assert not list(compressed.parent.glob(f".{compressed.name}.partial-*"))


def test_existing_output_is_not_overwritten_without_permission(compressed, capsys):
    assert main(["compress", "--model", "lm_plugin:digits_resnet", *FAST, "--output", str(compressed)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_unknown_yaml_key_is_reported(env, capsys):
    config = env / "bad.yaml"
    config.write_text("model: lm_plugin:digits_resnet\nbugdet: 0.5\n")
    assert main(["solve", "--config", str(config), "--output", str(env / "x")]) == 2
    assert "unknown option 'bugdet'" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "lm_plugin", "--help"], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent)
    for command in ("compress", "profile", "solve", "merge", "demo"):
        assert command in done.stdout


def test_demo_defaults_are_the_reference_workload_and_can_be_overridden():
    from lm_plugin.cli import COMMANDS, build_parser
    from lm_plugin.cli.options import resolve

    args = build_parser().parse_args(["demo", "--budget", "0.5"])
    opts = resolve(args, COMMANDS["demo"][3])
    assert (opts.model, opts.data, opts.train, opts.backend) == ("lm_plugin:resnet_fm", "fashion_mnist", True, "cpu")
    assert opts.budget == "0.5" and opts.finetune_epochs == 1.0 and opts.finetune_lr == 0.02  # the workload's recipe
