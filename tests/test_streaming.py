"""Streaming inference and sliding-window sleep: the same engine, driven token by token."""

from __future__ import annotations

import pytest
import torch

import sleepzoo
from sleepzoo import SleepzooError
from sleepzoo.mixers.attention import Attention
from sleepzoo.mixers.gated_deltanet import GatedDeltaNet

LAYERS = ["attention", "gated_deltanet", "attention", "gated_deltanet"]


def tiny_model(dtype=torch.float64, seed=0, loop=(None, None), layers=LAYERS):
    torch.manual_seed(seed)
    recipe = sleepzoo.load_recipe({
        "model": {"d_model": 32, "layers": layers, "vocab_size": 13, "loop_start": loop[0], "loop_end": loop[1],
                  "mixers": {"attention": {"num_heads": 2, "num_kv_heads": 1},
                             "gated_deltanet": {"num_heads": 2, "head_dim": 8, "chunk_size": 4}}},
        "sleep": {"window": 5, "loops": 1},
    })
    model = sleepzoo.build_model(recipe).to(dtype)
    with torch.no_grad():  # random norms so no block is an identity at init
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


SETTINGS = [
    pytest.param("full_flush", None, id="full_flush"),
    pytest.param("sliding_window", None, id="sliding"),
    pytest.param("sliding_window", 2, id="sliding-every2"),
]


@pytest.mark.parametrize("eviction, sleep_every", SETTINGS)
@pytest.mark.parametrize("loops", [1, 3])
@pytest.mark.parametrize("loop", [(None, None), (1, 3)], ids=["all-looped", "prelude-coda"])
def test_streaming_equals_the_training_forward(eviction, sleep_every, loops, loop):
    model = tiny_model(loop=loop)
    ids = torch.randint(0, 13, (2, 25))  # 5 windows of 5
    with torch.no_grad():
        batch = model(ids, window=5, loops=loops, eviction=eviction, sleep_every=sleep_every).logits
        streamed = torch.stack(list(model.stream(ids, window=5, loops=loops, eviction=eviction,
                                                 sleep_every=sleep_every)), dim=1)
    torch.testing.assert_close(streamed, batch, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("eviction, sleep_every", SETTINGS)
@pytest.mark.parametrize("loops", [1, 3])
def test_streaming_equals_the_training_forward_float32(eviction, sleep_every, loops):
    model = tiny_model(dtype=torch.float32)
    ids = torch.randint(0, 13, (2, 25))
    with torch.no_grad():
        batch = model(ids, window=5, loops=loops, eviction=eviction, sleep_every=sleep_every).logits
        stream = model.start_stream(window=5, loops=loops, eviction=eviction, sleep_every=sleep_every)
        pieces = [stream.feed(ids[:, :7])]  # a prefill that ends mid-window, then one token at a time
        pieces += [stream.feed(ids[:, t:t + 1]) for t in range(7, 25)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), batch, rtol=1e-5, atol=1e-5)
    assert stream.sleeps == (4 if sleep_every is None else 12)  # a sleep when the next token arrives


def test_loops_change_streaming_only_after_a_sleep():
    model = tiny_model()
    ids = torch.randint(0, 13, (1, 12))
    with torch.no_grad():
        one = torch.stack(list(model.stream(ids, window=5, loops=1)), dim=1)
        three = torch.stack(list(model.stream(ids, window=5, loops=3)), dim=1)
    torch.testing.assert_close(one[:, :5], three[:, :5], rtol=0, atol=0)
    assert (one[:, 5:] - three[:, 5:]).abs().max() > 1e-6


def full_sequence_swa_forward(model, ids, window):
    """A plain sliding-window-attention hybrid over the whole sequence at once: no chunks, no caches,
    attention masked to the last ``window`` tokens, the GDN scan and convs running straight through."""
    h = model.model.embed_tokens(ids)
    for block in model.model.layers:
        h, _ = block(h, None, span=window)
    return model.lm_head(model.model.norm(h))


