"""The Hebbian fast-weight rule (plain linear attention), registered as the ``rule`` plugin ``hebbian``.

Linear attention (Katharopoulos et al., *Transformers are RNNs*, 2020) read as a fast-weight programmer
(Schlag, Irie & Schmidhuber, *Linear Transformers Are Secretly Fast Weight Programmers*, 2021) keeps a matrix
``S`` of shape ``[K, V]`` per batch element and head and, for each token ``t``

.. code-block:: text

    S_t = S_{t-1} + beta_t * k_t v_t^T      # Hebbian write; beta_t = 1 when beta is None
    o_t = S_t^T (scale * q_t)               # read-out, the current token included

There is no decay and no delta-rule correction: the state only accumulates. Shapes follow sleepzoo's built-in
rules: ``q, k`` ``[B, T, H, K]``, ``v`` ``[B, T, H, V]``, ``beta`` ``[B, T, H]``, state ``[B, H, K, V]``. The
rule has no gate, so ``g`` is accepted for a uniform call signature and ignored, as the built-in ``delta`` does.

float32 and float64 inputs are computed in their own dtype, lower precisions in float32; the output comes back
in ``v.dtype`` and the state in the computation dtype (it is an accumulator).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sleepzoo.ops.rules import FastWeightRule

__all__ = ["hebbian", "hebbian_chunk", "hebbian_recurrent", "hebbian_step"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _check_shapes(q, k, v, beta, initial_state) -> tuple[int, int, int, int, int]:
    """Validate the ``[B, T, H, *]`` layout and return ``(B, T, H, K, V)``."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"hebbian: q, k must be [B, T, H, K] and v [B, T, H, V]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if beta is not None and beta.shape != (B, T, H):
        raise ValueError(f"hebbian: beta must be [B, T, H] = [{B}, {T}, {H}] or None; got {tuple(beta.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(f"hebbian: initial_state must be [B, H, K, V] = [{B}, {H}, {K}, {V}]; "
                         f"got {tuple(initial_state.shape)}")
    return B, T, H, K, V


def hebbian_step(q_t, k_t, v_t, g_t, beta_t, state, *, scale=None):
    """One token: ``q_t, k_t`` ``[B, H, K]``, ``v_t`` ``[B, H, V]``, ``beta_t`` ``[B, H]`` or None, ``state``
    ``[B, H, K, V]`` or None (zeros); ``g_t`` is ignored. Returns ``(o_t [B, H, V], new_state)``."""
    B, H, K = q_t.shape
    out_dtype = v_t.dtype
    dt = _compute_dtype(out_dtype)
    scale = K ** -0.5 if scale is None else scale
    q_t, k_t, v_t = q_t.to(dt), k_t.to(dt), v_t.to(dt)
    if beta_t is not None:
        v_t = v_t * beta_t.to(dt).unsqueeze(-1)  # (B, H, V) the write, beta_t v_t
    state = v_t.new_zeros(B, H, K, v_t.shape[-1]) if state is None else state.to(dt)
    state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)  # (B, H, K, V) rank-one write
    o_t = ((scale * q_t).unsqueeze(-2) @ state).squeeze(-2)  # (B, H, V)
    return o_t.to(out_dtype), state


def hebbian_recurrent(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False):
    """The rule as a loop over tokens (decoding, short inputs; the slow obviously-correct twin of the chunked
    form). Same arguments as :func:`hebbian_chunk` minus ``chunk_size``."""
    B, T, H, K, V = _check_shapes(q, k, v, beta, initial_state)
    state = initial_state
    if state is None:
        state = q.new_zeros(B, H, K, V, dtype=_compute_dtype(v.dtype))
    outs = []
    for t in range(T):
        o_t, state = hebbian_step(q[:, t], k[:, t], v[:, t], None, None if beta is None else beta[:, t], state,
                                  scale=scale)
        outs.append(o_t)  # (B, H, V)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)  # (B, T, H, V)
    return o, (state.to(_compute_dtype(v.dtype)) if output_final_state else None)


