"""The sleep engine: cut a sequence into chunks, wake, sleep, evict (SPEC 1).

Glossary (the names the code, the recipes and the docs use):

* **window** (L, ``sleep.window``): the most tokens the attention cache holds at once.
* **chunk**: the new tokens between two sleeps: a whole window under ``full_flush``, ``sleep_every`` tokens
  under ``sliding_window`` (``policy.chunk``). Not the kernels' ``chunk_size``, the block length of a chunked
  fast-weight op (:mod:`sleepzoo.ops`), which changes no value.
* **pass**: one run of the looped blocks over a chunk. The **wake** pass is the first: it reads the tokens as
  they arrive and gives their logits. **Sleep** is what happens when a chunk is full and the next token
  arrives: the passes after the wake pass, offline, each continuing the fast weights of the one before,
  then the eviction.
* **loops** (N, ``sleep.loops``): passes per chunk, the wake pass included (1 = no sleep); ``auto`` lets each
  sequence stop early (adaptive sleep), and its **passes used** are reported. Ouro's ``wake_passes`` is
  another thing: the loop steps inside one pass of a looped-depth model.
* **fast weights** (``mixer.carried_state``): the state of a fast-weight layer (Gated DeltaNet's S); they
  survive every eviction. **Caches**: attention K/V and conv history, what a chunk may still read of the
  tokens before it.
* **eviction**: what the policy keeps of the caches after a sleep. ``full_flush`` keeps none;
  ``sliding_window`` keeps the last ``retain = window - 1`` tokens' (the **retained context**), and the
  attention **span** (the most tokens a query attends to, itself included) stays the window.

A model gives the engine three lists of blocks, ``prelude``, ``loop`` and ``coda``. For every chunk::

    h = embed(chunk)                             full_flush: positions restart at 0
    h, S = prelude(h, S)                         blocks before the loop run once
    h, S = loop(h, S)                            pass 1 = the wake pass
    logits = head(coda(h))                       loss is taken here when the chunk has targets
    if another chunk follows (its cache is about to be evicted):
        repeat loops - 1 times: h, S = loop(h, S)     sleep: features of pass n feed pass n + 1
        _, S_coda = coda(h, S_coda at the chunk's start)   the coda's fast weights come from after sleep
        S = evict(S)                             fast weights survive; caches as the policy says

Fast weights accumulate over passes and chunks and are never reset within a sequence. Every pass of a
chunk reads the same context (the caches retained from earlier chunks: none under ``full_flush``); the
caches kept for later chunks are the wake pass's. The wake pass's coda output serves only the chunk's logits
(each token is predicted when it arrives, as in streaming); ``coda="wake"`` keeps the wake pass's coda states
instead (an ablation). Gradients flow through all chunks and passes (full BPTT; ``truncate=K`` cuts them
after every K-th window); with ``checkpoint=True`` each pass over a chunk keeps only its inputs and is
recomputed in the backward pass, so activation memory does not grow with ``loops``. ``loops=1`` is exactly
the plain hybrid. The head runs only where it is needed: at the target positions for the loss
(``return_logits=False``, what training uses), everywhere only when logits are asked for.

Training (:func:`run`) and streaming inference (:class:`Stream`) are two drivers of the same two steps,
:func:`wake` and :func:`consolidate`, so they can not drift apart.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from . import registry, rules
from .mixers import with_fast_weights
from .registry import SleepzooError

if TYPE_CHECKING:
    from .models.base import SleepModel

IGNORE_INDEX = -100


@dataclass
class SleepOutput:
    """What a forward returns. ``loss`` is the mean cross-entropy over targets != -100 (None without targets);
    ``logits`` (B, T, vocab) are the wake-pass logits of every position (None with ``return_logits=False``;
    (n, vocab) at the target positions with ``return_logits="targets"``)."""

    loss: Tensor | None
    logits: Tensor | None
    num_targets: int
    states: list[Any]
    target_positions: Tensor | None = None  # (n, 2) (batch, position) of .logits under return_logits="targets"
    # (B, windows slept) int64: passes each sequence used on each consolidated window (fixed loops: all equal
    # to loops; loops="auto": between 1 and max_loops); (B, 0) when no window was consolidated
    passes: Tensor | None = None


def chunk_bounds(seq_len: int, chunk: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) chunks of at most ``chunk`` tokens covering ``seq_len`` tokens."""
    return [(s, min(s + chunk, seq_len)) for s in range(0, seq_len, chunk)]


