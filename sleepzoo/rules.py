"""The rules that relate sleep settings, each stated once.

A recipe (:mod:`sleepzoo.config`), a pretrained folder's settings (:mod:`sleepzoo.pretrained`), an eviction
policy (:mod:`sleepzoo.eviction`), the engine and the model builders all call these functions; each caller
words the error for its own context (a recipe field, a keyword argument) from the :class:`RuleError`'s
``field``, ``value`` and ``allowed``. This module imports no torch, so validating a recipe stays cheap.
"""

from __future__ import annotations

from typing import Any

from .registry import SleepzooError


class RuleError(SleepzooError, ValueError):
    """A setting breaks a rule: ``field`` (its name), ``value`` and ``allowed`` (what the rule allows)."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is not allowed; {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_count(field: str, value: Any, meaning: str) -> int:
    """``value`` is an integer >= 1 (``window``: tokens per window; ``loops``: passes over a window)."""
    if not _is_int(value) or value < 1:
        raise RuleError(field, value, f"must be an integer >= 1 ({meaning})")
    return value


def check_window(window: Any, loops: Any) -> None:
    """The window holds >= 1 tokens and the model makes >= 1 passes over it (1 = no sleep)."""
    check_count("window", window, "tokens per attention window")
    check_count("loops", loops, "passes per window; 1 = no sleep")


def check_sleep_every(window: int, sleep_every: Any, eviction: Any = None) -> None:
    """``sleep_every`` (new tokens between two sleeps) is None (every window) or an integer in [1, window]:
    the model sleeps at the latest when its window is full. ``full_flush`` (hard eviction) sleeps on whole
    windows only, so there it must be None or the window itself."""
    if sleep_every is None:
        return
    if not _is_int(sleep_every) or not 1 <= sleep_every <= window:
        raise RuleError("sleep_every", sleep_every, f"must be an integer in [1, window = {window}] (null: sleep "
                                                    f"every window; the model sleeps at the latest when its "
                                                    f"window is full)")
    if eviction == "full_flush" and sleep_every != window:
        raise RuleError("sleep_every", sleep_every, f"full_flush sleeps on whole windows; leave sleep_every unset "
                                                    f"(= window {window}) or use eviction: sliding_window")


def check_loop_range(start: Any, end: Any, n_blocks: int | None = None) -> tuple[int, int]:
    """The looped blocks [start, end): integers with ``0 <= start < end <= n_blocks`` (``n_blocks`` None: the
    upper end is the model builder's to check, e.g. a pretrained model's depth comes from its config.json)."""
    top = "the number of layers" if n_blocks is None else f"{n_blocks} (the number of layers)"
    if not (_is_int(start) and _is_int(end) and 0 <= start < end and (n_blocks is None or end <= n_blocks)):
        raise RuleError("loop_start/loop_end", [start, end], f"need integers 0 <= loop_start < loop_end <= {top}")
    return start, end


AUTO = "auto"
DEFAULT_MAX_LOOPS = 8
DEFAULT_TOLERANCE = 0.01


def check_schedule(loops: Any, max_loops: Any = None, tolerance: Any = None) -> tuple[int, float | None]:
    """How many passes a window gets: (passes at the most, tolerance). ``loops`` an integer >= 1 is a fixed
    count, (loops, None); ``loops="auto"`` is adaptive sleep, (``max_loops``, ``tolerance``) with defaults
    :data:`DEFAULT_MAX_LOOPS` and :data:`DEFAULT_TOLERANCE`: each sequence stops when its fast weights change
    by less than the tolerance (sleepzoo.engine.consolidate). ``max_loops`` and ``tolerance`` go with auto only."""
    if loops != AUTO:
        if not _is_int(loops) or loops < 1:
            raise RuleError("loops", loops, "must be an integer >= 1 (passes per window; 1 = no sleep) or auto "
                                            "(adaptive: up to max_loops passes, until the fast weights settle)")
        for name, value in (("max_loops", max_loops), ("tolerance", tolerance)):
            if value is not None:
                raise RuleError(name, value, f"{name} goes with loops: auto (adaptive sleep), but loops is {loops}; "
                                             f"remove {name} or set loops: auto")
        return loops, None
    max_loops = DEFAULT_MAX_LOOPS if max_loops is None else max_loops
    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    check_count("max_loops", max_loops, "the most passes a window may take under loops: auto")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < float("inf"):
        raise RuleError("tolerance", tolerance, "must be a number >= 0 (the relative change of the fast weights "
                                                "under which a sequence stops sleeping; 0: never stop)")
    return max_loops, float(tolerance)


def merge_schedule(base: Any, loops: Any = None, max_loops: Any = None, tolerance: Any = None) -> tuple[Any, Any, Any]:
    """(loops, max_loops, tolerance) when the given ones override ``base``'s (a sleep section; None keeps
    the base's loops). The bounds of adaptive sleep belong to its loops: a base's ``max_loops`` / ``tolerance``
    carry over only when both the base and the result are ``auto``, so a fixed count given drops them, and
    ``auto`` given over a fixed base starts from the defaults. The result is checked by
    :func:`check_schedule`."""
    loops = base.loops if loops is None else loops
    inherit = loops == AUTO and base.loops == AUTO
    return (loops, base.max_loops if inherit and max_loops is None else max_loops,
            base.tolerance if inherit and tolerance is None else tolerance)
