"""Gated linear attention with a scalar decay (Mamba2 / simple GLA) in pure PyTorch: chunked, loop and one step.

A fast-weight matrix ``S`` of shape ``[K, V]`` per batch element and head, and for each token ``t``

.. code-block:: text

    S   <- exp(g_t) * S + beta_t * k_t v_t^T    # scalar decay (g_t <= 0 is a log-decay), Hebbian write
    o_t  = S^T (scale * q_t)                     # read-out

This is the state-space-duality form of Mamba2 (Dao & Gu, *Transformers are SSMs*, 2024) and fla's
``simple_gla`` (a scalar-per-head version of Yang et al., *Gated Linear Attention Transformers with
Hardware-Efficient Training*, 2024), with an optional write strength ``beta_t`` (``None`` means 1). With
``g = None`` there is no decay and it is plain (unnormalised) linear attention (Katharopoulos et al., 2020),
the Hebbian fast-weight rule of Schlag et al. (2021).

Shapes, dtypes and options are those of :mod:`sleepzoo.ops.gated_delta`: ``q, k`` are ``[B, T, H, K]``,
``v`` is ``[B, T, H, V]``, ``g`` and ``beta`` are ``[B, T, H]``, the state is ``[B, H, K, V]``; float32 and
float64 inputs are computed in their own dtype, lower precision in float32 (output cast back to ``v.dtype``,
state returned in the computation dtype).
"""

from __future__ import annotations

import torch

from .gated_delta import _check_shapes, _Chunks, _compute_dtype, _empty, _l2norm

__all__ = [
    "gated_linear_rule",
    "gated_linear_rule_recurrent",
    "gated_linear_rule_step",
    "linear_rule",
]


