"""Recipes: loading from a file or a mapping, ``key=value`` overrides parsed as YAML, the errors a user sees
(each names the file, the field and what is allowed), the YAML round trip, and every shipped recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

import sleepzoo
from sleepzoo import load_recipe, registry
from sleepzoo.config import ModelConfig, Recipe, RecipeError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))

TINY = {
    "model": {"d_model": 32, "layers": ["attention", "gated_deltanet"], "d_ff": 64,
              "mixers": {"attention": {"num_heads": 2}, "gated_deltanet": {"num_heads": 2, "head_dim": 8}}},
    "sleep": {"window": 6, "loops": 2},
    "task": {"name": "rule110", "steps": 1, "states": 2, "bits": 6},
    "train": {"steps": 3, "batch_size": 4, "muon_lr": 1e-3, "adamw_lr": 5e-5},
    "eval": {"every": 0, "num_examples": 8},
}


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text("# sleepzoo train tiny.yaml\n" + yaml.safe_dump(TINY, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------------------------
# loading and overrides


def test_load_from_file_and_from_dict(recipe_file):
    from_file, from_dict = load_recipe(recipe_file), load_recipe(TINY)
    assert from_file.source == str(recipe_file) and from_dict.source == "<dict>"
    assert from_file.to_dict() == from_dict.to_dict()
    r = from_file
    assert r.model.layers == ["attention", "gated_deltanet"] and r.model.d_model == 32
    assert r.model.mixers["gated_deltanet"] == {"num_heads": 2, "head_dim": 8}
    assert (r.sleep.window, r.sleep.loops, r.sleep.eviction) == (6, 2, "full_flush")  # eviction: the default
    assert (r.task.name, r.task.options) == ("rule110", {"steps": 1, "states": 2, "bits": 6})
    assert r.train.muon_lr == 1e-3 and r.train.optimizer == "muon"
    assert r.eval.every == 0


def test_empty_recipe_is_the_defaults():
    assert load_recipe({}) == Recipe()
    assert load_recipe({"model": None}).model == ModelConfig()


def test_overrides_are_parsed_as_yaml(recipe_file):
    r = load_recipe(recipe_file, overrides=[
        "model.layers=[attention,attention]",
        "train.muon_lr=1e-3",  # YAML 1.1 reads this as a string; the float field takes it
        "train.adamw_lr=2",  # an integer where a float is expected
        "sleep.loops=3",
        "sleep.checkpoint=true",
        "model.mixers.attention.num_kv_heads=1",  # nested keys that did not exist yet
        "task.states=3",
        "model.d_ff=null",
    ])
    assert r.model.layers == ["attention", "attention"]
    assert r.train.muon_lr == 1e-3 and isinstance(r.train.muon_lr, float)
    assert r.train.adamw_lr == 2.0 and isinstance(r.train.adamw_lr, float)
    assert r.sleep.loops == 3 and r.sleep.checkpoint is True
    assert r.model.mixers["attention"] == {"num_heads": 2, "num_kv_heads": 1}
    assert r.model.mixers["gated_deltanet"] == {"num_heads": 2, "head_dim": 8}  # siblings untouched
    assert r.task.options["states"] == 3
    assert r.model.d_ff is None


def test_overrides_do_not_touch_the_given_mapping():
    data = {"sleep": {"loops": 2}}
    load_recipe(data, overrides=["sleep.loops=4", "model.mixers.attention.num_heads=2"])
    assert data == {"sleep": {"loops": 2}}


def test_float_fields_accept_exponent_strings():
    r = load_recipe({"train": {"muon_lr": "1e-4", "weight_decay": "3E-2", "betas": ["0.9", 0.99]},
                     "model": {"init_std": 1}})
    assert r.train.muon_lr == 1e-4 and r.train.weight_decay == 3e-2 and r.train.betas == [0.9, 0.99]
    assert isinstance(r.model.init_std, float)


# ----------------------------------------------------------------------------------------------------------------
# errors: each names the file, the field and what is allowed

BAD_RECIPES = [  # (overrides, data replacing the file's, expected fragments of the message)
    pytest.param([], {"modle": {"d_model": 8}},
                 ["modle", "unknown section", "did you mean 'model'", "allowed sections", "sleep", "eval"],
                 id="unknown-section"),
    pytest.param(["sleep.windw=3"], None,
                 ["sleep.windw", "unknown key", "did you mean 'window'", "allowed keys", "loops", "checkpoint"],
                 id="unknown-key"),
    pytest.param(["train.stpes=3"], None, ["train.stpes", "did you mean 'steps'", "batch_size"],
                 id="unknown-train-key"),
    pytest.param(["sleep.window=abc"], None, ["sleep.window", "expected an integer", "'abc'"], id="wrong-type-int"),
    pytest.param(["train.steps=true"], None, ["train.steps", "expected an integer", "True"], id="bool-is-not-int"),
    pytest.param(["train.muon_lr=fast"], None, ["train.muon_lr", "expected a number", "'fast'"],
                 id="wrong-type-float"),
    pytest.param(["model.layers=attention"], None, ["model.layers", "expected a list", "'attention'"],
                 id="wrong-type-list"),
    pytest.param(["model.layers=[attention, 3]"], None, ["model.layers[1]", "expected a string"],
                 id="wrong-type-list-item"),
    pytest.param(["sleep=4"], None, ["sleep", "expected a mapping"], id="section-not-a-mapping"),
    pytest.param(["sleep.window=0"], None, ["sleep.window", "0 is not allowed", ">= 1"], id="window-0"),
    pytest.param(["sleep.loops=0"], None, ["sleep.loops", "0 is not allowed", ">= 1"], id="loops-0"),
    pytest.param(["train.optimizer=sgd"], None, ["train.optimizer", "'sgd'", "muon, adamw"], id="bad-optimizer"),
    pytest.param(["model.loop_start=2", "model.loop_end=1"], None, ["loop_start", "0 <= loop_start < loop_end"],
                 id="bad-loop-range"),
    pytest.param(["model.layers=[]"], None, ["model.layers", "at least one"], id="no-layers"),
]


@pytest.mark.parametrize("overrides, data, fragments", BAD_RECIPES)
def test_bad_recipes_name_file_field_and_allowed(recipe_file, overrides, data, fragments):
    if data is not None:
        recipe_file.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as exc_info:
        load_recipe(recipe_file, overrides=overrides)
    message = str(exc_info.value)
    assert str(recipe_file) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_recipe_error_is_a_value_error_and_a_sleepzoo_error():
    with pytest.raises(ValueError):
        load_recipe({"sleep": {"loops": 0}})
    with pytest.raises(sleepzoo.SleepzooError):
        load_recipe({"sleep": {"loops": 0}})


def test_malformed_override(recipe_file):
    with pytest.raises(RecipeError) as exc_info:
        load_recipe(recipe_file, overrides=["sleep.loops"])
    assert "'sleep.loops'" in str(exc_info.value) and "key.path=value" in str(exc_info.value)
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(recipe_file, overrides=["model.layers=[attention"])
    with pytest.raises(RecipeError, match="not a section"):
        load_recipe(recipe_file, overrides=["sleep.window.size=3"])


def test_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match="does not exist") as exc_info:
        load_recipe(missing)
    assert str(missing) in str(exc_info.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML") as exc_info:
        load_recipe(broken)
    assert str(broken) in str(exc_info.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- model\n- sleep\n")
    with pytest.raises(RecipeError, match="must be a mapping") as exc_info:
        load_recipe(listing)
    assert str(listing) in str(exc_info.value)


def test_mixer_option_not_in_signature(recipe_file):
    recipe = load_recipe(recipe_file, overrides=["model.mixers.attention.num_hedas=2"])  # checked at build time
    with pytest.raises(RecipeError) as exc_info:
        sleepzoo.build_model(recipe)
    message = str(exc_info.value)
    assert "model.mixers.attention.num_hedas" in message
    assert "did you mean 'num_heads'" in message
    for allowed in ("num_heads", "num_kv_heads", "head_dim", "rope_theta", "backend"):
        assert allowed in message
    assert "layer_idx" not in message and "d_model" not in message  # set by the model, not by recipes


def test_mixer_option_of_wrong_type(recipe_file):
    recipe = load_recipe(recipe_file, overrides=["model.mixers.gated_deltanet.head_dim=wide"])
    with pytest.raises(RecipeError) as exc_info:
        sleepzoo.build_model(recipe)
    assert "model.mixers.gated_deltanet.head_dim" in str(exc_info.value)
    assert "expected an integer" in str(exc_info.value)


@pytest.mark.parametrize("override, fragments", [
    pytest.param("task.stpes=3", ["task.stpes", "did you mean 'steps'", "allowed keys", "states", "bits"],
                 id="unknown-option"),
    pytest.param("task.bits=many", ["task.bits", "expected an integer", "'many'"], id="wrong-type"),
])
def test_bad_task_option(recipe_file, override, fragments):
    recipe = load_recipe(recipe_file, overrides=[override])
    with pytest.raises(RecipeError) as exc_info:
        sleepzoo.build_task(recipe)
    message = str(exc_info.value)
    assert str(recipe_file) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ----------------------------------------------------------------------------------------------------------------
# round trip and shipped recipes


def test_to_yaml_round_trip(recipe_file, tmp_path):
    recipe = load_recipe(TINY, overrides=["train.adamw_lr=1e-5", "model.loop_end=1", "train.threads=2"])
    text = recipe.to_yaml()
    assert load_recipe(yaml.safe_load(text)) == recipe
    saved = tmp_path / "saved.yaml"
    saved.write_text(text)
    reloaded = load_recipe(saved)
    assert reloaded.source == str(saved)
    assert dataclasses.replace(reloaded, source=recipe.source) == recipe
    assert reloaded.train.adamw_lr == 1e-5 and reloaded.train.threads == 2 and reloaded.model.loop_end == 1
    assert reloaded.task.options == {"steps": 1, "states": 2, "bits": 6}
    assert load_recipe(yaml.safe_load(Recipe().to_yaml())) == Recipe()


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_loads_and_validates(path):
    recipe = load_recipe(path)
    assert recipe.source == str(path)
    task = sleepzoo.build_task(recipe)  # task options checked against the task's signature
    registry.get("model", recipe.model.name)
    registry.get("eviction", recipe.sleep.eviction)
    if recipe.model.name == "hybrid":
        for name in recipe.model.layers:
            registry.get("mixer", name)
        with torch.device("meta"):  # builds every mixer from its settings, spending no memory
            model = sleepzoo.build_model(recipe)
        assert model.vocab_size == (recipe.model.vocab_size or task.vocab_size)
        assert len(model.layers) == len(recipe.model.layers)


def test_loop_range_beyond_the_blocks_is_named_by_the_builder(recipe_file):
    """The number of blocks is the model's (a pretrained one's comes from its config.json)."""
    recipe = load_recipe(recipe_file, overrides=["model.loop_start=1", "model.loop_end=9"])
    with pytest.raises(RecipeError, match=r"loop_start < loop_end <= 2 \(the number of layers\)") as exc_info:
        sleepzoo.build_model(recipe)
    assert str(recipe_file) in str(exc_info.value)