def check_sleep_args(window: Any, loops: Any) -> None:
    """``window`` and ``loops`` are integers >= 1 (:func:`sleepzoo.rules.check_window`)."""
    from .rules import check_window

    check_window(window, loops)


def check_stabilisers(model: Any, gate: Any, pass_norm: Any, truncate: Any, coda: Any = "sleep") -> dict:
    """Validate ``gate``, ``pass_norm``, ``truncate`` and ``coda``; return the keyword arguments of
    :func:`consolidate` (its callers, :func:`run` and :class:`Stream`, validate here once)."""
    if coda not in CODA_MODES:
        raise SleepzooError(f"sleep.coda={coda!r} is invalid: choose {' or '.join(CODA_MODES)}")
    for name, value in (("gate", gate), ("pass_norm", pass_norm)):
        if not isinstance(value, bool):
            raise SleepzooError(f"sleep.{name}={value!r} is invalid: it must be true or false")
    if truncate is not None and (isinstance(truncate, bool) or not isinstance(truncate, int) or truncate < 1):
        raise SleepzooError(f"sleep.truncate={truncate!r} is invalid: give a number of windows >= 1, or null for "
                            f"full BPTT")
    if gate:
        g = getattr(model, "sleep_gate", None)
        if g is None:
            raise SleepzooError("sleep.gate=true but the model has no sleep gate: build it with sleep.gate: true in "
                                "its recipe (sleepzoo.build_model), or call model.add_sleep_gate() before training")
        want = len(model.loop) + len(model.coda)
        if g.numel() != want:
            raise SleepzooError(f"model.sleep_gate has {g.numel()} entries but the model has {want} looped and coda "
                                f"blocks (was the loop range changed after the gate was made?); rebuild the gate")
    if pass_norm and getattr(model, "pass_norm_builtin", False):
        raise SleepzooError(f"sleep.pass_norm=true: {type(model).__name__} already applies its final norm at the "
                            f"end of every loop step; leave sleep.pass_norm false")
    if pass_norm and (not hasattr(model, "final_norm") or model.final_norm() is None):
        raise SleepzooError(f"sleep.pass_norm=true but {type(model).__name__} has no final norm to apply "
                            f"between passes")
    return {"gate": gate, "pass_norm": pass_norm, "coda": coda}


def resolve_eviction(eviction: Any, window: int, sleep_every: int | None = None) -> Any:
    """An eviction policy for ``window`` from a name (kind ``eviction``), or an already built policy."""
    if isinstance(eviction, str):
        return registry.get("eviction", eviction)(window=window, sleep_every=sleep_every)
    if not all(hasattr(eviction, a) for a in ("evict", "chunk", "span")):
        raise SleepzooError(f"eviction={eviction!r} is neither a policy name nor a policy object "
                            f"(with .evict(), .chunk and .span)")
    return eviction


def run_blocks(blocks: Sequence[torch.nn.Module], h: Tensor, states: Sequence[Any],
               span: int | None) -> tuple[Tensor, list]:
    """Apply ``blocks`` in order; ``states[i]`` belongs to ``blocks[i]``. Returns (h, new states)."""
    new_states = []
    for block, state in zip(blocks, states):
        h, state = block(h, state, span=span)
        new_states.append(state)
    return h, new_states


def block_lists(model: "SleepModel") -> tuple[Sequence[torch.nn.Module], Sequence[torch.nn.Module],
                                             Sequence[torch.nn.Module]]:
    """The model's (prelude, loop, coda) blocks: state slot i of the engine belongs to block i of
    ``prelude + loop + coda``."""
    return model.prelude, model.loop, model.coda


