"""Training stages and trainable-parameter selection: ``train.trainable`` patterns (globs and ``mixer:NAME``),
``stages:`` validation and overrides, a two-stage run (per-stage sleep settings, schedules, logs,
checkpoints) and exact resume across the stage boundary.

Most runs use the stand-ins of tests/test_train.py (``toy_lm``, ``toy_copy``); one trains the real hybrid
on a tiny Rule 110 recipe with the paper's sliding-window schedule (warm up the SSM layers, then all).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import Killed, ToyCopy, ToyLM, read_lines, tiny_rule110, toy_plugins, toy_recipe  # noqa: F401

import sleepzoo
from sleepzoo import registry
from sleepzoo.checkpoint import latest_checkpoint, list_checkpoints
from sleepzoo.config import RecipeError, load_recipe
from sleepzoo.optim import WarmupStableDecay, select_parameters
from sleepzoo.train import batch_seed, build, load_run, train


class SleepRecordingLM(ToyLM):
    """ToyLM that records the sleep settings it runs with: ``(training?, eviction, loops, sleep_every)``."""

    calls: list[tuple[bool, str, int, int | None]] = []

    def __init__(self, config, *, vocab_size, sleep=None):
        super().__init__(config, vocab_size=vocab_size, sleep=sleep)
        self.sleep = sleep

    def forward(self, input_ids, targets=None, *, window=None, loops=None):
        s = self.sleep
        SleepRecordingLM.calls.append((self.training, s.eviction, s.loops if loops is None else loops,
                                       s.sleep_every))
        return super().forward(input_ids, targets, window=window, loops=loops)


@pytest.fixture
def recording(toy_plugins):
    registry.register("model", "toy_sleep_lm")(SleepRecordingLM)
    SleepRecordingLM.calls = []
    yield
    registry.unregister("model", "toy_sleep_lm")


STAGES = [
    {"name": "warmup", "steps": 3, "sleep": {"eviction": "full_flush"},
     "train": {"trainable": ["up.*"], "muon_lr": 0.05}},
    {"name": "main", "steps": 4, "sleep": {"eviction": "sliding_window", "loops": 2, "sleep_every": 3}},
]


def staged_recipe(*overrides: str, stages=None, model: str = "toy_sleep_lm"):
    """toy_recipe (window 6, checkpoints every 2, eval every 3) as a 3 + 4 step two-stage run."""
    data = toy_recipe().to_dict()
    data["model"]["name"] = model
    del data["train"]["steps"]
    data["stages"] = STAGES if stages is None else stages
    return load_recipe(data, overrides=list(overrides))


def initial_weights(recipe) -> dict[str, torch.Tensor]:
    model, _ = build(recipe)  # seeded exactly as train() builds it
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# trainable patterns


def test_globs_select_parameters_by_name(toy_plugins):
    model = sleepzoo.build_model(toy_recipe())
    names = [n for n, _ in select_parameters(model, ["up.*", "A_log"])]
    assert sorted(names) == ["A_log", "up.bias", "up.weight"]
    assert len(select_parameters(model, None)) == len(list(model.parameters()))  # None: everything

    tied = sleepzoo.build_model(toy_recipe("model.tie_embeddings=true"))
    ((name, p),) = select_parameters(tied, ["out.weight"])  # the head's name reaches the tied embedding
    assert name == "embed.weight" and p is tied.embed.weight
    assert len(select_parameters(tied, ["embed.*", "out.*"])) == 1  # one tensor, listed once


@pytest.mark.parametrize("layers, selected", [
    (["attention", "gated_deltanet"], [1]),
    (["gated_deltanet", "attention", "gated_deltanet"], [0, 2]),
], ids=["one-ssm", "two-ssm"])
def test_mixer_form_selects_the_mixers_own_parameters(layers, selected):
    recipe = tiny_rule110(f"model.layers=[{', '.join(layers)}]")
    model = sleepzoo.build_model(recipe)
    names = {n for n, _ in select_parameters(model, ["mixer:gated_deltanet"], recipe.model.layers)}
    prefixes = tuple(f"model.layers.{i}.self_attn." for i in selected)
    expected = {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    assert names == expected and len(expected) > 3
    assert not any("layernorm" in n or "mlp" in n for n in names)  # the block's norms and MLP are not the mixer's
    both = {n for n, _ in select_parameters(model, ["mixer:gated_deltanet", "model.norm.*"], recipe.model.layers)}
    assert both == expected | {"model.norm.weight"}
    # Without the recipe's layer names, mixers are named by their registered class.
    assert {n for n, _ in select_parameters(model, ["mixer:gated_deltanet"])} == expected


def test_a_pattern_matching_nothing_is_an_error(toy_plugins, tmp_path):
    with pytest.raises(RecipeError) as err:
        train(toy_recipe("train.trainable=[up.*, encoder.*]"), tmp_path / "run", progress=False)
    message = str(err.value)
    assert "train.trainable" in message and "'encoder.*'" in message
    assert "10 parameters, e.g. A_log" in message and "out.weight" in message  # the first and the last name
    assert not (tmp_path / "run").exists()  # refused before anything was written

    with pytest.raises(RecipeError, match="ToyLM has no mixer layers"):
        train(toy_recipe("train.trainable=['mixer:gated_deltanet']"), tmp_path / "run", progress=False)

    recipe = tiny_rule110()
    model = sleepzoo.build_model(recipe)
    with pytest.raises(sleepzoo.SleepzooError) as err:
        select_parameters(model, ["mixer:gated_deltanett"], recipe.model.layers)
    assert "did you mean 'mixer:gated_deltanet'" in str(err.value) and "attention, gated_deltanet" in str(err.value)


def test_frozen_parameters_do_not_change(toy_plugins, tmp_path):
    recipe = toy_recipe("train.trainable=[up.*, down.weight]", "train.weight_decay=0.1")
    before = initial_weights(recipe)
    train(recipe, tmp_path / "run", progress=False)
    after = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"up.weight", "up.bias", "down.weight"}  # weight decay did not reach the frozen ones


# ---------------------------------------------------------------------------------------------------------
# validation and overrides


BAD_STAGES = [  # (overrides of staged_recipe, expected fragments of the message)
    pytest.param(["stages.0.stpes=3"], ["stages[0].stpes", "did you mean 'steps'", "name, steps, sleep, train"],
                 id="unknown-key"),
    pytest.param(["stages.main.sleep.windw=3"], ["stages[1] (main).sleep.windw", "did you mean 'window'"],
                 id="unknown-sleep-key"),
    pytest.param(["stages.warmup.train.mon_lr=1"], ["stages[0] (warmup).train.mon_lr", "did you mean 'muon_lr'"],
                 id="unknown-train-key"),
    pytest.param(["stages.0.steps=many"], ["stages[0] (warmup).steps", "expected an integer", "'many'"],
                 id="wrong-type"),
    pytest.param(["stages.1.sleep.loops=[2]"], ["stages[1] (main).sleep.loops", "expected an integer"],
                 id="wrong-type-sleep"),
    pytest.param(["stages.warmup.train.trainable=up.*"],
                 ["stages[0] (warmup).train.trainable", "expected a list of strings or null"], id="wrong-type-trainable"),
    pytest.param(["stages.0.steps=0"], ["stages[0] (warmup).steps", ">= 1"], id="zero-steps"),
    pytest.param(["stages.1.sleep.loops=0"], ["stages[1] (main): sleep.loops", ">= 1"], id="range-loops"),
    pytest.param(["stages.0.sleep.sleep_every=3"], ["stages[0] (warmup): sleep.sleep_every", "full_flush"],
                 id="sleep-every-with-full-flush"),
    pytest.param(["stages.0.model={d_model: 8}"], ["stages[0].model", "may not change the model or the task"],
                 id="model-change"),
    pytest.param(["stages.1.task={name: rule110}"], ["stages[1].task", "may not change the model or the task"],
                 id="task-change"),
    pytest.param(["stages.0.train.seed=4"], ["stages[0] (warmup).train.seed", "run-wide", "muon_lr"],
                 id="run-wide-train-setting"),
    pytest.param(["stages.0.train.steps=4"], ["stages[0] (warmup).train.steps", "its own steps"],
                 id="train-steps-in-stage"),
    pytest.param(["train.steps=8"], ["train.steps: 8", "add up to 7", "warmup 3 + main 4"], id="total-mismatch"),
    pytest.param(["stages.1.name=warmup"], ["stages[1] (warmup).name", "earlier stage"], id="duplicate-name"),
    pytest.param(["stages.0.name=null"], ["stages[0].name", "expected a string"], id="name-null"),
    pytest.param(["stages=[]"], ["stages", "non-empty list"], id="no-stages"),
    pytest.param(["stages.0=warmup"], ["stages[0]", "expected a mapping"], id="stage-not-a-mapping"),
    pytest.param(["stages.warmpu.steps=2"], ["stages has no element 'warmpu'", "warmup, main"], id="bad-override-name"),
]


@pytest.mark.parametrize("overrides, fragments", BAD_STAGES)
def test_bad_stages_name_the_stage_the_field_and_what_is_allowed(toy_plugins, overrides, fragments):
    with pytest.raises(RecipeError) as err:
        staged_recipe(*overrides)
    for fragment in fragments:
        assert fragment in str(err.value), f"{fragment!r} not in {str(err.value)!r}"


def test_stage_recipes_and_overrides(toy_plugins):
    recipe = staged_recipe("stages.warmup.steps=2", "stages.1.sleep.loops=3", "sleep.window=5", "train.steps=6")
    assert recipe.train.steps == 6  # the total; given, it must match
    (w_name, warmup), (m_name, main) = recipe.stage_recipes()
    assert (w_name, m_name) == ("warmup", "main")
    assert (warmup.train.steps, main.train.steps) == (2, 4)
    assert (warmup.sleep.eviction, warmup.sleep.loops, warmup.sleep.window) == ("full_flush", 1, 5)
    assert (main.sleep.eviction, main.sleep.loops, main.sleep.window) == ("sliding_window", 3, 5)
    assert warmup.train.trainable == ["up.*"] and main.train.trainable is None
    assert (warmup.train.muon_lr, main.train.muon_lr) == (0.05, 0.02)  # stages override the top level only
    assert recipe.to_dict()["stages"][1] == {"name": "main", "steps": 4,
                                             "sleep": {"eviction": "sliding_window", "loops": 3, "sleep_every": 3}}
    assert load_recipe(yaml.safe_load(recipe.to_yaml())) == recipe
    # Without stages (and without trainable) a recipe reads and saves exactly as before.
    plain = toy_recipe().to_dict()
    assert "stages" not in plain and "trainable" not in plain["train"]
    assert toy_recipe().stage_recipes() == [(None, toy_recipe())]


# ---------------------------------------------------------------------------------------------------------
# two-stage runs


def test_two_stage_run(recording, tmp_path):
    recipe = staged_recipe()
    before = initial_weights(recipe)
    SleepRecordingLM.calls = []
    result = train(recipe, tmp_path / "run", progress=False)

    # Each stage trains and evaluates with its own sleep settings.
    warm, main = ("full_flush", 1, None), ("sliding_window", 2, 3)
    assert [c[1:] for c in SleepRecordingLM.calls if c[0]] == [warm] * 3 + [main] * 4
    assert [c[1:] for c in SleepRecordingLM.calls if not c[0]] == [warm, main, main]  # steps 3, 6 and 7
    assert result["step"] == 7 and result["loops"] == 2

    # The data order runs on over the stage boundary.
    assert [s for s, split in ToyCopy.seeds_seen if split == "train"] == [batch_seed(3, i) for i in range(7)]

    lines = read_lines(tmp_path / "run")
    train_lines = [r for r in lines if "split" not in r]
    assert [(r["step"], r["stage"]) for r in train_lines] == \
        [(1, "warmup"), (2, "warmup"), (3, "warmup"), (4, "main"), (5, "main"), (6, "main"), (7, "main")]
    assert [(r["step"], r["stage"]) for r in lines if "split" in r] == [(3, "warmup"), (6, "main"), (7, "main")]
    # Each stage has its own warmup-stable-decay schedule (warmup 1, decay half) and learning rate.
    expected = [0.05 * WarmupStableDecay(3, 1, 0.5)(i) for i in range(3)] + \
        [0.02 * WarmupStableDecay(4, 1, 0.5)(i) for i in range(4)]
    assert [r["lr"] for r in train_lines] == pytest.approx(expected)

    # The warmup stage trained only up.*; the main stage everything (checkpoint 3 is the end of warmup).
    checkpoints = {p.name: p for p in list_checkpoints(tmp_path / "run" / "checkpoints")}
    assert list(checkpoints) == ["step_0000006", "step_0000007"]
    run2 = tmp_path / "keep-all"
    train(staged_recipe("train.keep_checkpoints=0"), run2, progress=False)
    at_3 = load_file(str(run2 / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert {k for k in before if not torch.equal(before[k], at_3[k])} == {"up.weight", "up.bias"}
    final = load_file(str(run2 / "final" / "model.safetensors"))
    assert all(not torch.equal(at_3[k], final[k]) for k in before)
    trainer = json.loads((run2 / "checkpoints" / "step_0000003" / "state.json").read_text())["trainer"]
    assert (trainer["stage"], trainer["stage_index"], trainer["stage_step"]) == ("warmup", 0, 3)
    trainer = json.loads((run2 / "checkpoints" / "step_0000006" / "state.json").read_text())["trainer"]
    assert (trainer["stage"], trainer["stage_index"], trainer["stage_step"]) == ("main", 1, 3)


@pytest.mark.parametrize("die_at, newest", [(5, "step_0000004"), (3, "step_0000003")],
                         ids=["inside-the-second-stage", "right-after-the-boundary"])
def test_resume_across_the_stage_boundary_is_exact(recording, tmp_path, monkeypatch, die_at, newest):
    straight = tmp_path / "straight"
    train(staged_recipe(), straight, progress=False)

    killed = tmp_path / "killed"
    real_generate = ToyCopy.generate

    def dying_generate(self, num_examples, seed, split="train"):
        if split == "train" and seed == batch_seed(3, die_at):
            raise Killed
        return real_generate(self, num_examples, seed, split)

    monkeypatch.setattr(ToyCopy, "generate", dying_generate)
    with pytest.raises(Killed):
        train(staged_recipe(), killed, progress=False)
    assert latest_checkpoint(killed / "checkpoints").name == newest
    monkeypatch.setattr(ToyCopy, "generate", real_generate)

    SleepRecordingLM.calls = []
    train(staged_recipe(), killed, resume=True, progress=False)
    assert [c[1] for c in SleepRecordingLM.calls if c[0]] == ["sliding_window"] * (7 - int(newest[-1]))
    assert read_lines(killed) == read_lines(straight)  # every loss, lr, grad norm and eval, bit for bit
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sliding_window_schedule_on_the_real_hybrid(tmp_path):
    """The paper's schedule in miniature: SSM layers alone with hard eviction, then all with the window."""
    data = tiny_rule110("train.keep_checkpoints=0").to_dict()
    del data["train"]["steps"]
    data["stages"] = [
        {"name": "warmup", "steps": 2, "train": {"trainable": ["mixer:gated_deltanet"]}},
        {"name": "main", "steps": 2, "sleep": {"eviction": "sliding_window"}},
    ]
    recipe = load_recipe(data)
    before = initial_weights(recipe)
    train(recipe, tmp_path / "run", progress=False)
    at_2 = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000002" / "model.safetensors"))
    changed = {k for k in at_2 if not torch.equal(before[k], at_2[k])}  # the tied head is saved once
    assert changed == {k for k in at_2 if k.startswith("model.layers.1.self_attn.")}
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert not torch.equal(at_2["model.embed_tokens.weight"], final["model.embed_tokens.weight"])
    assert [(r["step"], r["stage"]) for r in read_lines(tmp_path / "run") if "split" in r] == \
        [(2, "warmup"), (4, "main")]
    _, model, _, step = load_run(tmp_path / "run")
    assert step == 4 and model.sleep.eviction == "sliding_window"  # the last stage's, not the top level's


def test_validate_lists_the_stages():
    from pathlib import Path

    from click.testing import CliRunner

    from sleepzoo.cli import main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "rule110-tiny-sliding.yaml"
    result = CliRunner().invoke(main, ["recipe", "validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "stage  warmup: 100 steps, loops 2, eviction full_flush, trainable ['mixer:gated_deltanet']" in result.output
    assert "stage  main: 200 steps, loops 2, eviction sliding_window, trainable all" in result.output
