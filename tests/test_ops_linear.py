"""Tests of the gated linear (Mamba2 / simple GLA) and linear attention ops against a float64 loop and fla-core.

The reference below is written independently of :mod:`sleepzoo.ops.gated_linear`: one token at a time, in
float64, with einsums, ``S_t = exp(g_t) S_{t-1} + beta_t k_t v_t^T`` and ``o_t = S_t^T (scale q_t)``
(``g = None``: no decay; ``beta = None``: 1). Values of ``o`` and the final state and the gradients of every
input (the initial state's included) are compared, for both rules, the chunked op (two chunk sizes) and the
step-by-step op, in float64 and float32.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from sleepzoo.ops import (
    gated_linear_rule,
    gated_linear_rule_recurrent,
    gated_linear_rule_step,
    linear_rule,
)
from sleepzoo.ops import rules

import _fla_reference as fla_ref

B, H, K, V = 2, 2, 8, 6
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


# ----------------------------------------------------------------------------------------------------------------
# independent reference and helpers
# ----------------------------------------------------------------------------------------------------------------


def reference_gated_linear(q, k, v, g, beta, initial_state=None, *, scale=None, use_qk_l2norm=False):
    """float64 step-by-step ``S_t = exp(g_t) S_{t-1} + beta_t k_t v_t^T``, ``o_t = S_t^T (scale q_t)``."""
    q, k, v = (x.double() for x in (q, k, v))
    Bq, T, Hq, Kq = q.shape
    if use_qk_l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    scale = Kq**-0.5 if scale is None else scale
    S = torch.zeros(Bq, Hq, Kq, v.shape[-1], dtype=torch.float64) if initial_state is None else initial_state.double()
    outs = []
    for t in range(T):
        write = torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        if beta is not None:
            write = beta[:, t].double()[..., None, None] * write
        if g is not None:
            S = torch.exp(g[:, t].double())[..., None, None] * S
        S = S + write
        outs.append(torch.einsum("bhk,bhkv->bhv", scale * q[:, t], S))
    o = torch.stack(outs, 1) if outs else v.new_zeros(Bq, 0, Hq, v.shape[-1])
    return o, S


def make_inputs(T, *, seed=0, gate=True, init=True, beta=True, unit_keys=True, g_fill=None):
    """float64 inputs ``{q, k, v, g, beta, initial_state}`` (``g`` / ``beta`` / ``initial_state`` may be None)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    k = randn(B, T, H, K)
    x = {
        "q": randn(B, T, H, K),
        "k": F.normalize(k, dim=-1) if unit_keys else k,
        "v": randn(B, T, H, V),
        "g": F.logsigmoid(randn(B, T, H) + 1.0) if gate else None,  # log-decays around -0.3
        "beta": torch.sigmoid(randn(B, T, H)) if beta else None,
        "initial_state": 0.5 * randn(B, H, K, V) if init else None,
    }
    if g_fill is not None:
        x["g"] = torch.full((B, T, H), float(g_fill), dtype=torch.float64)
    return x


def upstream(T, seed=1):
    """Random upstream gradients ``(do, dS)`` for ``o`` and the final state."""
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, T, H, V, generator=gen, dtype=torch.float64),
        torch.randn(B, H, K, V, generator=gen, dtype=torch.float64),
    )


def run_with_grads(fn, inputs, dtype, do, dS):
    """Run ``fn(**inputs)`` in ``dtype`` on fresh leaves; return ``(o, S, {name: grad})`` (detached).

    ``fn`` may return ``S = None`` (references without a final state): then only ``o`` enters the loss.
    """
    leaves = {n: (x.to(dtype).requires_grad_() if x is not None else None) for n, x in inputs.items()}
    o, S = fn(**leaves)
    loss = (o * do.to(o.dtype)).sum()
    if S is not None:
        loss = loss + (S * dS.to(S.dtype)).sum()
    names = [n for n, x in leaves.items() if x is not None]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return o.detach(), (None if S is None else S.detach()), dict(zip(names, grads))


