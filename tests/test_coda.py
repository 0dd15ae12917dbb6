"""The coda after sleep (SPEC 1, issue 11): blocks after the loop run once more over the last sleep pass."""

from __future__ import annotations

import pytest
import torch

import sleepzoo
from test_engine import manual_block

LAYERS = ["gated_deltanet", "attention", "gated_deltanet", "attention", "gated_deltanet"]


def model_with(loop=(1, 3), seed=0, **sleep):
    torch.manual_seed(seed)
    r = sleepzoo.load_recipe({
        "model": {"d_model": 32, "layers": LAYERS, "vocab_size": 11, "loop_start": loop[0], "loop_end": loop[1],
                  "mixers": {"attention": {"num_heads": 2, "num_kv_heads": 1},
                             "gated_deltanet": {"num_heads": 2, "head_dim": 8, "chunk_size": 4}}},
        "sleep": {"window": 6, "loops": 1, **sleep}})
    model = sleepzoo.build_model(r).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def manual(model, ids, window, loops, coda="sleep"):
    """SPEC 1 by hand, hard eviction: per window the prelude once, the loop N times, the coda once over the
    wake pass's features (logits) and, for a consolidated window, once more over the last pass's features,
    from its state at the window's start; only fast weights cross windows."""
    lo, hi = model.loop_range
    blocks = list(model.model.layers)

    def block(i, h, S):
        return manual_block(blocks[i], i, h, S)

    S, logits = {}, []
    chunks = list(torch.split(ids, window, dim=1))
    for c, chunk in enumerate(chunks):
        h = model.model.embed_tokens(chunk)
        for i in range(lo):
            h = block(i, h, S)
        start = dict(S)  # the coda's state at the window's start
        for i in range(lo, hi):
            h = block(i, h, S)
        out = h
        for i in range(hi, len(blocks)):
            out = block(i, out, S)
        logits.append(model.lm_head(model.model.norm(out)))
        if c + 1 < len(chunks) and loops > 1:
            for _ in range(loops - 1):
                for i in range(lo, hi):
                    h = block(i, h, S)
            if coda == "sleep":
                coda_S = {i: start[i] for i in range(hi, len(blocks)) if i in start}
                for i in range(hi, len(blocks)):
                    h = block(i, h, coda_S)
                S.update(coda_S)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("loops", [2, 3])
@pytest.mark.parametrize("coda", ["sleep", "wake"])
def test_engine_matches_spec_with_prelude_and_coda(loops, coda):
    model = model_with(coda=coda)
    ids = torch.randint(0, 11, (2, 20))
    torch.testing.assert_close(model(ids, loops=loops).logits, manual(model, ids, 6, loops, coda), rtol=0, atol=1e-12)


def test_coda_sees_sleep():
    ids = torch.randint(0, 11, (2, 18))
    slept, woke = model_with(coda="sleep"), model_with(coda="wake")
    a, b = slept(ids, loops=3).logits, woke(ids, loops=3).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)  # the first window: wake logits alike
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-6  # later windows read coda fast weights made by sleep


def test_loops_1_unchanged_bit_for_bit():
    ids = torch.randint(0, 11, (2, 20))
    a, b = model_with(coda="sleep")(ids, loops=1).logits, model_with(coda="wake")(ids, loops=1).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("eviction", ["full_flush", "sliding_window"])
@pytest.mark.parametrize("loop", [(1, 3), (0, 5), (2, 5), (0, 2)])
def test_stream_equals_training_forward(eviction, loop):
    model = model_with(loop=loop, coda="sleep").eval()
    ids = torch.randint(0, 11, (2, 21))
    kw = {"loops": 3, "eviction": eviction, "sleep_every": 3 if eviction == "sliding_window" else None}
    full = model(ids, **kw).logits
    streamed = torch.stack(list(model.stream(ids, **kw)), dim=1)
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-10)


def test_gate_covers_the_coda():
    model = model_with(coda="sleep", gate=True)
    assert model.sleep_gate.shape == (4,)  # 2 looped + 2 coda layers
    ids = torch.randint(0, 11, (2, 18))
    ref = model_with(coda="sleep")
    torch.testing.assert_close(model(ids, loops=4).logits, ref(ids, loops=1).logits, rtol=0, atol=0)


def test_contract():
    model = model_with(loop=(1, 3))
    assert [b.self_attn.__class__.__name__ for b in model.prelude] == ["GatedDeltaNet"]
    assert len(model.loop) == 2 and len(model.coda) == 2
    assert model.shard_units() == list(model.model.layers)
