"""Ouro (looped transformer): published names and shapes, the published forward against an independent loop,
early-exit modes against hand computations, the Jet retrofit, the sleep engine over Ouro steps, config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sleepzoo import SleepzooError
from sleepzoo.models.ouro import OuroLM, exit_distribution, insert_jet_layers

# the published config.json, shipped with sleepzoo (sleepzoo/models/configs/); the facts are also these:
REFERENCE = Path(__file__).resolve().parents[1] / "sleepzoo" / "models" / "configs" / "ouro-1.4b.json"
REFERENCE_CONFIG = {
    "architectures": ["OuroForCausalLM"], "model_type": "ouro", "vocab_size": 49152, "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
    "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 65536, "rope_theta": 1000000.0,
    "rope_scaling": None, "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "total_ut_steps": 4,
    "early_exit_threshold": 1.0, "eos_token_id": 0, "torch_dtype": "bfloat16",
}

TINY = dict(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=6, rope_theta=10000.0, rms_norm_eps=1e-6, total_ut_steps=3,
            tie_word_embeddings=False, early_exit_threshold=1.0)


@pytest.fixture(autouse=True)
def float64_single_thread():
    previous, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(previous)
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, **overrides) -> OuroLM:
    """A tiny Ouro with every weight random, norms included (all-ones norms would hide a missing norm)."""
    torch.manual_seed(seed)
    model = OuroLM.from_config({**TINY, **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or "layernorm_2" in name or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
            elif p.dim() == 2:
                p.normal_(0, 0.3)
            else:
                p.normal_(0, 0.5)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# an independent implementation of the published forward, from the SPEC's description


def ref_rms(x, w, eps):
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def ref_rope(x, theta):
    """x (B, H, T, D), half-split pairs (i, i + D/2), positions 0..T-1."""
    D, T = x.shape[-1], x.shape[-2]
    freqs = theta ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2 / D)  # (D/2,)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None]  # (T, D/2)
    c, s = ang.cos(), ang.sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def ref_attention(x, layer, H, Hkv, D, theta):
    """Causal softmax attention with explicit scores (no SDPA), GQA by head groups."""
    B, T, _ = x.shape
    a = layer.self_attn
    q = (x @ a.q_proj.weight.T).view(B, T, H, D).transpose(1, 2)
    k = (x @ a.k_proj.weight.T).view(B, T, Hkv, D).transpose(1, 2)
    v = (x @ a.v_proj.weight.T).view(B, T, Hkv, D).transpose(1, 2)
    q, k = ref_rope(q, theta), ref_rope(k, theta)
    group = H // Hkv
    k, v = k[:, [h // group for h in range(H)]], v[:, [h // group for h in range(H)]]
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = scores.softmax(-1) @ v  # (B, H, T, D)
    return o.transpose(1, 2).reshape(B, T, H * D) @ a.o_proj.weight.T


def reference_steps(model: OuroLM, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The published loop: for each step, every layer with sandwich norms, then model.norm. Returns h_t."""
    c, eps = TINY, TINY["rms_norm_eps"]
    h = model.model.embed_tokens.weight[ids]
    out = []
    for _ in range(steps):
        for layer in model.model.layers:
            attn = ref_attention(ref_rms(h, layer.input_layernorm.weight, eps), layer, c["num_attention_heads"],
                                 c["num_key_value_heads"], c["head_dim"], c["rope_theta"])
            h = h + ref_rms(attn, layer.input_layernorm_2.weight, eps)
            m = layer.mlp
            u = ref_rms(h, layer.post_attention_layernorm.weight, eps)
            mlp = (F.silu(u @ m.gate_proj.weight.T) * (u @ m.up_proj.weight.T)) @ m.down_proj.weight.T
            h = h + ref_rms(mlp, layer.post_attention_layernorm_2.weight, eps)
        h = ref_rms(h, model.model.norm.weight, eps)
        out.append(h)
    return out


# ---------------------------------------------------------------------------------------------------------
# the published checkpoint layout