def wake(model: "SleepModel", ids: Tensor, states: Sequence[Any], span: int | None,
         need_logits: bool = True) -> tuple[Tensor, Tensor, Tensor | None, list]:
    """The wake pass over new tokens ``ids`` (B, t). Returns (looped blocks' output features, the coda's
    output features, logits or None, states). The coda runs even without logits: its states must see the
    wake pass (a consolidated chunk's coda states are replaced after sleep, see :func:`consolidate`)."""
    prelude, loop, coda = block_lists(model)
    lo, hi = len(prelude), len(prelude) + len(loop)
    h = model.embed(ids)  # (B, t, d)
    h, pre = run_blocks(prelude, h, states[:lo], span)
    feats, looped = run_blocks(loop, h, states[lo:hi], span)
    out, after = run_blocks(coda, feats, states[hi:], span)
    logits = model.head(out) if need_logits else None  # (B, t, vocab)
    return feats, out, logits, pre + looped + after


def consolidate(model: "SleepModel", feats: Tensor, states: Sequence[Any], start_states: Sequence[Any],
                passes: int, span: int | None, checkpoint: bool = False, *, gate: bool = False,
                pass_norm: bool = False, coda: str = "sleep", tolerance: float | None = None) -> tuple[list, Tensor]:
    """Sleep: passes 2..``passes`` of the looped blocks over a chunk whose wake pass produced ``feats``.
    Returns (states, passes used per sequence (B,) int64; 1 = the wake pass only).

    Each pass reads the context the wake pass read (the caches of ``start_states``, from before the chunk)
    and continues the fast weights of the previous pass; the returned states keep the wake pass's caches.
    With ``checkpoint`` each pass keeps only its inputs for the backward pass and is recomputed there, so
    the memory of a chunk's backward holds one pass's activations whatever ``passes`` is.

    Adaptive sleep (``tolerance`` not None, ``sleep.loops: auto``): ``passes`` is the most a sequence may
    take. After each pass the change of every fast-weight state of the looped blocks is measured per
    sequence, ``||S_new - S_old||_F / ||S_old||_F`` (:func:`fast_weight_change`); a sequence whose largest
    change is under ``tolerance`` stops: that pass's update is dropped and its features and fast weights stay
    as they were for the rest of the batch's passes. A sequence's passes used are its wake pass plus the
    sleep passes it kept. The decision passes no gradient; ``tolerance=0`` keeps every pass (fixed ``passes``).
    The batch stops early once every sequence has stopped (not under torch.distributed with several
    processes, whose ranks must run the same passes).

    The coda (``coda="sleep"``, SPEC 1): after the last pass the blocks after the loop run once over that
    pass's features, from their own states at the chunk's start, and their fast weights are the ones kept
    (caches: the wake pass's, as for the looped blocks). ``coda="wake"`` keeps the wake pass's coda states
    (an ablation: the coda then never sees sleep).

    Stabilisers (``sleep.gate``, ``sleep.pass_norm``): with ``gate`` the carried fast weights of the looped
    and coda layers are ``S_wake + g_i (S_sleep - S_wake)``, ``g = model.sleep_gate`` (one learned scalar per
    looped or coda layer, initialised to 0, so the model starts as its ``loops = 1`` self and learns how much
    of sleep to keep); with ``pass_norm`` the model's final norm is applied to the features between passes,
    as Ouro does between its loops.
    """
    states = list(states)
    used = torch.ones(feats.shape[0], dtype=torch.long, device=feats.device)
    if passes <= 1:
        return states, used
    prelude, loop, after = block_lists(model)
    mixers = model.mixers()
    lo, hi = len(prelude), len(prelude) + len(loop)
    fast = states[lo:hi]
    norm = model.final_norm() if pass_norm else None
    active = torch.ones_like(used, dtype=torch.bool)
    h = feats
    for _ in range(passes - 1):
        h_in = norm(h) if norm is not None else h
        pass_states = [with_fast_weights(mixers[lo + i], start_states[lo + i], fast[i]) for i in range(hi - lo)]
        if checkpoint:
            h_new, fast_new = activation_checkpoint(run_blocks, loop, h_in, pass_states, span, use_reentrant=False)
        else:
            h_new, fast_new = run_blocks(loop, h_in, pass_states, span)
        if tolerance is None:
            h, fast = h_new, fast_new
            continue
        with torch.no_grad():
            keep = active & ~(fast_weight_change(mixers[lo:hi], fast, fast_new) < tolerance)
        h = torch.where(keep.view(-1, *[1] * (h.dim() - 1)), h_new, h)
        fast = [keep_fast_weights(mixers[lo + i], keep, fast[i], fast_new[i]) for i in range(hi - lo)]
        used += keep.long()
        active = keep
        if not _must_run_every_pass() and not bool(active.any()):
            break
    if tolerance is None:  # a fixed count: every sequence took every pass
        used.fill_(passes)
    slept = list(fast)
    if coda == "sleep" and len(after):
        coda_start = list(start_states[hi:])
        if checkpoint:
            _, coda_states = activation_checkpoint(run_blocks, after, h, coda_start, span, use_reentrant=False)
        else:
            _, coda_states = run_blocks(after, h, coda_start, span)
        slept += coda_states
        n = len(states) - lo
    else:
        n = hi - lo
    if gate:
        slept = [gate_fast_weights(mixers[lo + i], states[lo + i], slept[i], model.sleep_gate[i])
                 for i in range(n)]
    for i in range(n):
        states[lo + i] = with_fast_weights(mixers[lo + i], states[lo + i], slept[i])
    return states, used


