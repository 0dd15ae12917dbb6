"""fla-core's naive PyTorch references, loaded without importing ``fla``.

``import fla`` pulls in triton (absent on CPU-only machines), so instead of importing the package this locates
it with :func:`importlib.util.find_spec` (which does not execute ``fla/__init__.py``) and loads the single file
``fla/ops/<op>/naive.py`` as a standalone module; those files only need torch and einops. ``sleepzoo bench ops``
times our chunked op against fla's naive chunk with it; the tests check our ops' values against these files
(``tests/_fla_reference.py``).
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType


def load_naive(op: str = "gated_delta_rule") -> tuple[ModuleType | None, str | None]:
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