def assert_close(actual, expected, tol, what):
    """max |actual - expected| <= tol * (1 + max |expected|): relative for O(1)+ values, absolute near zero."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    bound = tol * (1.0 + expected.abs().max().item()) if expected.numel() else tol
    assert err <= bound, f"{what}: max abs error {err:.3e} > {bound:.3e}"


def assert_matches(result, expected, tol, label=""):
    """Compare two ``(o, S, grads)`` triples (``S`` skipped where the expected one is None)."""
    o, S, grads = result
    o_ref, S_ref, grads_ref = expected
    assert_close(o, o_ref, tol, f"{label} o")
    if S_ref is not None:
        assert_close(S, S_ref, tol, f"{label} final state")
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], tol, f"{label} d{name}")


def _ref_fn(**kw):
    return reference_gated_linear(**kw)


# The ops under test, all called as fn(q=, k=, v=, g=, beta=, initial_state=) -> (o, S). The "linear" rule
# gets inputs with g=None; it goes through the public wrapper (chunked) and the plugin object (recurrent).
def _gated_chunk(chunk_size):
    def fn(**kw):
        return gated_linear_rule(**kw, output_final_state=True, chunk_size=chunk_size)

    return fn


def _gated_recurrent(**kw):
    return gated_linear_rule_recurrent(**kw, output_final_state=True)


def _linear_chunk(chunk_size):
    def fn(q, k, v, g, beta, **kw):
        assert g is None
        return linear_rule(q, k, v, beta, **kw, output_final_state=True, chunk_size=chunk_size)

    return fn


def _linear_recurrent(q, k, v, g, beta, **kw):
    return rules.linear.recurrent(q, k, v, g, beta, **kw, output_final_state=True)


OPS = {
    "gated_linear": {"chunk16": _gated_chunk(16), "chunk64": _gated_chunk(64), "recurrent": _gated_recurrent},
    "linear": {"chunk16": _linear_chunk(16), "chunk64": _linear_chunk(64), "recurrent": _linear_recurrent},
}
GATED = {"gated_linear": True, "linear": False}


@functools.lru_cache(maxsize=None)
def reference_case(T, gate, init, beta=True):
    """Inputs, upstream grads and float64 reference results for one configuration (shared across ops)."""
    inputs = make_inputs(T, gate=gate, init=init, beta=beta)
    do, dS = upstream(T)
    return inputs, do, dS, run_with_grads(_ref_fn, inputs, torch.float64, do, dS)


# ----------------------------------------------------------------------------------------------------------------
# against the reference: values and gradients
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", [True, False], ids=["init_state", "zero_state"])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200], ids=lambda T: f"T{T}")
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("op", ["chunk16", "chunk64", "recurrent"])
@pytest.mark.parametrize("rule", list(OPS))
def test_matches_reference(rule, op, dtype, T, init):
    """o, final state and the gradients of q, k, v, (g,) beta, initial_state vs the float64 loop."""
    inputs, do, dS, expected = reference_case(T, GATED[rule], init)
    result = run_with_grads(OPS[rule][op], inputs, DTYPES[dtype], do, dS)
    assert_matches(result, expected, TOL[DTYPES[dtype]], f"{rule}/{op}/{dtype}/T={T}")
    assert result[0].dtype == DTYPES[dtype] and result[1].dtype == DTYPES[dtype]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("op", ["chunk16", "recurrent"])
@pytest.mark.parametrize("rule", list(OPS))
def test_beta_none_means_one(rule, op, dtype):
    """beta=None writes k v^T at full strength, in every form, with gradients."""
    T = 37  # chunk16: two full chunks and a padded tail
    inputs, do, dS, expected = reference_case(T, GATED[rule], True, beta=False)
    assert inputs["beta"] is None
    result = run_with_grads(OPS[rule][op], inputs, DTYPES[dtype], do, dS)
    assert_matches(result, expected, TOL[DTYPES[dtype]], f"{rule}/{op}/beta=None")
    ones = dict(inputs, beta=torch.ones(B, T, H, dtype=torch.float64))
    o1, S1, _ = run_with_grads(OPS[rule][op], ones, DTYPES[dtype], do, dS)
    assert_close(result[0], o1, TOL[DTYPES[dtype]], "o(beta=None) vs o(beta=1)")
    assert_close(result[1], S1, TOL[DTYPES[dtype]], "S(beta=None) vs S(beta=1)")


@functools.lru_cache(maxsize=None)
def negative_g_case(g_kind):
    T = 130  # two full chunks of 64 plus a padded tail
    inputs = make_inputs(T, seed=4, g_fill=-20.0 if g_kind == "all_minus20" else None)
    if g_kind == "mixed_0_to_minus20":
        inputs["g"] = -20.0 * torch.rand(B, T, H, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    do, dS = upstream(T)
    return inputs, do, dS, run_with_grads(_ref_fn, inputs, torch.float64, do, dS)


@pytest.mark.parametrize("g_kind", ["all_minus20", "mixed_0_to_minus20"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_strongly_negative_g_is_finite(dtype, g_kind):
    """g = -20 per step: in-chunk cumulative log-decays reach -1280, yet values and gradients stay finite."""
    inputs, do, dS, expected = negative_g_case(g_kind)
    result = run_with_grads(_gated_chunk(64), inputs, DTYPES[dtype], do, dS)
    o, S, grads = result
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), f"d{name} is not finite"
    assert_matches(result, expected, TOL[DTYPES[dtype]], g_kind)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 64], ids=lambda c: f"C{c}")
def test_chunk_size_not_dividing_T(chunk_size):
    """T = 37 is prime: every chunk size but 1 and 37 pads the tail; the padding must not change anything."""
    T = 37
    inputs = make_inputs(T, seed=6)
    do, dS = upstream(T)
    expected = run_with_grads(_ref_fn, inputs, torch.float64, do, dS)
    result = run_with_grads(_gated_chunk(chunk_size), inputs, torch.float64, do, dS)
    assert_matches(result, expected, TOL[torch.float64], f"C={chunk_size}")


@pytest.mark.parametrize("op", ["chunk16", "recurrent"])
def test_qk_l2norm_and_custom_scale(op):
    """use_qk_l2norm normalises q and k inside the op (differentiated); scale replaces K ** -0.5."""
    T = 40
    inputs = make_inputs(T, unit_keys=False, seed=3)
    inputs["q"] = inputs["q"] * 3.0
    do, dS = upstream(T)
    expected = run_with_grads(
        lambda **kw: reference_gated_linear(**kw, use_qk_l2norm=True, scale=0.3), inputs, torch.float64, do, dS
    )
    fn = OPS["gated_linear"][op]
    result = run_with_grads(lambda **kw: fn(**kw, use_qk_l2norm=True, scale=0.3), inputs, torch.float64, do, dS)
    assert_matches(result, expected, TOL[torch.float64], op)


# ----------------------------------------------------------------------------------------------------------------
# against fla-core's naive references (beta is folded into v: beta k v^T = k (beta v)^T)
# ----------------------------------------------------------------------------------------------------------------


def _fold_beta(v, beta):
    return v * beta.unsqueeze(-1)


def _fla_simple_gla(kind):
    def fn(q, k, v, g, beta, initial_state):
        v = _fold_beta(v, beta)
        if kind == "naive_recurrent":
            return fla_ref.naive_recurrent_simple_gla(q, k, v, g, initial_state=initial_state, output_final_state=True)
        if kind == "naive_chunk":
            return fla_ref.naive_chunk_simple_gla(
                q, k, v, g, initial_state=initial_state, output_final_state=True, chunk_size=16
            )
        assert initial_state is None
        return fla_ref.naive_parallel_simple_gla(q, k, v, g)[0], None

    return fn


@pytest.mark.parametrize(
    "fla_fn, T, init",
    [
        ("naive_recurrent", 50, True),
        ("naive_recurrent", 65, False),
        ("naive_chunk", 65, True),
        ("naive_chunk", 50, False),
        ("naive_parallel", 65, False),  # no initial state in fla's parallel form
    ],
)
def test_gated_linear_matches_fla_simple_gla(fla_fn, T, init):
    """Our chunked gated_linear (float32) vs fla-core's naive simple_gla (float32): values and gradients."""
    if fla_ref.naive_chunk_simple_gla is None:
        pytest.skip(f"fla-core simple_gla reference unavailable: {fla_ref.SIMPLE_GLA_UNAVAILABLE_REASON}")
    inputs = make_inputs(T, seed=8, init=init)
    do, dS = upstream(T)
    theirs = run_with_grads(_fla_simple_gla(fla_fn), inputs, torch.float32, do, dS)
    ours = run_with_grads(_gated_chunk(16), inputs, torch.float32, do, dS)
    if theirs[1] is None:  # no final state in the reference: compare o-only losses
        ours = run_with_grads(lambda **kw: (_gated_chunk(16)(**kw)[0], None), inputs, torch.float32, do, dS)
    assert_matches(ours, theirs, TOL[torch.float32], f"vs fla simple_gla {fla_fn}")


