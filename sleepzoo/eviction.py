"""Eviction policies (kind ``eviction``): what of a window survives after the model has slept on it.

A policy is built by the engine as ``Policy(window=L, sleep_every=None)`` and tells it three things:

* ``chunk``: how many new tokens arrive between two sleeps;
* ``span``: how many tokens (itself included) a query may attend to (None: everything in the cache);
* ``evict(states, mixers)``: the per-block states after a sleep (fast weights always survive).
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .mixers import MixerState, evict_state
from .registry import SleepzooError
from .rules import RuleError, check_count, check_sleep_every


def _check(name: str, window: int, sleep_every: int | None) -> None:
    """The policy's window and sleep_every (:mod:`sleepzoo.rules`); an error names the policy."""
    try:
        check_count("window", window, "tokens per attention window")
        check_sleep_every(window, sleep_every, name)
    except RuleError as exc:
        raise SleepzooError(f"{name}: {exc}") from None


class FullFlush:
    """Hard eviction (the paper's main setting): sleep on each full window, then drop every cache.

    Only the fast weights cross the boundary; the next window starts with an empty attention cache, positions
    restart at 0 and conv histories are empty.
    """

    span = None
    retain = 0

    def __init__(self, window: int, sleep_every: int | None = None):
        _check("full_flush", window, sleep_every)
        self.window = self.chunk = window

    def evict(self, states: Sequence[MixerState], mixers: Sequence[nn.Module]) -> list[MixerState]:
        return [evict_state(m, s, 0) for s, m in zip(states, mixers)]


class SlidingWindow:
    """Sliding-window sleep: every ``sleep_every`` tokens (default: the window L) the model sleeps on the new
    tokens, then keeps the most recent L - 1 tokens' caches (the wake pass's K/V); every query attends to at
    most L tokens. With loops = 1 this is exactly a sliding-window-attention + SSM hybrid.
    """

    span: int
    retain: int

    def __init__(self, window: int, sleep_every: int | None = None):
        _check("sliding_window", window, sleep_every)
        self.window = self.span = window
        self.chunk = window if sleep_every is None else sleep_every
        self.retain = window - 1

    def evict(self, states: Sequence[MixerState], mixers: Sequence[nn.Module]) -> list[MixerState]:
        return [evict_state(m, s, self.retain) for s, m in zip(states, mixers)]