@pytest.mark.parametrize("sleep_every", [None, 1, 3])
def test_sliding_window_with_one_loop_is_a_swa_hybrid(sleep_every):
    model = tiny_model()
    ids = torch.randint(0, 13, (2, 23))
    with torch.no_grad():
        out = model(ids, window=5, loops=1, eviction="sliding_window", sleep_every=sleep_every).logits
        torch.testing.assert_close(out, full_sequence_swa_forward(model, ids, 5), rtol=1e-10, atol=1e-10)


def test_sliding_window_loops_differ_from_one_loop():
    model = tiny_model()
    ids = torch.randint(0, 13, (2, 15))
    with torch.no_grad():
        one = model(ids, window=5, loops=1, eviction="sliding_window").logits
        two = model(ids, window=5, loops=2, eviction="sliding_window").logits
    assert (one[:, 5:] - two[:, 5:]).abs().max() > 1e-6


def test_sliding_window_trains_through_retained_cache():
    """Gradients reach an earlier window through the retained K/V even in an attention-only model (one layer,
    so a token's receptive field is exactly the span)."""
    model = tiny_model(layers=["attention"])
    embeds = []
    original = model.embed

    def recording(chunk):
        h = original(chunk)
        embeds.append(h)
        return h

    model.embed = recording
    ids = torch.randint(0, 13, (1, 10))
    targets = torch.full_like(ids, -100)
    targets[:, 5] = 3  # first token of the second window: it attends to the previous 4 tokens
    loss = model(ids, targets, window=5, loops=2, eviction="sliding_window").loss
    first, _ = torch.autograd.grad(loss, embeds)
    assert first[:, 1:].abs().max() > 0 and first[:, 0].abs().max() == 0  # token 0 is out of reach


def test_stream_memory_is_bounded():
    model = tiny_model()
    for eviction, bound in (("full_flush", 5), ("sliding_window", 4 + 5)):
        stream = model.start_stream(window=5, loops=2, eviction=eviction)
        with torch.no_grad():
            for t in range(60):
                stream.feed(torch.randint(0, 13, (1, 1)))
                for state in stream.states:
                    if state and "k" in state:
                        assert state["k"].shape[2] <= bound
                    if state and "conv_q" in state:
                        assert state["conv_q"].shape[1] <= 3
                assert len(stream.feats) <= 5
        assert stream.tokens == 60


def test_generate_greedy_follows_stream_argmax():
    model = tiny_model()
    prompt = torch.randint(0, 13, (2, 7))
    out = model.generate(prompt, 9, window=5, loops=2)
    assert out.shape == (2, 16) and torch.equal(out[:, :7], prompt)
    with torch.no_grad():  # re-score the generated sequence: every new token is the argmax of its context
        logits = model(out, window=5, loops=2).logits
    assert torch.equal(logits[:, 6:-1].argmax(-1), out[:, 7:])
    top1 = model.generate(prompt, 9, window=5, loops=2, do_sample=True, top_k=1)
    assert torch.equal(top1, out)
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(prompt, 9, window=5, loops=2, do_sample=True, temperature=1.5, generator=g)
    assert sampled.shape == (2, 16) and int(sampled.max()) < 13


def test_attention_cache_equals_one_piece():
    torch.manual_seed(0)
    att = Attention(16, num_heads=4, num_kv_heads=2).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    whole, _ = att(x, None, span=4)
    first, state = att(x[:, :6], None, span=4)
    rest, _ = att(x[:, 6:], state, span=4)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, rtol=1e-12, atol=1e-12)
    trimmed = att.evict(state, 3)  # 3 retained tokens are all a span of 4 needs
    rest2, _ = att(x[:, 6:], trimmed, span=4)
    torch.testing.assert_close(rest2, rest, rtol=1e-12, atol=1e-12)
    assert att.evict(state, 0) is None


