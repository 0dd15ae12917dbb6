"""The `sleepzoo bench` suites under pytest-benchmark: the same cases, timed by pytest-benchmark.

    make bench                                                        # every file in bench/
    .venv/bin/python -m pytest bench/test_bench_suites.py --benchmark-enable --benchmark-only -o addopts="" \
        --benchmark-json bench.json
    .venv/bin/python -m pytest bench/test_bench_suites.py -k loops ...   # one suite

Each benchmark's ``extra_info`` carries what ``sleepzoo bench --json`` records for the case (tokens/s,
GFLOP/s, peak bytes, ``ratio_to_baseline`` against the baseline of its group measured in the same session)
and ``case`` (the suite's ``suite::name``), so ``sleepzoo bench --compare`` reads these files too. Nothing
here asserts a timing: the acceptance checks are printed by ``sleepzoo bench`` and written in
docs/performance.md.
"""

from __future__ import annotations

import statistics

import pytest

from sleepzoo import benchmarks

CASES = [case for suite in benchmarks.SUITES for case in benchmarks.cases(suite)]
_MEDIANS: dict[str, float] = {}  # fullname -> median seconds, this session


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.fullname)
def test_bench(benchmark, case):
    benchmark.group = case.group
    if case.measure is not None:  # untimed (memory, the matmul rate): measured once, recorded
        found = benchmark.pedantic(case.measure, rounds=1, iterations=1)
        benchmark.extra_info.update({**case.info, **found, "case": case.fullname})
        return
    benchmark.pedantic(case.make(), rounds=case.rounds, warmup_rounds=case.warmup, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    median = benchmark.stats.stats.median
    _MEDIANS[case.fullname] = median
    base_name = f"{case.suite}::{case.baseline}" if case.baseline else None
    if base_name and base_name not in _MEDIANS:  # selected without its baseline: time it now, same session
        base_case = next(c for c in CASES if c.fullname == base_name)
        _MEDIANS[base_name] = statistics.median(benchmarks.time_case(base_case))
    benchmark.extra_info.update(benchmarks.case_info(case, median, _MEDIANS.get(base_name)), case=case.fullname)
