"""Sleep semantics (SPEC 1), checked against independent re-computations of the algorithm."""

from __future__ import annotations

import pytest
import torch

import sleepzoo
from sleepzoo import SleepzooError
from sleepzoo.engine import chunk_bounds


def tiny_recipe(layers=("attention", "gated_deltanet", "attention", "gated_deltanet"), **sleep):
    return sleepzoo.load_recipe({
        "model": {"d_model": 32, "layers": list(layers), "vocab_size": 11,
                  "mixers": {"attention": {"num_heads": 2, "num_kv_heads": 1},
                             "gated_deltanet": {"num_heads": 2, "head_dim": 8, "chunk_size": 4}}
                  if "gated_deltanet" in layers else {"attention": {"num_heads": 2, "num_kv_heads": 1}}},
        "sleep": {"window": 6, "loops": 1, **sleep},
    })


def tiny_model(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    model = sleepzoo.build_model(tiny_recipe(**kw)).to(dtype)
    # Random norms and gates so no block is an identity at init.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def plain_forward(model, ids):
    """An ordinary hybrid forward over the whole sequence: no windows, no sleep."""
    h = model.model.embed_tokens(ids)
    for block in model.model.layers:
        h, _ = block(h, None)
    return model.lm_head(model.model.norm(h))


def manual_block(block, i, h, S):
    """One pre-norm block by hand with no cache: fast-weight mixers (those with a ``rule``) read and update
    ``S[i]`` in place of the engine's state; attention sees only ``h``."""
    mixer = block.self_attn
    x = block.input_layernorm(h)
    if hasattr(mixer, "rule"):
        out, st = mixer(x, {"fast_weights": S[i]} if i in S else None)
        S[i] = st["fast_weights"]
    else:
        out, _ = mixer(x, None)
    h = h + out
    return h + block.mlp(block.post_attention_layernorm(h))


def manual_sleep_forward(model, ids, window, loops):
    """SPEC 1 written out directly: per window embed, N passes over all blocks carrying only the fast
    weights S across passes and windows; logits from the first (wake) pass."""
    S = {}
    logits = []
    chunks = list(torch.split(ids, window, dim=1))
    for c, chunk in enumerate(chunks):
        h = model.model.embed_tokens(chunk)
        passes = loops if c + 1 < len(chunks) else 1
        for p in range(passes):
            for i, block in enumerate(model.model.layers):
                h = manual_block(block, i, h, S)
            if p == 0:
                logits.append(model.lm_head(model.model.norm(h)))
    return torch.cat(logits, dim=1)


def test_chunk_bounds():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(8, 4) == [(0, 4), (4, 8)]
    assert chunk_bounds(3, 24) == [(0, 3)]


@pytest.mark.parametrize("loops", [1, 3])
def test_single_window_equals_plain_forward(loops):
    model = tiny_model()
    ids = torch.randint(0, 11, (2, 17))
    out = model(ids, window=17, loops=loops)
    torch.testing.assert_close(out.logits, plain_forward(model, ids), rtol=0, atol=1e-12)
    out_big = model(ids, window=100, loops=loops)  # a window longer than the sequence is one window
    torch.testing.assert_close(out_big.logits, out.logits, rtol=0, atol=0)


@pytest.mark.parametrize("loops", [1, 2, 4])
@pytest.mark.parametrize("T", [6, 13, 18])
def test_engine_matches_manual_algorithm(loops, T):
    model = tiny_model()
    ids = torch.randint(0, 11, (2, T))
    out = model(ids, window=6, loops=loops)
    torch.testing.assert_close(out.logits, manual_sleep_forward(model, ids, 6, loops), rtol=0, atol=1e-12)


def test_loops_change_the_output_after_an_eviction():
    model = tiny_model()
    ids = torch.randint(0, 11, (2, 18))
    one, two = model(ids, loops=1).logits, model(ids, loops=2).logits
    torch.testing.assert_close(one[:, :6], two[:, :6], rtol=0, atol=0)  # first window: wake pass only
    assert (one[:, 6:] - two[:, 6:]).abs().max() > 1e-6


def test_loss_is_mean_ce_over_targets():
    model = tiny_model()
    ids = torch.randint(0, 11, (3, 14))
    targets = torch.full_like(ids, -100)
    targets[:, 3] = ids[:, 4]
    targets[:, 12] = ids[:, 13]
    targets[0, 7] = 5
    out = model(ids, targets, loops=2)
    logp = torch.log_softmax(out.logits, -1)
    mask = targets != -100
    expected = -logp[mask].gather(-1, targets[mask][:, None]).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    assert out.num_targets == int(mask.sum())
    no_logits = model(ids, targets, loops=2, return_logits=False)
    assert no_logits.logits is None
    torch.testing.assert_close(no_logits.loss, out.loss, rtol=0, atol=0)


def _grads_of_window_embeddings(model, ids, targets, loops):
    """Gradient of the loss with respect to each window's input embeddings."""
    embeds = []
    original = model.embed

    def recording_embed(chunk_ids):
        h = original(chunk_ids)
        embeds.append(h)
        return h

    model.embed = recording_embed
    try:
        loss = model(ids, targets, loops=loops).loss
    finally:
        del model.embed
    return torch.autograd.grad(loss, embeds, allow_unused=True)


def test_gradients_cross_evictions_only_through_fast_weights():
    ids = torch.randint(0, 11, (2, 18))
    targets = torch.full_like(ids, -100)
    targets[:, -2:] = ids[:, :2]  # loss only in the last window
    attention_only = tiny_model(layers=("attention", "attention"))
    grads = _grads_of_window_embeddings(attention_only, ids, targets, loops=2)
    for g in grads[:2]:  # earlier windows: no path to the loss
        assert g is None or g.abs().max() == 0
    assert grads[2].abs().max() > 0
    hybrid = tiny_model()
    grads = _grads_of_window_embeddings(hybrid, ids, targets, loops=2)
    for g in grads:
        assert g is not None and g.abs().max() > 0


@pytest.mark.parametrize("loop_range", [(None, None), (1, 3)], ids=["all", "prelude+coda"])
@pytest.mark.parametrize("loops", [1, 3])
def test_activation_checkpointing_gives_the_same_loss_and_grads(loops, loop_range):
    ids = torch.randint(0, 11, (2, 20))
    targets = torch.randint(0, 11, (2, 20))
    targets[:, :5] = -100
    results = []
    for ckpt in (False, True):
        model = tiny_model()
        model.loop_range = (0 if loop_range[0] is None else loop_range[0],
                            len(model.layers) if loop_range[1] is None else loop_range[1])
        loss = model(ids, targets, loops=loops, checkpoint=ckpt).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, rtol=0, atol=1e-13)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-10, atol=1e-12, msg=name)


