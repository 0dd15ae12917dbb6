"""Mixers against independent float64 computations."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from sleepzoo import SleepzooError
from sleepzoo.mixers.attention import Attention, apply_rope, rope_cos_sin
from sleepzoo.mixers.gated_deltanet import GatedDeltaNet



@pytest.fixture(autouse=True)
def float64_default():
    """Every tensor and parameter of this module in float64; restored afterwards for other modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def naive_attention(q, k, v):
    """Causal softmax attention with an explicit mask; q (B,H,T,D), k/v (B,Hkv,T,D)."""
    H, Hkv, T = q.shape[1], k.shape[1], q.shape[2]
    out = torch.empty_like(q)
    for h in range(H):
        kv = h // (H // Hkv)  # query head h reads key/value group h // group size
        scores = q[:, h] @ k[:, kv].transpose(-1, -2) / math.sqrt(q.shape[-1])
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        out[:, h] = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v[:, kv]
    return out


def naive_rope(x, positions, theta):
    """RoPE written pair by pair: dims (i, i + D/2) rotate by pos * theta^(-2i/D)."""
    D = x.shape[-1]
    out = x.clone()
    for i in range(D // 2):
        angle = positions.double() * theta ** (-2 * i / D)
        c, s = angle.cos(), angle.sin()
        a, b = x[..., i], x[..., i + D // 2]
        out[..., i] = a * c - b * s
        out[..., i + D // 2] = a * s + b * c
    return out


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa2", "mqa"])
def test_attention_matches_naive(heads, kv_heads):
    torch.manual_seed(0)
    att = Attention(24, num_heads=heads, num_kv_heads=kv_heads, head_dim=6, rope_theta=100.0)
    x = torch.randn(2, 9, 24)
    y, state = att(x)
    B, T, D = 2, 9, 6
    q = att.q_proj(x).view(B, T, heads, D).transpose(1, 2)
    k = att.k_proj(x).view(B, T, kv_heads, D).transpose(1, 2)
    v = att.v_proj(x).view(B, T, kv_heads, D).transpose(1, 2)
    pos = torch.arange(T)
    q, k = naive_rope(q, pos, 100.0), naive_rope(k, pos, 100.0)
    expected = att.o_proj(naive_attention(q, k, v).transpose(1, 2).reshape(B, T, heads * D))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert state["offset"] == T and state["k"].shape == (B, kv_heads, T, D)  # the cache of this window


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):
        cq, sq = rope_cos_sin(torch.tensor([i]), 8, 10000.0, q.dtype)
        ck, sk = rope_cos_sin(torch.tensor([j]), 8, 10000.0, q.dtype)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(103, 100))
    assert not torch.isclose(score(5, 2), score(5, 3))


def test_attention_is_causal():
    torch.manual_seed(0)
    att = Attention(16, num_heads=2)
    x = torch.randn(1, 8, 16)
    x2 = x.clone()
    x2[:, 5:] += 1.0
    torch.testing.assert_close(att(x)[0][:, :5], att(x2)[0][:, :5])


def test_attention_bad_heads():
    with pytest.raises(SleepzooError, match="num_kv_heads=3"):
        Attention(24, num_heads=4, num_kv_heads=3)


def reference_gdn(layer: GatedDeltaNet, x, S0=None):
    """The Gated DeltaNet layer recomputed token by token from its parameters (SPEC 1 formulas)."""
    B, T, _ = x.shape
    H, K, V = layer.num_heads, layer.head_k_dim, layer.head_v_dim

    def conv(u, weight):  # causal depthwise conv, empty history, written as a sum over taps
        W = weight.shape[-1]
        out = torch.zeros_like(u)
        for t in range(T):
            for j in range(W):  # tap j sees token t - (W - 1 - j)
                src = t - (W - 1 - j)
                if src >= 0:
                    out[:, t] += u[:, src] * weight[:, 0, j]
        return out

    q = F.silu(conv(layer.q_proj(x), layer.q_conv1d.weight)).view(B, T, H, K)
    k = F.silu(conv(layer.k_proj(x), layer.k_conv1d.weight)).view(B, T, H, K)
    v = F.silu(conv(layer.v_proj(x), layer.v_conv1d.weight)).view(B, T, H, V)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)  # fla's q/k L2 norm: eps inside the root
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    beta = torch.sigmoid(layer.b_proj(x))
    g = -torch.exp(layer.A_log) * F.softplus(layer.a_proj(x) + layer.dt_bias)
    S = torch.zeros(B, H, K, V) if S0 is None else S0.clone()
    o = torch.zeros(B, T, H, V)
    for t in range(T):
        for b in range(B):
            for h in range(H):
                St = torch.exp(g[b, t, h]) * S[b, h]
                St = St + beta[b, t, h] * torch.outer(k[b, t, h], v[b, t, h] - St.T @ k[b, t, h])
                S[b, h] = St
                o[b, t, h] = St.T @ q[b, t, h] / math.sqrt(K)
    gate = layer.g_proj(x).view(B, T, H, V)
    normed = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps) * layer.o_norm.weight
    y = layer.o_proj((normed * F.silu(gate)).reshape(B, T, H * V))
    return y, S


@pytest.mark.parametrize("T", [1, 7, 20])
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "carried"])
def test_gated_deltanet_matches_token_loop(T, with_state):
    torch.manual_seed(0)
    layer = GatedDeltaNet(16, num_heads=2, head_dim=4, expand_v=1.5, chunk_size=8)
    with torch.no_grad():
        layer.o_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, T, 16)
    S0 = torch.randn(2, 2, 4, 6) * 0.3 if with_state else None
    y, state = layer(x, None if S0 is None else {"fast_weights": S0})
    y_ref, S_ref = reference_gdn(layer, x, S0)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state["fast_weights"], S_ref, rtol=1e-10, atol=1e-10)


