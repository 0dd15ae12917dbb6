"""Optional dependencies and accelerated back ends: the one module that knows what can run where.

Accelerated code (flash-attn, xformers, fla's Triton kernels, torch's flex attention) runs only on some devices,
dtypes and torch builds. Everything that needs to know asks here, so the checks, their cached results and the
wording of the reasons live in one place:

* :func:`import_problem`: can an optional module be imported? (``None``, or why not; tried once, cached);
* :func:`needs_grad`: will autograd have to differentiate through a call? (some kernels have no backward);
* :func:`cuda_capability`: a CUDA device's compute capability (cached);
* :func:`flex_attention_problem`: can ``torch.nn.attention.flex_attention`` run a call like this one here?
  (a tiny call, tried once per device type, dtype, head size and grad mode, cached);
* :func:`flex_attention_callable`: that function, compiled where compiling is what makes it fast (CUDA);
* :func:`warn_fallback`: announce, once per back end and reason, that the reference path runs instead.

A back end that can not run on some inputs says so through ``unsupported(...) -> str | None`` (the reason, or
``None``); its caller then runs the reference implementation and announces it with a
:class:`BackendFallbackWarning`. A back end whose *package* is missing is a different matter: the registry
reports it as :class:`sleepzoo.registry.MissingDependencyError` when the name is first asked for.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "BackendFallbackWarning",
    "warn_fallback",
    "import_problem",
    "needs_grad",
    "cuda_capability",
    "flex_attention_problem",
    "flex_attention_callable",
]


class BackendFallbackWarning(UserWarning):
    """An accelerated back end can not run on these inputs, so the reference implementation runs instead."""


# (back end, reason) pairs already announced in this process
_announced: set[tuple[str, str]] = set()


def warn_fallback(backend: str, reason: str, fallback: str, *, stacklevel: int = 3) -> None:
    """Warn that ``backend`` can not run (``reason``) and ``fallback`` runs instead; once per (backend, reason).

    ``stacklevel`` 3 points at the caller of the function that decided to fall back.
    """
    key = (backend, reason)
    if key in _announced:
        return
    _announced.add(key)
    warnings.warn(f"{backend}: {reason}; falling back to {fallback} (announced once per back end and reason)",
                  BackendFallbackWarning, stacklevel=stacklevel)


@functools.lru_cache(maxsize=None)
def import_problem(module: str) -> str | None:
    """``None`` when ``module`` imports, else why not (the exception, e.g. a missing ``triton``). Tried once.

    Any exception counts, not only a missing module: a half-working install (a Triton that does not match the
    CUDA driver, say) should make a back end fall back, not crash the model.
    """
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001  (reported, never swallowed silently)
        return f"{module} can not be imported ({type(exc).__name__}: {exc})"
    return None


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will differentiate through a call on ``tensors`` (grad mode on and one requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability ``(major, minor)`` of a CUDA ``device`` (cached per device index)."""
    return _capability(torch.cuda.current_device() if device.index is None else device.index)


# ----------------------------------------------------------------------------------------------------------------
# torch's flex attention


@functools.lru_cache(maxsize=None)
def flex_attention_callable(device_type: str) -> Callable:
    """``torch.nn.attention.flex_attention.flex_attention`` for tensors on ``device_type``.

    On CUDA it is compiled: uncompiled flex attention materialises the whole score matrix, which defeats its
    purpose. Elsewhere it runs eagerly (torch's unfused reference implementation): compiling for the CPU needs a
    C++ tool chain and minutes, and the CPU path is there for correctness, not speed.
    """
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return torch.compile(flex_attention)
    return flex_attention


def _flex_probe(device_type: str, dtype: torch.dtype, head_dim: int, grad: bool) -> None:
    """One tiny causal GQA call (and its backward when ``grad``); raises whatever flex attention raises."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device(device_type)
    q = torch.randn(1, 2, 4, head_dim, device=device, dtype=dtype, requires_grad=grad)
    k = torch.randn(1, 1, 4, head_dim, device=device, dtype=dtype, requires_grad=grad)
    v = torch.randn(1, 1, 4, head_dim, device=device, dtype=dtype, requires_grad=grad)
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, 4, 4, device=device)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = flex_attention_callable(device_type)(q, k, v, block_mask=mask, enable_gqa=True)
        if grad:
            out.sum().backward()


@functools.lru_cache(maxsize=None)
def flex_attention_problem(device_type: str, dtype: torch.dtype, head_dim: int, grad: bool) -> str | None:
    """``None`` when flex attention runs for these settings on ``device_type``, else why not.

    Support differs between torch versions and devices (e.g. no backward on the CPU), so rather than keeping a
    table of versions this tries a tiny call once per (device type, dtype, head size, grad mode) and caches it.
    """
    missing = import_problem("torch.nn.attention.flex_attention")
    if missing is not None:
        return f"flex attention is not in torch {torch.__version__}: {missing}"
    mode = "with gradients" if grad else "without gradients"
    try:
        _flex_probe(device_type, dtype, head_dim, grad)
    except Exception as exc:  # noqa: BLE001  (the reason is reported by the caller's fallback warning)
        first_line = (str(exc).strip().splitlines() or [""])[0].rstrip(".")
        return (f"flex attention does not run on {device_type} in {dtype} (head_dim {head_dim}, {mode}) with "
                f"torch {torch.__version__}: {type(exc).__name__}: {first_line}")
    return None