def hebbian_chunk(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, chunk_size=64):
    """Chunked causal linear attention with an inter-chunk state; computes exactly :func:`hebbian_recurrent`.

    With ``C = chunk_size`` and ``S_n`` the state entering chunk ``n``, for token ``i`` of chunk ``n``

    .. code-block:: text

        o_i     = S_n^T (scale q_i) + sum_{j <= i in chunk n} (scale q_i . k_j) beta_j v_j
        S_{n+1} = S_n + sum_{j in chunk n} beta_j k_j v_j^T

    The rule has no decay, so the states entering the chunks are an exclusive prefix sum of the chunk writes:
    no sequential loop at all. Any ``T`` works; the tail is padded with ``k = v = 0`` steps, which write nothing.

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, H, V]``.
        g: ignored (the rule has no gate).
        beta: ``[B, T, H]`` write strengths, or ``None`` for 1.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` or ``None`` for zeros. Differentiable.
        output_final_state: return the state after the last token.
        chunk_size: tokens per chunk (default 64); inputs shorter than a chunk use one chunk of ``T``.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in ``v.dtype``; ``final_state`` ``[B, H, K, V]`` or ``None``.
    """
    B, T, H, K, V = _check_shapes(q, k, v, beta, initial_state)
    if chunk_size < 1:
        raise ValueError(f"hebbian: chunk_size must be >= 1; got {chunk_size}")
    out_dtype = v.dtype
    dt = _compute_dtype(out_dtype)
    scale = K ** -0.5 if scale is None else scale
    if T == 0:
        state = q.new_zeros(B, H, K, V, dtype=dt) if initial_state is None else initial_state.to(dt)
        return v.new_zeros(B, 0, H, V), (state if output_final_state else None)

    C = min(chunk_size, T)
    N = -(-T // C)  # number of chunks
    pad = N * C - T

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        """(B, T, H, D) -> (B, H, N, C, D), zero-padded at the end."""
        x = F.pad(x.transpose(1, 2), (0, 0, 0, pad))  # (B, H, N * C, D)
        return x.reshape(B, H, N, C, x.shape[-1])

    q = to_chunks(q.to(dt) * scale)  # (B, H, N, C, K)
    k = to_chunks(k.to(dt))  # (B, H, N, C, K)
    v = v.to(dt)
    if beta is not None:
        v = v * beta.to(dt).unsqueeze(-1)  # beta_j v_j: what token j writes
    v = to_chunks(v)  # (B, H, N, C, V)

    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (B, H, N, C, C), j <= i
    o_intra = scores @ v  # (B, H, N, C, V)

    writes = k.transpose(-1, -2) @ v  # (B, H, N, K, V): sum_j k_j (beta_j v_j)^T per chunk
    written = writes.cumsum(dim=2)  # (B, H, N, K, V): inclusive prefix sum over chunks
    entry = torch.cat([torch.zeros_like(written[:, :, :1]), written[:, :, :-1]], dim=2)  # exclusive
    if initial_state is not None:
        entry = entry + initial_state.to(dt).unsqueeze(2)  # (B, H, N, K, V)

    o = o_intra + q @ entry  # (B, H, N, C, V)
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)  # (B, T, H, V)
    final_state = None
    if output_final_state:
        final_state = written[:, :, -1] if initial_state is None else initial_state.to(dt) + written[:, :, -1]
    return o.to(out_dtype), final_state


hebbian = FastWeightRule(
    name="hebbian",
    chunk=hebbian_chunk,
    recurrent=hebbian_recurrent,
    step=hebbian_step,
    uses_gate=False,
    uses_beta=True,
    doc="Hebbian fast weights / plain linear attention: S <- S + beta k v^T, o = S^T (scale q); beta=None is 1.",
)