def _weighted_values(v: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
    """``beta * v`` (the write ``beta k v^T`` equals ``k (beta v)^T``); ``v`` itself when ``beta`` is None."""
    return v if beta is None else v * beta.unsqueeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# single step and step-by-step loop
# ----------------------------------------------------------------------------------------------------------------


def gated_linear_rule_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    g_t: torch.Tensor | None,
    beta_t: torch.Tensor | None,
    state: torch.Tensor | None,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of scalar-decay gated linear attention (Mamba2 / simple GLA), e.g. for decoding.

    Args:
        q_t, k_t: ``[B, H, K]`` query and key of this token.
        v_t: ``[B, H, V]`` value.
        g_t: ``[B, H]`` log-decay (``<= 0``), or ``None`` for no decay (linear attention).
        beta_t: ``[B, H]`` write strength, or ``None`` for 1.
        state: ``[B, H, K, V]`` fast weights before this token, or ``None`` for zeros.
        scale: query scale, default ``K ** -0.5``.
        use_qk_l2norm: L2-normalise ``q_t`` and ``k_t`` over the last dimension first.

    Returns:
        ``(o_t, new_state)``: ``o_t`` is ``[B, H, V]`` in ``v_t.dtype``, ``new_state`` is ``[B, H, K, V]``.
    """
    B, H, K = q_t.shape
    V = v_t.shape[-1]
    out_dtype = v_t.dtype
    dt = _compute_dtype(out_dtype)
    if scale is None:
        scale = K**-0.5
    q_t, k_t, v_t = (x.to(dt) for x in (q_t, k_t, v_t))
    if use_qk_l2norm:
        q_t, k_t = _l2norm(q_t), _l2norm(k_t)
    state = v_t.new_zeros(B, H, K, V) if state is None else state.to(dt)
    vb_t = _weighted_values(v_t, None if beta_t is None else beta_t.to(dt))
    state = _write(state, k_t, vb_t, None if g_t is None else g_t.to(dt).exp())
    o_t = ((scale * q_t).unsqueeze(-2) @ state).squeeze(-2)  # (B, H, V)
    return o_t.to(out_dtype), state


def _write(state: torch.Tensor, k_t: torch.Tensor, vb_t: torch.Tensor, decay_t: torch.Tensor | None) -> torch.Tensor:
    """Decay, then the rank-one Hebbian write ``k_t (beta_t v_t)^T``: shared by the step and the loop."""
    kv = k_t.unsqueeze(-1) * vb_t.unsqueeze(-2)  # (B, H, K, V)
    if decay_t is None:
        return state + kv
    return torch.addcmul(kv, decay_t[..., None, None], state)


def gated_linear_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scalar-decay gated linear attention as a step-by-step loop over tokens.

    ``O(T)`` Python steps, so use it for decoding and short inputs; :func:`gated_linear_rule` computes the same
    thing in chunks and is much faster for long inputs.

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log-decays (``<= 0``), or ``None`` for no decay (linear attention).
        beta: ``[B, T, H]`` write strengths, or ``None`` for 1.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` or ``None`` for zeros.
        output_final_state: return the state after the last token.
        use_qk_l2norm: L2-normalise ``q`` and ``k`` over the last dimension first.

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, V]`` in ``v.dtype``; ``final_state`` is ``[B, H, K, V]``,
        or ``None`` unless ``output_final_state``.
    """
    B, T, H, K, V = _check_shapes(q, k, v, g, beta, initial_state)
    out_dtype = v.dtype
    dt = _compute_dtype(out_dtype)
    if scale is None:
        scale = K**-0.5
    q, k, v = (x.to(dt) for x in (q, k, v))
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    vb = _weighted_values(v, None if beta is None else beta.to(dt))
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    decay = None if g is None else g.to(dt).exp()  # (B, T, H), all at once rather than per step
    outs = []
    for t in range(T):
        state = _write(state, k[:, t], vb[:, t], None if decay is None else decay[:, t])
        outs.append((q[:, t].unsqueeze(-2) @ state).squeeze(-2))  # (B, H, V)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)  # (B, T, H, V)
    o = o * scale  # scaling the output equals scaling q, and is one op instead of T
    return o.to(out_dtype), (state if output_final_state else None)


# ----------------------------------------------------------------------------------------------------------------
# chunked form
# ----------------------------------------------------------------------------------------------------------------


def gated_linear_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked scalar-decay gated linear attention (Mamba2's SSD / fla's chunked simple GLA).

    Computes exactly the recurrence of :func:`gated_linear_rule_recurrent` in chunks of ``C = chunk_size``
    tokens. Inside chunk ``n``, with ``gamma_i`` the cumulative log-decay from the chunk start to token ``i``
    (inclusive), ``S0`` the state entering the chunk and ``u_j = beta_j v_j``:

    .. code-block:: text

        o_i    = exp(gamma_i) q_i^T S0 + sum_{j<=i} exp(gamma_i - gamma_j) (q_i . k_j) u_j
        S_next = exp(gamma_C) S0 + sum_j exp(gamma_C - gamma_j) k_j u_j^T

    The intra-chunk term ``((Q K^T) * L) U`` (``L`` the causal decay mask) and the per-chunk ``D = Kd^T U`` are
    batched over all chunks; the only Python loop is ``S <- exp(gamma_C) S + D`` once per chunk, and the
    read-out of the chunk-entry states is one batched matmul afterwards.

    Numerics: as in :func:`sleepzoo.ops.gated_delta_rule`, decays are exponentials of in-chunk *differences*
    of log-decays, masked to the lower triangle *before* the exp, so every exponent is ``<= 0`` and very
    negative ``g`` underflows to zero with finite values and gradients.

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log-decays (``<= 0``), or ``None`` for no decay (linear attention).
        beta: ``[B, T, H]`` write strengths, or ``None`` for 1.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` or ``None`` for zeros. Differentiable.
        output_final_state: return the state after the last token.
        use_qk_l2norm: L2-normalise ``q`` and ``k`` over the last dimension first (inside the op).
        chunk_size: tokens per chunk ``C``. Any ``T`` works: the tail is padded with ``g = 0, k = 0, v = 0``
            steps, which leave the state unchanged. Inputs shorter than a chunk use one chunk of ``T``.

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, V]`` in ``v.dtype``; ``final_state`` is ``[B, H, K, V]``,
        or ``None`` unless ``output_final_state``.
    """
    B, T, H, K, V = _check_shapes(q, k, v, g, beta, initial_state)
    chunks = _Chunks(T, chunk_size)
    out_dtype = v.dtype
    dt = _compute_dtype(out_dtype)
    if scale is None:
        scale = K**-0.5
    if T == 0:
        return _empty(q, v, initial_state, output_final_state, dt)
    N = chunks.N

    q, k, v = (x.to(dt) for x in (q, k, v))
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * scale
    u = _weighted_values(v, None if beta is None else beta.to(dt))  # (B, T, H, V)
    q, k, u = chunks.split(q), chunks.split(k), chunks.split(u)  # (B, H, N, C, K|V)
    qk = q @ k.transpose(-1, -2)  # (B, H, N, C, C)
    if g is None:
        p = qk.tril()
        q_state, k_decay, chunk_decay = q, k, None
    else:
        gamma, decay_mat = chunks.log_decays(g.to(dt))  # (B, H, N, C), (B, H, N, C, C)
        gamma_c = gamma[..., -1:]  # (B, H, N, 1) log-decay over the whole chunk
        p = qk * decay_mat
        q_state = q * gamma.exp().unsqueeze(-1)  # (B, H, N, C, K)
        k_decay = k * (gamma_c - gamma).exp().unsqueeze(-1)  # (B, H, N, C, K), exponents <= 0
        chunk_decay = gamma_c.exp().permute(2, 0, 1, 3).reshape(N, B * H, 1, 1).unbind(0)

    o_intra = p @ u  # (B, H, N, C, V), causal incl. the diagonal (o_t reads the state after writing token t)
    d = k_decay.transpose(-1, -2) @ u  # (B, H, N, K, V): what chunk n writes, decayed to its end

    # The only sequential part: S <- exp(gamma_C) S + D per chunk, on chunk-major (B*H)-flattened slices
    # (unbind, not d[n]: its backward is one stack instead of N full-size zero-filled gradients).
    d = d.permute(2, 0, 1, 3, 4).reshape(N, B * H, K, V).unbind(0)
    state = q.new_zeros(B * H, K, V) if initial_state is None else initial_state.to(dt).reshape(B * H, K, V)
    entry_states = []
    for n in range(N):
        entry_states.append(state)
        state = d[n] + state if chunk_decay is None else torch.addcmul(d[n], chunk_decay[n], state)
    s0 = torch.stack(entry_states, dim=1).reshape(B, H, N, K, V)  # state entering each chunk

    o = chunks.merge(o_intra + q_state @ s0)  # (B, T, H, V)
    final_state = state.reshape(B, H, K, V) if output_final_state else None
    return o.to(out_dtype), final_state


def linear_rule(q, k, v, beta=None, **kwargs):
    """Plain linear attention / Hebbian rule: :func:`gated_linear_rule` with ``g = None`` (no decay).

    ``S <- S + beta_t k_t v_t^T``, ``o_t = S^T (scale q_t)``; same shapes and options.
    """
    return gated_linear_rule(q, k, v, None, beta, **kwargs)
