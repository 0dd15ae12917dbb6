"""Sleep stabilisers (issue 12): sleep.gate, sleep.pass_norm, sleep.truncate, against the algorithm by hand."""

from __future__ import annotations

import pytest
import torch

import sleepzoo
from sleepzoo import SleepzooError
from sleepzoo.config import RecipeError
from test_engine import manual_block

LAYERS = ["attention", "gated_deltanet", "attention", "gated_deltanet"]


def recipe(**sleep):
    return sleepzoo.load_recipe({
        "model": {"d_model": 32, "layers": LAYERS, "vocab_size": 11,
                  "mixers": {"attention": {"num_heads": 2, "num_kv_heads": 1},
                             "gated_deltanet": {"num_heads": 2, "head_dim": 8, "chunk_size": 4}}},
        "sleep": {"window": 6, "loops": 1, **sleep},
    })


def model_with(seed=0, gate_values=None, **sleep):
    torch.manual_seed(seed)
    model = sleepzoo.build_model(recipe(**sleep)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        if gate_values is not None:
            model.sleep_gate.copy_(torch.tensor(gate_values, dtype=torch.float64))
    return model


def manual(model, ids, window, loops, gate=None, pass_norm=False):
    """SPEC 1 by hand, with the stabilisers: after a window's sleep passes the carried S of fast-weight layer
    i is S_wake + gate[i] (S_sleep - S_wake); with pass_norm, model.norm is applied before every sleep pass."""
    S, logits = {}, []
    chunks = list(torch.split(ids, window, dim=1))
    for c, chunk in enumerate(chunks):
        h = model.model.embed_tokens(chunk)
        passes = loops if c + 1 < len(chunks) else 1
        woken = {}
        for p in range(passes):
            if p > 0 and pass_norm:
                h = model.model.norm(h)
            for i, block in enumerate(model.model.layers):
                h = manual_block(block, i, h, S)
            if p == 0:
                logits.append(model.lm_head(model.model.norm(h)))
                woken = dict(S)
        if passes > 1 and gate is not None:
            S = {i: woken[i] + gate[i] * (S[i] - woken[i]) for i in S}
    return torch.cat(logits, dim=1)


def test_gate_at_zero_is_the_one_pass_model():
    ids = torch.randint(0, 11, (3, 20))
    tg = torch.randint(0, 11, (3, 20))
    plain = model_with(loops=1)
    gated = model_with(loops=4, gate=True)
    assert gated.sleep_gate.shape == (4,) and bool((gated.sleep_gate == 0).all())
    a, b = plain(ids, tg), gated(ids, tg)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    b.loss.backward()
    g = gated.sleep_gate.grad
    assert g[1] != 0 and g[3] != 0  # the fast-weight layers learn how much sleep to keep
    assert g[0] == 0 and g[2] == 0  # attention layers carry no fast weights


@pytest.mark.parametrize("loops", [2, 3])
@pytest.mark.parametrize("pass_norm", [False, True])
def test_gate_and_pass_norm_match_manual_algorithm(loops, pass_norm):
    gate = [0.0, 0.37, 0.0, -0.8]
    model = model_with(loops=loops, gate=True, pass_norm=pass_norm, gate_values=gate)
    ids = torch.randint(0, 11, (2, 19))
    out = model(ids)
    ref = manual(model, ids, 6, loops, gate=torch.tensor(gate, dtype=torch.float64), pass_norm=pass_norm)
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-12)
    # and the gate is not a no-op: the ungated model differs
    ungated = manual(model, ids, 6, loops, gate=None, pass_norm=pass_norm)
    assert (out.logits - ungated).abs().max() > 1e-6


def test_gate_at_one_is_ungated_sleep():
    model = model_with(loops=3, gate=True, gate_values=[1.0] * 4)
    ids = torch.randint(0, 11, (2, 18))
    torch.testing.assert_close(model(ids).logits, manual(model, ids, 6, 3), rtol=0, atol=1e-12)


def test_gate_gradient_matches_finite_difference():
    model = model_with(loops=3, gate=True, gate_values=[0.0, 0.2, 0.0, 0.5])
    ids, tg = torch.randint(0, 11, (2, 18)), torch.randint(0, 11, (2, 18))
    model(ids, tg).loss.backward()
    eps = 1e-6
    for i in (1, 3):
        with torch.no_grad():
            model.sleep_gate[i] += eps
            up = model(ids, tg).loss
            model.sleep_gate[i] -= 2 * eps
            down = model(ids, tg).loss
            model.sleep_gate[i] += eps
        assert abs((up - down).item() / (2 * eps) - model.sleep_gate.grad[i].item()) < 1e-6


