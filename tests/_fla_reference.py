"""fla-core's naive PyTorch references for the gated delta rule, loaded without importing ``fla``.

``import fla`` pulls in triton (absent on CPU-only machines), so instead of importing the package we locate it
with :func:`importlib.util.find_spec` (which does not execute ``fla/__init__.py``) and load the single file
``fla/ops/gated_delta_rule/naive.py`` as a standalone module. That file only needs torch and einops.

Exposes ``naive_recurrent_gated_delta_rule`` and ``naive_chunk_gated_delta_rule`` (each ``None`` when fla-core
or einops is not installed) and ``UNAVAILABLE_REASON`` (``None`` when both loaded). Note their argument orders
differ: ``naive_recurrent_gated_delta_rule(q, k, v, beta, g, ...)`` but
``naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=64, ...)``; both compute in float32.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

__all__ = ["naive_recurrent_gated_delta_rule", "naive_chunk_gated_delta_rule", "UNAVAILABLE_REASON"]

_NAIVE_RELPATH = os.path.join("ops", "gated_delta_rule", "naive.py")


def _load() -> tuple[ModuleType | None, str | None]:
    """Return ``(module, None)`` or ``(None, reason)``."""
    try:
        spec = importlib.util.find_spec("fla")
    except (ImportError, ValueError) as exc:  # a broken install can raise while locating
        return None, f"fla-core could not be located: {exc}"
    if spec is None or not spec.submodule_search_locations:
        return None, "fla-core is not installed"
    for root in spec.submodule_search_locations:
        path = os.path.join(root, _NAIVE_RELPATH)
        if os.path.isfile(path):
            break
    else:
        return None, f"fla-core is installed but has no {_NAIVE_RELPATH}"
    if importlib.util.find_spec("einops") is None:
        return None, "fla-core's naive reference needs einops, which is not installed"
    mod_spec = importlib.util.spec_from_file_location("_sleepzoo_fla_naive_gated_delta", path)
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
