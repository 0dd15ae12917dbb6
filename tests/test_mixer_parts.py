"""The Gated DeltaNet family with the conv chosen per projection, and the shared mixer parts (the RMSNorm
family, the conv-cache eviction), against independent float64 computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sleepzoo import SleepzooError
from sleepzoo.mixers import evict_state
from sleepzoo.mixers.gated_deltanet import GatedDeltaMixer, GatedDeltaNet
from sleepzoo.mixers.jet import JetBlock
from sleepzoo.mixers.mamba2 import Mamba2
from sleepzoo.mixers.parts import RMSNorm, evict_conv_caches

D, H, K, EV, W, R = 16, 2, 4, 1.5, 3, 2
MIXED = [dict(q_conv="none", k_conv="dynamic", v_conv="short"),
         dict(q_conv="dynamic", k_conv="short", v_conv="none", use_gate=False),
         dict(q_conv="short", k_conv="none", v_conv="dynamic")]
MIXED_IDS = ["q-none,k-dynamic,v-short", "q-dynamic,k-short,v-none,no-gate", "q-short,k-none,v-dynamic"]


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_mixer(seed=0, **convs) -> GatedDeltaMixer:
    """A tiny mixer with every parameter random (a dynamic conv's w2 starts at zero, o_norm at one)."""
    torch.manual_seed(seed)
    mixer = GatedDeltaMixer(D, num_heads=H, head_dim=K, expand_v=EV, conv_size=W, dconv_generator_reduction=R,
                            chunk_size=4, **convs)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if "kernel_generator.w2" in name:
                p.normal_(0, 0.4)
        mixer.o_norm.weight.uniform_(0.5, 1.5)
    return mixer


def reference(mixer: GatedDeltaMixer, x, S0=None, histories=None):
    """The layer recomputed token by token from its parameters: per projection no conv, a fixed-tap conv
    (tap j reads the input W - 1 - j steps back) or a conv whose taps w2 silu(w1 x_t) + b2 are read
    channel-major; then the gated delta rule, RMSNorm and the gate."""
    B, T, _ = x.shape
    V = mixer.head_v_dim
    histories = histories or {}
    feats = {}
    for p in "qkv":
        u = getattr(mixer, f"{p}_proj")(x)  # (B, T, C)
        kind = mixer.convs[p]
        past = histories.get(p, u[:, :0])
        full, P = torch.cat([past, u], 1), past.shape[1]
        out = torch.zeros_like(u) if kind != "none" else u.clone()
        for b in range(B):
            for t in range(T):
                if kind == "short":
                    taps = getattr(mixer, f"{p}_conv1d").weight[:, 0]  # (C, W)
                elif kind == "dynamic":
                    gen = getattr(mixer, "dynamic_conv1d" if p == "v" else f"{p}_dynamic_conv1d").kernel_generator
                    flat = gen.w2.weight @ F.silu(gen.w1.weight @ x[b, t]) + gen.w2.bias
                    taps = flat.view(-1, W)  # (C, W): channel c, tap j is flat[c * W + j]
                else:
                    continue
                for j in range(W):
                    src = P + t - (W - 1) + j
                    if src >= 0:
                        out[b, t] = out[b, t] + taps[:, j] * full[b, src]
        feats[p] = F.silu(out)
    q, k = feats["q"].view(B, T, H, K), feats["k"].view(B, T, H, K)
    v = feats["v"].view(B, T, H, V)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)  # fla's L2 norm: eps inside the root
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    beta = torch.sigmoid(mixer.b_proj(x))
    g = -torch.exp(mixer.A_log) * F.softplus(mixer.a_proj(x) + mixer.dt_bias)
    S = torch.zeros(B, H, K, V) if S0 is None else S0.clone()
    o = torch.zeros(B, T, H, V)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                St = torch.exp(g[b, t, h]) * S[b, h]
                St = St + beta[b, t, h] * torch.outer(k[b, t, h], v[b, t, h] - St.T @ k[b, t, h])
                S[b, h] = St
                o[b, t, h] = St.T @ q[b, t, h] / math.sqrt(K)
    normed = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + mixer.o_norm.eps) * mixer.o_norm.weight
    if mixer.use_gate:
        normed = normed * F.silu(mixer.g_proj(x).view(B, T, H, V))
    return mixer.o_proj(normed.reshape(B, T, H * V)), S