def test_gated_deltanet_caches_equal_one_piece():
    torch.manual_seed(0)
    layer = GatedDeltaNet(16, num_heads=2, head_dim=4, chunk_size=4).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    whole, s_whole = layer(x)
    state, pieces = None, []
    for t in range(9):  # token by token: conv history and S carried in the state
        y, state = layer(x[:, t:t + 1], state)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state["fast_weights"], s_whole["fast_weights"], rtol=1e-10, atol=1e-10)
    flushed = layer.evict(state, 0)
    assert set(flushed) == {"fast_weights"}


@pytest.mark.parametrize("kwargs, match", [
    ({"eviction": "sliding_window", "sleep_every": 6}, "sleep_every=6"),
    ({"eviction": "full_flush", "sleep_every": 2}, "full_flush"),
    ({"eviction": "sliding_windw"}, "sliding_window"),
])
def test_bad_eviction_settings(kwargs, match):
    model = tiny_model()
    with pytest.raises(SleepzooError, match=match):
        model(torch.zeros(1, 8, dtype=torch.long), window=5, **kwargs)
    with pytest.raises(SleepzooError, match=match):
        model.start_stream(window=5, **kwargs)


def test_recipe_sleep_every_checks():
    base = {"model": {"vocab_size": 5}, "sleep": {"window": 4, "eviction": "sliding_window"}}
    with pytest.raises(sleepzoo.RecipeError, match="sleep.sleep_every"):
        sleepzoo.load_recipe(base, ["sleep.sleep_every=5"])
    with pytest.raises(sleepzoo.RecipeError, match="sliding_window"):
        sleepzoo.load_recipe(base, ["sleep.sleep_every=2", "sleep.eviction=full_flush"])
    assert sleepzoo.load_recipe(base, ["sleep.sleep_every=2"]).sleep.sleep_every == 2


def test_generate_command_streams_a_trained_run(tmp_path):
    from click.testing import CliRunner

    from sleepzoo.cli import main
    from sleepzoo.train import train

    recipe = sleepzoo.load_recipe({
        "model": {"d_model": 16, "layers": ["attention", "gated_deltanet"],
                  "mixers": {"attention": {"num_heads": 2}, "gated_deltanet": {"num_heads": 2, "head_dim": 8}}},
        "sleep": {"window": 8, "loops": 2},
        "task": {"name": "rule110", "steps": 0, "states": 2, "bits": 8},
        "train": {"steps": 2, "batch_size": 4, "log_every": 1},
        "eval": {"every": 0, "num_examples": 8},
    })
    train(recipe, tmp_path / "run", progress=False)
    runner = CliRunner()
    result = runner.invoke(main, ["generate", str(tmp_path / "run"), "-n", "2", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert result.output.count("->") == 2 and "loops 2, window 8" in result.output
    result = runner.invoke(main, ["generate", str(tmp_path / "run"), "--prompt", "0 1 Q9"])
    assert result.exit_code == 2 and "'Q9' not in the task's vocabulary" in result.output


def test_a_forked_stream_continues_like_the_original():
    """Two continuations of one prefix: each equals feeding the whole sequence to a fresh stream."""
    from sleepzoo.engine import Stream

    torch.manual_seed(0)
    model = sleepzoo.build_model(sleepzoo.load_recipe({
        "model": {"d_model": 16, "layers": ["attention", "gated_deltanet"], "vocab_size": 11,
                  "mixers": {"attention": {"num_heads": 2}, "gated_deltanet": {"num_heads": 2, "head_dim": 4}}},
        "sleep": {"window": 4, "loops": 2}})).double().eval()
    prefix, a, b = torch.randint(0, 11, (1, 7)), torch.randint(0, 11, (1, 6)), torch.randint(0, 11, (1, 6))
    with torch.no_grad():
        stream = Stream(model, window=4, loops=2)
        stream.feed(prefix)
        fork = stream.fork()
        out_a, out_b = stream.feed(a), fork.feed(b)
        for tail, out in ((a, out_a), (b, out_b)):
            fresh = Stream(model, window=4, loops=2)
            expected = fresh.feed(torch.cat([prefix, tail], dim=1))[:, 7:]
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)  # pieces vs one chunk: rounding
        assert stream.tokens == fork.tokens == 13
