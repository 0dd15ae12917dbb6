"""Tests of the fast-weight ops in :mod:`sleepzoo.ops` against an independent float64 reference and fla-core.

The reference below is deliberately written differently from the package: it applies the explicit per-token
transition matrix ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` (the form in Yang et al.,
*Gated Delta Networks*, 2024), in float64, one token at a time.

Inputs use unit-norm keys and ``beta`` in (0, 1), as the mixers produce; then ``I - beta k k^T`` is contractive
and long sequences stay well-conditioned, so float32 errors measure the op and not an exploding recurrence.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from sleepzoo.ops import delta_rule, gated_delta_rule, gated_delta_rule_recurrent, gated_delta_rule_step
from sleepzoo.ops import rules

import _fla_reference as fla_ref

B, H, K, V = 2, 2, 8, 6
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
INPUT_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


# ----------------------------------------------------------------------------------------------------------------
# independent reference and helpers
# ----------------------------------------------------------------------------------------------------------------


def reference_gated_delta(q, k, v, g, beta, initial_state=None, *, scale=None, use_qk_l2norm=False):
    """float64 step-by-step gated delta rule via explicit transition matrices. Returns ``(o, final_state)``."""
    q, k, v, beta = (x.double() for x in (q, k, v, beta))
    Bq, T, Hq, Kq = q.shape
    if use_qk_l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    scale = Kq**-0.5 if scale is None else scale
    eye = torch.eye(Kq, dtype=torch.float64)
    S = torch.zeros(Bq, Hq, Kq, v.shape[-1], dtype=torch.float64) if initial_state is None else initial_state.double()
    outs = []
    for t in range(T):
        kt, bt = k[:, t], beta[:, t]  # (B, H, K), (B, H)
        decay = torch.ones_like(bt) if g is None else torch.exp(g[:, t].double())
        transition = decay[..., None, None] * (eye - bt[..., None, None] * torch.einsum("bhi,bhj->bhij", kt, kt))
        S = torch.einsum("bhij,bhjv->bhiv", transition, S) + bt[..., None, None] * torch.einsum(
            "bhi,bhv->bhiv", kt, v[:, t]
        )
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outs, 1) if outs else v.new_zeros(Bq, 0, Hq, v.shape[-1])
    return o, S


def make_inputs(T, *, seed=0, gate=True, init=True, unit_keys=True, g_fill=None):
    """float64 inputs ``{q, k, v, g, beta, initial_state}`` (``g`` / ``initial_state`` may be None)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    k = randn(B, T, H, K)
    x = {
        "q": randn(B, T, H, K),
        "k": F.normalize(k, dim=-1) if unit_keys else k,
        "v": randn(B, T, H, V),
        "g": F.logsigmoid(randn(B, T, H) + 1.0) if gate else None,  # log-decays around -0.3
        "beta": torch.sigmoid(randn(B, T, H)),
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
    """Run ``fn(**inputs)`` in ``dtype`` on fresh leaves; return ``(o, S, {name: grad})`` (detached)."""
    leaves = {n: (x.to(dtype).requires_grad_() if x is not None else None) for n, x in inputs.items()}
    o, S = fn(**leaves)
    loss = (o * do.to(o.dtype)).sum() + (S * dS.to(S.dtype)).sum()
    names = [n for n, x in leaves.items() if x is not None]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return o.detach(), S.detach(), dict(zip(names, grads))


def assert_close(actual, expected, tol, what):
    """max |actual - expected| <= tol * (1 + max |expected|): relative for O(1)+ values, absolute near zero."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    bound = tol * (1.0 + expected.abs().max().item()) if expected.numel() else tol
    assert err <= bound, f"{what}: max abs error {err:.3e} > {bound:.3e}"


def assert_matches(result, expected, tol, label=""):
    """Compare two ``(o, S, grads)`` triples."""
    o, S, grads = result
    o_ref, S_ref, grads_ref = expected
    assert_close(o, o_ref, tol, f"{label} o")
    assert_close(S, S_ref, tol, f"{label} final state")
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], tol, f"{label} d{name}")


def _ref_fn(**kw):
    return reference_gated_delta(**kw)


@functools.lru_cache(maxsize=None)
def reference_case(T, gate, init):
    """Inputs, upstream grads and float64 reference results for one configuration (shared across ops)."""
    inputs = make_inputs(T, gate=gate, init=init)
    do, dS = upstream(T)
    return inputs, do, dS, run_with_grads(_ref_fn, inputs, torch.float64, do, dS)


def _chunk(chunk_size):
    def fn(**kw):
        return gated_delta_rule(**kw, output_final_state=True, chunk_size=chunk_size)

    return fn


def _recurrent(**kw):
    return gated_delta_rule_recurrent(**kw, output_final_state=True)


OPS = {"chunk16": _chunk(16), "chunk64": _chunk(64), "chunk256": _chunk(256), "recurrent": _recurrent}  # 256: one chunk
DTYPES = {"float64": torch.float64, "float32": torch.float32}


# ----------------------------------------------------------------------------------------------------------------
# against the reference: values and gradients
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", [True, False], ids=["gated", "g_none"])
@pytest.mark.parametrize("init", [True, False], ids=["init_state", "zero_state"])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200], ids=lambda T: f"T{T}")
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("op", list(OPS), ids=list(OPS))
def test_matches_reference(op, dtype, T, init, gate):
    """Chunked (two chunk sizes) and recurrent ops: o, final state and all gradients vs the float64 loop."""
    inputs, do, dS, expected = reference_case(T, gate, init)
    result = run_with_grads(OPS[op], inputs, DTYPES[dtype], do, dS)
    assert_matches(result, expected, TOL[DTYPES[dtype]], f"{op}/{dtype}/T={T}")
    assert result[0].dtype == DTYPES[dtype]


@pytest.mark.parametrize("op", ["chunk16", "recurrent"])
def test_qk_l2norm(op):
    """use_qk_l2norm normalises q and k inside the op, so gradients flow through the normalisation."""
    T = 65
    inputs = make_inputs(T, unit_keys=False, seed=3)
    inputs["q"] = inputs["q"] * 3.0  # far from unit norm, so a missing normalisation would show
    do, dS = upstream(T)

    def ref(**kw):
        return reference_gated_delta(**kw, use_qk_l2norm=True)

    def ours(**kw):
        return OPS[op](**kw, use_qk_l2norm=True)

    expected = run_with_grads(ref, inputs, torch.float64, do, dS)
    assert_matches(run_with_grads(ours, inputs, torch.float64, do, dS), expected, TOL[torch.float64], op)
    assert_matches(run_with_grads(ours, inputs, torch.float32, do, dS), expected, TOL[torch.float32], op)


@pytest.mark.parametrize("chunk", [64, 256], ids=["C64", "one_chunk"])
@pytest.mark.parametrize("g_kind", ["all_minus20", "mixed_0_to_minus20"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_strongly_negative_g_is_finite(dtype, g_kind, chunk):
    """g = -20 per step: in-chunk cumulative log-decays reach -1280 (-2600 in one chunk of 256), yet values and
    gradients stay finite."""
    T = 130  # two full chunks of 64 plus a padded tail, or one chunk
    inputs = make_inputs(T, seed=4, g_fill=-20.0 if g_kind == "all_minus20" else None)
    if g_kind == "mixed_0_to_minus20":
        inputs["g"] = -20.0 * torch.rand(B, T, H, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    do, dS = upstream(T)
    result = run_with_grads(_chunk(chunk), inputs, DTYPES[dtype], do, dS)
    o, S, grads = result
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), f"d{name} is not finite"
    expected = run_with_grads(_ref_fn, inputs, torch.float64, do, dS)
    assert_matches(result, expected, TOL[DTYPES[dtype]], g_kind)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 64], ids=lambda c: f"C{c}")
def test_chunk_size_not_dividing_T(chunk_size):
    """T = 37 is prime: every chunk size but 1 and 37 pads the tail; results must not depend on it."""
    T = 37
    inputs = make_inputs(T, seed=6)
    do, dS = upstream(T)
    expected = run_with_grads(_ref_fn, inputs, torch.float64, do, dS)
    assert_matches(run_with_grads(_chunk(chunk_size), inputs, torch.float64, do, dS), expected, TOL[torch.float64])


def test_custom_scale():
    T = 20
    inputs = make_inputs(T, seed=7)
    do, dS = upstream(T)
    expected = run_with_grads(lambda **kw: reference_gated_delta(**kw, scale=0.3), inputs, torch.float64, do, dS)
    for fn in (_chunk(8), _recurrent):
        result = run_with_grads(lambda **kw: fn(**kw, scale=0.3), inputs, torch.float64, do, dS)
        assert_matches(result, expected, TOL[torch.float64])


# ----------------------------------------------------------------------------------------------------------------
# against fla-core's naive references
# ----------------------------------------------------------------------------------------------------------------


def _fla_recurrent(q, k, v, g, beta, initial_state):
    return fla_ref.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=initial_state, output_final_state=True)


def _fla_chunk(q, k, v, g, beta, initial_state):
    return fla_ref.naive_chunk_gated_delta_rule(
        q, k, v, g, beta, chunk_size=16, initial_state=initial_state, output_final_state=True
    )


@pytest.mark.parametrize("init", [True, False], ids=["init_state", "zero_state"])
@pytest.mark.parametrize("T", [50, 65], ids=lambda T: f"T{T}")
@pytest.mark.parametrize("fla_fn", ["naive_recurrent", "naive_chunk"])
def test_matches_fla_naive(fla_fn, T, init):
    """Our chunked op (float32) vs fla-core's naive references (float32): values and gradients."""
    if fla_ref.naive_chunk_gated_delta_rule is None:
        pytest.skip(f"fla-core reference unavailable: {fla_ref.UNAVAILABLE_REASON}")
    inputs = make_inputs(T, seed=8, init=init)
    do, dS = upstream(T)
    theirs = run_with_grads(
        _fla_recurrent if fla_fn == "naive_recurrent" else _fla_chunk, inputs, torch.float32, do, dS
    )
    ours = run_with_grads(_chunk(16), inputs, torch.float32, do, dS)
    assert_matches(ours, theirs, TOL[torch.float32], f"vs fla {fla_fn}")


# ----------------------------------------------------------------------------------------------------------------
# single-step decoding, wrappers, plugin objects, edge cases
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", [True, False], ids=["gated", "g_none"])
@pytest.mark.parametrize("init", [True, False], ids=["init_state", "zero_state"])
def test_step_by_step_reproduces_chunked(init, gate):
    """Decoding token by token with gated_delta_rule_step gives the chunked op's outputs and final state."""
    T = 65
    x = make_inputs(T, seed=9, init=init, gate=gate)
    o_chunk, S_chunk = gated_delta_rule(
        x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"], output_final_state=True,
        chunk_size=16,
    )
    state = x["initial_state"]
    outs = []
    for t in range(T):
        g_t = None if x["g"] is None else x["g"][:, t]
        o_t, state = gated_delta_rule_step(x["q"][:, t], x["k"][:, t], x["v"][:, t], g_t, x["beta"][:, t], state)
        assert o_t.shape == (B, H, V) and state.shape == (B, H, K, V)
        outs.append(o_t)
    assert_close(torch.stack(outs, 1), o_chunk, TOL[torch.float64], "o")
    assert_close(state, S_chunk, TOL[torch.float64], "final state")


def test_step_l2norm_and_scale_match_chunked():
    T = 10
    x = make_inputs(T, seed=10, unit_keys=False)
    o_chunk, S_chunk = gated_delta_rule(
        x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"], output_final_state=True,
        use_qk_l2norm=True, scale=0.7,
    )
    state = x["initial_state"]
    outs = []
    for t in range(T):
        o_t, state = gated_delta_rule_step(
            x["q"][:, t], x["k"][:, t], x["v"][:, t], x["g"][:, t], x["beta"][:, t], state, scale=0.7,
            use_qk_l2norm=True,
        )
        outs.append(o_t)
    assert_close(torch.stack(outs, 1), o_chunk, TOL[torch.float64], "o")
    assert_close(state, S_chunk, TOL[torch.float64], "final state")


def test_final_state_only_when_requested():
    x = make_inputs(9, seed=11)
    for fn in (gated_delta_rule, gated_delta_rule_recurrent):
        o, S = fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"])
        assert S is None and o.shape == (B, 9, H, V)


def test_delta_rule_is_gated_delta_without_decay():
    x = make_inputs(30, seed=12)
    kw = dict(initial_state=x["initial_state"], output_final_state=True, chunk_size=8)
    o_d, S_d = delta_rule(x["q"], x["k"], x["v"], x["beta"], **kw)
    o_none, S_none = gated_delta_rule(x["q"], x["k"], x["v"], None, x["beta"], **kw)
    o_zero, S_zero = gated_delta_rule(x["q"], x["k"], x["v"], torch.zeros_like(x["g"]), x["beta"], **kw)
    assert torch.equal(o_d, o_none) and torch.equal(S_d, S_none)
    assert_close(o_d, o_zero, TOL[torch.float64], "o")
    assert_close(S_d, S_zero, TOL[torch.float64], "S")


def test_rule_plugins():
    assert isinstance(rules.gated_delta, rules.FastWeightRule)
    assert (rules.gated_delta.name, rules.gated_delta.uses_gate, rules.gated_delta.uses_beta) == ("gated_delta", True, True)
    assert (rules.delta.name, rules.delta.uses_gate, rules.delta.uses_beta) == ("delta", False, True)
    assert rules.gated_delta.chunk is gated_delta_rule
    assert rules.gated_delta.recurrent is gated_delta_rule_recurrent
    assert rules.gated_delta.step is gated_delta_rule_step
    assert rules.gated_delta.doc and rules.delta.doc
    with pytest.raises(Exception):  # frozen dataclass
        rules.delta.name = "other"

    x = make_inputs(12, seed=13)
    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    kw = dict(initial_state=x["initial_state"], output_final_state=True)
    # the delta rule ignores whatever g it is given
    o_ref, S_ref = reference_gated_delta(x["q"], x["k"], x["v"], None, x["beta"], x["initial_state"])
    for o, S in (rules.delta.chunk(*args, **kw, chunk_size=5), rules.delta.recurrent(*args, **kw)):
        assert_close(o, o_ref, TOL[torch.float64], "delta o")
        assert_close(S, S_ref, TOL[torch.float64], "delta S")
    o_t, S_t = rules.delta.step(x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], x["g"][:, 0], x["beta"][:, 0],
                                x["initial_state"])
    o1, S1 = reference_gated_delta(x["q"][:, :1], x["k"][:, :1], x["v"][:, :1], None, x["beta"][:, :1],
                                   x["initial_state"])
    assert_close(o_t, o1[:, 0], TOL[torch.float64], "delta step o")
    assert_close(S_t, S1, TOL[torch.float64], "delta step S")
    o, S = rules.gated_delta.chunk(*args, **kw)
    o_ref, S_ref = reference_gated_delta(*args, x["initial_state"])
    assert_close(o, o_ref, TOL[torch.float64], "gated_delta o")


