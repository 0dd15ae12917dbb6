"""Sequence mixers (kind ``mixer``): the token-mixing half of a block.

A mixer is an ``nn.Module`` constructed as ``Mixer(d_model, layer_idx=i, **recipe.model.mixers[name])`` with
one contract for the sleep engine::

    y, state = mixer(x, state)        # x, y: (B, T, d_model); state: dict[str, Tensor] or None

``state`` is the mixer's per-sequence memory. Keys listed in ``mixer.carried_state`` are fast weights: they
survive an eviction and accumulate across sleep passes. Every other key is a cache that an eviction policy
may drop. ``None`` means a fresh sequence (zero fast weights, empty caches).
"""

from __future__ import annotations

from typing import Dict, Optional

from torch import Tensor

MixerState = Optional[Dict[str, Tensor]]
