"""Eviction policies (kind ``eviction``): what of a window survives after the model has slept on it.

A policy is a class constructed with no arguments (recipe settings come later as keyword arguments) with
one method the engine calls after a window's sleep passes::

    states = policy.evict(states, mixers)   # one MixerState per block, in block order
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .mixers import MixerState


class FullFlush:
    """Hard eviction (the paper's main setting): drop every cache, keep only the fast weights.

    Each mixer names its fast-weight keys in ``carried_state``; everything else (KV caches, conv history)
    is dropped, so the next window starts with an empty attention cache and positions restart at 0.
    """

    retained_tokens = 0

    def evict(self, states: Sequence[MixerState], mixers: Sequence[nn.Module]) -> list[MixerState]:
        out: list[MixerState] = []
        for state, mixer in zip(states, mixers):
            keep = getattr(mixer, "carried_state", ())
            kept = {k: v for k, v in (state or {}).items() if k in keep}
            out.append(kept or None)
        return out
