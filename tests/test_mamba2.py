"""Mamba2 mixer against a token-by-token float64 recomputation, streaming, eviction and its parameter count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sleepzoo import SleepzooError, registry
from sleepzoo.mixers import evict_state
from sleepzoo.mixers.mamba2 import Mamba2
from sleepzoo.ops import gated_linear_rule
from sleepzoo.ops.rules import FastWeightRule, gated_linear


@pytest.fixture(autouse=True, scope="module")
def gated_linear_registered():
    """The ``gated_linear`` rule (in-process stand-in while its entry point is not installed) and ``mamba2``."""
    wanted = (("rule", "gated_linear", gated_linear), ("mixer", "mamba2", Mamba2))
    added = [(kind, name, obj) for kind, name, obj in wanted if name not in registry.names(kind)]
    for kind, name, obj in added:
        registry.register(kind, name)(obj)
    yield
    for kind, name, _ in added:
        registry.unregister(kind, name)


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_mamba(d=16, H=4, P=3, N=5, G=1, W=3, chunk_size=4, seed=0, **kw):
    torch.manual_seed(seed)
    layer = Mamba2(d, num_heads=H, head_dim=P, state_size=N, num_groups=G, conv_size=W, chunk_size=chunk_size, **kw)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.D.uniform_(-1, 1)
        layer.A_log.uniform_(-2, 1)  # decays that neither vanish nor saturate over a few tokens
    return layer


def reference_mamba2(layer: Mamba2, u, S0=None, history=None):
    """Mamba2 recomputed token by token: S <- exp(-exp(A_log) dt) S + dt B x^T, y = S^T C + D x."""
    Bsz, T, _ = u.shape
    H, P, N, G, E = layer.num_heads, layer.head_dim, layer.state_size, layer.num_groups, layer.d_inner
    W = layer.conv1d.weight.shape[-1]
    proj = layer.in_proj(u)
    z, xbc, dt_raw = proj[..., :E], proj[..., E:E + layer.conv_dim], proj[..., E + layer.conv_dim:]
    past = torch.zeros(Bsz, 0, layer.conv_dim) if history is None else history
    full, Pn = torch.cat([past, xbc], 1), past.shape[1]
    S = torch.zeros(Bsz, H, N, P) if S0 is None else S0.clone()
    out = torch.zeros(Bsz, T, u.shape[-1])
    for b in range(Bsz):
        for t in range(T):
            conv = layer.conv1d.bias.clone()
            for j in range(W):  # tap j reads the token W - 1 - j steps back
                src = Pn + t - (W - 1) + j
                if src >= 0:
                    conv = conv + layer.conv1d.weight[:, 0, j] * full[b, src]
            conv = F.silu(conv)
            x, Bk, Cq = conv[:E].view(H, P), conv[E:E + G * N].view(G, N), conv[E + G * N:].view(G, N)
            y = torch.zeros(H, P)
            for h in range(H):
                grp = h // (H // G)
                dt = F.softplus(dt_raw[b, t, h] + layer.dt_bias[h])
                a = torch.exp(-torch.exp(layer.A_log[h]) * dt)
                S[b, h] = a * S[b, h] + dt * torch.outer(Bk[grp], x[h])
                y[h] = S[b, h].T @ Cq[grp] + layer.D[h] * x[h]
            yz = (y.reshape(E) * F.silu(z[b, t])).view(G, E // G)
            normed = yz / torch.sqrt(yz.pow(2).mean(-1, keepdim=True) + layer.norm.eps)
            out[b, t] = layer.out_proj.weight @ (normed.reshape(E) * layer.norm.weight)
    return out, S


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("T", [1, 7, 13])
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "carried"])
def test_mamba2_matches_token_loop(G, T, with_state):
    layer = make_mamba(G=G)
    u = torch.randn(2, T, 16)
    S0 = torch.randn(2, 4, 5, 3) * 0.3 if with_state else None
    hist = torch.randn(2, 2, layer.conv_dim) if with_state else None
    state = None if not with_state else {"fast_weights": S0, "conv_xbc": hist}
    y, new_state = layer(u, state)
    y_ref, S_ref = reference_mamba2(layer, u, S0, hist)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(new_state["fast_weights"], S_ref, rtol=1e-10, atol=1e-10)


def test_mamba2_pieces_and_tokens_equal_one_piece():
    layer = make_mamba(W=4)
    u = torch.randn(2, 13, 16)
    whole, s_whole = layer(u)
    for cuts in ([0, 2, 3, 9, 13], list(range(14))):
        state, outs = None, []
        for a, b in zip(cuts[:-1], cuts[1:]):
            y, state = layer(u[:, a:b], state)
            outs.append(y)
        torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(state["fast_weights"], s_whole["fast_weights"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(state["conv_xbc"], s_whole["conv_xbc"])


def test_mamba2_eviction():
    layer = make_mamba(W=4)
    u = torch.randn(2, 10, 16)
    whole, _ = layer(u)
    _, state = layer(u[:, :6])
    assert set(evict_state(layer, state, 0)) == {"fast_weights"}
    rest, _ = layer(u[:, 6:], layer.evict(state, 3))  # retains the whole W - 1 history: nothing changes
    torch.testing.assert_close(rest, whole[:, 6:], rtol=1e-10, atol=1e-10)
    y_hard, _ = layer(u[:, 6:], layer.evict(state, 0))  # conv restarts from zeros, S carries over
    y_ref, _ = reference_mamba2(layer, u[:, 6:], state["fast_weights"], None)
    torch.testing.assert_close(y_hard, y_ref, rtol=1e-10, atol=1e-10)


def test_mamba2_rule_without_beta_gets_dt_in_the_values():
    """``beta = dt`` and ``v = x * dt`` are the same write; a rule that reads no beta gets the latter."""
    no_beta = FastWeightRule(
        name="gated_linear_no_beta",
        chunk=lambda q, k, v, g, beta, **kw: gated_linear_rule(q, k, v, g, None, **kw),
        recurrent=gated_linear.recurrent, step=gated_linear.step, uses_gate=True, uses_beta=False)
    registry.register("rule", "gated_linear_no_beta")(no_beta)
    try:
        a, b = make_mamba(), make_mamba(rule="gated_linear_no_beta")
        u = torch.randn(2, 9, 16)
        torch.testing.assert_close(a(u)[0], b(u)[0], rtol=1e-10, atol=1e-10)
    finally:
        registry.unregister("rule", "gated_linear_no_beta")


def mamba2_param_formula(d, H, P, N, G, W):
    E = H * P
    return d * (2 * E + 2 * G * N + H) + (W + 1) * (E + 2 * G * N) + 3 * H + E + E * d


@pytest.mark.parametrize("d, H, P, N, G, W", [(32, 4, 16, 8, 1, 4), (24, 6, 4, 5, 3, 3)])
def test_mamba2_parameter_count_formula(d, H, P, N, G, W):
    layer = Mamba2(d, num_heads=H, head_dim=P, state_size=N, num_groups=G, conv_size=W)
    assert sum(p.numel() for p in layer.parameters()) == mamba2_param_formula(d, H, P, N, G, W)


def test_mamba2_sizes_and_names():
    layer = Mamba2(64)  # head_dim from expand: d_inner = 2 * 64 = 128, P = 32
    assert (layer.d_inner, layer.head_dim, layer.state_size) == (128, 32, 64)
    assert {n for n, _ in layer.named_parameters()} == {
        "in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"}
    assert layer.in_proj.weight.shape == (2 * 128 + 2 * 64 + 4, 64)
    assert Mamba2(64, num_heads=2, head_dim=48).d_inner == 96  # an explicit head_dim overrides expand
    with pytest.raises(SleepzooError, match="num_groups"):
        Mamba2(64, num_heads=4, num_groups=3)
    with pytest.raises(SleepzooError, match="multiple"):
        Mamba2(10, num_heads=3)


def test_mamba2_keeps_the_mixer_contract_in_float32():
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    mixer = registry.get("mixer", "mamba2")(64, layer_idx=0)
    assert mixer.carried_state == ("fast_weights",)
    x = torch.randn(2, 9, 64)
    whole, state = mixer(x)
    assert whole.shape == x.shape and whole.dtype == x.dtype and torch.isfinite(whole).all()
    first, state = mixer(x[:, :4])
    rest, _ = mixer(x[:, 4:], state, span=4)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole, rtol=1e-4, atol=1e-5)
    whole.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mixer.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = mixer(x)
    assert torch.isfinite(y).all()
