"""fla-core's naive PyTorch references (independent checks of sleepzoo's ops), loaded without importing ``fla``.

``import fla`` pulls in triton (absent on CPU-only machines), so instead of importing the package we locate it
with :func:`importlib.util.find_spec` (which does not execute ``fla/__init__.py``) and load single files
``fla/ops/<op>/naive.py`` as standalone modules. Those files only need torch and einops.

Gated delta rule (``fla/ops/gated_delta_rule/naive.py``): ``naive_recurrent_gated_delta_rule`` and
``naive_chunk_gated_delta_rule`` (each ``None`` when fla-core or einops is not installed) and
``UNAVAILABLE_REASON`` (``None`` when both loaded). Note their argument orders differ:
``naive_recurrent_gated_delta_rule(q, k, v, beta, g, ...)`` but
``naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=64, ...)``; both compute in float32.

Scalar-decay gated linear attention (``fla/ops/simple_gla/naive.py``, no ``beta``):
``naive_recurrent_simple_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=True)``,
``naive_chunk_simple_gla(q, k, v, g, initial_state=None, output_final_state=False, chunk_size=64, scale=None)``
and ``naive_parallel_simple_gla(q, k, v, g, scale=None) -> (o, attention)`` (zero initial state, no final
state); ``SIMPLE_GLA_UNAVAILABLE_REASON``.

Linear attention (``fla/ops/linear_attn/naive.py``, no decay, no ``beta``):
``naive_recurrent_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False)`` and
``naive_chunk_linear_attn(q, k, v, scale=None) -> o`` (``T`` a multiple of 64, zero initial state, no final
state); ``LINEAR_ATTN_UNAVAILABLE_REASON``. All compute in float32.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

__all__ = [
    "naive_recurrent_gated_delta_rule",
    "naive_chunk_gated_delta_rule",
    "UNAVAILABLE_REASON",
    "naive_recurrent_simple_gla",
    "naive_chunk_simple_gla",
    "naive_parallel_simple_gla",
    "SIMPLE_GLA_UNAVAILABLE_REASON",
    "naive_recurrent_linear_attn",
    "naive_chunk_linear_attn",
    "LINEAR_ATTN_UNAVAILABLE_REASON",
]

_NAIVE_RELPATH = os.path.join("ops", "gated_delta_rule", "naive.py")


def _load(op: str = "gated_delta_rule") -> tuple[ModuleType | None, str | None]:
    """Load ``fla/ops/<op>/naive.py``; return ``(module, None)`` or ``(None, reason)``."""
    naive_relpath = os.path.join("ops", op, "naive.py")
    try:
        spec = importlib.util.find_spec("fla")
    except (ImportError, ValueError) as exc:  # a broken install can raise while locating
        return None, f"fla-core could not be located: {exc}"
    if spec is None or not spec.submodule_search_locations:
        return None, "fla-core is not installed"
    for root in spec.submodule_search_locations:
        path = os.path.join(root, naive_relpath)
        if os.path.isfile(path):
            break
    else:
        return None, f"fla-core is installed but has no {naive_relpath}"
    if importlib.util.find_spec("einops") is None:
        return None, "fla-core's naive reference needs einops, which is not installed"
    module_name = "_sleepzoo_fla_naive_gated_delta" if op == "gated_delta_rule" else f"_sleepzoo_fla_naive_{op}"
    mod_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure means "reference unavailable", with the reason
        return None, f"loading {path} failed: {type(exc).__name__}: {exc}"
    return module, None


_module, UNAVAILABLE_REASON = _load()
naive_recurrent_gated_delta_rule = getattr(_module, "naive_recurrent_gated_delta_rule", None)
naive_chunk_gated_delta_rule = getattr(_module, "naive_chunk_gated_delta_rule", None)
if _module is not None and (naive_recurrent_gated_delta_rule is None or naive_chunk_gated_delta_rule is None):
    UNAVAILABLE_REASON = "fla-core's naive.py lacks the expected functions"
    naive_recurrent_gated_delta_rule = naive_chunk_gated_delta_rule = None


def _load_functions(op: str, names: tuple[str, ...]) -> tuple[list, str | None]:
    """The functions ``names`` of ``fla/ops/<op>/naive.py`` (all ``None`` unless every one loaded), and a reason."""
    module, reason = _load(op)
    functions = [getattr(module, name, None) for name in names]
    if module is not None and any(f is None for f in functions):
        missing = ", ".join(n for n, f in zip(names, functions) if f is None)
        reason = f"fla-core's {op}/naive.py lacks {missing}"
    if reason is not None:
        functions = [None] * len(names)
    return functions, reason


(naive_recurrent_simple_gla, naive_chunk_simple_gla, naive_parallel_simple_gla), SIMPLE_GLA_UNAVAILABLE_REASON = (
    _load_functions("simple_gla", ("naive_recurrent_simple_gla", "naive_chunk_simple_gla", "naive_parallel_simple_gla"))
)
(naive_recurrent_linear_attn, naive_chunk_linear_attn), LINEAR_ATTN_UNAVAILABLE_REASON = _load_functions(
    "linear_attn", ("naive_recurrent_linear_attn", "naive_chunk_linear_attn")
)
