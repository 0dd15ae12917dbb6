"""Sequence mixers (kind ``mixer``): the token-mixing half of a block.

A mixer is an ``nn.Module`` constructed as ``Mixer(d_model, layer_idx=i, **recipe.model.mixers[name])`` with
one contract for the sleep engine::

    y, state = mixer(x, state, span=None)   # x, y: (B, T, d_model); state: dict or None

``state`` is the mixer's memory of the sequence so far; ``None`` means a fresh sequence (zero fast weights,
empty caches). The returned state covers ``x`` too. Two kinds of entries:

* fast weights, the keys listed in ``mixer.carried_state``: they survive every eviction and accumulate
  across sleep passes (the Gated DeltaNet state S);
* caches (attention K/V and position, short-conv history): what a window may still read of the tokens
  before it. ``mixer.evict(state, retain)`` keeps the fast weights and the caches of the last ``retain``
  tokens (``retain = 0``: the caches are dropped, so positions and conv history restart).

``span`` bounds how many tokens (itself included) a query may attend to; ``None`` is unbounded. Mixers
without attention ignore it.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn

MixerState = Optional[Dict[str, Any]]


def evict_state(mixer: nn.Module, state: MixerState, retain: int) -> MixerState:
    """``mixer.evict(state, retain)`` when the mixer defines it; otherwise keep its fast weights only."""
    if state is None:
        return None
    if hasattr(mixer, "evict"):
        return mixer.evict(state, retain)
    kept = {k: v for k, v in state.items() if k in getattr(mixer, "carried_state", ())}
    return kept or None


def with_fast_weights(mixer: nn.Module, caches: MixerState, fast: MixerState) -> MixerState:
    """The caches of ``caches`` with the fast weights of ``fast`` (a sleep pass re-reads the window's
    context, while its fast weights keep accumulating)."""
    carried = getattr(mixer, "carried_state", ())
    merged = {k: v for k, v in (caches or {}).items() if k not in carried}
    merged.update({k: v for k, v in (fast or {}).items() if k in carried})
    return merged or None
