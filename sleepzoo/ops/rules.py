"""Fast-weight update rules as plugin objects (entry-point group ``sleepzoo.rule``).

A :class:`FastWeightRule` bundles the three forms of one rule, so a mixer can train with ``chunk``, decode with
``step`` and fall back to ``recurrent`` for short inputs, without knowing which rule it runs. Built-ins:

* :data:`gated_delta`: the gated delta rule (Yang et al., *Gated Delta Networks*, 2024); reads ``g`` and ``beta``.
* :data:`delta`: the plain delta rule, the same code with ``g=None``; reads ``beta`` only.
* :data:`gated_linear`: scalar-decay gated linear attention (Mamba2 / simple GLA), ``S <- exp(g) S + beta k v^T``;
  reads ``g`` and ``beta`` (``beta=None`` means 1).
* :data:`linear`: plain linear attention / Hebbian rule, the same code with ``g=None``; reads ``beta`` only.

Shapes: ``q, k`` ``[B, T, H, K]``, ``v`` ``[B, T, H, V]``, ``g, beta`` ``[B, T, H]``, state ``[B, H, K, V]``;
single-token forms drop the ``T`` axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .gated_delta import gated_delta_rule, gated_delta_rule_recurrent, gated_delta_rule_step
from .gated_linear import gated_linear_rule, gated_linear_rule_recurrent, gated_linear_rule_step

__all__ = ["FastWeightRule", "gated_delta", "delta", "gated_linear", "linear"]


@dataclass(frozen=True)
class FastWeightRule:
    """One fast-weight update rule in its three forms.

    Attributes:
        name: registry name.
        chunk: ``(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, chunk_size=64)
            -> (o, S)``, the chunked form for training and prefill.
        recurrent: same signature minus ``chunk_size``; a step-by-step loop.
        step: ``(q_t, k_t, v_t, g_t, beta_t, state, *, scale=None) -> (o_t, new_state)``, one token.
        uses_gate: whether ``g`` is read; callers pass ``g=None`` otherwise.
        uses_beta: whether ``beta`` is read.
        doc: one-line description.
    """

    name: str
    chunk: Callable
    recurrent: Callable
    step: Callable
    uses_gate: bool
    uses_beta: bool
    doc: str = ""

    def __call__(self, q, k, v, g, beta, *, scale: float | None = None, initial_state=None,
                 chunk_size: int = 64):
        """Apply the rule to a piece of a sequence, returning ``(o, final_state)``: one token with a state
        goes through ``step`` (decoding), anything else through ``chunk``. ``g`` / ``beta`` are dropped
        when the rule does not read them, so mixers may always pass what they computed."""
        g = g if self.uses_gate else None
        beta = beta if self.uses_beta else None
        if q.shape[1] == 1 and initial_state is not None:
            o, state = self.step(q[:, 0], k[:, 0], v[:, 0], None if g is None else g[:, 0],
                                 None if beta is None else beta[:, 0], initial_state, scale=scale)
            return o.unsqueeze(1), state
        return self.chunk(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=True,
                          chunk_size=chunk_size)


def _without_gate(fn: Callable) -> Callable:
    """Wrap ``fn`` so that ``g`` is ignored and replaced by ``None`` (no decay), keeping the signature."""

    def wrapped(q, k, v, g, beta, *args, **kwargs):
        return fn(q, k, v, None, beta, *args, **kwargs)

    wrapped.__name__ = f"{fn.__name__}_ungated"
    wrapped.__qualname__ = wrapped.__name__
    wrapped.__doc__ = f"{fn.__name__} with ``g`` forced to ``None`` (no decay).\n\n{fn.__doc__ or ''}"
    return wrapped


gated_delta = FastWeightRule(
    name="gated_delta",
    chunk=gated_delta_rule,
    recurrent=gated_delta_rule_recurrent,
    step=gated_delta_rule_step,
    uses_gate=True,
    uses_beta=True,
    doc="Gated delta rule (Yang et al., Gated Delta Networks, 2024): S <- exp(g) S + k beta (v - exp(g) S^T k)^T.",
)

delta = FastWeightRule(
    name="delta",
    chunk=_without_gate(gated_delta_rule),
    recurrent=_without_gate(gated_delta_rule_recurrent),
    step=_without_gate(gated_delta_rule_step),
    uses_gate=False,
    uses_beta=True,
    doc="Delta rule (no decay): S <- S + k beta (v - S^T k)^T; the gated delta rule with g=None.",
)

gated_linear = FastWeightRule(
    name="gated_linear",
    chunk=gated_linear_rule,
    recurrent=gated_linear_rule_recurrent,
    step=gated_linear_rule_step,
    uses_gate=True,
    uses_beta=True,
    doc="Scalar-decay gated linear attention (Mamba2 / simple GLA): S <- exp(g) S + beta k v^T (beta=None: 1).",
)

linear = FastWeightRule(
    name="linear",
    chunk=_without_gate(gated_linear_rule),
    recurrent=_without_gate(gated_linear_rule_recurrent),
    step=_without_gate(gated_linear_rule_step),
    uses_gate=False,
    uses_beta=True,
    doc="Linear attention / Hebbian rule (no decay): S <- S + beta k v^T; gated_linear with g=None.",
)