def test_bfloat16_inputs_compute_in_float32():
    """Low-precision inputs are computed in float32: o comes back in v's dtype, the state stays float32."""
    x = make_inputs(40, seed=14)
    xb = {n: (t.to(torch.bfloat16) if t is not None else None) for n, t in x.items()}
    o, S = gated_delta_rule(**xb, output_final_state=True, chunk_size=16)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    o_ref, S_ref = reference_gated_delta(**{n: (t.double() if t is not None else None) for n, t in xb.items()})
    assert_close(o.double(), o_ref, 2e-2, "bf16 o")
    assert_close(S.double(), S_ref, 1e-4, "bf16 S")


def test_empty_sequence():
    x = make_inputs(0, seed=15)
    for fn in (gated_delta_rule, gated_delta_rule_recurrent):
        o, S = fn(**x, output_final_state=True)
        assert o.shape == (B, 0, H, V)
        assert torch.equal(S, x["initial_state"])


def test_shape_errors():
    x = make_inputs(5, seed=16)
    with pytest.raises(ValueError, match="beta"):
        gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"][:, :4])
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule_recurrent(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"][:, :1])
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=0)


def test_reference_sanity():
    """The test reference itself: one token from a zero state gives o = scale * (q.k) beta v."""
    x = make_inputs(1, seed=17, init=False)
    o, S = reference_gated_delta(x["q"], x["k"], x["v"], x["g"], x["beta"])
    qk = (x["q"][:, 0] * x["k"][:, 0]).sum(-1)  # (B, H)
    expected = (qk * x["beta"][:, 0] / math.sqrt(K))[..., None] * x["v"][:, 0]
    assert_close(o[:, 0], expected, 1e-12, "one-token o")


def test_l2norm_is_fla_formula_not_f_normalize():
    """q/k normalisation as fla's kernels do it: x / sqrt(sum x^2 + 1e-6), in float64 by hand."""
    from sleepzoo.ops import l2norm

    x = torch.randn(3, 5, 8, dtype=torch.float64) * torch.tensor([1e-4, 1e-2, 1.0, 10.0, 1e3], dtype=torch.float64)[:, None]
    expected = x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(l2norm(x), expected, rtol=1e-14, atol=0)
    small = x[:, 0]  # |x| ~ 3e-4: eps matters, and F.normalize's max(|x|, eps) gives another result
    assert not torch.allclose(l2norm(small), F.normalize(small, dim=-1), rtol=1e-3, atol=0)
    assert l2norm(torch.zeros(2, 4)).abs().sum() == 0  # zero rows stay zero
    half = l2norm(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), expected, rtol=1e-2, atol=1e-2)
