"""The ``sleepzoo`` command line, driven in-process with click's CliRunner on the stand-in plugins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from torch import nn

from sleepzoo import registry
from sleepzoo.cli import main
from test_train import ToyCopy, ToyLM, toy_plugins  # noqa: F401  (toy_plugins is a fixture)


class ToyMixer(nn.Module):
    """Only its signature matters: recipes' ``model.mixers.toy_mixer`` settings are checked against it."""

    def __init__(self, d_model: int, *, num_heads: int = 2, layer_idx: int | None = None):
        super().__init__()


@pytest.fixture
def plugins(toy_plugins):  # noqa: F811  (the imported fixture, extended)
    registry.register("mixer", "toy_mixer")(ToyMixer)
    yield
    registry.unregister("mixer", "toy_mixer")


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": "toy_lm", "d_model": 16, "tie_embeddings": False, "layers": ["toy_mixer"],
                  "mixers": {"toy_mixer": {"num_heads": 2}}},
        "sleep": {"window": 6},
        "task": {"name": "toy_copy", "lag": 4},
        "train": {"steps": 3, "batch_size": 8, "optimizer": "muon", "log_every": 1, "checkpoint_every": 2},
        "eval": {"every": 0, "num_examples": 16, "batch_size": 16},
    }))
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0]


# ---------------------------------------------------------------------------------------------------------
# plugins


