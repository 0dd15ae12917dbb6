"""flash-attn 2 as sleepzoo's ``attention`` back end ``flash_attn``.

flash-attn is imported at the top on purpose: without it this module does not import, and sleepzoo's
registry reports a :class:`~sleepzoo.registry.MissingDependencyError` naming ``flash_attn`` when the back end
is asked for (at model build), rather than a failure deep inside the first forward pass.
"""

from __future__ import annotations

import torch
from flash_attn import flash_attn_func
from sleepzoo import backends
from torch import Tensor

__all__ = ["flash_attn"]

_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256
_MIN_CAPABILITY = (8, 0)  # flash-attn 2: Ampere or newer


def flash_attn(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, window: int | None = None,
               scale: float | None = None) -> Tensor:
    """Softmax attention with ``flash_attn_func``; sleepzoo's back-end contract (see ``sleepzoo.mixers.attention``).

    q (B, H, T, D); k, v (B, Hkv, S, D), S >= T, the queries being the last T key positions; returns
    (B, H, T, D). ``window`` keys per query, itself included (``None``: all). GQA is native in flash-attn.
    """
    # flash-attn >= 2.1 aligns the causal mask bottom-right when S > T; (-1, -1) is an unlimited window
    window_size = (window - 1, 0) if causal and window is not None else (-1, -1)
    o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, T|S, H|Hkv, D)
                        softmax_scale=scale, causal=causal, window_size=window_size)
    return o.transpose(1, 2)  # (B, H, T, D)


def _unsupported(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None) -> str | None:
    if q.device.type != "cuda":
        return f"flash_attn needs CUDA tensors, got {q.device.type}"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"flash_attn needs float16/bfloat16 q, k and v, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"flash_attn supports head_dim <= {_MAX_HEAD_DIM}, got {q.shape[-1]}"
    capability = backends.cuda_capability(q.device)
    if capability < _MIN_CAPABILITY:
        return f"flash_attn 2 needs a GPU of compute capability >= 8.0, got {capability[0]}.{capability[1]}"
    return None


flash_attn.unsupported = _unsupported