def test_reference_config_builds_published_keys_and_shapes():
    torch.set_default_dtype(torch.float32)
    config = REFERENCE if REFERENCE is not None else REFERENCE_CONFIG
    with torch.device("meta"):
        model = OuroLM.from_config(config)
    sd = model.state_dict()
    layer = {"self_attn.q_proj.weight": (2048, 2048), "self_attn.k_proj.weight": (2048, 2048),
             "self_attn.v_proj.weight": (2048, 2048), "self_attn.o_proj.weight": (2048, 2048),
             "mlp.gate_proj.weight": (5632, 2048), "mlp.up_proj.weight": (5632, 2048),
             "mlp.down_proj.weight": (2048, 5632), "input_layernorm.weight": (2048,),
             "input_layernorm_2.weight": (2048,), "post_attention_layernorm.weight": (2048,),
             "post_attention_layernorm_2.weight": (2048,)}
    expected = {"model.embed_tokens.weight": (49152, 2048), "model.norm.weight": (2048,),
                "model.early_exit_gate.weight": (1, 2048), "model.early_exit_gate.bias": (1,),
                "lm_head.weight": (49152, 2048)}
    expected.update({f"model.layers.{i}.{k}": s for i in range(24) for k, s in layer.items()})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied
    per_layer = 4 * 2048 * 2048 + 3 * 2048 * 5632 + 4 * 2048
    assert model.num_parameters() == 2 * 49152 * 2048 + 24 * per_layer + 2048 + 2049 == 1_434_652_673
    assert model.total_ut_steps == model.wake_passes == 4 and model.loop_range == (3, 4)


# ---------------------------------------------------------------------------------------------------------
# the published forward


