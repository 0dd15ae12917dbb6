"""The ``sleepzoo`` command line, driven in-process with click's CliRunner on the stand-in plugins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from sleepzoo import registry
from sleepzoo.cli import main
from sleepzoo.tasks.base import IGNORE_INDEX, Task
from test_report import PNG_MAGIC, bucket_scores, make_run
from test_train import ToyCopy, ToyLM, toy_plugins  # noqa: F401  (toy_plugins is a fixture)

REPO = Path(__file__).resolve().parents[1]


class ToyMixer(nn.Module):
    """Only its signature matters: recipes' ``model.mixers.toy_mixer`` settings are checked against it."""

    def __init__(self, d_model: int, *, num_heads: int = 2, layer_idx: int | None = None):
        super().__init__()


class ToyHop(Task):
    """Random digits, then ``K{k}``: the answer is the digit ``k`` places from the end (a task with buckets)."""

    name = "toy_hop"
    buckets = ("k",)

    def __init__(self, length: int = 8, hops: int = 3):
        self.length, self.hops = length, hops

    @property
    def vocab(self) -> list[str]:
        return ["<pad>", *map(str, range(4)), *(f"K{k}" for k in range(1, self.hops + 1))]

    @property
    def seq_len(self) -> int:
        return self.length + 1

    def _draw(self, rng, m):
        return {"digits": rng.integers(0, 4, (m, self.length)), "k": rng.integers(1, self.hops + 1, m)}

    def _split_key(self, content):
        return np.concatenate([content["digits"], content["k"][:, None]], axis=1)

    def _build(self, content, split):
        digits, k = content["digits"], content["k"]
        ids = np.concatenate([digits + 1, (4 + k)[:, None]], axis=1)
        targets = np.full_like(ids, IGNORE_INDEX)
        targets[:, -1] = digits[np.arange(len(k)), self.length - k] + 1
        return {"input_ids": torch.from_numpy(ids).long(), "targets": torch.from_numpy(targets).long(),
                "k": torch.from_numpy(k).long()}


@pytest.fixture
def plugins(toy_plugins):  # noqa: F811  (the imported fixture, extended)
    registry.register("mixer", "toy_mixer")(ToyMixer)
    registry.register("task", "toy_hop")(ToyHop)
    yield
    registry.unregister("mixer", "toy_mixer")
    registry.unregister("task", "toy_hop")


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


