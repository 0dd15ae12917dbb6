"""Fast-weight operators in pure PyTorch.

* :func:`gated_delta_rule`: chunked gated delta rule (Yang et al., *Gated Delta Networks*, 2024), for training
  and prefill; any sequence length, differentiable everywhere including the initial state.
* :func:`gated_delta_rule_recurrent`: the same recurrence as a step-by-step loop (decoding, short inputs).
* :func:`gated_delta_rule_step`: a single token.
* :func:`delta_rule`: the plain delta rule, i.e. ``gated_delta_rule`` with ``g=None``.

The plugin objects that mixers look up by name live in :mod:`sleepzoo.ops.rules`.
"""

from .gated_delta import delta_rule, gated_delta_rule, gated_delta_rule_recurrent, gated_delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_recurrent", "gated_delta_rule_step", "delta_rule"]