def _fast_weights(mixer: torch.nn.Module, state: Any) -> list[tuple[str, Tensor]]:
    return [(k, v) for k, v in (state or {}).items()
            if k in getattr(mixer, "carried_state", ()) and isinstance(v, Tensor)]


def fast_weight_change(mixers: Sequence[torch.nn.Module], old: Sequence[Any], new: Sequence[Any]) -> Tensor:
    """Per sequence, the largest relative change of any fast-weight state between two passes:
    ``max over (layer, entry) of ||new - old||_F / ||old||_F`` over each sequence's slice (B,), in float32
    or wider. A state that was zero and stays zero has changed by 0; one that was zero and is not, by inf."""
    worst = None
    for mixer, a, b in zip(mixers, old, new):
        before = dict(_fast_weights(mixer, a))
        for key, after in _fast_weights(mixer, b):
            prev = before.get(key)
            after = after if after.dtype in (torch.float32, torch.float64) else after.float()
            prev = torch.zeros_like(after) if prev is None else prev.to(after.dtype)
            num = (after - prev).flatten(1).norm(dim=1)
            den = prev.flatten(1).norm(dim=1)
            rel = torch.where(num == 0, torch.zeros_like(num), num / den)  # x / 0 = inf: it changed
            worst = rel if worst is None else torch.maximum(worst, rel)
    if worst is None:
        raise SleepzooError("sleep.loops: auto measures the change of the looped layers' fast weights, but "
                            "no looped layer has any (carried_state); use a fixed sleep.loops")
    return worst


def keep_fast_weights(mixer: torch.nn.Module, keep: Tensor, old: Any, new: Any) -> Any:
    """``new``'s fast weights for the sequences where ``keep`` (B,) is true, ``old``'s for the others; the
    rest of ``new`` (caches) as it is."""
    if not new:
        return new
    before = dict(_fast_weights(mixer, old))
    out = dict(new)
    for key, value in _fast_weights(mixer, new):
        prev = before.get(key, torch.zeros_like(value))
        out[key] = torch.where(keep.view(-1, *[1] * (value.dim() - 1)), value, prev)
    return out


def _must_run_every_pass() -> bool:
    """Under torch.distributed with several processes every rank runs the same passes (collectives per block)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def pass_summary(passes: Tensor) -> dict:
    """``{"passes_mean": m, "passes_hist": {"n": count}}`` of a tensor of passes used (any shape, one entry a
    sequence and window slept); ``passes_mean`` is None when nothing was slept."""
    values, counts = torch.unique(passes.reshape(-1).long().cpu(), return_counts=True)
    return summary_of_counts({int(v): int(c) for v, c in zip(values, counts)})


def summary_of_counts(counts: dict[int, int]) -> dict:
    """:func:`pass_summary` of a histogram ``{passes used: how many}``."""
    total = sum(counts.values())
    if total == 0:
        return {"passes_mean": None, "passes_hist": {}}
    return {"passes_mean": sum(n * c for n, c in counts.items()) / total,
            "passes_hist": {str(n): counts[n] for n in sorted(counts)}}


CODA_MODES = ("sleep", "wake")


def gate_fast_weights(mixer: torch.nn.Module, woken: Any, slept: Any, g: Tensor) -> Any:
    """``S_wake + g (S_sleep - S_wake)`` for every fast-weight entry of a mixer's state (``sleep.gate``)."""
    if not slept:
        return slept
    carried = getattr(mixer, "carried_state", ())
    out = dict(slept)
    for key in carried:
        if key in slept and woken is not None and key in woken:
            s_wake = woken[key]
            out[key] = s_wake + g.to(s_wake.dtype) * (slept[key] - s_wake)
    return out