def _fla_linear_attn(kind):
    def fn(q, k, v, g, beta, initial_state):
        assert g is None
        v = _fold_beta(v, beta)
        if kind == "naive_recurrent":
            return fla_ref.naive_recurrent_linear_attn(q, k, v, initial_state=initial_state, output_final_state=True)
        assert initial_state is None
        return fla_ref.naive_chunk_linear_attn(q, k, v), None

    return fn


@pytest.mark.parametrize(
    "fla_fn, T, init",
    [("naive_recurrent", 50, True), ("naive_recurrent", 65, False), ("naive_chunk", 128, False)],
)
def test_linear_matches_fla_linear_attn(fla_fn, T, init):
    """Our chunked linear rule (float32) vs fla-core's naive linear_attn (float32): values and gradients."""
    if fla_ref.naive_recurrent_linear_attn is None:
        pytest.skip(f"fla-core linear_attn reference unavailable: {fla_ref.LINEAR_ATTN_UNAVAILABLE_REASON}")
    inputs = make_inputs(T, seed=18, init=init, gate=False)
    do, dS = upstream(T)
    theirs = run_with_grads(_fla_linear_attn(fla_fn), inputs, torch.float32, do, dS)
    ours_fn = _linear_chunk(16)
    if theirs[1] is None:
        ours = run_with_grads(lambda **kw: (ours_fn(**kw)[0], None), inputs, torch.float32, do, dS)
    else:
        ours = run_with_grads(ours_fn, inputs, torch.float32, do, dS)
    assert_matches(ours, theirs, TOL[torch.float32], f"vs fla linear_attn {fla_fn}")


