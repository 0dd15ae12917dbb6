"""JetBlock (Jet-Nemotron) against independent float64 computations, streaming, and the checkpoint layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sleepzoo import SleepzooError, registry
from sleepzoo.mixers import evict_state
from sleepzoo.mixers.jet import JetBlock
from sleepzoo.mixers.parts import dynamic_causal_conv

# Jet-Nemotron-2B's JetBlock (reference/jet-nemotron-2b.config.json): hidden 1536, efficient_attention_config.jet
REAL = dict(num_heads=12, head_dim=96, expand_v=2.6666666667, conv_size=4, dconv_generator_reduction=8)
REAL_SHAPES = {
    "q_proj.weight": (1152, 1536),
    "k_proj.weight": (1152, 1536),
    "v_proj.weight": (3072, 1536),
    "g_proj.weight": (3072, 1536),
    "o_proj.weight": (1536, 3072),
    "b_proj.weight": (12, 1536),
    "a_proj.weight": (12, 1536),
    "A_log": (12,),
    "dt_bias": (12,),
    "dynamic_conv1d.kernel_generator.w1.weight": (384, 1536),
    "dynamic_conv1d.kernel_generator.w2.weight": (12288, 384),
    "dynamic_conv1d.kernel_generator.w2.bias": (12288,),
    "o_norm.weight": (256,),
}


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_block(d=16, H=2, K=4, ev=1.5, W=3, R=2, chunk_size=4, seed=0):
    """A tiny block with every parameter random (w2 starts at zero, o_norm at one)."""
    torch.manual_seed(seed)
    block = JetBlock(d, num_heads=H, head_dim=K, expand_v=ev, conv_size=W, dconv_generator_reduction=R,
                     chunk_size=chunk_size)
    with torch.no_grad():
        gen = block.dynamic_conv1d.kernel_generator
        gen.w2.weight.normal_(0, 0.3)
        gen.w2.bias.normal_(0, 0.5)
        block.o_norm.weight.uniform_(0.5, 1.5)
    return block


def naive_dynamic_conv(u, kern, history=None):
    """y[b, t, c] = sum_j kern[b, t, c, j] * u[b, t - (W-1) + j, c], zeros before the known inputs."""
    B, T, C = u.shape
    W = kern.shape[-1]
    past = torch.zeros(B, 0, C) if history is None else history
    full = torch.cat([past, u], dim=1)
    P = past.shape[1]
    y = torch.zeros(B, T, C)
    for b in range(B):
        for t in range(T):
            for c in range(C):
                for j in range(W):
                    src = P + t - (W - 1) + j
                    if src >= 0:
                        y[b, t, c] += kern[b, t, c, j] * full[b, src, c]
    return y


@pytest.mark.parametrize("W", [1, 3, 4])
@pytest.mark.parametrize("hist_len", [None, 1, 3], ids=["none", "short", "full"])
def test_dynamic_conv_matches_double_loop(W, hist_len):
    torch.manual_seed(0)
    B, T, C = 2, 6, 3
    u, kern = torch.randn(B, T, C), torch.randn(B, T, C, W)
    history = None if hist_len is None else torch.randn(B, min(hist_len, W - 1), C)
    y, new_hist = dynamic_causal_conv(u, kern, history)
    torch.testing.assert_close(y, naive_dynamic_conv(u, kern, history), rtol=1e-12, atol=1e-12)
    full = u if history is None else torch.cat([history, u], 1)
    assert new_hist.shape[1] == min(W - 1, full.shape[1])
    torch.testing.assert_close(new_hist, full[:, full.shape[1] - new_hist.shape[1]:])


def test_dynamic_conv_kernel_layout_is_channel_major():
    """kernel[t, c, j] = (w2 silu(w1 x_t) + b2)[c * W + j], generated from the block input x."""
    block = make_block()
    gen, W, C = block.dynamic_conv1d.kernel_generator, block.conv_size, block.value_dim
    x = torch.randn(2, 5, 16)
    kern = gen(x)
    assert kern.shape == (2, 5, C, W)
    for b in range(2):
        for t in range(5):
            flat = gen.w2.weight @ F.silu(gen.w1.weight @ x[b, t]) + gen.w2.bias
            for c in range(C):
                for j in range(W):
                    torch.testing.assert_close(kern[b, t, c, j], flat[c * W + j], rtol=1e-12, atol=1e-12)
    u = torch.randn(2, 5, C)
    y, _ = block.dynamic_conv1d(u, x)
    torch.testing.assert_close(y, naive_dynamic_conv(u, kern), rtol=1e-12, atol=1e-12)


def reference_jet(block: JetBlock, x, S0=None, history=None):
    """The JetBlock recomputed token by token from its parameters (SPEC 3 formulas)."""
    B, T, _ = x.shape
    H, K, V, W = block.num_heads, block.head_k_dim, block.head_v_dim, block.conv_size
    gen = block.dynamic_conv1d.kernel_generator
    u = block.v_proj(x)  # (B, T, H*V)
    past = torch.zeros(B, 0, H * V) if history is None else history
    full, P = torch.cat([past, u], 1), past.shape[1]
    S = torch.zeros(B, H, K, V) if S0 is None else S0.clone()
    o = torch.zeros(B, T, H, V)
    for b in range(B):
        for t in range(T):
            xt = x[b, t]
            q = F.silu(block.q_proj.weight @ xt).view(H, K)
            k = F.silu(block.k_proj.weight @ xt).view(H, K)
            flat = gen.w2.weight @ F.silu(gen.w1.weight @ xt) + gen.w2.bias  # kernel of token t
            vt = torch.zeros(H * V)
            for j in range(W):
                src = P + t - (W - 1) + j
                if src >= 0:
                    vt = vt + flat[j::W] * full[b, src]  # channel c, tap j is flat[c * W + j]
            v = F.silu(vt).view(H, V)
            beta = torch.sigmoid(block.b_proj.weight @ xt)
            g = -torch.exp(block.A_log) * F.softplus(block.a_proj.weight @ xt + block.dt_bias)
            for h in range(H):
                qh = q[h] / torch.sqrt(q[h] @ q[h] + 1e-6)  # fla's L2 norm: eps inside the root
                kh = k[h] / torch.sqrt(k[h] @ k[h] + 1e-6)
                St = torch.exp(g[h]) * S[b, h]
                St = St + beta[h] * torch.outer(kh, v[h] - St.T @ kh)
                S[b, h] = St
                o[b, t, h] = St.T @ qh / math.sqrt(K)
    gate = block.g_proj(x).view(B, T, H, V)
    normed = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + block.o_norm.eps) * block.o_norm.weight
    return block.o_proj((normed * F.silu(gate)).reshape(B, T, H * V)), S


@pytest.mark.parametrize("T", [1, 7, 13])
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "carried"])
def test_jet_block_matches_token_loop(T, with_state):
    block = make_block()
    x = torch.randn(2, T, 16)
    S0 = torch.randn(2, 2, 4, 6) * 0.3 if with_state else None
    hist = torch.randn(2, 2, 12) if with_state else None
    state = None if not with_state else {"fast_weights": S0, "conv_v": hist}
    y, new_state = block(x, state)
    y_ref, S_ref = reference_jet(block, x, S0, hist)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(new_state["fast_weights"], S_ref, rtol=1e-10, atol=1e-10)
    full = block.v_proj(x) if hist is None else torch.cat([hist, block.v_proj(x)], 1)
    torch.testing.assert_close(new_state["conv_v"], full[:, -2:])


def test_jet_block_pieces_and_tokens_equal_one_piece():
    block = make_block(W=4)
    x = torch.randn(2, 13, 16)
    whole, s_whole = block(x)
    for cuts in ([0, 2, 3, 9, 13], list(range(14))):  # uneven pieces (some shorter than W - 1), then tokens
        state, outs = None, []
        for a, b in zip(cuts[:-1], cuts[1:]):
            y, state = block(x[:, a:b], state)
            outs.append(y)
        torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(state["fast_weights"], s_whole["fast_weights"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(state["conv_v"], s_whole["conv_v"])


def test_jet_block_eviction():
    block = make_block(W=4)
    x = torch.randn(2, 10, 16)
    whole, _ = block(x)
    _, state = block(x[:, :6])
    assert state["conv_v"].shape == (2, 3, block.value_dim)
    hard = block.evict(state, 0)
    assert set(hard) == {"fast_weights"}
    assert set(evict_state(block, state, 0)) == set(block.carried_state)
    # sliding: retaining >= W - 1 tokens keeps the whole conv history, so the continuation is unchanged
    slid = block.evict(state, 5)
    rest, _ = block(x[:, 6:], slid)
    torch.testing.assert_close(rest, whole[:, 6:], rtol=1e-10, atol=1e-10)
    assert block.evict(state, 1)["conv_v"].shape == (2, 1, block.value_dim)
    # hard: the conv restarts from zeros, the fast weights carry over
    y_hard, _ = block(x[:, 6:], hard)
    y_ref, _ = reference_jet(block, x[:, 6:], state["fast_weights"], None)
    torch.testing.assert_close(y_hard, y_ref, rtol=1e-10, atol=1e-10)


def jet_reference_keys() -> set[str]:
    """Jet-Nemotron's ``model.layers.{i}.self_attn.*`` names of a JetBlock (SPEC 3), without the prefix."""
    modules = ["q_proj", "k_proj", "v_proj", "b_proj", "a_proj", "dynamic_conv1d.kernel_generator.w1",
               "dynamic_conv1d.kernel_generator.w2", "g_proj", "o_norm", "o_proj"]
    return {f"{m}.weight" for m in modules} | {"A_log", "dt_bias", "dynamic_conv1d.kernel_generator.w2.bias"}


