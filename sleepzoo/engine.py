"""The sleep engine: cut a sequence into windows, wake, sleep, evict (SPEC 1).

For every window of at most ``window`` tokens::

    h = embed(window tokens)                     positions restart at 0 (hard eviction)
    h, S = prelude(h, S)                         blocks before the loop run once
    h, S = looped(h, S)                          pass 1 = the wake pass
    logits = head(coda(h))                       loss is taken here when the window has targets
    if another window follows (its cache is about to be evicted):
        repeat loops - 1 times: h, S = looped(h, S)   sleep: features of pass n feed pass n + 1
        S = evict(S)                             only fast weights cross the boundary

S accumulates over passes and windows and is never reset within a sequence. Gradients flow through all
windows and passes (full BPTT); with ``checkpoint=True`` each window's activations are recomputed in the
backward pass, so memory holds one window's activations plus the states. ``loops=1`` is exactly the plain
hybrid. *Ours*: the coda runs once per window, on the wake pass, as in streaming, where each token is
predicted when it arrives and the window is slept on afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from . import registry
from .registry import SleepzooError

if TYPE_CHECKING:
    from .mixers import MixerState
    from .models.base import SleepModel

IGNORE_INDEX = -100


@dataclass
class SleepOutput:
    """What a forward returns. ``loss`` is the mean cross-entropy over targets != -100 (None without targets);
    ``logits`` (B, T, vocab) are the wake-pass logits of every position (None with ``return_logits=False``)."""

    loss: Tensor | None
    logits: Tensor | None
    num_targets: int
    states: list[Any]


def window_bounds(seq_len: int, window: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) windows of at most ``window`` tokens covering ``seq_len`` tokens."""
    return [(s, min(s + window, seq_len)) for s in range(0, seq_len, window)]


def check_sleep_args(window: Any, loops: Any) -> None:
    for name, value, hint in (("window", window, "tokens per attention window"),
                              ("loops", loops, "passes per window; 1 = no sleep")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SleepzooError(f"{name}={value!r} is invalid: it must be an integer >= 1 ({hint})")


def resolve_eviction(eviction: Any) -> Any:
    """An eviction policy object from a name (kind ``eviction``) or an already built policy."""
    if isinstance(eviction, str):
        return registry.get("eviction", eviction)()
    if not hasattr(eviction, "evict"):
        raise SleepzooError(f"eviction={eviction!r} is neither a policy name nor an object with .evict()")
    return eviction


def run_blocks(blocks: Sequence[torch.nn.Module], h: Tensor, states: list, offset: int) -> Tensor:
    """Apply ``blocks`` in order, updating ``states[offset + i]`` in place."""
    for i, block in enumerate(blocks):
        h, states[offset + i] = block(h, states[offset + i])
    return h


def _window(model: "SleepModel", ids: Tensor, targets: Tensor | None, states: list, passes: int,
            need_logits: bool) -> tuple[Tensor | None, Tensor | None, list]:
    """Wake pass (+ ``passes - 1`` sleep passes) over one window. Returns (logits, summed CE, states)."""
    states = list(states)  # never mutate the caller's list: checkpoint recomputation replays this call
    layers = model.layers
    lo, hi = model.loop_range
    h = model.embed(ids)  # (B, W, d)
    h = run_blocks(layers[:lo], h, states, 0)
    h = run_blocks(layers[lo:hi], h, states, lo)  # pass 1: the wake pass
    logits = loss_sum = None
    if need_logits:
        wake = run_blocks(layers[hi:], h, states, hi)
        logits = model.head(wake)  # (B, W, vocab)
        if targets is not None:
            # half-precision logits are upcast for the loss; float32/float64 are kept as they are
            scores = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
            loss_sum = F.cross_entropy(scores.flatten(0, 1), targets.flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
    elif hi < len(layers):  # the coda's states must see the wake pass even when nothing is predicted
        run_blocks(layers[hi:], h, states, hi)
    for _ in range(passes - 1):  # sleep: consolidate the window into the looped blocks' fast weights
        h = run_blocks(layers[lo:hi], h, states, lo)
    return logits, loss_sum, states


def run(model: "SleepModel", input_ids: Tensor, targets: Tensor | None = None, *, window: int, loops: int,
        eviction: Any = "full_flush", checkpoint: bool = False, return_logits: bool = True,
        states: list["MixerState"] | None = None) -> SleepOutput:
    """Run ``model`` over ``input_ids`` (B, T) window by window with sleep; see the module docstring."""
    check_sleep_args(window, loops)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise SleepzooError(f"input_ids must be a LongTensor of shape (batch, seq_len), got "
                            f"{getattr(input_ids, 'dtype', type(input_ids))} {tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[1] == 0:
        raise SleepzooError("input_ids is empty: give at least one token per sequence")
    if targets is not None and targets.shape != input_ids.shape:
        raise SleepzooError(f"targets shape {tuple(targets.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
    vocab = model.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise SleepzooError(f"input_ids hold ids outside [0, {vocab}): min {int(input_ids.min())}, "
                            f"max {int(input_ids.max())}; is the recipe's vocab_size that of the task?")
    policy = resolve_eviction(eviction)
    mixers = model.mixers()
    states = [None] * len(mixers) if states is None else list(states)
    bounds = window_bounds(input_ids.shape[1], window)
    use_ckpt = checkpoint and torch.is_grad_enabled()
    logits_parts: list[Tensor] = []
    loss_total: Tensor | None = None
    num_targets = 0 if targets is None else int((targets != IGNORE_INDEX).sum())
    for c, (start, end) in enumerate(bounds):
        consolidate = c + 1 < len(bounds)
        ids_c = input_ids[:, start:end]
        tgt_c = None if targets is None else targets[:, start:end]
        has_targets = tgt_c is not None and bool((tgt_c != IGNORE_INDEX).any())
        need_logits = return_logits or has_targets
        passes = loops if consolidate else 1
        if use_ckpt:
            logits_c, loss_c, states = activation_checkpoint(
                _window, model, ids_c, tgt_c if has_targets else None, states, passes, need_logits,
                use_reentrant=False)
        else:
            logits_c, loss_c, states = _window(model, ids_c, tgt_c if has_targets else None, states, passes,
                                               need_logits)
        if return_logits:
            logits_parts.append(logits_c)
        if loss_c is not None:
            loss_total = loss_c if loss_total is None else loss_total + loss_c
        if consolidate:
            states = policy.evict(states, mixers)
    loss = None
    if targets is not None:
        if num_targets == 0:
            raise SleepzooError("targets has no position != -100: nothing to take a loss on")
        loss = loss_total / num_targets
    logits = torch.cat(logits_parts, dim=1) if return_logits else None
    return SleepOutput(loss=loss, logits=logits, num_targets=num_targets, states=states)