def test_stream_equals_training_forward_with_stabilisers():
    model = model_with(loops=3, gate=True, pass_norm=True, gate_values=[0.0, 0.6, 0.0, 0.3]).eval()
    ids = torch.randint(0, 11, (2, 20))
    full = model(ids).logits
    streamed = torch.stack(list(model.stream(ids)), dim=1)
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-10)


def _embedding_grads(model, ids, tg):
    """Gradient of the loss with respect to each chunk's embedding output."""
    outs = []

    def keep(_module, _inp, out):
        out.retain_grad()
        outs.append(out)

    handle = model.model.embed_tokens.register_forward_hook(keep)
    try:
        model(ids, tg).loss.backward()
    finally:
        handle.remove()
    return [torch.zeros_like(o) if o.grad is None else o.grad for o in outs]  # None: no path at all


def test_truncate_cuts_gradient_through_old_fast_weights():
    ids = torch.randint(0, 11, (2, 18))  # 3 windows of 6
    tg = torch.full((2, 18), -100)
    tg[:, -2:] = torch.randint(0, 11, (2, 2))  # a loss in the last window only
    full = _embedding_grads(model_with(loops=2), ids, tg)
    assert all(g is not None and g.abs().max() > 0 for g in full)
    cut1 = _embedding_grads(model_with(loops=2, truncate=1), ids, tg)
    assert cut1[0].abs().max() == 0 and cut1[1].abs().max() == 0 and cut1[2].abs().max() > 0
    cut2 = _embedding_grads(model_with(loops=2, truncate=2), ids, tg)  # detached after window 2 only
    assert cut2[0].abs().max() == 0 and cut2[1].abs().max() == 0
    cut3 = _embedding_grads(model_with(loops=2, truncate=3), ids, tg)
    for a, b in zip(cut3, full):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the forward is unchanged
    torch.testing.assert_close(model_with(loops=2, truncate=1)(ids, tg).loss, model_with(loops=2)(ids, tg).loss,
                               rtol=0, atol=0)


def test_bad_settings_are_one_clear_error():
    with pytest.raises(RecipeError, match="sleep.truncate"):
        recipe(truncate=0)
    with pytest.raises(RecipeError, match="sleep.gate"):
        recipe(gate="maybe")
    model = model_with(loops=2)
    with pytest.raises(SleepzooError, match="no sleep gate"):
        sleepzoo.engine.run(model, torch.randint(0, 11, (1, 12)), window=6, loops=2, gate=True)


def test_gate_is_saved_and_trained(tmp_path):
    r = sleepzoo.load_recipe("recipes/rule110-tiny.yaml",
                             overrides=["sleep.loops=2", "sleep.gate=true", "train.steps=6", "eval.every=0",
                                        "eval.num_examples=16", "train.log_every=2"])
    from sleepzoo.train import load_run, train
    train(r, tmp_path / "run", progress=False)
    _, model, _, _ = load_run(tmp_path / "run")
    assert model.sleep_gate.abs().max() > 0


def test_truncate_cuts_gradient_under_sliding_window_too():
    ids = torch.randint(0, 11, (2, 18))
    tg = torch.full((2, 18), -100)
    tg[:, -2:] = torch.randint(0, 11, (2, 2))
    grads = _embedding_grads(model_with(loops=2, truncate=1, eviction="sliding_window"), ids, tg)
    # the retained K/V of earlier windows are detached with the fast weights: only the last window learns
    assert grads[0].abs().max() == 0 and grads[1].abs().max() == 0 and grads[-1].abs().max() > 0


def test_gate_of_the_wrong_length_is_one_clear_error():
    model = model_with(loops=2, gate=True)
    model.sleep_gate = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(SleepzooError, match="sleep_gate has 2 entries but the model has 4"):
        model(torch.randint(0, 11, (1, 12)))


def test_bad_forward_arguments_are_one_clear_error():
    model = model_with(loops=2)
    ids = torch.randint(0, 11, (2, 12))
    with pytest.raises(SleepzooError, match="return_logits"):
        model(ids, ids, return_logits=1)
    with pytest.raises(SleepzooError, match="outside"):
        model(ids, torch.full_like(ids, 11))
    with pytest.raises(SleepzooError, match="LongTensor"):
        model(ids, ids.float())
    with pytest.raises(SleepzooError, match="no rows"):
        model(ids[:0], ids[:0])