def truncate_states(states: Sequence[Any], mixers: Sequence[torch.nn.Module]) -> list:
    """The states detached (``sleep.truncate``): fast weights and the caches retained under sliding_window
    (which older fast weights produced), so no gradient flows back through anything older."""
    out = []
    for state in states:
        if state:
            state = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in state.items()}
        out.append(state)
    return out


#: Target logits above this many elements (256 MiB in float32) are computed in pieces of positions, each
#: recomputed in the backward pass, so a step never holds more than one piece of (positions, vocab) scores.
LOSS_PIECE_ELEMENTS = 1 << 26


def _piece_loss(model: "SleepModel", h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(summed CE, logits) of features ``h`` (n, d) against targets ``y`` (n,)."""
    logits = model.head(h)
    return F.cross_entropy(_for_loss(logits), y, reduction="sum"), logits


def _for_loss(logits: Tensor) -> Tensor:
    """Half-precision logits upcast for the loss; float32/float64 are kept as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def target_loss(model: "SleepModel", out: Tensor, targets: Tensor, keep_logits: bool = False,
                piece_elements: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Summed cross-entropy of the head at the positions of ``targets`` (B, t) != -100 only, from the coda's
    output features ``out`` (B, t, d): no (B, t, vocab) tensor is made. Where even (targets, vocab) is large
    the positions are taken in pieces, each recomputed in the backward pass. Returns (loss sum, the target
    positions' logits (n, vocab) in row-major order, or None unless ``keep_logits``)."""
    mask = targets != IGNORE_INDEX
    h, y = out[mask], targets[mask]  # (n, d), (n,)
    limit = LOSS_PIECE_ELEMENTS if piece_elements is None else piece_elements
    rows = max(1, limit // max(1, model.vocab_size))
    if keep_logits or h.shape[0] <= rows:
        loss, logits = _piece_loss(model, h, y)
        return loss, (logits if keep_logits else None)
    total = None
    for start in range(0, h.shape[0], rows):
        hp, yp = h[start:start + rows], y[start:start + rows]
        if torch.is_grad_enabled():
            part = activation_checkpoint(lambda a, b: _piece_loss(model, a, b)[0], hp, yp, use_reentrant=False)
        else:
            part = _piece_loss(model, hp, yp)[0]
        total = part if total is None else total + part
    return total, None


def _wake_and_loss(model: "SleepModel", ids: Tensor, targets: Tensor | None, states: list, span: int | None,
                   logits_mode: Any) -> tuple[Tensor, Tensor | None, Tensor | None, list]:
    """The wake pass and the summed CE over ``targets``: (features, logits or None, loss or None, states).
    ``logits_mode``: True (every position's logits), "targets" (the target positions' logits, (n, vocab)) or
    False (none: the head runs at the target positions only, for the loss)."""
    full = logits_mode is True
    feats, out, logits, woken = wake(model, ids, states, span, need_logits=full)
    loss_sum = None
    if targets is not None:
        if full:
            loss_sum = F.cross_entropy(_for_loss(logits).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum")
        else:
            loss_sum, logits = target_loss(model, out, targets, keep_logits=logits_mode == "targets")
    return feats, logits, loss_sum, woken


def _chunk(model: "SleepModel", ids: Tensor, targets: Tensor | None, states: list, passes: int,
           logits_mode: Any, span: int | None, checkpoint: bool = False,
           stabilise: dict | None = None) -> tuple[Tensor | None, Tensor | None, list, Tensor]:
    """Wake + sleep over one training chunk. Returns (logits, summed CE over its targets, states, passes used
    per sequence (B,)); ``stabilise``: :func:`consolidate`'s keyword arguments.
    With ``checkpoint`` the wake pass and each sleep pass are recomputed in the backward pass."""
    args = (model, ids, targets, states, span, logits_mode)
    if checkpoint:
        feats, logits, loss_sum, woken = activation_checkpoint(_wake_and_loss, *args, use_reentrant=False)
    else:
        feats, logits, loss_sum, woken = _wake_and_loss(*args)
    states, used = consolidate(model, feats, woken, states, passes, span, checkpoint, **(stabilise or {}))
    return logits, loss_sum, states, used


def _describe_tensor(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # a numpy array and the like
        return f"a {type(value).__name__} of {value.dtype}, shape {tuple(value.shape)}"
    shown = " ".join(repr(value).split())
    return f"{type(value).__name__} {shown[:80]}{'...' if len(shown) > 80 else ''}"


def _check_ids(name: str, ids: Any, vocab: int, allowed: str, ignore: bool) -> None:
    """``ids`` must be an int64 tensor of shape (batch, seq_len) with values in [0, vocab) (or -100 if
    ``ignore``): one SleepzooError naming ``name``, what was given and what is allowed."""
    what = f"{name} must be a LongTensor (int64) of shape (batch, seq_len) with token ids in {allowed}"
    if not isinstance(ids, Tensor):
        raise SleepzooError(f"{what}; got {_describe_tensor(ids)} (wrap it: torch.tensor(..., dtype=torch.long))")
    if ids.dtype != torch.long:
        hint = " (convert it with .long())" if not ids.is_floating_point() and not ids.is_complex() else ""
        raise SleepzooError(f"{what}; got {_describe_tensor(ids)}{hint}")
    if ids.dim() != 2:
        hint = f" (one sequence? give {name}[None])" if ids.dim() == 1 else ""
        raise SleepzooError(f"{what}; got {_describe_tensor(ids)}{hint}")
    if ids.numel() == 0 or ids.is_meta:
        return  # nothing to read; an empty batch is the caller's to refuse
    bad = (ids < 0) | (ids >= vocab)
    if ignore:
        bad &= ids != IGNORE_INDEX
    if bool(bad.any()):
        raise SleepzooError(f"{name} hold {int(bad.sum())} value(s) outside {allowed} (e.g. {int(ids[bad][0])}; "
                            f"min {int(ids.min())}, max {int(ids.max())}); is the recipe's vocab_size that of "
                            f"the task?")


def check_inputs(model: "SleepModel", input_ids: Any, targets: Any) -> None:
    """What every forward checks first: ``input_ids`` (and ``targets`` unless None) as the model can take them."""
    vocab = model.vocab_size
    _check_ids("input_ids", input_ids, vocab, f"[0, {vocab})", ignore=False)
    if input_ids.shape[0] == 0:
        raise SleepzooError(f"input_ids has no rows (shape {tuple(input_ids.shape)}): give a batch of at least "
                            f"one sequence")
    if input_ids.shape[1] == 0:
        raise SleepzooError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token per "
                            f"sequence")
    if targets is None:
        return
    _check_ids("targets", targets, vocab, f"[0, {vocab}) or {IGNORE_INDEX} (no loss)", ignore=True)
    if targets.shape != input_ids.shape:
        raise SleepzooError(f"targets must have input_ids' shape {tuple(input_ids.shape)} (the target at each "
                            f"position), got {tuple(targets.shape)}")
    if targets.device != input_ids.device:
        raise SleepzooError(f"targets must be on input_ids' device {input_ids.device}, got {targets.device} "
                            f"(move it with .to(input_ids.device))")


def run(model: "SleepModel", input_ids: Tensor, targets: Tensor | None = None, *, window: int, loops: int,
        eviction: Any = "full_flush", sleep_every: int | None = None, checkpoint: bool = False,
        return_logits: bool | str = True, gate: bool = False, pass_norm: bool = False,
        truncate: int | None = None, coda: str = "sleep", max_loops: int | None = None,
        tolerance: float | None = None) -> SleepOutput:
    """Run ``model`` over ``input_ids`` (B, T) chunk by chunk with sleep; see the module docstring.

    ``return_logits``: True gives every position's wake logits (B, T, vocab); False gives none and the head
    runs only at the target positions, for the loss (what training uses: no (B, T, vocab) tensor exists);
    ``"targets"`` gives the target positions' logits as ``.logits`` (n, vocab), row-major over (B, T), the
    positions in ``.target_positions`` (n, 2): what evaluation needs.

    ``gate`` and ``pass_norm``: see :func:`consolidate`. ``truncate=K`` detaches the fast weights after every
    K-th chunk (truncated BPTT in blocks of K windows): a loss sends gradient back through at most K windows
    of fast weights, never through older ones.

    ``loops="auto"`` (adaptive sleep): each sequence takes up to ``max_loops`` passes per window and stops
    when its fast weights change by less than ``tolerance`` (see :func:`consolidate`); ``.passes`` says how
    many each used."""
    passes, tol = rules.check_schedule(loops, max_loops, tolerance)
    check_sleep_args(window, passes)
    stabilise = {**check_stabilisers(model, gate, pass_norm, truncate, coda), "tolerance": tol}
    if not (isinstance(return_logits, bool) or return_logits == "targets"):
        raise SleepzooError(f"return_logits={return_logits!r} is invalid: give True, False or 'targets'")
    if return_logits == "targets" and targets is None:
        raise SleepzooError("return_logits='targets' needs targets: the positions to compute logits at")
    check_inputs(model, input_ids, targets)
    policy = resolve_eviction(eviction, window, sleep_every)
    mixers = model.mixers()
    states: list = [None] * len(mixers)
    bounds = chunk_bounds(input_ids.shape[1], policy.chunk)
    use_ckpt = checkpoint and torch.is_grad_enabled()
    logits_parts: list[Tensor] = []
    positions: list[Tensor] = []
    loss_total: Tensor | None = None
    num_targets = 0 if targets is None else int((targets != IGNORE_INDEX).sum())
    used: list[Tensor] = []
    for c, (start, end) in enumerate(bounds):
        more = c + 1 < len(bounds)  # the chunk is consolidated iff another follows
        ids_c = input_ids[:, start:end]
        tgt_c = None if targets is None else targets[:, start:end]
        if tgt_c is not None and not bool((tgt_c != IGNORE_INDEX).any()):
            tgt_c = None
        logits_c, loss_c, states, used_c = _chunk(model, ids_c, tgt_c, states, passes if more else 1,
                                                  return_logits, policy.span, use_ckpt, stabilise)
        if return_logits is True:
            logits_parts.append(logits_c)
        elif return_logits == "targets" and tgt_c is not None:
            logits_parts.append(logits_c)
            where = (tgt_c != IGNORE_INDEX).nonzero()  # (n_c, 2), row-major within the chunk
            where[:, 1] += start
            positions.append(where)
        if loss_c is not None:
            loss_total = loss_c if loss_total is None else loss_total + loss_c
        if more:
            used.append(used_c)
            states = policy.evict(states, mixers)
            if truncate is not None and (c + 1) % truncate == 0:
                states = truncate_states(states, mixers)
    loss = None
    if targets is not None:
        if num_targets == 0:
            raise SleepzooError("targets has no position != -100: nothing to take a loss on")
        loss = loss_total / num_targets
    logits, target_positions = None, None
    if return_logits is True:
        logits = torch.cat(logits_parts, dim=1)
    elif return_logits == "targets":
        where = torch.cat(positions)
        order = (where[:, 0] * input_ids.shape[1] + where[:, 1]).argsort()  # chunk-major -> row-major
        logits, target_positions = torch.cat(logits_parts)[order], where[order]
    slept = torch.stack(used, dim=1) if used else input_ids.new_zeros((input_ids.shape[0], 0))
    return SleepOutput(loss=loss, logits=logits, num_targets=num_targets, states=states,
                       target_positions=target_positions, passes=slept)


class Stream:
    """Streaming inference: feed tokens in pieces of any size (a prompt, then one token at a time); the model
    sleeps when a chunk is full and the next token arrives, then evicts by policy. Memory stays bounded by
    the window, one chunk of wake features and the fast weights, whatever the length of the stream.

    Its logits equal :func:`run`'s on the same sequence (same window, loops, eviction): both are made of
    :func:`wake` and :func:`consolidate`, and a chunk's wake pass token by token equals it in one piece.
    """

    def __init__(self, model: "SleepModel", *, window: int, loops: int, eviction: Any = "full_flush",
                 sleep_every: int | None = None, gate: bool = False, pass_norm: bool = False,
                 truncate: int | None = None, coda: str = "sleep", max_loops: int | None = None,
                 tolerance: float | None = None):
        self.max_passes, tol = rules.check_schedule(loops, max_loops, tolerance)
        check_sleep_args(window, self.max_passes)
        self.stabilise = {**check_stabilisers(model, gate, pass_norm, truncate, coda),  # truncate: no gradient
                          "tolerance": tol}
        self.model, self.loops = model, loops
        self.max_loops, self.tolerance = (self.max_passes, tol) if tol is not None else (None, None)
        self.policy = resolve_eviction(eviction, window, sleep_every)
        self.mixers = model.mixers()
        self.states: list = [None] * len(self.mixers)
        self.chunk_start: list = self.states  # the caches every pass of the current chunk reads
        self.feats: list[Tensor] = []  # wake features of the current chunk, input of its sleep passes
        self.filled = 0  # tokens of the current chunk seen so far
        self.tokens = 0  # tokens seen in all
        self.sleeps = 0
        self.pass_counts: dict[int, int] = {}  # passes used -> how many (sleep, row) took that many: bounded
        self.batch: int | None = None  # rows, fixed by the first feed (the states hold one memory per row)

    def feed(self, ids: Tensor) -> Tensor:
        """Process new tokens ``ids`` (B, t); return their wake logits (B, t, vocab)."""
        check_inputs(self.model, ids, None)
        if self.batch is not None and ids.shape[0] != self.batch:
            raise SleepzooError(f"Stream.feed: ids have {ids.shape[0]} rows but this stream holds the memory of "
                                f"{self.batch} (its first feed, or the memory it was loaded from); feed "
                                f"({self.batch}, t) ids, or start a new stream")
        self.batch = ids.shape[0]
        out = []
        pos = 0
        while pos < ids.shape[1]:
            if self.filled == self.policy.chunk:
                self.sleep()
            take = min(self.policy.chunk - self.filled, ids.shape[1] - pos)
            feats, _, logits, self.states = wake(self.model, ids[:, pos:pos + take], self.states, self.policy.span)
            self.feats.append(feats)
            out.append(logits)
            self.filled += take
            pos += take
        self.tokens += ids.shape[1]
        return torch.cat(out, dim=1)

    def fork(self) -> "Stream":
        """An independent stream in this one's state (e.g. several continuations of one prompt): states are
        shared until either stream replaces them, which is safe because the engine never changes a state
        tensor in place."""
        other = copy.copy(self)
        other.states, other.feats, other.pass_counts = list(self.states), list(self.feats), dict(self.pass_counts)
        other.chunk_start = other.states if self.chunk_start is self.states else list(self.chunk_start)
        return other

    def save(self, path: Any) -> Any:
        """Write this stream's memory (fast weights, retained caches, the current chunk, its position) to one
        file, atomically, so that :meth:`load` in another process continues it exactly (sleepzoo.memory)."""
        from .memory import save_stream

        return save_stream(self, path)

    @classmethod
    def load(cls, model: "SleepModel", path: Any, **settings: Any) -> "Stream":
        """The stream saved at ``path``, over ``model``: its settings come from the file (any given must match
        them); another model, other weights or other settings are one error naming what differs."""
        from .memory import load_stream

        return load_stream(model, path, **settings)

    def pass_summary(self) -> dict:
        """The passes used so far, over every sleep and row (as :func:`pass_summary` gives them)."""
        return summary_of_counts(self.pass_counts)

    def sleep(self) -> None:
        """Consolidate the current chunk (passes 2..loops) and evict; the next token starts a new chunk."""
        feats = torch.cat(self.feats, dim=1)  # (B, chunk, d)
        states, used = consolidate(self.model, feats, self.states, self.chunk_start, self.max_passes,
                                   self.policy.span, **self.stabilise)
        if self.tolerance is None or used.is_meta:  # a fixed count (or sizes only): known without a device sync
            self.pass_counts[self.max_passes] = self.pass_counts.get(self.max_passes, 0) + used.shape[0]
        else:
            for n in used.tolist():
                self.pass_counts[n] = self.pass_counts.get(n, 0) + 1
        self.states = self.chunk_start = self.policy.evict(states, self.mixers)
        self.feats, self.filled = [], 0
        self.sleeps += 1