def test_jet_state_dict_names_and_real_shapes():
    tiny = make_block()
    assert set(tiny.state_dict()) == jet_reference_keys() == set(REAL_SHAPES)
    # a checkpoint keyed like Jet-Nemotron's, for layer 3, loads strictly
    torch.manual_seed(1)
    prefix = "model.layers.3.self_attn."
    ckpt = {prefix + k: torch.randn(v.shape) for k, v in tiny.state_dict().items()}
    block = JetBlock(16, num_heads=2, head_dim=4, expand_v=1.5, conv_size=3, dconv_generator_reduction=2)
    block.load_state_dict({k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}, strict=True)
    for k, v in block.state_dict().items():
        torch.testing.assert_close(v, ckpt[prefix + k])
    with torch.device("meta"):
        real = JetBlock(1536, **REAL)
    shapes = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    assert shapes == REAL_SHAPES
    assert (real.head_k_dim, real.head_v_dim, real.value_dim) == (96, 256, 3072)


def jet_param_formula(d, H, K, V, W, R):
    Dv = H * V
    return d * H * (2 * K + 3 * V) + 2 * d * H + 2 * H + (Dv // R) * d + (Dv // R + 1) * Dv * W + V


@pytest.mark.parametrize("d, H, K, ev, W, R", [(32, 2, 8, 2.0, 4, 8), (48, 3, 16, 1.0, 3, 4), (16, 2, 4, 1.5, 2, 5)])
def test_jet_parameter_count_formula(d, H, K, ev, W, R):
    block = JetBlock(d, num_heads=H, head_dim=K, expand_v=ev, conv_size=W, dconv_generator_reduction=R)
    assert sum(p.numel() for p in block.parameters()) == jet_param_formula(d, H, K, int(K * ev), W, R)


def test_jet_real_parameter_count():
    with torch.device("meta"):
        real = JetBlock(1536, **REAL)
    n = sum(p.numel() for p in real.parameters())
    assert n == jet_param_formula(1536, 12, 96, 256, 4, 8) == 23_052_568


def test_jet_bad_sizes():
    with pytest.raises(SleepzooError, match="whole number"):
        JetBlock(16, num_heads=2, head_dim=3, expand_v=1.5)
    with pytest.raises(SleepzooError, match="dconv_generator_reduction"):
        JetBlock(16, num_heads=1, head_dim=2, expand_v=1.0, dconv_generator_reduction=4)


def test_jet_norm_eps_accepts_config_string():
    assert JetBlock(16, num_heads=2, head_dim=4, norm_eps="1e-5").o_norm.eps == 1e-5


@pytest.fixture
def jet_registered():
    added = "jet" not in registry.names("mixer")
    if added:
        registry.register("mixer", "jet")(JetBlock)
    yield
    if added:
        registry.unregister("mixer", "jet")


def test_jet_keeps_the_mixer_contract_in_float32(jet_registered):
    torch.set_default_dtype(torch.float32)
    cls = registry.get("mixer", "jet")
    torch.manual_seed(0)
    mixer = cls(64, layer_idx=0)
    x = torch.randn(2, 9, 64)
    whole, state = mixer(x)
    assert whole.shape == x.shape and whole.dtype == x.dtype and torch.isfinite(whole).all()
    first, state = mixer(x[:, :4])
    rest, _ = mixer(x[:, 4:], state, span=4)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole, rtol=1e-4, atol=1e-5)
    assert set(evict_state(mixer, state, 0)) == {"fast_weights"}
    whole.sum().backward()  # every parameter gets a gradient, the kernel generator included
    assert all(p.grad is not None for p in mixer.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = mixer(x)
    assert torch.isfinite(y).all()


def test_hybrid_model_keeps_the_jet_kernel_generator_init():
    """Model builders redraw Linear weights, but not a module a mixer marked as custom-initialised."""
    import sleepzoo

    recipe = sleepzoo.load_recipe({"model": {"d_model": 32, "layers": ["attention", "jet"], "vocab_size": 7,
                                             "mixers": {"jet": {"num_heads": 2, "head_dim": 8}}}})
    model = sleepzoo.build_model(recipe)
    w2 = model.model.layers[1].self_attn.dynamic_conv1d.kernel_generator.w2
    assert w2.weight.abs().max() == 0 and w2.bias.abs().max() > 0  # starts as a static depthwise conv
    assert model.model.layers[1].self_attn.q_proj.weight.std() < 0.05  # the rest follows init_std