def test_checkpointing_keeps_activation_memory_from_growing_with_loops():
    """Peak bytes of a training step (deterministic: counted tensor by tensor). Without checkpointing every
    pass's activations are kept until the backward pass; with it, one pass's at a time."""
    from sleepzoo.benchmarks.core import peak_bytes

    ids = torch.randint(0, 11, (4, 48))
    model = tiny_model(dtype=torch.float32)

    def peak(loops, ckpt):
        return peak_bytes(lambda: model(ids, ids, window=6, loops=loops, checkpoint=ckpt).loss.backward())

    plain = {n: peak(n, False) for n in (1, 4)}
    ckpt = {n: peak(n, True) for n in (1, 4)}
    assert plain[4] > 2.5 * plain[1]
    assert ckpt[1] < plain[1] / 2
    assert ckpt[4] < 1.5 * ckpt[1]


def test_gradients_match_finite_differences_through_sleep():
    """Full BPTT: autograd of the whole windowed, looped computation equals numerical differentiation."""
    model = tiny_model(layers=("attention", "gated_deltanet"))
    ids = torch.randint(0, 11, (1, 10))
    targets = torch.randint(0, 11, (1, 10))
    p = model.model.layers[1].self_attn.a_proj.weight
    loss = model(ids, targets, window=4, loops=3).loss
    (grad,) = torch.autograd.grad(loss, p)
    eps = 1e-6
    for idx in [(0, 0), (1, 5), (0, 17)]:
        with torch.no_grad():
            p[idx] += eps
            up = model(ids, targets, window=4, loops=3).loss
            p[idx] -= 2 * eps
            down = model(ids, targets, window=4, loops=3).loss
            p[idx] += eps
        assert abs((up - down).item() / (2 * eps) - grad[idx].item()) < 1e-7


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 0}, "window=0"),
    ({"loops": 0}, "loops=0"),
    ({"window": 2.5}, "window=2.5"),
    ({"eviction": "full_flsh"}, "full_flush"),
])
def test_bad_sleep_arguments(kwargs, match):
    model = tiny_model()
    with pytest.raises(SleepzooError, match=match):
        model(torch.zeros(1, 8, dtype=torch.long), **kwargs)


def test_bad_token_ids_and_targets():
    model = tiny_model()
    with pytest.raises(SleepzooError, match="outside"):
        model(torch.full((1, 8), 11, dtype=torch.long))
    with pytest.raises(SleepzooError, match="LongTensor"):
        model(torch.zeros(1, 8))
    with pytest.raises(SleepzooError, match="shape"):
        model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(SleepzooError, match="nothing to take a loss"):
        model(torch.zeros(1, 8, dtype=torch.long), torch.full((1, 8), -100))