@pytest.mark.parametrize("convs", MIXED, ids=MIXED_IDS)
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "carried"])
def test_per_projection_convs_match_token_loop(convs, with_state):
    mixer = make_mixer(**convs)
    x = torch.randn(2, 7, D)
    S0 = torch.randn(2, H, K, 6) * 0.3 if with_state else None
    widths = {"q": H * K, "k": H * K, "v": H * 6}
    hist = {p: torch.randn(2, W - 1, widths[p]) for p in "qkv" if convs[f"{p}_conv"] != "none"}
    state = {"fast_weights": S0, **{f"conv_{p}": h for p, h in hist.items()}} if with_state else None
    y, new_state = mixer(x, state)
    y_ref, S_ref = reference(mixer, x, S0, hist if with_state else None)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(new_state["fast_weights"], S_ref, rtol=1e-10, atol=1e-10)
    assert set(new_state) == {"fast_weights"} | {f"conv_{p}" for p in hist}
    for p in hist:  # the next history: the last W - 1 inputs of the projection
        u = getattr(mixer, f"{p}_proj")(x)
        full = torch.cat([hist[p], u], 1) if with_state else u
        torch.testing.assert_close(new_state[f"conv_{p}"], full[:, -(W - 1):])


@pytest.mark.parametrize("convs", MIXED, ids=MIXED_IDS)
def test_per_projection_convs_stream_and_evict(convs):
    """Pieces (some shorter than W - 1) equal one piece; a sliding eviction that keeps the whole conv history
    continues unchanged; a hard one keeps S and restarts every conv from zeros."""
    mixer = make_mixer(**convs)
    x = torch.randn(2, 11, D)
    whole, s_whole = mixer(x)
    state, outs = None, []
    for a, b in zip([0, 1, 3, 8], [1, 3, 8, 11]):
        y, state = mixer(x[:, a:b], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-10, atol=1e-10)
    _, state = mixer(x[:, :6])
    rest, _ = mixer(x[:, 6:], mixer.evict(state, 4))
    torch.testing.assert_close(rest, whole[:, 6:], rtol=1e-10, atol=1e-10)
    hard = mixer.evict(state, 0)
    assert set(hard) == {"fast_weights"} and set(evict_state(mixer, state, 0)) == {"fast_weights"}
    y_hard, _ = mixer(x[:, 6:], hard)
    y_ref, _ = reference(mixer, x[:, 6:], state["fast_weights"])
    torch.testing.assert_close(y_hard, y_ref, rtol=1e-10, atol=1e-10)


