"""Forward+backward speed of the fast-weight rule ops (pytest-benchmark).

Shape: B=2, T=1024, H=4, K=V=64, float32, gradients into q, k, v, g, beta and the final state is used.
For the gated delta rule, compares the chunked op, the step-by-step recurrent op and fla-core's naive chunk
reference (skipped when fla-core is missing). For the scalar-decay gated linear rule (Mamba2 / simple GLA),
the same three (fla's ``naive_chunk_simple_gla``, with beta folded into v); for the plain linear rule, chunked
vs recurrent (``g`` is passed and ignored). Run with::

    PYTHONPATH=. python -m pytest bench/test_bench_ops.py -p no:cacheprovider -o addopts="" --benchmark-only

or ``PYTHONPATH=. python bench/test_bench_ops.py`` for a plain table of timings and ratios.

Acceptance (checked here, never in tests/): for each rule, the chunked op is >= 5x faster than its recurrent op
and no slower than fla's naive chunk reference. Each comparison test records ``speedup_of_chunked`` in
``extra_info``. Op names: ``chunked`` / ``recurrent`` / ``fla_naive_chunk`` are the gated delta rule's;
the other rules' are prefixed ``gated_linear_`` and ``linear_``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import _fla_reference as fla_ref  # noqa: E402  (tests/ holds the loader that avoids importing fla)

from sleepzoo.ops import gated_delta_rule, gated_delta_rule_recurrent  # noqa: E402
from sleepzoo.ops import gated_linear_rule, gated_linear_rule_recurrent, linear_rule  # noqa: E402
from sleepzoo.ops import rules  # noqa: E402

B, T, H, K, V = 2, 1024, 4, 64, 64
ROUNDS = 5
MIN_SPEEDUP_VS_RECURRENT = 5.0
MIN_SPEEDUP_VS_FLA_NAIVE = 1.0

# median seconds per fwd+bwd, filled as the benchmarks run so later tests can compute ratios
_MEDIANS: dict[str, float] = {}


def make_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "q": torch.randn(B, T, H, K, generator=gen),
        "k": F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
        "v": torch.randn(B, T, H, V, generator=gen),
        "g": F.logsigmoid(torch.randn(B, T, H, generator=gen) + 1.0),
        "beta": torch.sigmoid(torch.randn(B, T, H, generator=gen)),
    }


def _chunked(q, k, v, g, beta):
    return gated_delta_rule(q, k, v, g, beta, output_final_state=True)


def _recurrent(q, k, v, g, beta):
    return gated_delta_rule_recurrent(q, k, v, g, beta, output_final_state=True)


def _fla_naive_chunk(q, k, v, g, beta):
    return fla_ref.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=64, output_final_state=True)


def _gated_linear_chunked(q, k, v, g, beta):
    return gated_linear_rule(q, k, v, g, beta, output_final_state=True)


def _gated_linear_recurrent(q, k, v, g, beta):
    return gated_linear_rule_recurrent(q, k, v, g, beta, output_final_state=True)


def _gated_linear_fla_naive_chunk(q, k, v, g, beta):
    return fla_ref.naive_chunk_simple_gla(q, k, v * beta.unsqueeze(-1), g, chunk_size=64, output_final_state=True)


def _linear_chunked(q, k, v, g, beta):
    return linear_rule(q, k, v, beta, output_final_state=True)


def _linear_recurrent(q, k, v, g, beta):
    return rules.linear.recurrent(q, k, v, g, beta, output_final_state=True)


OPS = {
    "chunked": _chunked,
    "recurrent": _recurrent,
    "fla_naive_chunk": _fla_naive_chunk,
    "gated_linear_chunked": _gated_linear_chunked,
    "gated_linear_recurrent": _gated_linear_recurrent,
    "gated_linear_fla_naive_chunk": _gated_linear_fla_naive_chunk,
    "linear_chunked": _linear_chunked,
    "linear_recurrent": _linear_recurrent,
}
# rule of each op: its chunked op is the baseline of its ratios, and its benchmark group
RULE_PREFIX = {"gated_delta": "", "gated_linear": "gated_linear_", "linear": "linear_"}
FLA_AVAILABLE = {
    "fla_naive_chunk": lambda: fla_ref.naive_chunk_gated_delta_rule is not None,
    "gated_linear_fla_naive_chunk": lambda: fla_ref.naive_chunk_simple_gla is not None,
}


def rule_of(name: str) -> str:
    """The rule an op name belongs to (longest matching prefix)."""
    return max((r for r, p in RULE_PREFIX.items() if name.startswith(p)), key=lambda r: len(RULE_PREFIX[r]))


def chunked_of(name: str) -> str:
    """The chunked op of the rule ``name`` belongs to: the baseline its speedup is measured against."""
    return RULE_PREFIX[rule_of(name)] + "chunked"


def fwd_bwd_callable(name: str, inputs: dict[str, torch.Tensor]):
    """A no-argument callable running one forward+backward of op ``name`` on fresh leaves."""
    fn = OPS[name]
    leaves = {n: x.clone().requires_grad_() for n, x in inputs.items()}

    def run():
        for x in leaves.values():
            x.grad = None
        o, S = fn(**leaves)
        (o.sum() + S.sum()).backward()

    return run


def median_seconds(name: str, rounds: int = ROUNDS, inputs=None) -> float:
    """Plain timing (one warm-up, then the median of ``rounds``), used outside pytest-benchmark."""
    run = fwd_bwd_callable(name, make_inputs() if inputs is None else inputs)
    run()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed_ratios(medians: dict[str, float], base: str = "chunked") -> dict[str, float]:
    """How many times faster op ``base`` is than each other op, from median seconds per fwd+bwd."""
    return {name: t / medians[base] for name, t in medians.items() if name != base}


def _bench(benchmark, name: str) -> float | None:
    """Benchmark op ``name``; record tokens/s; return the median seconds (None when benchmarks are disabled)."""
    run = fwd_bwd_callable(name, make_inputs())
    benchmark.group = f"{rule_of(name)} fwd+bwd B={B} T={T} H={H} K=V={K} float32"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    if benchmark.stats is None:  # --benchmark-disable: ran once, no timings
        return None
    median = benchmark.stats.stats.median
    _MEDIANS[name] = median
    benchmark.extra_info["tokens_per_s"] = round(B * T / median)
    benchmark.extra_info["ms_per_fwd_bwd"] = round(median * 1e3, 2)
    return median


def _check_speedup(benchmark, name: str, median: float | None, minimum: float) -> None:
    if median is None:
        pytest.skip("benchmarks disabled: no timings to compare")
    base = chunked_of(name)
    if base not in _MEDIANS:  # this test was selected alone: time the baseline here
        _MEDIANS[base] = median_seconds(base)
    speedup = speed_ratios({base: _MEDIANS[base], name: median}, base)[name]
    benchmark.extra_info["speedup_of_chunked"] = round(speedup, 2)
    assert speedup >= minimum, f"chunked is only {speedup:.2f}x faster than {name} (need >= {minimum}x)"


def test_bench_chunked(benchmark):
    _bench(benchmark, "chunked")


def test_bench_recurrent(benchmark):
    _check_speedup(benchmark, "recurrent", _bench(benchmark, "recurrent"), MIN_SPEEDUP_VS_RECURRENT)


def test_bench_fla_naive_chunk(benchmark):
    if fla_ref.naive_chunk_gated_delta_rule is None:
        pytest.skip(f"fla-core reference unavailable: {fla_ref.UNAVAILABLE_REASON}")
    _check_speedup(benchmark, "fla_naive_chunk", _bench(benchmark, "fla_naive_chunk"), MIN_SPEEDUP_VS_FLA_NAIVE)


def test_bench_gated_linear_chunked(benchmark):
    _bench(benchmark, "gated_linear_chunked")


def test_bench_gated_linear_recurrent(benchmark):
    name = "gated_linear_recurrent"
    _check_speedup(benchmark, name, _bench(benchmark, name), MIN_SPEEDUP_VS_RECURRENT)


def test_bench_gated_linear_fla_naive_chunk(benchmark):
    if fla_ref.naive_chunk_simple_gla is None:
        pytest.skip(f"fla-core simple_gla reference unavailable: {fla_ref.SIMPLE_GLA_UNAVAILABLE_REASON}")
    name = "gated_linear_fla_naive_chunk"
    _check_speedup(benchmark, name, _bench(benchmark, name), MIN_SPEEDUP_VS_FLA_NAIVE)


def test_bench_linear_chunked(benchmark):
    _bench(benchmark, "linear_chunked")


def test_bench_linear_recurrent(benchmark):
    _check_speedup(benchmark, "linear_recurrent", _bench(benchmark, "linear_recurrent"), MIN_SPEEDUP_VS_RECURRENT)


if __name__ == "__main__":
    rule_names = sys.argv[1:] or list(RULE_PREFIX)  # e.g. `python bench/test_bench_ops.py gated_linear linear`
    names = [n for n in OPS if rule_of(n) in rule_names and FLA_AVAILABLE.get(n, lambda: True)()]
    medians = {n: median_seconds(n) for n in names}
    for n, t in medians.items():
        print(f"{n:>28}: {t * 1e3:8.1f} ms per fwd+bwd, {B * T / t:10.0f} tokens/s")
    for rule in rule_names:
        base = RULE_PREFIX[rule] + "chunked"
        for n, r in speed_ratios({n: t for n, t in medians.items() if rule_of(n) == rule}, base).items():
            print(f"{base} is {r:.1f}x faster than {n}")
