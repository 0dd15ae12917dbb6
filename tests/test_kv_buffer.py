"""Decoding without copies (issue 11, item 7): without gradients the attention cache of a window is a
preallocated buffer written in place, copied only on a fork's first write and compacted only at eviction.

Every value is checked against an independent float64 computation (attention and RoPE written out per query
and per pair) or against the training forward with gradients enabled, which never uses the buffer.
"""

from __future__ import annotations

import math

import pytest
import torch

import sleepzoo
from sleepzoo import SleepzooError
from sleepzoo.mixers.attention import Attention, KVBuffer, kv_capacity, visible_keys

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------------
# independent references


def reference_rope(x, positions, theta):
    """RoPE pair by pair: dims (i, i + D/2) of x (B, H, T, D) rotate by pos * theta^(-2i/D)."""
    D = x.shape[-1]
    out = x.clone()
    for i in range(D // 2):
        angle = positions.to(F64) * theta ** (-2 * i / D)
        a, b = x[..., i], x[..., i + D // 2]
        out[..., i] = a * angle.cos() - b * angle.sin()
        out[..., i + D // 2] = a * angle.sin() + b * angle.cos()
    return out


def reference_attention(att, x, window=None, positions=None):
    """The mixer's output for x (B, T, d) in one piece, query by query: query t reads keys j with
    t - window < j <= t (all j <= t without a window); ``positions`` are the RoPE positions (default 0..T-1)."""
    B, T, _ = x.shape
    H, Hkv, D = att.num_heads, att.num_kv_heads, att.head_dim
    pos = torch.arange(T) if positions is None else positions
    q = reference_rope((x @ att.q_proj.weight.T).view(B, T, H, D).transpose(1, 2), pos, att.rope_theta)
    k = reference_rope((x @ att.k_proj.weight.T).view(B, T, Hkv, D).transpose(1, 2), pos, att.rope_theta)
    v = (x @ att.v_proj.weight.T).view(B, T, Hkv, D).transpose(1, 2)
    out = torch.zeros(B, H, T, D, dtype=x.dtype)
    for h in range(H):
        g = h // (H // Hkv)
        for t in range(T):
            lo = 0 if window is None else max(0, t - window + 1)
            scores = (k[:, g, lo:t + 1] @ q[:, h, t, :, None])[..., 0] / math.sqrt(D)  # (B, keys)
            out[:, h, t] = (scores.softmax(-1)[..., None] * v[:, g, lo:t + 1]).sum(1)
    return out.transpose(1, 2).reshape(B, T, H * D) @ att.o_proj.weight.T


@pytest.fixture
def allocations(monkeypatch):
    """How many KVBuffers have been made (each is one allocation of a layer's K and V)."""
    made = []
    original = KVBuffer.__init__

    def counting(self, k, v, capacity):
        made.append(capacity)
        original(self, k, v, capacity)

    monkeypatch.setattr(KVBuffer, "__init__", counting)
    return made


def mixer(seed=0, **kw):
    torch.manual_seed(seed)
    return Attention(24, num_heads=4, num_kv_heads=2, head_dim=6, rope_theta=100.0, **kw).double().eval()


# ----------------------------------------------------------------------------------------------------------------
# the mixer


def test_decoding_writes_every_token_in_place_into_one_buffer(allocations):
    att = mixer()
    x = torch.randn(2, 12, 24, dtype=F64)
    want = reference_attention(att, x)
    with torch.no_grad():
        y, state = att(x[:, :3], None)  # a prefill
        buf, storage = state["kv_buffer"], state["kv_buffer"].k.untyped_storage().data_ptr()
        outs, seen = [y], [(state["k"], state["k"].clone(), state["v"], state["v"].clone())]
        for t in range(3, 12):
            y, state = att(x[:, t:t + 1], state)
            outs.append(y)
            seen.append((state["k"], state["k"].clone(), state["v"], state["v"].clone()))
            assert state["kv_buffer"] is buf and state["k"].untyped_storage().data_ptr() == storage
            assert state["k"].shape == (2, 2, t + 1, 6) and state["offset"] == t + 1
    assert allocations == [16] and buf.used == 12  # one buffer (of the minimum 16 slots) for the whole window
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-12, atol=1e-12)
    for k, k0, v, v0 in seen:  # no state a step handed out has changed since
        assert torch.equal(k, k0) and torch.equal(v, v0)

    concat = mixer(kv_cache="concat")
    with torch.no_grad():
        y, s = concat(x[:, :3], None)
        pieces = [y]
        for t in range(3, 12):
            y, s = concat(x[:, t:t + 1], s)
            pieces.append(y)
    assert "kv_buffer" not in s
    torch.testing.assert_close(torch.cat(pieces, 1), torch.cat(outs, 1), rtol=1e-12, atol=1e-12)


def test_a_full_buffer_doubles_so_copies_stay_amortised(allocations):
    att = mixer()
    x = torch.randn(1, 40, 24, dtype=F64)
    with torch.no_grad():
        outs, state = [], None
        for t in range(40):
            y, state = att(x[:, t:t + 1], state)
            outs.append(y)
    assert allocations == [16, 32, 64]  # 40 tokens, 3 buffers: copies of 16 + 32 tokens in all
    torch.testing.assert_close(torch.cat(outs, 1), reference_attention(att, x), rtol=1e-12, atol=1e-12)


def test_capacity_rule():
    assert kv_capacity(1, None) == 16  # a minimum, so that tiny caches do not double every token
    assert kv_capacity(100, None) == 200  # a cache of unknown size: room to double
    assert kv_capacity(17, None, previous=16) == 32 and kv_capacity(200, None, previous=16) == 200
    assert kv_capacity(5, None, previous=64) == 64  # a fork's copy is as large as the buffer it copies
    assert kv_capacity(1, 2000) == 3999  # sliding window: L - 1 retained + a chunk of at most L
    assert kv_capacity(3999, 2000) == 3999 and kv_capacity(4000, 2000) == 8000


def test_forks_of_one_state_decode_different_tokens_without_interfering(allocations):
    att = mixer()
    x_a, x_b = torch.randn(1, 11, 24, dtype=F64), torch.randn(1, 11, 24, dtype=F64)
    x_b[:, :5] = x_a[:, :5]  # one prefix of 5 tokens, two continuations
    with torch.no_grad():
        _, prefix = att(x_a[:, :5], None)
        k0, v0 = prefix["k"].clone(), prefix["v"].clone()
        a, b, outs_a, outs_b = prefix, prefix, [], []
        for t in range(5, 11):  # interleaved: a token of a, then one of b
            y, a = att(x_a[:, t:t + 1], a)
            outs_a.append(y)
            y, b = att(x_b[:, t:t + 1], b)
            outs_b.append(y)
    assert a["kv_buffer"] is prefix["kv_buffer"]  # the first to write after the fork appends in place
    assert b["kv_buffer"] is not prefix["kv_buffer"]  # the second copies once (copy-on-write), then appends
    assert allocations == [16, 16]
    assert torch.equal(prefix["k"], k0) and torch.equal(prefix["v"], v0)
    torch.testing.assert_close(torch.cat(outs_a, 1), reference_attention(att, x_a)[:, 5:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(outs_b, 1), reference_attention(att, x_b)[:, 5:], rtol=1e-12, atol=1e-12)
    # re-reading an old state (as every sleep pass re-reads the start of its chunk) copies, and changes nothing
    with torch.no_grad():
        y, again = att(x_a[:, 5:6], prefix)
    torch.testing.assert_close(y, outs_a[0], rtol=1e-12, atol=1e-12)
    assert again["kv_buffer"] is not prefix["kv_buffer"] and torch.equal(prefix["k"], k0)


@pytest.mark.parametrize("chunk", [5, 2], ids=["every-window", "every-2"])
def test_sliding_window_retention_compacts_once_per_window(chunk, allocations):
    """The engine's sliding window, driven by hand: L = 5, sleep every ``chunk`` tokens, keep L - 1 tokens.
    Every query then sees its 5 most recent tokens: a 5-token sliding window over the whole sequence."""
    L, T = 5, 23
    att = mixer()
    x = torch.randn(2, T, 24, dtype=F64)
    with torch.no_grad():
        outs, state, filled, allocs_at_sleep = [], None, 0, []
        for t in range(T):
            if filled == chunk:  # a sleep: the policy's eviction, L - 1 tokens kept
                before = len(allocations)
                kept = att.evict(state, L - 1)
                allocs_at_sleep.append(len(allocations) - before)
                n = state["k"].shape[2]
                assert torch.equal(kept["k"], state["k"][:, :, max(0, n - L + 1):])  # the last L - 1 tokens' K/V
                assert torch.equal(kept["v"], state["v"][:, :, max(0, n - L + 1):])
                assert kept["offset"] == state["offset"] == t and kept["kv_buffer"].capacity == 2 * L - 1
                state, filled = kept, 0
            before = len(allocations)
            y, state = att(x[:, t:t + 1], state, span=L)
            assert len(allocations) == before or t == 0  # between sleeps: written in place
            outs.append(y)
            filled += 1
    assert allocs_at_sleep == [1] * len(allocs_at_sleep) and len(allocations) == 1 + len(allocs_at_sleep)
    torch.testing.assert_close(torch.cat(outs, 1), reference_attention(att, x, window=L), rtol=1e-12, atol=1e-12)


def test_full_flush_eviction_leaves_a_preallocated_empty_window(allocations):
    att = mixer()
    x = torch.randn(1, 16, 24, dtype=F64)
    with torch.no_grad():
        state, outs = None, []
        for t in range(16):
            if t == 8:  # the window of 8 is full: sleep and flush
                state = att.evict(state, 0)
                assert state["offset"] == 0 and state["k"].shape[2] == 0 and state["kv_buffer"].capacity == 8
                made = len(allocations)
            y, state = att(x[:, t:t + 1], state)
            outs.append(y)
    assert len(allocations) == made  # the second window writes into the buffer made at eviction
    want = torch.cat([reference_attention(att, x[:, :8]), reference_attention(att, x[:, 8:])], 1)  # positions restart
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-12, atol=1e-12)
    _, trained = att(x[:, :4], None)  # with gradients: plain tensors, and eviction drops them, as always
    assert "kv_buffer" not in trained and att.evict(trained, 0) is None


def test_a_windowed_layer_reads_only_the_keys_in_reach():
    att = mixer(window=3)  # a sliding-window attention layer (Jet-Nemotron's SWA)
    x = torch.randn(2, 10, 24, dtype=F64)
    with torch.no_grad():
        y, state = att(x[:, :4], None)
        outs = [y]
        for start, end in ((4, 5), (5, 6), (6, 9), (9, 10)):  # tokens one at a time and a piece of 3
            y, state = att(x[:, start:end], state)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), reference_attention(att, x, window=3), rtol=1e-12, atol=1e-12)
    k = torch.randn(1, 2, 9, 4)
    one = visible_keys(k, k, 1, 3)
    assert one[0].shape[2] == 3 and one[2:] == (False, None)  # one query: its 3 keys, no mask
    three = visible_keys(k, k, 3, 3)
    assert three[0].shape[2] == 5 and three[2:] == (True, 3) and torch.equal(three[0], k[:, :, 4:])
    assert visible_keys(k, k, 1, None)[0].shape[2] == 9