# ----------------------------------------------------------------------------------------------------------------
# single-step decoding, plugins, edge cases
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [True, False], ids=["beta", "beta_none"])
@pytest.mark.parametrize("init", [True, False], ids=["init_state", "zero_state"])
@pytest.mark.parametrize("rule", list(OPS))
def test_step_by_step_reproduces_chunked(rule, init, beta):
    """Decoding token by token with the rule's step gives the chunked op's outputs and final state."""
    T = 65
    plugin = getattr(rules, rule)
    x = make_inputs(T, seed=9, init=init, beta=beta)  # g given to both rules; "linear" must ignore it
    o_chunk, S_chunk = plugin.chunk(
        x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"], output_final_state=True,
        chunk_size=16,
    )
    state = x["initial_state"]
    outs = []
    for t in range(T):
        beta_t = None if x["beta"] is None else x["beta"][:, t]
        o_t, state = plugin.step(x["q"][:, t], x["k"][:, t], x["v"][:, t], x["g"][:, t], beta_t, state)
        assert o_t.shape == (B, H, V) and state.shape == (B, H, K, V)
        outs.append(o_t)
    assert_close(torch.stack(outs, 1), o_chunk, TOL[torch.float64], "o")
    assert_close(state, S_chunk, TOL[torch.float64], "final state")
    o_ref, S_ref = reference_gated_linear(
        x["q"], x["k"], x["v"], x["g"] if GATED[rule] else None, x["beta"], x["initial_state"]
    )
    assert_close(o_chunk, o_ref, TOL[torch.float64], "chunked o vs reference")
    assert_close(S_chunk, S_ref, TOL[torch.float64], "chunked S vs reference")


def test_step_options_and_bf16():
    """The step's scale / use_qk_l2norm match the chunked op; bf16 inputs compute in float32."""
    x = make_inputs(6, seed=10, unit_keys=False)
    o_chunk, S_chunk = gated_linear_rule(**x, output_final_state=True, use_qk_l2norm=True, scale=0.7)
    state = x["initial_state"]
    outs = []
    for t in range(6):
        o_t, state = gated_linear_rule_step(
            x["q"][:, t], x["k"][:, t], x["v"][:, t], x["g"][:, t], x["beta"][:, t], state, scale=0.7,
            use_qk_l2norm=True,
        )
        outs.append(o_t)
    assert_close(torch.stack(outs, 1), o_chunk, TOL[torch.float64], "o")
    assert_close(state, S_chunk, TOL[torch.float64], "S")
    o_t, S_t = gated_linear_rule_step(*(x[n][:, 0].to(torch.bfloat16) for n in ("q", "k", "v", "g", "beta")), None)
    assert o_t.dtype == torch.bfloat16 and S_t.dtype == torch.float32