def test_per_projection_conv_names_and_parameter_count():
    mixer = make_mixer(**MIXED[0])
    names = {n for n, _ in mixer.named_parameters()}
    assert names == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight", "b_proj.weight",
                     "A_log", "dt_bias", "k_dynamic_conv1d.kernel_generator.w1.weight",
                     "k_dynamic_conv1d.kernel_generator.w2.weight", "k_dynamic_conv1d.kernel_generator.w2.bias",
                     "v_conv1d.weight", "g_proj.weight", "o_norm.weight", "o_proj.weight"}
    V, Ck, Cv = 6, H * K, H * 6
    formula = (D * H * (2 * K + 2 * V) + D * H * V + 2 * D * H + 2 * H + V
               + (Ck // R) * D + (Ck // R + 1) * Ck * W + W * Cv)
    assert sum(p.numel() for p in mixer.parameters()) == formula


def test_the_two_configurations_keep_their_names_and_order():
    """gated_deltanet and jet are configurations of one class with fla's and Jet-Nemotron's names, each in its
    own registration order (a_proj first in fla, b_proj first in Jet-Nemotron)."""
    gdn, jet = GatedDeltaNet(16, num_heads=2, head_dim=4), JetBlock(16, num_heads=2, head_dim=4)
    assert isinstance(gdn, GatedDeltaMixer) and isinstance(jet, GatedDeltaMixer)
    assert not isinstance(jet, GatedDeltaNet)
    assert list(gdn.state_dict()) == ["A_log", "dt_bias", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                                      "a_proj.weight", "b_proj.weight", "q_conv1d.weight", "k_conv1d.weight",
                                      "v_conv1d.weight", "g_proj.weight", "o_norm.weight", "o_proj.weight"]
    assert list(jet.state_dict()) == ["A_log", "dt_bias", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                                      "b_proj.weight", "a_proj.weight", "dynamic_conv1d.kernel_generator.w1.weight",
                                      "dynamic_conv1d.kernel_generator.w2.weight",
                                      "dynamic_conv1d.kernel_generator.w2.bias", "g_proj.weight", "o_norm.weight",
                                      "o_proj.weight"]
    assert gdn.convs == {"q": "short", "k": "short", "v": "short"}
    assert jet.convs == {"q": "none", "k": "none", "v": "dynamic"}
    assert GatedDeltaNet(16, num_heads=2, head_dim=4, use_short_conv=False).convs["v"] == "none"


def test_bad_conv_choices_are_one_clear_error():
    with pytest.raises(SleepzooError, match=r"layer 3\): v_conv='long' must be one of 'none', 'short', 'dynamic'"):
        GatedDeltaMixer(16, num_heads=2, head_dim=4, v_conv="long", layer_idx=3)
    with pytest.raises(SleepzooError, match="dconv_generator_reduction=16 must be >= 1 and at most the key width 8"):
        GatedDeltaMixer(16, num_heads=2, head_dim=4, q_conv="dynamic", dconv_generator_reduction=16)
    # a reduction that only a dynamic conv reads is not checked without one
    GatedDeltaMixer(16, num_heads=2, head_dim=4, dconv_generator_reduction=16)
    with pytest.raises(SleepzooError, match=r"^gated_deltanet \(layer 1\): head_dim \* expand_v"):
        GatedDeltaNet(16, num_heads=2, head_dim=3, expand_v=1.5, layer_idx=1)


class _Carrier(torch.nn.Module):
    carried_state = ("fast_weights", "extra_fast")
    evict = evict_conv_caches


def test_evict_conv_caches_keeps_fast_weights_and_the_last_rows_of_conv_histories():
    mixer = _Carrier()
    S, S2 = torch.randn(2, 3, 4, 5), torch.randn(2, 3)
    conv_a = torch.arange(2 * 3 * 4.).view(2, 3, 4)  # (B, W - 1 = 3 rows, C)
    conv_b = torch.arange(2 * 2 * 5.).view(2, 2, 5)
    state = {"fast_weights": S, "extra_fast": S2, "conv_a": conv_a, "conv_b": conv_b, "kv": torch.ones(2, 9)}
    hard = mixer.evict(state, 0)
    assert set(hard) == {"fast_weights", "extra_fast"}
    assert hard["fast_weights"] is S and hard["extra_fast"] is S2
    one = mixer.evict(state, 1)
    assert set(one) == {"fast_weights", "extra_fast", "conv_a", "conv_b"}  # other caches never survive
    assert one["conv_a"].tolist() == [[[8., 9., 10., 11.]], [[20., 21., 22., 23.]]]
    assert one["conv_b"].tolist() == [[[5., 6., 7., 8., 9.]], [[15., 16., 17., 18., 19.]]]
    many = mixer.evict(state, 100)  # more than a history holds: all of it
    assert torch.equal(many["conv_a"], conv_a) and torch.equal(many["conv_b"], conv_b)
    assert mixer.evict(None, 3) is None
    assert evict_state(mixer, state, 2)["conv_b"].shape == (2, 2, 5)
    with pytest.raises(KeyError):  # a state without the fast weights is not a state of this mixer
        mixer.evict({"conv_a": conv_a}, 1)


def test_the_three_fast_weight_mixers_share_one_evict():
    assert GatedDeltaNet.evict is JetBlock.evict is Mamba2.evict is evict_conv_caches


def _rms(x, eps, group):  # float64 definition: x / sqrt(mean(x^2) + eps) over groups of the last dim
    g = x.double().unflatten(-1, (-1, group))
    return (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)


@pytest.mark.parametrize("group", [None, 3])
def test_rmsnorm_gate_after_and_before_in_float64(group):
    torch.manual_seed(0)
    norm = RMSNorm(6, eps=1e-3, group_size=group)
    first = RMSNorm(6, eps=1e-3, group_size=group, gate_first=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        first.weight.copy_(norm.weight)
    x, z = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
    gs = group or 6
    torch.testing.assert_close(norm(x), _rms(x, 1e-3, gs) * norm.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm(x, z), _rms(x, 1e-3, gs) * norm.weight * F.silu(z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(first(x, z), _rms(x * F.silu(z), 1e-3, gs) * norm.weight, rtol=1e-12, atol=1e-12)


def test_rmsnorm_precision_paths():
    """bf16 is normalised in float32, rounded to bf16 and then scaled by the weight in bf16; ``float32``
    normalises and scales in float32 and rounds once at the end, a float64 input too."""
    torch.manual_seed(0)
    x = torch.randn(3, 64, dtype=torch.float64) * 3
    w = torch.rand(64) + 0.5
    low = RMSNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        low.weight.copy_(w)
    xb = x.bfloat16()
    out = low(xb)
    assert out.dtype == torch.bfloat16
    normed = _rms(xb, 1e-5, 64)  # exact, of the same bf16 inputs
    assert torch.equal(out, normed.bfloat16() * low.weight)  # rounded, then scaled in bf16
    assert not torch.equal(out, (normed * low.weight.double()).bfloat16())  # (the order shows)
    qwen = RMSNorm(64, float32=True)
    with torch.no_grad():
        qwen.weight.copy_(w)
    out = qwen(x)
    assert out.dtype == torch.float64
    exact = _rms(x, 1e-5, 64) * qwen.weight
    torch.testing.assert_close(out, exact, rtol=1e-6, atol=1e-6)  # float32's rounding ...
    assert (out - exact).abs().max() > 1e-10  # ... not float64's
    assert torch.equal(out, out.float().double())  # every value a float32
    qb = qwen.to(torch.bfloat16)
    out = qb(xb)  # one rounding to bf16, at the end
    assert torch.equal(out, (normed * qb.weight.double()).bfloat16())
    assert not torch.equal(out, normed.bfloat16() * qb.weight)


def test_the_family_is_a_registered_mixer_a_recipe_can_configure_per_projection():
    import sleepzoo
    from sleepzoo import registry

    assert registry.get("mixer", "gated_delta_mixer") is GatedDeltaMixer
    mixers = {"num_heads": 2, "head_dim": 8, "chunk_size": 4}
    family = {"model": {"d_model": 16, "layers": ["attention", "gated_delta_mixer"], "vocab_size": 11,
                        "mixers": {"attention": {"num_heads": 2}, "gated_delta_mixer": mixers}},
              "sleep": {"window": 6, "loops": 2}}
    named = {**family, "model": {**family["model"], "layers": ["attention", "gated_deltanet"],
                                 "mixers": {"attention": {"num_heads": 2}, "gated_deltanet": mixers}}}
    torch.manual_seed(0)
    a = sleepzoo.build_model(sleepzoo.load_recipe(family))
    torch.manual_seed(0)
    b = sleepzoo.build_model(sleepzoo.load_recipe(named))
    assert list(a.state_dict()) == list(b.state_dict())  # short convs everywhere: gated_deltanet's names
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    ids = torch.randint(0, 11, (2, 13))
    assert torch.equal(a(ids).logits, b(ids).logits)
    mixed = {**family, "model": {**family["model"], "mixers": {
        "attention": {"num_heads": 2}, "gated_delta_mixer": {**mixers, "q_conv": "none", "v_conv": "dynamic",
                                                              "dconv_generator_reduction": 2}}}}
    model = sleepzoo.build_model(sleepzoo.load_recipe(mixed))
    names = {n.split("self_attn.")[1].split(".")[0] for n, _ in model.named_parameters() if "layers.1.self_attn" in n}
    assert {"k_conv1d", "dynamic_conv1d"} <= names and "q_conv1d" not in names and "v_conv1d" not in names
