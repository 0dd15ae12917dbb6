"""Softmax attention mixer (GQA + RoPE) and its reference back end.

Attention back ends are plugins of kind ``attention``: a function
``backend(q, k, v, *, causal, window, scale) -> o`` with q (B, H, T, D), k and v (B, Hkv, S, D), S >= T, the
queries being the last T keys' positions, o (B, H, T, D). ``sdpa`` is the reference and runs everywhere; ``flex``
(torch's flex attention) is built in; flash-attn and xformers come as plugins.

A back end that can not run on some inputs (wrong device, dtype or head size; no backward) may say so with an
attribute ``backend.unsupported(q, k, v, *, window) -> str | None``: the reason, or ``None`` when it can run.
:func:`attend` asks before every call (the check is cheap) and runs ``sdpa`` instead when there is a reason,
announcing it once per (back end, reason) with a :class:`sleepzoo.backends.BackendFallbackWarning`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends, registry
from ..registry import SleepzooError
from . import MixerState


def attention_mask(q_len: int, k_len: int, window: int | None, device: torch.device) -> Tensor:
    """Boolean (q_len, k_len) mask, True = may attend. Queries are the last ``q_len`` of the ``k_len`` keys
    (bottom-right aligned, as with a KV cache): causal, and at most ``window`` keys (itself included)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, window: int | None = None,
                   scale: float | None = None) -> Tensor:
    """Reference back end: ``torch.nn.functional.scaled_dot_product_attention``; GQA by repeating K/V heads.

    q (B, H, T, D); k, v (B, Hkv, S, D) with S >= T: the queries are the last T positions of the keys.
    ``window`` limits each query to its ``window`` most recent keys (itself included).
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(n_rep, dim=1)
    T, S = q.shape[2], k.shape[2]
    if not causal:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if S == T and (window is None or window >= T):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = attention_mask(T, S, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, window: int | None = None,
                   scale: float | None = None) -> Tensor:
    """torch's ``flex_attention`` with a block mask: causal, at most ``window`` keys, queries bottom-right aligned.

    Same contract as :func:`sdpa_attention`; GQA through ``enable_gqa`` (query head h reads K/V head
    ``h // (H / Hkv)``, as ``repeat_interleave`` does). Compiled on CUDA, eager elsewhere. Where it can not run
    (e.g. backward on the CPU in some torch versions) ``flex_attention.unsupported`` says why, found by a tiny
    trial call (:func:`sleepzoo.backends.flex_attention_problem`), and :func:`attend` runs ``sdpa`` instead.
    """
    T, S = q.shape[2], k.shape[2]
    block_mask = _flex_block_mask(T, S, window, q.device) if causal else None
    run = backends.flex_attention_callable(q.device.type)
    enable_gqa = q.shape[1] != k.shape[1]
    if q.device.type == "cuda":
        return run(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    with warnings.catch_warnings():  # the eager path is the intended one off CUDA: no advice to compile it
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return run(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


@functools.lru_cache(maxsize=64)
def _flex_block_mask(q_len: int, k_len: int, window: int | None, device: torch.device):
    """The :func:`attention_mask` pattern as a flex ``BlockMask`` (cached: building one costs a vmap).

    The offset and window are captured as tensors, not Python numbers, so that a compiled flex attention
    sees the same ``mask_mod`` code with new tensor values, rather than a new function to recompile, as the
    cache grows during decoding.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    offset = torch.tensor(k_len - q_len, device=device)
    span = torch.tensor(k_len if window is None else window, device=device)

    def bottom_right_window(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        return (kv_idx <= q_pos) & (kv_idx > q_pos - span)

    return create_block_mask(bottom_right_window, None, None, q_len, k_len, device=device)


def _flex_unsupported(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None) -> str | None:
    return backends.flex_attention_problem(q.device.type, q.dtype, q.shape[-1], backends.needs_grad(q, k, v))


flex_attention.unsupported = _flex_unsupported


def attend(backend: Callable, name: str, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
           window: int | None = None, scale: float | None = None) -> Tensor:
    """``backend(q, k, v, ...)``, or :func:`sdpa_attention` when ``backend.unsupported`` gives a reason.

    ``name`` is the back end's registered name, used in the fallback warning (once per name and reason).
    """
    unsupported = getattr(backend, "unsupported", None)
    if unsupported is not None:
        reason = unsupported(q, k, v, window=window)
        if reason is not None:
            backends.warn_fallback(f"attention back end {name!r}", reason, "'sdpa'")
            backend = sdpa_attention
    return backend(q, k, v, causal=causal, window=window, scale=scale)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables (T, head_dim) for rotary embeddings in the half-split (Llama/Qwen) layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, D) by position; pairs are (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


KV_CACHES = ("buffer", "concat")


class KVBuffer:
    """Preallocated K/V storage of one attention layer, appended to in place while decoding without gradients.

    ``k``, ``v``: (B, Hkv, capacity, D). A state never holds the buffer alone: it holds the views
    ``k[:, :, :n]``, ``v[:, :, :n]`` of the ``n`` tokens it caches, and the buffer as ``state["kv_buffer"]``.
    ``used`` is the number of slots any state has written. A state may write its new tokens in place only when
    it is the *tip* (``n == used``): the slots it writes are then ones no other state's view covers, so every
    existing view (a fork's, the start of the chunk that the sleep passes re-read) keeps its values, and the
    engine's rule that a state tensor never changes in place still holds for everything a state can see. A
    state that is not the tip (the second of two forks to decode, a sleep pass over the chunk's start) copies
    its ``n`` tokens into a buffer of its own first: copy-on-write, once per fork.
    """

    __slots__ = ("k", "v", "used")

    def __init__(self, k: Tensor, v: Tensor, capacity: int):
        """An empty buffer for ``capacity`` tokens shaped, typed and placed like ``k`` and ``v`` (B, Hkv, *, D)."""
        B, H, _, D = k.shape
        self.k = k.new_empty(B, H, capacity, D)
        self.v = v.new_empty(B, H, capacity, v.shape[-1])
        self.used = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def appendable(self, k: Tensor, k_new: Tensor, v_new: Tensor) -> bool:
        """Whether the state whose key view is ``k`` may write ``k_new``, ``v_new`` in place: it is the tip,
        they fit, they match the buffer, and the buffer may be written here (an inference-mode tensor can
        not be written outside inference mode)."""
        n, t = k.shape[2], k_new.shape[2]
        return (n == self.used and n + t <= self.capacity and k.storage_offset() == 0  # a prefix of self.k
                and k.untyped_storage().data_ptr() == self.k.untyped_storage().data_ptr()
                and k_new.dtype == self.k.dtype and v_new.dtype == self.v.dtype and k_new.device == self.k.device
                and k_new.shape[:2] == self.k.shape[:2] and k_new.shape[3] == self.k.shape[3]
                and v_new.shape[3] == self.v.shape[3]
                and (torch.is_inference_mode_enabled() or not self.k.is_inference()))

    def append(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k_new``, ``v_new`` (B, Hkv, t, D) after the ``used`` slots; return the views of all of them."""
        n, t = self.used, k_new.shape[2]
        self.k[:, :, n:n + t].copy_(k_new)
        self.v[:, :, n:n + t].copy_(v_new)
        self.used = n + t
        return self.k[:, :, :n + t], self.v[:, :, :n + t]


def kv_capacity(need: int, span: int | None, previous: int | None = None) -> int:
    """Slots for a new buffer that must hold ``need`` tokens now.

    At least the capacity of the buffer it replaces (``previous``: a fork's copy is as large as the original),
    and under a span (sliding-window eviction) ``2 span - 1``: the ``span - 1`` retained tokens plus a chunk of at
    most ``span`` new ones, all a sliding window ever holds, so its buffer never grows. Without a span, at least
    16 slots. When ``need`` is more, the capacity doubles (``2 need``, or twice ``previous``), so that a cache
    of unknown size (the first window under ``full_flush``, whose length the mixer is not told) costs amortised
    O(1) copies per token; after the first eviction the buffer is exactly the window (:meth:`Attention.evict`).
    """
    floor = max(previous or 0, 2 * span - 1 if span is not None else 16)  # 16: no doubling every token
    if need <= floor:
        return floor
    return max(need, 2 * (previous or need))


def _cache(k_new: Tensor, v_new: Tensor, state: MixerState, span: int | None) -> tuple[Tensor, Tensor, KVBuffer]:
    """K/V of the cached tokens of ``state`` followed by ``k_new``, ``v_new``, held in a :class:`KVBuffer`:
    written in place when ``state`` is its buffer's tip, else copied with the cached tokens into a new one."""
    old = None if state is None else state.get("kv_buffer")
    if state is not None and old is not None and old.appendable(state["k"], k_new, v_new):
        k, v = old.append(k_new, v_new)
        return k, v, old
    n = 0 if state is None else state["k"].shape[2]
    capacity = kv_capacity(n + k_new.shape[2], span, None if old is None else old.capacity)
    if n:
        k_old, v_old = state["k"], state["v"]
        like_k = k_new.to(torch.promote_types(k_old.dtype, k_new.dtype))  # what torch.cat would give
        like_v = v_new.to(torch.promote_types(v_old.dtype, v_new.dtype))
        buf = KVBuffer(like_k, like_v, capacity)
        buf.append(k_old, v_old)
    else:
        buf = KVBuffer(k_new, v_new, capacity)
    k, v = buf.append(k_new, v_new)
    return k, v, buf


def visible_keys(k: Tensor, v: Tensor, T: int, window: int | None) -> tuple[Tensor, Tensor, bool, int | None]:
    """What ``T`` new queries (the last ``T`` of the keys ``k``, ``v`` (B, Hkv, S, D)) can see, as the arguments
    of an attention call: ``(k, v, causal, window)``. Only the last ``window + T - 1`` keys are in reach of any of
    them, so the rest is not read; a single query sees every key left, so it needs no mask at all (a
    causal, windowed call would give the same result, masking nothing). Used by decoding without gradients,
    where this is a view of the cache and reading is the whole cost of a token's attention."""
    S = k.shape[2]
    if window is not None and S > window + T - 1:
        k, v = k[:, :, S - (window + T - 1):], v[:, :, S - (window + T - 1):]
    if T == 1:
        return k, v, False, None
    return k, v, True, window


class Attention(nn.Module):
    """Causal multi-head softmax attention with grouped K/V heads (GQA) and rotary positions.

    Causal within the window the engine hands it; under hard eviction positions restart at 0 in every
    window, so it never sees evicted tokens. Parameters: q_proj (d, H*D), k_proj and v_proj (d, Hkv*D),
    o_proj (H*D, d): ``d*D*(2H + 2Hkv)`` weights (+ biases with ``qkv_bias``).

    Args:
        d_model: model width.
        num_heads: query heads H (default 4).
        num_kv_heads: key/value heads Hkv, must divide H (default: H, i.e. plain MHA).
        head_dim: D (default d_model // num_heads).
        rope_theta: RoPE base (default 10000.0).
        qkv_bias: biases on q/k/v projections, as in Qwen2 (default False).
        window: sliding-window attention: each query sees its ``window`` most recent tokens (default None:
            all tokens in the cache). The engine's sliding-window eviction narrows it further to ``span``.
        backend: name of an ``attention`` plugin (default "sdpa"); where it can not run on the inputs it gets
            (see :func:`attend`), ``sdpa`` runs instead, announced once.
        layer_idx: position in the stack (for messages).
        kv_cache: how the K/V cache grows while decoding without gradients: ``"buffer"`` (default) writes each
            token in place into a preallocated :class:`KVBuffer` (copy-on-write when a stream is forked), so a
            token costs no copy of the tokens already cached, only their attention read; ``"concat"`` builds a
            new cache per call by concatenation (the old path, kept as the ``wake`` benchmark's reference). With
            gradients enabled (training) the cache is always concatenated: autograd needs every state tensor to
            stay as it was made, so training is the same either way.
    """

    carried_state: tuple[str, ...] = ()  # attention has no fast weights: everything is cache

    def __init__(self, d_model: int, *, num_heads: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, rope_theta: float = 10000.0, qkv_bias: bool = False,
                 window: int | None = None, backend: str = "sdpa", layer_idx: int | None = None,
                 kv_cache: str = "buffer"):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = d_model // num_heads if head_dim is None else head_dim
        where = f"attention (layer {layer_idx})"
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise SleepzooError(f"{where}: num_kv_heads={num_kv_heads} must be >= 1 and divide num_heads={num_heads}")
        if head_dim < 2 or head_dim % 2:
            raise SleepzooError(f"{where}: head_dim={head_dim} must be even and >= 2 (RoPE rotates pairs)")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        if window is not None and window < 1:
            raise SleepzooError(f"{where}: window={window} must be >= 1 (or null for no sliding window)")
        if kv_cache not in KV_CACHES:
            raise SleepzooError(f"{where}: kv_cache={kv_cache!r} must be one of {', '.join(map(repr, KV_CACHES))}")
        self.kv_cache = kv_cache
        self.rope_theta = rope_theta
        self.window = window
        self.layer_idx = layer_idx
        self.backend_name = backend
        self.backend = registry.get("attention", backend)
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, d_model, bias=False)

    def forward(self, x: Tensor, state: MixerState = None, *, span: int | None = None) -> tuple[Tensor, MixerState]:
        """Attend over the cached tokens of ``state`` and ``x``; the returned state caches both.

        State: ``k``, ``v`` (B, Hkv, S, D) rotated keys and values of the cached tokens, ``offset`` the
        position of the next token (RoPE is relative, so absolute positions only need to be consistent), and
        without gradients ``kv_buffer``, the :class:`KVBuffer` that ``k`` and ``v`` are views of.
        """
        B, T, _ = x.shape
        offset = 0 if state is None else state["offset"]
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        positions = torch.arange(offset, offset + T, device=x.device)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        window = self.window if span is None else span if self.window is None else min(span, self.window)
        new_state: dict = {"offset": offset + T}
        causal = True
        if self.kv_cache == "buffer" and not torch.is_grad_enabled():
            k_all, v_all, new_state["kv_buffer"] = _cache(k, v, state, span)
            if state is not None and state["k"].shape[2]:  # else the new tokens alone, as without a cache
                k, v, causal, window = visible_keys(k_all, v_all, T, window)
        else:
            k_all = k if state is None else torch.cat([state["k"], k], dim=2)  # (B, Hkv, S, D)
            v_all = v if state is None else torch.cat([state["v"], v], dim=2)
            k, v = k_all, v_all
        new_state["k"], new_state["v"] = k_all, v_all
        o = attend(self.backend, self.backend_name, q, k, v, causal=causal, window=window,
                   scale=self.head_dim ** -0.5)  # (B, H, T, D)
        o = o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(o), new_state

    def evict(self, state: MixerState, retain: int) -> MixerState:
        """Keep the K/V of the last ``retain`` tokens (and the position count); none: a fresh window.

        A state with a :class:`KVBuffer` (decoding without gradients) is compacted here, once per window: the
        retained tokens are copied to the front of a new buffer of the same capacity, so the next window
        appends in place again. With ``retain = 0`` it becomes an empty state (offset 0, nothing cached) with
        a buffer of exactly the window just completed, so every later window is preallocated.
        """
        if state is None:
            return None
        buf = state.get("kv_buffer")
        if buf is None or torch.is_grad_enabled():
            if retain <= 0:
                return None
            return {"k": state["k"][:, :, -retain:], "v": state["v"][:, :, -retain:], "offset": state["offset"]}
        n = state["k"].shape[2]
        kept = min(max(retain, 0), n)
        new = KVBuffer(state["k"], state["v"], n if kept == 0 and n else buf.capacity)
        k, v = new.append(state["k"][:, :, n - kept:], state["v"][:, :, n - kept:])
        return {"k": k, "v": v, "offset": state["offset"] if kept else 0, "kv_buffer": new}