def test_bfloat16_inputs_compute_in_float32():
    """Low-precision inputs are computed in float32: o comes back in v's dtype, the state stays float32."""
    x = make_inputs(40, seed=14)
    xb = {n: (t.to(torch.bfloat16) if t is not None else None) for n, t in x.items()}
    o_ref, S_ref = reference_gated_linear(**{n: (t.double() if t is not None else None) for n, t in xb.items()})
    for fn in (_gated_chunk(16), _gated_recurrent):
        o, S = fn(**xb)
        assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
        assert_close(o.double(), o_ref, 2e-2, "bf16 o")
        assert_close(S.double(), S_ref, 1e-4, "bf16 S")


def test_linear_is_gated_linear_without_decay():
    x = make_inputs(30, seed=12)
    kw = dict(initial_state=x["initial_state"], output_final_state=True, chunk_size=8)
    o_l, S_l = linear_rule(x["q"], x["k"], x["v"], x["beta"], **kw)
    o_none, S_none = gated_linear_rule(x["q"], x["k"], x["v"], None, x["beta"], **kw)
    o_zero, S_zero = gated_linear_rule(x["q"], x["k"], x["v"], torch.zeros_like(x["g"]), x["beta"], **kw)
    assert torch.equal(o_l, o_none) and torch.equal(S_l, S_none)
    assert_close(o_l, o_zero, TOL[torch.float64], "o")
    assert_close(S_l, S_zero, TOL[torch.float64], "S")


def test_rule_plugins():
    gl, lin = rules.gated_linear, rules.linear
    assert isinstance(gl, rules.FastWeightRule) and isinstance(lin, rules.FastWeightRule)
    assert (gl.name, gl.uses_gate, gl.uses_beta) == ("gated_linear", True, True)
    assert (lin.name, lin.uses_gate, lin.uses_beta) == ("linear", False, True)
    assert gl.chunk is gated_linear_rule
    assert gl.recurrent is gated_linear_rule_recurrent
    assert gl.step is gated_linear_rule_step
    assert gl.doc and lin.doc
    assert {"gated_linear", "linear"} <= set(rules.__all__)
    # the linear rule ignores whatever g it is given
    x = make_inputs(12, seed=13)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    kw = dict(initial_state=x["initial_state"], output_final_state=True)
    o_ref, S_ref = reference_gated_linear(x["q"], x["k"], x["v"], None, x["beta"], x["initial_state"])
    for o, S in (lin.chunk(*args, **kw, chunk_size=5), lin.recurrent(*args, **kw)):
        assert_close(o, o_ref, TOL[torch.float64], "linear o")
        assert_close(S, S_ref, TOL[torch.float64], "linear S")


def test_final_state_only_when_requested_and_empty_sequence():
    x = make_inputs(9, seed=11)
    for fn in (gated_linear_rule, gated_linear_rule_recurrent):
        o, S = fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"])
        assert S is None and o.shape == (B, 9, H, V)
    x = make_inputs(0, seed=15)
    for fn in (gated_linear_rule, gated_linear_rule_recurrent):
        o, S = fn(**x, output_final_state=True)
        assert o.shape == (B, 0, H, V)
        assert torch.equal(S, x["initial_state"])


def test_shape_errors():
    x = make_inputs(5, seed=16)
    with pytest.raises(ValueError, match="beta"):
        gated_linear_rule(x["q"], x["k"], x["v"], x["g"], x["beta"][:, :4])
    with pytest.raises(ValueError, match="g must"):
        gated_linear_rule_recurrent(x["q"], x["k"], x["v"], x["g"][:, :4], x["beta"])
    with pytest.raises(ValueError, match="initial_state"):
        gated_linear_rule_recurrent(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"][:, :1])
    with pytest.raises(ValueError, match="chunk_size"):
        gated_linear_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=0)


def test_reference_sanity():
    """The test reference itself: one token from a zero state gives o = scale * (q.k) beta v."""
    x = make_inputs(1, seed=17, init=False)
    o, S = reference_gated_linear(x["q"], x["k"], x["v"], x["g"], x["beta"])
    qk = (x["q"][:, 0] * x["k"][:, 0]).sum(-1)  # (B, H)
    expected = (qk * x["beta"][:, 0] / math.sqrt(K))[..., None] * x["v"][:, 0]
    assert_close(o[:, 0], expected, 1e-12, "one-token o")