def test_gated_deltanet_parameter_names_follow_fla():
    layer = GatedDeltaNet(32, num_heads=2, head_dim=8)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight", "b_proj.weight",
                     "A_log", "dt_bias", "q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight",
                     "g_proj.weight", "o_norm.weight", "o_proj.weight"}
    assert layer.q_conv1d.weight.shape == (16, 1, 4)  # fla's ShortConvolution is a depthwise Conv1d


@pytest.mark.parametrize("d, H, K, ev, W", [(32, 2, 8, 2.0, 4), (48, 3, 16, 1.0, 3)])
def test_gated_deltanet_parameter_count_formula(d, H, K, ev, W):
    layer = GatedDeltaNet(d, num_heads=H, head_dim=K, expand_v=ev, conv_size=W)
    V = int(K * ev)
    formula = d * H * (2 * K + 2 * V) + H * V * d + 2 * d * H + 2 * H + W * H * (2 * K + V) + V
    assert sum(p.numel() for p in layer.parameters()) == formula


def test_gated_deltanet_decay_is_a_log_decay():
    layer = GatedDeltaNet(16, num_heads=4, head_dim=4)
    g = -layer.A_log.exp() * F.softplus(layer.a_proj(torch.randn(3, 16)) + layer.dt_bias)
    assert (g <= 0).all()


def test_gated_deltanet_bad_sizes():
    with pytest.raises(SleepzooError, match="whole number"):
        GatedDeltaNet(16, num_heads=2, head_dim=3, expand_v=1.5)


@pytest.mark.parametrize("T", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("history", [None, 0, 1, 3])
def test_causal_depthwise_conv_matches_a_tap_loop(T, history):
    """The sum over taps (one-token decoding, and the hand-written backward of longer inputs) equals the
    definition written as a loop, values and gradients (of x, the weight and the history), in float64."""
    from sleepzoo.mixers.parts import causal_depthwise_conv

    gen = torch.Generator().manual_seed(T)
    B, C, W = 2, 5, 4
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(C, 1, W, generator=gen, dtype=torch.float64, requires_grad=True)
    hist = None if history is None else torch.randn(B, history, C, generator=gen, dtype=torch.float64,
                                                    requires_grad=True)
    y, nxt = causal_depthwise_conv(x, weight, hist)
    full = x if hist is None else torch.cat([hist, x], dim=1)
    P = full.shape[1] - T
    ref = torch.zeros(B, T, C, dtype=torch.float64)
    for t in range(T):
        for j in range(W):  # tap j reads the input W - 1 - j steps back
            src = P + t - (W - 1 - j)
            if src >= 0:
                ref[:, t] = ref[:, t] + full[:, src] * weight[:, 0, j]
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nxt, full[:, -(W - 1):])
    g = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    inputs = (x, weight) if hist is None or history == 0 else (x, weight, hist)
    grads = torch.autograd.grad(y, inputs, g)
    grads_ref = torch.autograd.grad(ref, inputs, g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_tap_conv_gradcheck_and_low_precision_accumulates_in_float32():
    """The hand-written backward passes gradcheck; bf16 inputs are summed in float32 and rounded once."""
    from sleepzoo.mixers.parts import _TapConv, causal_depthwise_conv

    gen = torch.Generator().manual_seed(0)
    seq = torch.randn(2, 9, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    taps = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_TapConv.apply, (seq, taps))
    x = torch.randn(2, 30, 8, generator=gen).bfloat16()
    w = torch.randn(8, 1, 4, generator=gen).bfloat16()
    y, _ = causal_depthwise_conv(x, w)
    assert y.dtype == torch.bfloat16
    y64, _ = causal_depthwise_conv(x.double(), w.double())
    torch.testing.assert_close(y, y64.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["bf16-weights", "autocast"])
def test_gated_deltanet_decay_is_float32_under_bf16(mode):
    """The g handed to the rule is float32 and equals the decay computed in float64 from the same bf16
    inputs (A_log, dt_bias and the a_proj output), rounded once; a bf16 computation would be visibly off."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    layer = GatedDeltaNet(32, num_heads=4, head_dim=8, chunk_size=8)
    with torch.no_grad():
        layer.A_log.uniform_(-1.0, 2.5)  # decays spread over a range where bf16 rounding shows
        layer.dt_bias.uniform_(-3.0, 1.0)
    x = torch.randn(2, 11, 32)
    if mode == "bf16-weights":
        layer.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    seen = {}
    real_rule = layer.rule

    def spy(q, k, v, g, beta, **kwargs):
        seen["g"] = g
        return real_rule(q, k, v, g, beta, **kwargs)

    layer.rule = spy
    context = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
    with torch.no_grad(), context:
        y, _ = layer(x)
        a = layer.a_proj(x)  # the projection as the layer computes it (bf16 in both modes)
    assert a.dtype == torch.bfloat16 and seen["g"].dtype == torch.float32
    A_log, dt_bias = layer.A_log.double(), layer.dt_bias.double()
    want = -A_log.exp() * F.softplus(a.double() + dt_bias)
    torch.testing.assert_close(seen["g"].double(), want, rtol=2e-6, atol=1e-7)
    in_bf16 = -layer.A_log.to(torch.bfloat16).exp() * F.softplus(a + layer.dt_bias.to(torch.bfloat16))
    assert (in_bf16.double() - want).abs().max() > 100 * (seen["g"].double() - want).abs().max()
    assert torch.isfinite(y).all()
