"""The CLI end to end on a tiny configuration (scikit-learn digits, a small residual CNN), and its bad-input paths."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_plugin import Plan
from lm_plugin.budget import DEFAULT_BUDGET
from lm_plugin.cli import main
from lm_plugin.data import image_folder
from lm_plugin.data.datasets import digits, digits_image_folder
from lm_plugin.runs import BadInputError, parse_data_spec, parse_normalize, parse_shape
from lm_plugin.train import evaluate, fit

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
                     "merged.pt", "model.ts", "model.onnx"}
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
    # Every stage's time, the trade-off sweep (free here: a complete table) and the export included.
    assert {"prepare", "latency_table", "importance_table", "solve", "finetune", "merge", "measure", "tradeoff",
            "report"} <= set(report["seconds"])
    assert "Stage times (s): prepare" in md and "Time estimate" in md
    assert report["finetune"]["epochs"] == 0.5 and report["estimate"]["estimator"] == "zero_shot"
    objectives = [p["objective"] for p in report["frontier"]]
    assert objectives == sorted(objectives) and report["frontier"][-1]["budget"] == 1.0


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


def test_compress_with_a_screen_reports_what_it_scored(compressed, env):
    out = env / "screened_run"
    code = main(["compress", "--model", "lm_plugin:digits_resnet", "--train", "--budget", "0.6", *FAST,
                 "--importance", "tail_distill", "--importance-steps", "2", "--screen", "zero_shot",
                 "--output", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["screen"]["estimator"]["estimator"] == "zero_shot"
    assert 0 < report["screen"]["scored_entries"] < report["screen"]["table_entries"]
    assert "screened search with `zero_shot`" in (out / "report.md").read_text()
    assert "(`median` lift)" in (out / "report.md").read_text()  # the default
    assert report["exact"]


def test_solve_with_a_screen_scores_part_of_the_table(compressed, env, capsys):
    code = main(["solve", "--model", "lm_plugin:digits_resnet", "--train", "--budget", "0.6", "--data", "digits",
                 "--backend", "macs", "--batch-size", "16", "--no-progress",
                 "--importance", "tail_distill", "--importance-steps", "2", "--screen", "zero_shot",
                 "--output", str(env / "screened")])
    assert code == 0
    report = json.loads((env / "screened" / "report.json").read_text())
    assert report["screen"]["estimator"]["estimator"] == "zero_shot"
    assert 0 < report["screen"]["scored_entries"] < report["screen"]["table_entries"]
    assert "screened search:" in capsys.readouterr().out
    Plan.from_json(str(env / "screened" / "plan.json"))


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
    from lm_plugin.runs import resolve

    args = build_parser().parse_args(["demo", "--budget", "0.5"])
    opts = resolve(args, COMMANDS["demo"][3])
    assert (opts.model, opts.data, opts.train, opts.backend) == ("lm_plugin:resnet_fm", "fashion_mnist", True, "auto")
    assert opts.budget == "0.5" and opts.finetune_epochs == "auto" and opts.finetune_lr == 0.02  # auto: until it stops
    # One default budget for the library and every command.
    import inspect

    from lm_plugin import LayerMergePruner

    for command in ("compress", "solve", "demo"):
        assert resolve(build_parser().parse_args([command]), COMMANDS[command][3]).budget == str(DEFAULT_BUDGET)
    assert inspect.signature(LayerMergePruner).parameters["budget"].default == DEFAULT_BUDGET


# ------------------------------------------------------------------------------------------ users' own data
# The images: scikit-learn digits written as PNGs, 16×16 grayscale, 10 classes × 30 train / 10 val / 10 test.
IMAGES = ["--input-shape", "1,16,16", "--normalize", "data",
          "--importance", "zero_shot", "--finetune-epochs", "0.2", "--rounds", "1",
          "--backend", "macs", "--batch-size", "16", "--train-batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def images(env) -> Path:
    return digits_image_folder(env / "images", size=16, per_class=(30, 10, 10))


@pytest.fixture(scope="module")
def images_without_test(env) -> Path:
    return digits_image_folder(env / "images_no_test", size=16, per_class=(30, 10, 0))


def test_compress_an_image_folder_end_to_end(env, images, one_thread, capsys):
    out = env / "images_run"
    code = main(["compress", "--data", f"imagefolder:{images}", "--model", "lm_plugin:digits_resnet", *IMAGES,
                 "--output", str(out)])
    assert code == 0
    assert {"report.md", "report.json", "plan.json", "model.ts", "model.onnx", "trainable.pt"} <= {
        p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    Plan.from_json(str(out / "plan.json"))
    assert report["exact"] and 0.0 <= report["accuracy"]["compressed"] <= 100.0
    assert report["context"]["accuracy_split"] == "test"
    notes = " ".join(report["context"]["data_notes"])
    assert "10 classes" in notes and "accuracy reported on test/" in notes and "computed on 300 training" in notes
    md = (out / "report.md").read_text()
    assert "| test accuracy (%) |" in md and "importance scored on 100 images of val/" in md
    assert "10 classes" in capsys.readouterr().err
    # The exported model reproduces the reported accuracy on the test folder, read as the CLI read it.
    test = image_folder(images, (1, 16, 16), normalize="data").test
    assert evaluate(torch.jit.load(str(out / "model.ts")), test) == pytest.approx(report["accuracy"]["compressed"],
                                                                                   abs=1e-6)


def test_a_timm_model_spec_on_an_image_folder_without_test_split(env, images_without_test, one_thread, capsys):
    pytest.importorskip("timm")
    out = env / "timm_run"
    code = main(["compress", "--data", f"imagefolder:{images_without_test}", "--model",
                 "timm:test_resnet:num_classes=10,in_chans=1", *IMAGES, "--output", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["exact"] and report["context"]["model"].startswith("timm:test_resnet")
    assert report["chain"]["convs"] >= 10  # the timm model was traced, not a stand-in
    # No test/ folder: the accuracy is on val/ and says so; importance was scored on training images.
    assert report["context"]["accuracy_split"] == "val"
    md = (out / "report.md").read_text()
    assert "| val accuracy (%) |" in md and "importance scored on 300 images of train/" in md
    assert "measured on the val split" in capsys.readouterr().out


def test_yaml_config_with_an_image_folder_and_a_given_normalisation(env, images, capsys):
    config = env / "images.yaml"
    config.write_text(f"model: lm_plugin:digits_resnet\ndata: imagefolder:{images}\ninput_shape: [1, 16, 16]\n"
                      "normalize: {mean: [0.3], std: [0.33]}\nimportance: zero_shot\nbackend: macs\n"
                      "batch_size: 16\nprogress: false\n")
    assert main(["solve", "--config", str(config), "--output", str(env / "images_solve")]) == 0
    report = json.loads((env / "images_solve" / "report.json").read_text())
    assert report["context"]["options"]["normalize"] == {"mean": [0.3], "std": [0.33]}
    assert "mean (0.3000) std (0.3300) (given)" in " ".join(report["context"]["data_notes"])
    assert Plan.from_json(str(env / "images_solve" / "plan.json")).length == 7


FACTORY = '''
from lm_plugin.data.datasets import digits


def loaders(batch_size=64, with_test=True):
    train, test = digits(batch_size, train=True), digits(256, train=False)
    return {"train": train, "val": test, **({"test": test} if with_test else {})}


def broken():
    return [digits(64)]
'''


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "my_digits.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_digits"


def test_data_from_a_factory(env, factory_module, capsys):
    out = env / "factory_solve"
    code = main(["solve", "--model", "lm_plugin:digits_resnet", "--data", f"{factory_module}:loaders:batch_size=32",
                 "--importance", "zero_shot", "--backend", "macs", "--batch-size", "16", "--no-progress",
                 "--output", str(out), "--overwrite"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["context"]["accuracy_split"] == "test"
    assert report["predicted_ms"]["compressed"] <= report["budget_ms"] + 1e-9


@pytest.mark.parametrize("args, message", [
    (["--data", "imagefolder:{root}/nowhere", "--input-shape", "1,16,16"], "does not exist; expected layout"),
    (["--data", "imagefolder:{broken}", "--input-shape", "1,16,16"], "has no val/ folder; expected layout"),
    (["--data", "imagefolder:{root}"], "pass it, e.g. --input-shape 3,224,224"),
    (["--data", "imagefolder:{root}", "--input-shape", "3,x,9"], "bad input shape"),
    (["--data", "imagefolder:{root}", "--input-shape", "1,0,16"], "positive integers"),
    (["--data", "imagefolder:{root}", "--input-shape", "5,16,16"], "C 1 (grayscale) or 3 (RGB)"),
    # digits_resnet takes one channel: RGB images do not run through it.
    (["--data", "imagefolder:{root}", "--input-shape", "3,16,16", "--normalize", "data"],
     "does not run on inputs of shape 3×16×16"),
    (["--data", "imagefolder:{root}", "--input-shape", "1,16,16", "--normalize", "data", "--model",
      "lm_plugin:digits_resnet:num_classes=5"], "head has 5 outputs but imagefolder:"),
    (["--data", "imagefolder:{root}", "--input-shape", "1,16,16", "--normalize", "0.5"], "--normalize MEAN"),
    (["--data", "imagefolder:{root}", "--input-shape", "1,16,16", "--normalize", "0.1,0.2:0.3,0.3"],
     "does not fit 1-channel images"),
    (["--data", "digits", "--input-shape", "3,224,224"], "whose inputs are 1×8×8: drop --input-shape"),
    (["--data", "digits", "--normalize", "0.5:0.2"], "--normalize applies to --data imagefolder"),
    (["--data", "digits", "--model", "torchvision:resnet18:num_classes=10"], "does not run on inputs of shape 1×8×8"),
    (["--data", "{factory}:broken"], "returned a list: return a lm_plugin.data.DataSplits"),
    (["--data", "{factory}:loaders:bogus=1"], "does not take the arguments"),
    (["--data", "{factory}:missing"], "cannot import 'missing'"),
    (["--data", "no_such_package.mod:fn"], "cannot import"),
    (["--data", "imagefolder:"], "needs a folder"),
])
def test_bad_data_is_refused_up_front_with_advice(env, images, factory_module, capsys, args, message):
    broken = env / "broken_images"
    if not broken.exists():
        shutil.copytree(images / "train", broken / "train")
    args = [a.format(root=images, broken=broken, factory=factory_module) for a in args]
    if "--model" not in args:
        args += ["--model", "lm_plugin:digits_resnet"]
    out = env / "refused"
    assert main(["compress", *args, "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "chain:" not in err  # refused before the model was traced
    assert not out.exists()


def test_a_missing_timm_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` finds when timm is not installed
    assert main(["inspect", "timm:resnet18", "--input-shape", "3,32,32"]) == 2
    assert "pip install 'lm-plugin[timm]'" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["3,x,9", "3,,9", "0,8,8", "3,-1,8", "", "a,b", [3, True], [3, 0], "3.5,8,8"])
def test_malformed_shapes_are_refused(text):
    with pytest.raises(BadInputError, match="bad input shape"):
        parse_shape(text)


def test_shapes_normalisations_and_data_specs_parse():
    assert parse_shape("3,224,224") == parse_shape("3x224x224") == parse_shape([3, 224, 224]) == (3, 224, 224)
    assert parse_normalize("0.5,0.4,0.3:0.2,0.2,0.2") == ([0.5, 0.4, 0.3], [0.2, 0.2, 0.2])
    assert parse_normalize({"mean": [0.5], "std": 0.25}) == parse_normalize([0.5, 0.25]) == ([0.5], [0.25])
    for bad in ("0.5", "0.5:0", "a:b", {"mean": [0.5]}, [1, 2, 3]):
        with pytest.raises(BadInputError, match="normalisation"):
            parse_normalize(bad)
    names = ["digits", "fashion_mnist"]
    assert parse_data_spec("digits", names).kind == "name"
    assert parse_data_spec("imagefolder:/data/x:y", names).target == "/data/x:y"
    spec = parse_data_spec("pkg.mod:make:size=3,name=a", names)
    assert (spec.kind, spec.target, spec.kwargs) == ("factory", "pkg.mod:make", {"size": 3, "name": "a"})
    with pytest.raises(BadInputError, match=r"unknown dataset 'imagenet'.*imagefolder:DIR"):
        parse_data_spec("imagenet", names)


@pytest.fixture(scope="module")
def timm_checkpoint(env, images, one_thread) -> Path:
    """A timm model trained by hand on the image folder with the statistics timm resolves for it (the usual timm
    habit: ``resolve_data_config(model=model)``; ImageNet's for most timm models, 0.5/0.5 for ``test_resnet``)."""
    timm = pytest.importorskip("timm")
    from timm.data import resolve_data_config

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    config = resolve_data_config({}, model=model)
    splits = image_folder(images, (3, 16, 16), normalize=(config["mean"], config["std"]), batch_size=32)
    fit(model, splits.train, epochs=8, max_lr=0.05, seed=0, progress=False)
    assert evaluate(model, splits.test) > 50.0  # trained: far above chance (10 %)
    path = env / "timm_test_resnet.pt"
    torch.save(model.state_dict(), path)
    return path


def test_a_checkpoint_is_evaluated_with_the_statistics_its_model_declares(env, images, timm_checkpoint, capsys):
    """No --normalize: a timm model's pretrained_cfg says how it was trained; the run checks the checkpoint first."""
    args = ["compress", "--model", "timm:test_resnet:num_classes=10", "--checkpoint", str(timm_checkpoint),
            "--data", f"imagefolder:{images}", "--input-shape", "3,16,16", "--importance", "zero_shot",
            "--finetune-epochs", "0", "--rounds", "1", "--backend", "macs", "--batch-size", "8", "--no-progress"]
    assert main([*args, "--output", str(env / "timm_declared")]) == 0
    err = capsys.readouterr().err
    assert "declared by the model's pretrained_cfg" in err and "the checkpoint scores" in err
    report = json.loads((env / "timm_declared" / "report.json").read_text())
    assert report["accuracy"]["original"] > 50.0
    # Deliberately wrong statistics: refused before any table, naming the cause and the option.
    wrong = env / "timm_wrong"
    code = main([*args, "--normalize", "0.9:0.01", "--cache-dir", str(env / "wrong_cache"), "--output", str(wrong)])
    assert code == 2
    err = capsys.readouterr().err
    assert "near chance" in err and "--normalize" in err and "class order" in err
    assert not wrong.exists() and not (env / "wrong_cache").exists(), "a table was built for a broken model"


def test_a_torchvision_model_declares_the_statistics_of_its_published_weights(env, images, capsys):
    code = main(["solve", "--model", "torchvision:resnet18:num_classes=10", "--data", f"imagefolder:{images}",
                 "--input-shape", "3,16,16", "--importance", "zero_shot", "--backend", "macs", "--batch-size", "4",
                 "--val-size", "20", "--no-progress", "--output", str(env / "tv_declared")])
    assert code == 0
    err = capsys.readouterr().err
    assert ("mean (0.4850, 0.4560, 0.4060) std (0.2290, 0.2240, 0.2250) (declared by the transforms of "
            "torchvision's ResNet") in err


def test_unknown_model_names_suggest_the_close_ones(capsys):
    pytest.importorskip("timm")
    assert main(["inspect", "timm:efficientnet_ess", "--input-shape", "3,32,32"]) == 2
    assert "did you mean efficientnet_es" in capsys.readouterr().err
    assert main(["inspect", "torchvision:resnet1", "--input-shape", "3,32,32"]) == 2
    assert "resnet18" in capsys.readouterr().err


def test_help_shows_every_default_a_run_depends_on(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "auto (default) trains one-epoch cycles" in text and "distill 30" in text and "(default: 0.02)" in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "(default: 5)" in " ".join(capsys.readouterr().out.split())  # the demo's own importance steps


def test_a_model_that_declares_no_normalisation_needs_one(env, images, capsys):
    code = main(["solve", "--model", "lm_plugin:digits_resnet", "--data", f"imagefolder:{images}",
                 "--input-shape", "1,16,16", "--backend", "macs", "--output", str(env / "no_norm")])
    assert code == 2
    err = capsys.readouterr().err
    assert "which normalisation was the model trained with" in err and "'data'" in err