def test_inference_mode_and_no_grad_mix():
    """A buffer made under inference mode can not be written outside it: the state copies instead of failing."""
    att = mixer()
    x = torch.randn(1, 6, 24, dtype=F64)
    with torch.inference_mode():
        _, state = att(x[:, :3], None)
    with torch.no_grad():
        y1, state = att(x[:, 3:4], state)
        assert not state["kv_buffer"].k.is_inference()
    with torch.inference_mode():
        y2, state = att(x[:, 4:5], state)  # a normal buffer may be written under inference mode
    torch.testing.assert_close(torch.cat([y1, y2], 1), reference_attention(att, x)[:, 3:5], rtol=1e-12, atol=1e-12)


def test_bad_kv_cache_option():
    with pytest.raises(SleepzooError, match="kv_cache='ring' must be one of 'buffer', 'concat'"):
        Attention(16, num_heads=2, kv_cache="ring")
    recipe = sleepzoo.load_recipe({"model": {"d_model": 16, "layers": ["attention"], "vocab_size": 7,
                                             "mixers": {"attention": {"num_heads": 2, "kv_cache": "concat"}}}})
    assert sleepzoo.build_model(recipe).mixers()[0].kv_cache == "concat"


# ----------------------------------------------------------------------------------------------------------------
# the engine


