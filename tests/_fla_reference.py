"""fla-core's naive PyTorch references: independent checks of sleepzoo's ops in the tests (a test helper).

The files are loaded without importing ``fla`` (see :mod:`sleepzoo.benchmarks.fla_naive`).

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

from sleepzoo.benchmarks.fla_naive import load_naive

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


_module, UNAVAILABLE_REASON = load_naive()
naive_recurrent_gated_delta_rule = getattr(_module, "naive_recurrent_gated_delta_rule", None)
naive_chunk_gated_delta_rule = getattr(_module, "naive_chunk_gated_delta_rule", None)
if _module is not None and (naive_recurrent_gated_delta_rule is None or naive_chunk_gated_delta_rule is None):
    UNAVAILABLE_REASON = "fla-core's naive.py lacks the expected functions"
    naive_recurrent_gated_delta_rule = naive_chunk_gated_delta_rule = None


def _load_functions(op: str, names: tuple[str, ...]) -> tuple[list, str | None]:
    """The functions ``names`` of ``fla/ops/<op>/naive.py`` (all ``None`` unless every one loaded), and a reason."""
    module, reason = load_naive(op)
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