def test_plugins_list_json(plugins):
    result = invoke("plugins", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert all({"kind", "name", "provider", "status"} <= row.keys() for row in rows)
    assert {"kind": "model", "name": "toy_lm", "provider": "<runtime>", "status": "loaded"}.items() <= \
        next(r for r in rows if r["name"] == "toy_lm").items()
    assert {r["kind"] for r in rows} <= set(registry.KINDS)


def test_plugins_list_table_by_kind(plugins):
    result = invoke("plugins", "list", "--kind", "task")
    assert result.exit_code == 0, result.output
    assert "toy_copy" in result.stdout and "toy_lm" not in result.stdout
    assert_one_line_error(invoke("plugins", "list", "--kind", "bogus"), "--kind", "bogus")


# ---------------------------------------------------------------------------------------------------------
# recipe validate


def test_validate_ok(plugins, recipe_file):
    result = invoke("recipe", "validate", recipe_file, "sleep.loops=3")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok")
    # embed 8*16 + conv 16*3+16 + A_log 16 + norm 2*16 + up 16*32+32 + down 32*16 + head 16*8
    assert "1,424 parameters" in result.stdout
    assert "loops 3" in result.stdout


@pytest.mark.parametrize("override,needles", [
    ("train.stepz=3", ["train.stepz: unknown key", "did you mean 'steps'"]),
    ("train.steps=abc", ["train.steps: expected an integer", "'abc'"]),
    ("sleep.loops=0", ["sleep.loops: 0 is not allowed"]),
    ("sleep.window=0", ["sleep.window: 0 is not allowed"]),
    ("model.name=nope", ["unknown model 'nope'"]),
    ("task.name=nope", ["unknown task 'nope'"]),
    ("sleep.eviction=nope", ["unknown eviction 'nope'"]),
    ("model.layers=[toy_mixer,nope_mixer]", ["unknown mixer 'nope_mixer'"]),
    ("model.mixers.toy_mixer.heads=2", ["model.mixers.toy_mixer.heads: unknown key", "num_heads"]),
    ("model.mixers.toy_mixer.num_heads=two", ["model.mixers.toy_mixer.num_heads: expected an integer"]),
    ("model.mixers.other={}", ["unknown mixer 'other'"]),
    ("task.lagg=3", ["task.lagg: unknown key", "did you mean 'lag'"]),
    ("task.lag=x", ["task.lag: expected an integer"]),
    ("no_equals_sign", ["expected key.path=value"]),
    ("train.log_every=0", ["train.log_every: 0 is not allowed"]),
    ("sleep.window=13", ["sleep.window: 13 is larger than the task's sequences (12 tokens)"]),
    ("model.vocab_size=4", ["model.vocab_size: 4 is smaller than the task's vocabulary (8 tokens)"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_validate_errors(plugins, recipe_file, override, needles):
    assert_one_line_error(invoke("recipe", "validate", recipe_file, override), *needles)


def test_validate_missing_file(plugins, tmp_path):
    assert_one_line_error(invoke("recipe", "validate", tmp_path / "nope.yaml"), "nope.yaml", "does not exist")


def test_usage_errors_are_one_line():
    assert_one_line_error(invoke("trian"), "No such command 'trian'")
    assert_one_line_error(invoke("eval"), "Missing argument 'RUN_DIR'")


# ---------------------------------------------------------------------------------------------------------
# train, eval, demo


def test_train_writes_the_run_directory(plugins, recipe_file, tmp_path):
    run = tmp_path / "run"
    result = invoke("train", recipe_file, "train.seed=5", "--out", run, "--no-progress")
    assert result.exit_code == 0, result.output
    assert str(run) in result.stdout and "exact_accuracy" in result.stdout
    for name in ("recipe.yaml", "metrics.jsonl", "eval.json", "final/model.safetensors",
                 "checkpoints/step_0000002/state.json", "checkpoints/step_0000003/model.safetensors"):
        assert (run / name).is_file(), name
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["seed"] == 5
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "split" not in r] == [1, 2, 3]
    assert json.loads((run / "eval.json").read_text())["step"] == 3

    # The same directory again without --resume would mix two runs.
    assert_one_line_error(invoke("train", recipe_file, "--out", run), "already holds a run", "--resume")
    # Resuming with another recipe names the fields that differ.
    assert_one_line_error(invoke("train", recipe_file, "train.seed=6", "--out", run, "--resume"),
                          "train.seed: saved 5, given 6")
    assert_one_line_error(invoke("train", recipe_file, "--resume"), "--resume needs --out")


def test_eval_command(plugins, recipe_file, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", recipe_file, "--out", run, "--no-progress").exit_code == 0
    trained = json.loads((run / "eval.json").read_text())

    ToyLM.loops_seen = []
    result = invoke("eval", run, "--loops", "3", "--num-examples", "4")
    assert result.exit_code == 0, result.output
    assert set(ToyLM.loops_seen) == {3}  # the option reaches the model
    out = json.loads((run / "eval-loops3-window6.json").read_text())
    assert out["loops"] == 3 and out["num_examples"] == 4 and out["step"] == 3
    assert json.loads((run / "eval.json").read_text()) == trained  # the training result is kept

    result = invoke("eval", run)
    assert result.exit_code == 0, result.output
    again = json.loads((run / "eval.json").read_text())
    assert again["exact_accuracy"] == trained["exact_accuracy"] and again["loss"] == trained["loss"]

    assert_one_line_error(invoke("eval", run, "--loops", "0"), "--loops", ">= 1")
    assert_one_line_error(invoke("eval", tmp_path), "not a run directory")


def test_demo(plugins, recipe_file, tmp_path):
    out = tmp_path / "demo"
    result = invoke("demo", "--recipe", recipe_file, "--loops", "1,2", "--out", out, "--no-progress",
                    "train.steps=2")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "demo.json").read_text())
    assert [r["loops"] for r in summary["runs"]] == [1, 2]
    assert summary["overrides"] == ["train.steps=2"]
    for r, n in zip(summary["runs"], (1, 2)):
        assert r == {"run": str(out / f"loops{n}"), **json.loads((out / f"loops{n}" / "eval.json").read_text())}
    assert (out / "demo.png").stat().st_size > 0
    assert "exact acc" in result.stdout and "label acc" in result.stdout

    # Run again: both runs are finished, so nothing is trained and the numbers are the same.
    ToyCopy.seeds_seen = []
    again = invoke("demo", "--recipe", recipe_file, "--loops", "1,2", "--out", out, "--no-progress",
                   "train.steps=2")
    assert again.exit_code == 0, again.output
    assert not [s for s in ToyCopy.seeds_seen if s[1] == "train"]
    assert json.loads((out / "demo.json").read_text()) == summary

    assert_one_line_error(invoke("demo", "--recipe", recipe_file, "--loops", "0,1"), "--loops")
    assert_one_line_error(invoke("demo", "--recipe", recipe_file, "--loops", "a"), "--loops")


def test_unexpected_errors_keep_their_traceback(plugins, recipe_file, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(ToyCopy, "generate", broken)
    result = invoke("train", recipe_file, "--out", tmp_path / "run", "--no-progress")
    assert isinstance(result.exception, RuntimeError)
    assert result.exit_code == 1


def test_validate_the_shipped_tiny_recipe():
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "rule110-tiny.yaml"
    if not recipe.is_file() or "hybrid" not in registry.names("model"):
        pytest.skip("recipes/rule110-tiny.yaml or the hybrid model is not there yet")
    import sleepzoo
    from sleepzoo.config import load_recipe

    model = sleepzoo.build_model(load_recipe(recipe))
    expected = sum(p.numel() for p in model.parameters())  # built for real, on the CPU
    result = invoke("recipe", "validate", recipe)
    assert result.exit_code == 0, result.output
    assert f"{expected:,} parameters" in result.stdout
    # A value only the mixer's constructor can check is still reported as a recipe error.
    assert_one_line_error(invoke("recipe", "validate", recipe, "model.mixers.attention.num_kv_heads=3"),
                          "rule110-tiny.yaml: model:", "num_kv_heads=3")
