"""Benchmarks of sleep on the machine at hand: ``sleepzoo bench`` and ``bench/`` (pytest-benchmark) run these.

    from sleepzoo import benchmarks
    results = benchmarks.run(["loops", "wake"])            # list of Result
    benchmarks.checks(results)                               # the acceptance checks, measured
    benchmarks.write_json(results, "bench.json")             # pytest-benchmark's format

See :mod:`sleepzoo.benchmarks.suites` for what each suite measures and :mod:`sleepzoo.benchmarks.core` for
how (timing, peak memory, JSON).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

from .core import (Case, Result, case_info, load_json, peak_bytes, run_case, run_group, saved_medians, time_case,
                   time_interleaved, to_json)
from .suites import SUITES, cases, checks

__all__ = ["Case", "Result", "SUITES", "case_info", "cases", "checks", "load_json", "peak_bytes", "run",
           "run_case", "run_group", "saved_medians", "time_case", "time_interleaved", "to_json", "write_json"]


def run(suites: Sequence[str] = SUITES, *, size: str = "default", device: str = "cpu",
        on_case: Callable[[Case, Result | None], None] | None = None) -> list[Result]:
    """Run ``suites`` in order on ``device``; ``on_case(case, None)`` before and ``on_case(case, result)`` after
    each case."""
    results: list[Result] = []
    for suite in suites:
        medians: dict[str, float] = {}
        for group in _groups(cases(suite, size, device)):
            if on_case:
                for case in group:
                    on_case(case, None)
            if len(group) > 1 and all(c.make is not None for c in group):
                found = run_group(group, medians)  # timed comparisons: interleaved rounds
            else:
                found = [run_case(case, medians) for case in group]
            results.extend(found)
            if on_case:
                for case, result in zip(group, found):
                    on_case(case, result)
    return results


def _groups(found: list[Case]) -> list[list[Case]]:
    """The cases of each group, groups in order of first appearance."""
    groups: dict[str, list[Case]] = {}
    for case in found:
        groups.setdefault(case.group, []).append(case)
    return list(groups.values())


def write_json(results: list[Result], path: str | Path, suites: Sequence[str]) -> Path:
    """Write the run as pytest-benchmark JSON (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(to_json(results, checks(results), suites=list(suites)), indent=2) + "\n")
    os.replace(tmp, path)
    return path
