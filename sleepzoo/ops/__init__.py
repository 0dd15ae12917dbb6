"""Fast-weight operators in pure PyTorch.

* :func:`gated_delta_rule`: chunked gated delta rule (Yang et al., *Gated Delta Networks*, 2024), for training
  and prefill; any sequence length, differentiable everywhere including the initial state.
* :func:`gated_delta_rule_recurrent`: the same recurrence as a step-by-step loop (decoding, short inputs).
* :func:`gated_delta_rule_step`: a single token.
* :func:`delta_rule`: the plain delta rule, i.e. ``gated_delta_rule`` with ``g=None``.
* :func:`gated_linear_rule`, :func:`gated_linear_rule_recurrent`, :func:`gated_linear_rule_step`: scalar-decay
  gated linear attention (Mamba2 / simple GLA), ``S <- exp(g) S + beta k v^T``, in the same three forms.
* :func:`l2norm`: the q/k normalisation of the Gated DeltaNet and Jet layers (fla's formula).
* :func:`linear_rule`: plain linear attention / Hebbian rule, i.e. ``gated_linear_rule`` with ``g=None``.

The plugin objects that mixers look up by name live in :mod:`sleepzoo.ops.rules`.
"""

from .gated_delta import delta_rule, l2norm, gated_delta_rule, gated_delta_rule_recurrent, gated_delta_rule_step
from .gated_linear import gated_linear_rule, gated_linear_rule_recurrent, gated_linear_rule_step, linear_rule

__all__ = [
    "gated_delta_rule",
    "gated_delta_rule_recurrent",
    "gated_delta_rule_step",
    "delta_rule",
    "gated_linear_rule",
    "gated_linear_rule_recurrent",
    "gated_linear_rule_step",
    "linear_rule",
    "l2norm",
]