def test_published_forward_equals_independent_loop():
    model = tiny_model()
    ids = torch.randint(0, TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    hs = reference_steps(model, ids, TINY["total_ut_steps"])
    expected = hs[-1] @ model.lm_head.weight.T  # last step's logits, no extra norm
    with torch.no_grad():
        engine = model(ids, window=7, loops=1).logits  # the engine: window covers the sequence, no sleep
        published = model.exit_logits(ids, "last")
        hiddens, gates = model.step_outputs(ids)
    torch.testing.assert_close(engine, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(published, expected, rtol=1e-10, atol=1e-10)
    for h, ref in zip(hiddens, hs):
        torch.testing.assert_close(h, ref, rtol=1e-10, atol=1e-10)
    # the gate reads the normed step output
    g = model.model.early_exit_gate
    torch.testing.assert_close(gates, torch.stack([h @ g.weight[0] + g.bias[0] for h in hs], dim=-1))


def test_wake_passes_is_the_number_of_wake_steps():
    model = tiny_model(wake_passes=2)
    ids = torch.randint(0, TINY["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(2))
    hs = reference_steps(model, ids, 2)
    with torch.no_grad():
        logits = model(ids, window=6, loops=1).logits
    torch.testing.assert_close(logits, hs[1] @ model.lm_head.weight.T, rtol=1e-10, atol=1e-10)
    assert model.loop_range == (1, 2) and len(model.layers) == 2 and model.layers[0] is model.layers[1]


# ---------------------------------------------------------------------------------------------------------
# early exit


def test_exit_distribution_by_hand():
    # lambda = 1/2 at every step of three: p = [1/2, 1/4, 1/4]
    p = exit_distribution(torch.zeros(1, 1, 3))
    torch.testing.assert_close(p, torch.tensor([[[0.5, 0.25, 0.25]]], dtype=p.dtype))
    # lambda = (0.2, 0.5, 0.9, x): p = (0.2, 0.8*0.5, 0.8*0.5*0.9, 0.8*0.5*0.1)
    logit = lambda q: math.log(q / (1 - q))  # noqa: E731
    p = exit_distribution(torch.tensor([logit(0.2), logit(0.5), logit(0.9), 3.0]))
    torch.testing.assert_close(p, torch.tensor([0.2, 0.4, 0.36, 0.04], dtype=p.dtype))
    assert OuroLM.exit_steps(p, 0.5).item() == 1 and OuroLM.exit_steps(p, 0.97).item() == 3
    assert OuroLM.exit_steps(p, 0.2).item() == 0 and OuroLM.exit_steps(p, 1.5).item() == 3


def test_exit_modes_with_constant_gate_by_hand():
    model = tiny_model()
    with torch.no_grad():  # the gate always says lambda = 1/2: p = [1/2, 1/4, 1/4], cdf = [1/2, 3/4, 1]
        model.model.early_exit_gate.weight.zero_()
        model.model.early_exit_gate.bias.zero_()
    ids = torch.randint(0, TINY["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(3))
    logits = [h @ model.lm_head.weight.T for h in reference_steps(model, ids, 3)]
    with torch.no_grad():
        torch.testing.assert_close(model.exit_logits(ids, "expected"),
                                   0.5 * logits[0] + 0.25 * logits[1] + 0.25 * logits[2])
        torch.testing.assert_close(model.exit_logits(ids, "threshold", threshold=0.5), logits[0])
        torch.testing.assert_close(model.exit_logits(ids, "threshold", threshold=0.6), logits[1])
        torch.testing.assert_close(model.exit_logits(ids, "threshold"), logits[2])  # config's 1.0
        torch.testing.assert_close(model.exit_logits(ids, "step", step=1), logits[1])
    with pytest.raises(SleepzooError, match="exit mode 'first'"):
        model.exit_logits(ids, "first")


def test_threshold_exit_picks_each_tokens_step():
    model = tiny_model(seed=4)
    with torch.no_grad():
        model.model.early_exit_gate.weight.mul_(3.0)  # spread the gate over tokens
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(5))
    hs = reference_steps(model, ids, 3)
    g = model.model.early_exit_gate
    lam = [torch.sigmoid(h @ g.weight[0] + g.bias[0]) for h in hs]  # (B, T) each
    p = [lam[0], (1 - lam[0]) * lam[1], (1 - lam[0]) * (1 - lam[1])]
    cdf = [p[0], p[0] + p[1], p[0] + p[1] + p[2]]
    threshold = 0.5
    step = torch.full(ids.shape, 2)
    for t in (1, 0):  # the first step whose cdf reaches the threshold
        step = torch.where(cdf[t] >= threshold, torch.full_like(step, t), step)
    assert len(step.unique()) > 1, "the test should mix exit steps"
    expected = torch.stack(hs, dim=2).gather(2, step[..., None, None].expand(-1, -1, 1, 16)).squeeze(2)
    with torch.no_grad():
        got = model.exit_logits(ids, "threshold", threshold=threshold)
    torch.testing.assert_close(got, expected @ model.lm_head.weight.T)


# ---------------------------------------------------------------------------------------------------------
# the Jet retrofit and the sleep engine


def test_inserted_jet_layers_keep_the_pretrained_function_until_trained():
    model = tiny_model(seed=6)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(7))
    names_before = set(model.state_dict())
    with torch.no_grad():
        plain = model(ids, window=6, loops=1).logits
        plain_full = model(ids, window=12, loops=1).logits
    insert_jet_layers(model, after=(0, 2), num_heads=2, head_dim=4, expand_v=2.0, dconv_generator_reduction=2)
    names = set(model.state_dict())
    assert names_before <= names
    assert {n.split(".")[2] for n in names - names_before} == {"0", "1"}
    assert all(n.startswith("model.sleep_layers.") for n in names - names_before)
    assert [type(b).__name__ for b in model.loop_body()] == ["OuroBlock", "Block", "OuroBlock", "OuroBlock", "Block"]
    with torch.no_grad():
        assert torch.equal(model(ids, window=6, loops=1).logits, plain)
        assert torch.equal(model(ids, window=12, loops=1).logits, plain_full)
        for layer in model.model.sleep_layers:
            layer.self_attn.o_proj.weight.normal_(0, 0.3)
        moved = model(ids, window=6, loops=1).logits
    assert (moved - plain).abs().max() > 1e-3


def test_sleep_passes_continue_the_loop_and_streaming_matches():
    model = tiny_model(seed=8, wake_passes=2)
    insert_jet_layers(model, after=(1,), num_heads=2, head_dim=4, expand_v=1.0, dconv_generator_reduction=2)
    with torch.no_grad():
        model.model.sleep_layers[0].self_attn.o_proj.weight.normal_(0, 0.3)
    ids = torch.randint(0, TINY["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        one = model(ids, window=4, loops=1)
        two = model(ids, window=4, loops=2)
        # one state slot per wake step; the body is [layer 0, layer 1, Jet, layer 2]: Jet is entry 2
        assert len(two.states) == 2 and all(s is not None and "2.fast_weights" in s for s in two.states)
        assert not torch.equal(two.states[0]["2.fast_weights"], two.states[1]["2.fast_weights"])
        torch.testing.assert_close(one.logits[:, :4], two.logits[:, :4])  # the first window is not slept on yet
        assert (one.logits[:, 4:] - two.logits[:, 4:]).abs().max() > 1e-6  # sleep reached the next window
        streamed = torch.stack(list(model.stream(ids, window=4, loops=2, eviction="sliding_window")), dim=1)
        batch = model(ids, window=4, loops=2, eviction="sliding_window").logits
    torch.testing.assert_close(streamed, batch, rtol=1e-9, atol=1e-9)


def test_insert_jet_layers_rejects_bad_positions_and_twice():
    model = tiny_model()
    with pytest.raises(SleepzooError, match="after="):
        insert_jet_layers(model, after=(1, 3))
    insert_jet_layers(model, after=(2,), num_heads=2, head_dim=4)
    with pytest.raises(SleepzooError, match="already inserted"):
        insert_jet_layers(model, after=(1,))


def test_default_retrofit_of_ouro_1_4b_adds_under_ten_percent():
    torch.set_default_dtype(torch.float32)
    with torch.device("meta"):
        model = OuroLM.from_config(REFERENCE_CONFIG)
        base = model.num_parameters()
        insert_jet_layers(model)
    assert len(model.model.sleep_layers) == 6 and model.sleep_after == (3, 7, 11, 15, 19, 23)
    assert len(model.loop_body()) == 30
    assert 0 < model.num_parameters() - base < 0.10 * base


# ---------------------------------------------------------------------------------------------------------
# configuration


def test_unknown_and_unsupported_config_fields_are_named(tmp_path):
    with pytest.raises(SleepzooError, match="frobnicate"):
        OuroLM.from_config({**TINY, "frobnicate": 3})
    with pytest.raises(SleepzooError, match="hidden_act='gelu'"):
        OuroLM.from_config({**TINY, "hidden_act": "gelu"})
    with pytest.raises(SleepzooError, match="intermediate_size"):
        OuroLM.from_config({k: v for k, v in TINY.items() if k != "intermediate_size"})
    with pytest.raises(SleepzooError, match="wake_passes=0"):
        OuroLM.from_config(TINY, wake_passes=0)
    path = tmp_path / "config.json"  # a path, or its folder, works as the dict does; HF bookkeeping is fine
    path.write_text(json.dumps({**TINY, "architectures": ["OuroForCausalLM"], "torch_dtype": "bfloat16",
                                "wake_passes": 2}))
    assert OuroLM.from_config(tmp_path).wake_passes == 2
    assert OuroLM.from_config(path, wake_passes=1).loop_range == (0, 1)


def test_save_pretrained_round_trip_with_sleep_layers(tmp_path):
    """hf_config is the published config; inserted sleep layers and wake_passes go to sleepzoo.json, so
    from_pretrained rebuilds the same model (the published Ouro code could not: no auto_map is written)."""
    from sleepzoo.pretrained import from_pretrained, save_pretrained

    model = tiny_model(seed=3, wake_passes=2)
    assert model.hf_config["total_ut_steps"] == 3 and "wake_passes" not in model.hf_config
    insert_jet_layers(model, after=(0, 2), num_heads=2, head_dim=4, expand_v=1.0, dconv_generator_reduction=2)
    with torch.no_grad():
        for layer in model.model.sleep_layers:
            layer.self_attn.o_proj.weight.normal_(0, 0.3)
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    settings = json.loads((tmp_path / "sleepzoo.json").read_text())
    assert "sleepzoo" not in config and settings["sleep_layers"] == [0, 2] and settings["wake_passes"] == 2
    loaded = from_pretrained(tmp_path, window=4, loops=2)
    ids = torch.randint(0, TINY["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids, window=4, loops=2).logits)
    with pytest.raises(SleepzooError, match="already has sleep layers after \\[0, 2\\]"):
        loaded.configure(sleep_layers=[1])
    loaded.configure(sleep_layers=[0, 2])  # the same positions: nothing to do


def test_tied_ouro_stays_tied():
    model = OuroLM.from_config({**TINY, "tie_word_embeddings": True})
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.to_empty(device="cpu")
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_pass_norm_is_refused_on_ouro_whose_steps_end_with_the_norm():
    from sleepzoo import engine

    model = OuroLM.from_config(TINY_OURO_FOR_PASS_NORM)
    with pytest.raises(SleepzooError, match="already applies its final norm"):
        engine.run(model, torch.randint(0, 41, (1, 8)), window=4, loops=2, pass_norm=True)


TINY_OURO_FOR_PASS_NORM = {
    "architectures": ["OuroForCausalLM"], "model_type": "ouro", "vocab_size": 41, "hidden_size": 16,
    "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 4, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "total_ut_steps": 2, "early_exit_threshold": 1.0, "max_position_embeddings": 64, "torch_dtype": "float32",
}
