"""fla-core's Triton kernels as sleepzoo fast-weight rules (kind ``rule``).

Each rule computes exactly what its sleepzoo twin in :mod:`sleepzoo.ops.rules` computes, with the same
signatures, shapes (``q, k`` ``[B, T, H, K]``, ``v`` ``[B, T, H, V]``, ``g, beta`` ``[B, T, H]``, state
``[B, H, K, V]``) and conventions (``g`` a log-decay, the state returned in float32 for float32 and lower):

================  ==============  =================================  ===============================================
rule              twin            chunk                              recurrent / step
================  ==============  =================================  ===============================================
fla_gated_delta   gated_delta     ``chunk_gated_delta_rule``         ``fused_recurrent_gated_delta_rule``; under
                                                                     autograd the chunk kernel (the fused recurrent
                                                                     one has no backward)
fla_delta         delta           ``chunk_delta_rule``               ``fused_recurrent_delta_rule``
fla_gated_linear  gated_linear    ``chunk_simple_gla``, beta folded  ``fused_recurrent_simple_gla``, beta folded
                                  into v (``beta k v^T = k (beta     into v
                                  v)^T``)
fla_linear        linear          ``chunk_simple_gla``, ``g=None``   ``fused_recurrent_simple_gla``, ``g=None``
================  ==============  =================================  ===============================================

The kernels run on CUDA tensors in float16, bfloat16 or float32 with ``K <= 256`` when ``fla.ops`` imports.
Anything else (a CPU run, float64 tests, a Triton that does not import) runs the twin's torch op instead,
announced once per rule and reason by a :class:`sleepzoo.backends.BackendFallbackWarning`; the values are then
the twin's exactly. ``fla`` is imported inside the CUDA branch only: importing ``fla.ops`` imports Triton,
which CPU machines lack, and this module must still load there.

Numerics on the kernel path: fla accumulates in float32 whatever the input dtype; ``q``, ``k`` and ``beta`` are
cast to ``v.dtype`` (fla wants one dtype), ``g`` to float32 and the initial state to float32. ``chunk_size`` is
sleepzoo's tiling knob; the kernels choose their own tiling, which does not change the recurrence computed.
"""

from __future__ import annotations

from typing import Callable

import torch
from sleepzoo import backends
from sleepzoo.ops import rules as torch_rules
from sleepzoo.ops.gated_delta import _check_shapes, _l2norm
from sleepzoo.ops.rules import FastWeightRule
from torch import Tensor

