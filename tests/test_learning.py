"""Learning checks on the real recipe (slow: about a minute each on 2 CPU cores; `make test-slow`).

With ``states: 1, steps: 0`` the answer is bit 0 of a window that is evicted before the query (chance
1/2). The hybrid can only answer through its Gated DeltaNet fast weights; an attention-only model of the
same recipe has no path at all and must stay at chance, which shows nothing leaks across an eviction.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sleepzoo import load_recipe
from sleepzoo.train import train

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "rule110-tiny.yaml"
ONE_STATE = ["task.states=1", "task.steps=0", "train.steps=300", "eval.every=0", "eval.num_examples=1024"]


@pytest.mark.slow
def test_hybrid_remembers_an_evicted_window_through_fast_weights(tmp_path):
    result = train(load_recipe(RECIPE, ONE_STATE), tmp_path / "hybrid", progress=False)
    assert result["exact_accuracy"] >= 0.95, result


@pytest.mark.slow
def test_attention_only_model_stays_at_chance_after_eviction(tmp_path):
    layers = "model.layers=[attention,attention,attention,attention]"
    result = train(load_recipe(RECIPE, ONE_STATE + [layers]), tmp_path / "attention", progress=False)
    # 1024 test examples, chance 0.5: 0.6 is more than 6 standard deviations above it
    assert result["exact_accuracy"] < 0.6, result
