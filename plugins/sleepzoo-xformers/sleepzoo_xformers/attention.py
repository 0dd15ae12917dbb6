"""xformers' ``memory_efficient_attention`` as sleepzoo's ``attention`` back end ``xformers``.

xformers is imported at the top on purpose: without it this module does not import, and sleepzoo's registry
reports a :class:`~sleepzoo.registry.MissingDependencyError` naming ``xformers`` when the back end is asked
for (at model build), rather than a failure inside the first forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor
from xformers.ops import memory_efficient_attention
from xformers.ops.fmha.attn_bias import LowerTriangularFromBottomRightLocalAttentionMask, LowerTriangularFromBottomRightMask

__all__ = ["xformers"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def xformers(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, window: int | None = None,
             scale: float | None = None) -> Tensor:
    """Softmax attention with ``memory_efficient_attention``; sleepzoo's back-end contract.

    q (B, H, T, D); k, v (B, Hkv, S, D), S >= T, the queries being the last T key positions; returns
    (B, H, T, D). ``window`` keys per query, itself included (``None``: all).
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if not causal:
        bias = None
    elif window is None:
        bias = LowerTriangularFromBottomRightMask()
    else:
        bias = LowerTriangularFromBottomRightLocalAttentionMask(window)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T|S, H|Hkv, D)
    if Hkv != H:
        # 5-D (B, M, G, H/G, D): query head h = g * (H/Hkv) + r reads K/V head g (as repeat_interleave);
        # K/V are expanded over r, not copied
        rep = H // Hkv
        q = q.reshape(B, T, Hkv, rep, D)
        k = k.unsqueeze(3).expand(B, S, Hkv, rep, D)
        v = v.unsqueeze(3).expand(B, S, Hkv, rep, v.shape[-1])
    o = memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)  # (B, T, [Hkv, rep | H], D)
    return o.reshape(B, T, H, o.shape[-1]).transpose(1, 2)  # (B, H, T, D)


def _unsupported(q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None) -> str | None:
    if q.device.type != "cuda":
        return f"xformers needs CUDA tensors, got {q.device.type}"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"xformers needs float16/bfloat16/float32 q, k and v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    return None


xformers.unsupported = _unsupported