def test_eval_writes_buckets_and_a_plot(plugins, recipe_file, tmp_path):
    run = tmp_path / "run"
    result = invoke("train", recipe_file, "task={name: toy_hop}", "--out", run, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "per bucket" in result.stdout and "k=1" in result.stdout
    trained = json.loads((run / "eval.json").read_text())
    assert set(trained["buckets"]["k"]) == {"1", "2", "3"}

    result = invoke("eval", run)
    assert result.exit_code == 0, result.output
    assert "k=3" in result.stdout and "eval.png" in result.stdout
    again = json.loads((run / "eval.json").read_text())
    assert again["buckets"] == trained["buckets"]  # the per-bucket metrics are kept in eval.json
    for scores in again["buckets"]["k"].values():
        assert set(scores) == {"loss", "token_accuracy", "exact_accuracy", "num_examples", "num_targets"}
    assert sum(s["num_examples"] for s in again["buckets"]["k"].values()) == again["num_examples"] == 16
    assert (run / "eval.png").read_bytes()[:8] == PNG_MAGIC

    result = invoke("eval", run, "--loops", "2")  # other settings: their own JSON and plot
    assert result.exit_code == 0, result.output
    assert (run / "eval-loops2-window6.png").read_bytes()[:8] == PNG_MAGIC


def test_eval_plot_without_buckets(plugins, recipe_file, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", recipe_file, "--out", run, "--no-progress").exit_code == 0
    result = invoke("eval", run)
    assert result.exit_code == 0, result.output
    assert (run / "eval.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------------------
# task show, task export


def test_task_show_rule110():
    from sleepzoo.tasks.rule110 import Rule110

    result = invoke("task", "show", "rule110", "steps=1", "task.states=2", "bits=8", "-n", "2")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("rule110: Rule 110")
    assert "options     steps=1, states=2, bits=8" in out and "seq_len     18" in out
    assert "vocab       5 tokens: <pad> 0 1 Q1 Q2" in out
    assert "#0  11111010 01000001 | Q1=>1 Q2=>1" in out  # the example of Rule110's docstring
    task = Rule110(steps=1, states=2, bits=8)
    data = task.generate(2, seed=0)
    assert f"#1  {task.decode(data['input_ids'][1], data['targets'][1])}" in out
    assert "#2" not in out


def test_task_show_from_a_recipe():
    result = invoke("task", "show", REPO / "recipes" / "repro" / "rule110.yaml", "task.bits=8", "--split", "test",
                    "--seed", "3", "-n", "1")
    assert result.exit_code == 0, result.output
    assert "options     steps=2, states=1, bits=8" in result.stdout and "1 test example (seed 3)" in result.stdout
    assert "| Q1=>" in result.stdout


def test_task_show_buckets(plugins):
    result = invoke("task", "show", "toy_hop", "hops=2", "-n", "4")
    assert result.exit_code == 0, result.output
    data = ToyHop(hops=2).generate(4, seed=0)
    for i in range(4):
        assert f"#{i}  k={int(data['k'][i])}  " in result.stdout
    assert "buckets     k" in result.stdout and "=>" in result.stdout


@pytest.mark.parametrize("args,needles", [
    (["rule110", "stepz=2"], ["task.stepz: unknown key", "did you mean 'steps'"]),
    (["rule110", "steps=-1"], ["steps must be an integer >= 0, got -1"]),
    (["rule110", "steps=x"], ["task.steps: expected an integer"]),
    (["rule110", "steps"], ["expected key=value"]),
    (["nope"], ["unknown task 'nope'"]),
    (["recipes/repro/rule110.yaml", "sleep.loops=2"], ["give a task option as key=value or task.key=value"]),
    (["missing.yaml"], ["recipe 'missing.yaml' does not exist"]),
    (["rule110", "-n", "0"], ["-n"]),
    (["rule110", "--split", "dev"], ["--split"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0] != "task" else None)
def test_task_show_errors(args, needles, monkeypatch):
    monkeypatch.chdir(REPO)
    assert_one_line_error(invoke("task", "show", *args), *needles)


def test_task_export_reproduces_from_its_metadata(tmp_path):
    out = tmp_path / "sets" / "rule110.jsonl"
    result = invoke("task", "export", "rule110", "steps=3", "bits=12", "states=2", "-n", "20", "--seed", "7",
                    "--split", "test", "--out", out)
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    meta = json.loads(lines[0])["_meta"]
    assert meta["task"] == "rule110" and meta["config"] == {"steps": 3, "states": 2, "bits": 12}
    assert (meta["seed"], meta["split"], meta["num_examples"]) == (7, "test", 20)
    assert meta["sleepzoo_version"] and meta["buckets"] == []
    rows = [json.loads(line) for line in lines[1:]]
    assert len(rows) == 20

    task = registry.get("task", meta["task"])(**meta["config"])  # regenerate from the metadata alone
    data = task.generate(meta["num_examples"], seed=meta["seed"], split=meta["split"])
    assert torch.equal(torch.tensor([r["input_ids"] for r in rows]), data["input_ids"])
    assert torch.equal(torch.tensor([r["targets"] for r in rows]), data["targets"])
    assert rows[0]["text"] == task.decode(data["input_ids"][0], data["targets"][0])
    assert sorted(p.name for p in out.parent.iterdir()) == ["rule110.jsonl"]  # no temporary file left

    # Exporting again gives the same bytes.
    before = out.read_bytes()
    assert invoke("task", "export", "rule110", "steps=3", "bits=12", "states=2", "-n", "20", "--seed", "7",
                  "--split", "test", "--out", out).exit_code == 0
    assert out.read_bytes() == before
    assert_one_line_error(invoke("task", "export", "rule110"), "Missing option '--out'")


def test_task_export_bucket_keys(plugins, tmp_path):
    out = tmp_path / "hop.jsonl"
    assert invoke("task", "export", "toy_hop", "length=6", "-n", "5", "--out", out).exit_code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["_meta"]["buckets"] == ["k"] and lines[0]["_meta"]["config"] == {"length": 6, "hops": 3}
    data = ToyHop(length=6).generate(5, seed=0)
    assert [r["k"] for r in lines[1:]] == data["k"].tolist()
    assert all(r["text"].endswith(f"K{r['k']}=>{r['text'].split()[-1 - r['k']]}") for r in lines[1:])


# ---------------------------------------------------------------------------------------------------------
# compare


def test_compare_command(tmp_path):
    root = tmp_path / "grid"
    accs = {(1, 0): 0.2, (1, 1): 0.4, (2, 0): 0.6, (2, 1): 0.9}
    for (n, s), a in accs.items():
        make_run(root, f"loops{n}-seed{s}", loops=n, seed=s, metrics={"exact_accuracy": a})
    make_run(root, "loops4-seed0", loops=4, finished=False, log_evals=[(5, {"exact_accuracy": 1.0, "loss": 0.1})])
    (root / "loops4-seed1").mkdir()  # just started: no recipe.yaml yet, skipped as not a run... but listed
    (root / "loops4-seed1" / "recipe.yaml").write_text((root / "loops4-seed0" / "recipe.yaml").read_text())
    (root / "notes.txt").write_text("a file among the runs")

    result = invoke("compare", *sorted(root.iterdir()), "--json", tmp_path / "cmp.json")
    assert result.exit_code == 0, result.output
    assert "1 run(s) without an evaluation yet left out" in result.stderr
    out = result.stdout
    assert "exact_accuracy by sleep.loops" in out and "0.300 ±0.141" in out and "0.750 ±0.212" in out
    assert "1*" in out and "not finished, step 5/10" in out
    assert (root / "compare.png").read_bytes()[:8] == PNG_MAGIC  # default: next to the runs
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert [g["value"] for g in saved["groups"]] == [1, 2, 4]
    assert saved["groups"][0]["metrics"]["exact_accuracy"]["mean"] == pytest.approx(0.3)

    result = invoke("compare", root, "--key", "loops", "--metric", "loss", "--out", tmp_path / "loss.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC

    assert_one_line_error(invoke("compare", root, "--metric", "bogus"), "--metric 'bogus'")
    assert_one_line_error(invoke("compare", root, "--key", "steps"), "ambiguous")
    assert_one_line_error(invoke("compare", tmp_path / "nope"), "does not exist")
    assert_one_line_error(invoke("compare", root / "loops4-seed1"), "none of the 1 runs has an evaluation yet")
    assert_one_line_error(invoke("compare"), "Missing argument")


def test_compare_command_buckets(tmp_path):
    for n, accs in ((1, {1: 0.9, 2: 0.1}), (2, {1: 1.0, 2: 0.6})):
        for s in (0, 1):
            make_run(tmp_path, f"loops{n}-seed{s}", loops=n, seed=s, buckets=bucket_scores(accs))
    result = invoke("compare", tmp_path, "--bucket", "k", "--out", tmp_path / "k.png")
    assert result.exit_code == 0, result.output
    assert "k=1" in result.stdout and "k=2" in result.stdout and "0.600" in result.stdout
    assert (tmp_path / "k.png").read_bytes()[:8] == PNG_MAGIC
    assert_one_line_error(invoke("compare", tmp_path, "--bucket", "op"), "--bucket 'op': the runs have k")


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