def tiny_model(kv_cache="buffer", dtype=F64, layers=("attention", "gated_deltanet", "attention", "gated_deltanet")):
    torch.manual_seed(0)
    recipe = sleepzoo.load_recipe({
        "model": {"d_model": 32, "layers": list(layers), "vocab_size": 13,
                  "mixers": {"attention": {"num_heads": 2, "num_kv_heads": 1, "kv_cache": kv_cache},
                             "gated_deltanet": {"num_heads": 2, "head_dim": 8, "chunk_size": 4}}},
    })
    model = sleepzoo.build_model(recipe).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


SETTINGS = [("full_flush", None), ("sliding_window", None), ("sliding_window", 2)]


@pytest.mark.parametrize("eviction, sleep_every", SETTINGS, ids=["full_flush", "sliding", "sliding-every2"])
def test_forked_streams_decode_different_tokens_like_the_training_forward(eviction, sleep_every):
    """Two forks of one prompt, fed token by token in turn across several sleeps: each one's logits equal the
    training forward (gradients on, so no buffer anywhere) of its own whole sequence."""
    model = tiny_model()
    torch.manual_seed(1)
    prefix, tail_a, tail_b = torch.randint(0, 13, (2, 7)), torch.randint(0, 13, (2, 9)), torch.randint(0, 13, (2, 9))
    kw = dict(window=5, loops=3, eviction=eviction, sleep_every=sleep_every)
    with torch.no_grad():
        a = model.start_stream(**kw)
        first = a.feed(prefix)
        b = a.fork()
        out_a, out_b = [first], [first]
        for t in range(9):
            out_a.append(a.feed(tail_a[:, t:t + 1]))
            out_b.append(b.feed(tail_b[:, t:t + 1]))
    assert a.sleeps == b.sleeps > 2
    for tail, out in ((tail_a, out_a), (tail_b, out_b)):
        want = model(torch.cat([prefix, tail], 1), **kw).logits.detach()  # grad enabled: the concatenated cache
        torch.testing.assert_close(torch.cat(out, 1), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("eviction, sleep_every", SETTINGS, ids=["full_flush", "sliding", "sliding-every2"])
def test_stream_allocates_caches_only_when_it_sleeps(eviction, sleep_every, allocations):
    model = tiny_model()
    stream = model.start_stream(window=5, loops=2, eviction=eviction, sleep_every=sleep_every)
    with torch.no_grad():
        stream.feed(torch.randint(0, 13, (1, 3)))
        for t in range(30):
            before, sleeps = len(allocations), stream.sleeps
            stream.feed(torch.randint(0, 13, (1, 1)))
            if stream.sleeps == sleeps:
                assert len(allocations) == before, t  # a token without a sleep writes in place
            for state in stream.states:
                if state and "kv_buffer" in state:
                    assert state["kv_buffer"].capacity <= (16 if eviction == "full_flush" else 9)
    assert stream.sleeps >= 5


@pytest.mark.parametrize("eviction, sleep_every", SETTINGS + [("sliding_window", 1)],
                         ids=["full_flush", "sliding", "sliding-every2", "sliding-every1"])
def test_training_is_unchanged_bit_for_bit(eviction, sleep_every):
    """With gradients the buffer is never used: loss, logits and every gradient equal the concatenating cache's
    exactly, and the states hold plain tensors."""
    ids, targets = torch.randint(0, 13, (2, 17)), torch.randint(0, 13, (2, 17))
    results = []
    for kv_cache in ("buffer", "concat"):
        model = tiny_model(kv_cache, dtype=torch.float32).train()
        out = model(ids, targets, window=5, loops=2, eviction=eviction, sleep_every=sleep_every)
        out.loss.backward()
        assert not any(s and "kv_buffer" in s for s in out.states)
        results.append((out.loss.detach(), out.logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss, logits, grads), (loss_c, logits_c, grads_c) = results
    assert torch.equal(loss, loss_c) and torch.equal(logits, logits_c)
    assert all(torch.equal(g, g_c) for g, g_c in zip(grads, grads_c))
