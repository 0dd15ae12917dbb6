"""Each rule stated once (sleepzoo.rules): the recipe, a pretrained model's settings, the eviction policies and
the engine refuse exactly the same settings, with the rule's own words; and the model section's fields are
checked against the chosen builder's signature."""

from __future__ import annotations

import pytest
import torch

import sleepzoo
from sleepzoo import RecipeError, SleepzooError, registry
from sleepzoo.config import builder_fields, load_recipe
from sleepzoo.engine import check_sleep_args
from sleepzoo.pretrained import from_config
from sleepzoo.rules import RuleError, check_loop_range, check_sleep_every, check_window
from test_pretrained import JET, recipe_dict

# (window, sleep_every, eviction) -> the words of the rule it breaks (None: allowed), written by hand
SLEEP_EVERY_CASES = [
    (6, None, "full_flush", None), (6, 6, "full_flush", None), (6, 2, "sliding_window", None),
    (6, 6, "sliding_window", None), (6, 1, "sliding_window", None),
    (6, 3, "full_flush", "full_flush sleeps on whole windows"),
    (6, 7, "sliding_window", "must be an integer in [1, window = 6]"),
    (6, 0, "sliding_window", "0 is not allowed; must be"),  # the recipe's lower bound (BOUNDS) speaks first
]


def _error(call) -> str | None:
    try:
        call()
    except SleepzooError as exc:
        assert "\n" not in str(exc)
        return str(exc)
    return None


@pytest.mark.parametrize("window, every, eviction, words", SLEEP_EVERY_CASES,
                         ids=[f"L{w}-every{e}-{ev}" for w, e, ev, _ in SLEEP_EVERY_CASES])
def test_the_sleep_every_rule_is_the_same_everywhere(window, every, eviction, words):
    sleep = {"window": window, "sleep_every": every, "eviction": eviction}
    errors = {
        "rule": _error(lambda: check_sleep_every(window, every, eviction)),
        "recipe": _error(lambda: load_recipe(recipe_dict({"name": "hybrid"}, sleep=sleep))),
        "policy": _error(lambda: registry.get("eviction", eviction)(window, every)),
        "pretrained": _error(lambda: from_config(JET, **sleep)),
    }
    for where, message in errors.items():
        if words is None:
            assert message is None, (where, message)
        else:
            assert message is not None and words in message, (where, message)
    if words is not None:
        assert "sleep.sleep_every" in errors["recipe"] and errors["policy"].startswith(f"{eviction}: ")


@pytest.mark.parametrize("window, loops, field", [(0, 1, "window"), (4, 0, "loops"), (True, 1, "window"),
                                                  (4, 1.5, "loops")])
def test_window_and_loops_are_counts_for_the_engine_and_a_pretrained_model(window, loops, field):
    with pytest.raises(RuleError) as info:
        check_window(window, loops)
    assert info.value.field == field and "must be an integer >= 1" in str(info.value)
    with pytest.raises(SleepzooError, match=rf"{field}=.* is not allowed; must be an integer >= 1"):
        check_sleep_args(window, loops)
    with pytest.raises(SleepzooError, match=rf"config: {field}=.* is not allowed; must be an integer >= 1"):
        from_config(JET, window=window, loops=loops)
    check_window(4, 2)  # and a valid pair passes


def test_the_loop_range_rule_is_the_same_everywhere():
    words = "need integers 0 <= loop_start < loop_end <= "
    assert check_loop_range(1, 3, 4) == (1, 3) and check_loop_range(0, 9) == (0, 9)
    for start, end, n in [(3, 3, 4), (2, 1, 4), (-1, 2, 4), (1, 5, 4), (True, 2, 4)]:
        with pytest.raises(RuleError, match=words):
            check_loop_range(start, end, n)
    with pytest.raises(RecipeError, match=r"model.loop_start/loop_end: \[3, 2\] is not allowed; " + words):
        load_recipe(recipe_dict({"name": "hybrid", "loop_start": 3, "loop_end": 2}))
    hybrid = load_recipe(recipe_dict({"name": "hybrid", "d_model": 16, "layers": ["attention"] * 2,
                                      "mixers": {"attention": {"num_heads": 2}}, "loop_start": 1, "loop_end": 3}))
    with pytest.raises(RecipeError, match=r"<dict>: model.loop_start/loop_end=\[1, 3\] is not allowed; " + words
                                          + r"2 \(the number of layers\)"):
        sleepzoo.build_model(hybrid, vocab_size=8)
    with pytest.raises(SleepzooError, match=words + r"5 \(the number of layers\)"):
        from_config(JET, loop_start=4, loop_end=6)


# The fields of the model section each shipped builder takes, written out by hand.
TAKES = {
    "hybrid": ["d_model", "layers", "d_ff", "norm_eps", "tie_embeddings", "init_std", "loop_start", "loop_end",
               "mixers"],
    "jet_nemotron": ["pretrained", "hf_config", "loop_start", "loop_end"],
    "ouro": ["pretrained", "hf_config", "wake_passes", "sleep_layers", "mixers", "d_model", "layers", "d_ff",
             "norm_eps", "tie_embeddings", "init_std"],
}
FOREIGN = [("hybrid", "pretrained", "/some/folder"), ("hybrid", "wake_passes", 1), ("hybrid", "sleep_layers", []),
           ("jet_nemotron", "d_model", 64), ("jet_nemotron", "mixers", {"attention": {"num_heads": 2}}),
           ("jet_nemotron", "sleep_layers", [1]), ("jet_nemotron", "tie_embeddings", False),
           ("ouro", "loop_start", 1), ("ouro", "loop_end", 2)]


def test_each_builder_takes_the_fields_its_signature_names():
    for name, fields in TAKES.items():
        assert builder_fields(registry.get("model", name)) == fields, name


@pytest.mark.parametrize("name, field, value", FOREIGN, ids=[f"{n}-{f}" for n, f, _ in FOREIGN])
def test_a_field_the_builder_does_not_take_is_one_line_naming_it(name, field, value, tmp_path):
    model = {"name": name, field: value}
    if name != "hybrid":
        model["hf_config"] = JET if name == "jet_nemotron" else "ouro-1.4b"
    recipe = tmp_path / "r.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(recipe_dict(model)))
    loaded = load_recipe(recipe)  # the section itself is valid: which fields apply is the builder's to say
    with torch.device("meta"), pytest.raises(RecipeError) as info:
        sleepzoo.build_model(loaded, vocab_size=41)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{recipe}: model.{field}: ") and f"model {name!r} does not take {field}" in message
    assert f"(it takes {', '.join(TAKES[name])}, and vocab_size)" in message


def test_a_recipe_written_out_in_full_still_builds(tmp_path):
    """A run's recipe.yaml holds every field, defaults included: a default-valued field is not 'set'."""
    recipe = load_recipe(recipe_dict({"name": "jet_nemotron", "hf_config": JET, "loop_start": 1, "loop_end": 3}))
    full = recipe.to_dict()["model"]
    assert full["d_model"] == 256 and full["layers"] and full["wake_passes"] is None  # hybrid/Ouro defaults
    with torch.device("meta"):
        model = sleepzoo.build_model(load_recipe(recipe.to_dict()), vocab_size=41)
    assert model.loop_range == (1, 3)