__all__ = ["fla_gated_delta", "fla_delta", "fla_gated_linear", "fla_linear", "kernel_problem"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
# the fla module whose kernels each rule calls
KERNEL_MODULES = {"fla_gated_delta": "fla.ops.gated_delta_rule", "fla_delta": "fla.ops.delta_rule",
                  "fla_gated_linear": "fla.ops.simple_gla", "fla_linear": "fla.ops.simple_gla"}


def kernel_problem(name: str, q: Tensor, v: Tensor) -> str | None:
    """Why rule ``name``'s fla kernels can not run on inputs like ``q``, ``v`` (the torch op runs), or ``None``."""
    module = KERNEL_MODULES[name]
    if q.device.type != "cuda":
        return f"fla kernels need CUDA tensors, got {q.device.type}"
    if v.dtype not in _KERNEL_DTYPES:
        return f"fla kernels need float16/bfloat16/float32, got {v.dtype}"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"fla kernels need head dim K <= {_MAX_HEAD_DIM}, got {q.shape[-1]}"
    return backends.import_problem(module)


def _state(initial_state: Tensor | None) -> Tensor | None:
    return None if initial_state is None else initial_state.to(torch.float32)


def _delta_kernels(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, *, scale: float | None,
                   initial_state: Tensor | None, output_final_state: bool, use_qk_l2norm: bool,
                   recurrent: bool) -> tuple[Tensor, Tensor | None]:
    """One fla call for the gated delta rule, or with ``g=None`` the delta rule; ``[B, T, H, *]`` layout."""
    grad = backends.needs_grad(q, k, v, g, beta, initial_state)
    dt = v.dtype
    q, k, beta = q.to(dt), k.to(dt), beta.to(dt)
    options = dict(scale=scale, initial_state=_state(initial_state), output_final_state=output_final_state,
                   use_qk_l2norm_in_kernel=use_qk_l2norm)
    if g is None:
        from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule

        return (fused_recurrent_delta_rule if recurrent else chunk_delta_rule)(q, k, v, beta, **options)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    if recurrent and not grad:
        return fused_recurrent_gated_delta_rule(q, k, v, g.float(), beta=beta, **options)
    return chunk_gated_delta_rule(q, k, v, g.float(), beta, **options)


def _linear_kernels(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, *,
                    scale: float | None, initial_state: Tensor | None, output_final_state: bool,
                    use_qk_l2norm: bool, recurrent: bool) -> tuple[Tensor, Tensor | None]:
    """One fla ``simple_gla`` call for ``S <- exp(g) S + beta k v^T`` (``g=None``: no decay)."""
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

    dt = v.dtype
    if use_qk_l2norm:  # simple_gla has no in-kernel l2norm; sleepzoo normalises in float32
        q, k = _l2norm(q.float()), _l2norm(k.float())
    if beta is not None:  # fla's simple_gla has no write strength: beta k v^T = k (beta v)^T
        v = v.float() * beta.float().unsqueeze(-1)
    kernel = fused_recurrent_simple_gla if recurrent else chunk_simple_gla
    return kernel(q.to(dt), k.to(dt), v.to(dt), g=None if g is None else g.float(), scale=scale,
                  initial_state=_state(initial_state), output_final_state=output_final_state)


def _fla_rule(name: str, twin: FastWeightRule, kernels: Callable) -> FastWeightRule:
    """The rule ``name``: fla's ``kernels`` where they can run, ``twin``'s torch forms elsewhere."""
    gated = twin.uses_gate
    fallback = f"sleepzoo's torch rule {twin.name!r}"

    def cannot_run(q: Tensor, v: Tensor) -> bool:
        reason = kernel_problem(name, q, v)
        if reason is not None:
            backends.warn_fallback(f"rule {name!r}", reason, fallback, stacklevel=4)
        return reason is not None

    def chunk(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
              use_qk_l2norm=False, chunk_size=64):
        if cannot_run(q, v):
            return twin.chunk(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
                              chunk_size=chunk_size)
        g = g if gated else None
        _check_shapes(q, k, v, g, beta, initial_state)
        return kernels(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm, recurrent=False)

    def recurrent(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                  use_qk_l2norm=False):
        if cannot_run(q, v):
            return twin.recurrent(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                  output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm)
        g = g if gated else None
        _check_shapes(q, k, v, g, beta, initial_state)
        return kernels(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm, recurrent=True)

    def step(q_t, k_t, v_t, g_t, beta_t, state, *, scale=None, use_qk_l2norm=False):
        if cannot_run(q_t, v_t):
            return twin.step(q_t, k_t, v_t, g_t, beta_t, state, scale=scale, use_qk_l2norm=use_qk_l2norm)

        def one_token(x):  # (B, H, *) -> (B, 1, H, *)
            return None if x is None else x.unsqueeze(1)

        q, k, v = one_token(q_t), one_token(k_t), one_token(v_t)
        g, beta = one_token(g_t if gated else None), one_token(beta_t)
        _check_shapes(q, k, v, g, beta, state)
        o, new_state = kernels(q, k, v, g, beta, scale=scale, initial_state=state, output_final_state=True,
                               use_qk_l2norm=use_qk_l2norm, recurrent=True)
        return o[:, 0], new_state

    for form in (chunk, recurrent, step):
        form.__name__ = form.__qualname__ = f"{name}_{form.__name__}"
        form.__doc__ = (f"``{twin.name}``'s {form.__name__.rsplit('_', 1)[1]} form on fla's kernels where they run "
                        f"(CUDA; see :mod:`sleepzoo_fla.rules`), else sleepzoo's torch op. Same signature as "
                        f"``sleepzoo.ops.rules.{twin.name}``.")
    return FastWeightRule(name=name, chunk=chunk, recurrent=recurrent, step=step, uses_gate=twin.uses_gate,
                          uses_beta=twin.uses_beta, doc=f"{twin.doc} On fla-core's Triton kernels (CUDA).")


fla_gated_delta = _fla_rule("fla_gated_delta", torch_rules.gated_delta, _delta_kernels)
fla_delta = _fla_rule("fla_delta", torch_rules.delta, _delta_kernels)
fla_gated_linear = _fla_rule("fla_gated_linear", torch_rules.gated_linear, _linear_kernels)
fla_linear = _fla_rule("fla_linear", torch_rules.linear, _linear_kernels)
