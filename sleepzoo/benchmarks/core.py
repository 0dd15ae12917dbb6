"""What every benchmark suite shares: cases, timing, peak memory, the machine's matmul rate, and results in
pytest-benchmark's JSON format.

A :class:`Case` is one measurement: ``make()`` builds its inputs once and returns the callable that is timed
(``rounds`` times after ``warmup`` calls), or, for an untimed case, ``measure()`` returns what it found.
``bench/`` (pytest-benchmark) and ``sleepzoo bench`` run the same cases: pytest-benchmark times the callable
itself, the CLI uses :func:`time_case`; both record :func:`case_info` in ``extra_info``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..registry import SleepzooError


@dataclass
class Case:
    """One benchmark. ``name`` is unique within its suite (``"window[N=4]"``); ``group`` gathers the cases
    compared with each other; ``baseline`` names the case of the group every ratio is taken against (its
    median from the same run). ``tokens`` per call gives tokens/s."""

    suite: str
    name: str
    group: str
    params: dict[str, Any]
    make: Callable[[], Callable[[], Any]] | None = None
    measure: Callable[[], dict[str, Any]] | None = None
    tokens: int | None = None
    baseline: str | None = None
    rounds: int = 5
    warmup: int = 1
    info: dict[str, Any] = field(default_factory=dict)  # static facts recorded with the result (FLOPs, sizes)
    device: str = "cpu"  # where it runs: CUDA work is synchronised before a timing ends

    @property
    def fullname(self) -> str:
        return f"{self.suite}::{self.name}"


@dataclass
class Result:
    """Timings in seconds (empty for untimed cases) and what is recorded beside them."""

    case: Case
    times: list[float]
    extra_info: dict[str, Any]

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def time_case(case: Case) -> list[float]:
    """Seconds per call of ``case.make()``'s callable: ``warmup`` untimed calls, then ``rounds`` timed ones."""
    return time_interleaved([case])[0]


def _synchronized(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` that returns only when the device's queued work has finished (CUDA runs asynchronously)."""
    if not device.startswith("cuda"):
        return fn

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize(device)
        return out
    return run


def time_interleaved(cases: list[Case]) -> list[list[float]]:
    """Seconds per call of each case, measured round-robin (round r of every case before round r + 1 of any),
    so that a slow drift of the machine (another process, frequency scaling) affects every case of a
    comparison alike instead of whichever ran during it. Cases with fewer rounds drop out early."""
    fns = [_synchronized(case.make(), case.device) for case in cases]
    for case, fn in zip(cases, fns):
        for _ in range(case.warmup):
            fn()
    times: list[list[float]] = [[] for _ in cases]
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(max(case.rounds for case in cases)):
            for i, (case, fn) in enumerate(zip(cases, fns)):
                if r < case.rounds:
                    t0 = time.perf_counter()
                    fn()
                    times[i].append(time.perf_counter() - t0)
    finally:
        if gc_was:
            gc.enable()
    return times


def case_info(case: Case, median: float | None, baseline_median: float | None) -> dict[str, Any]:
    """``extra_info`` of a timed case: its static facts, tokens/s and the ratio to its group's baseline."""
    info = dict(case.info)
    if median is not None:
        info["ms"] = round(median * 1e3, 3)
        if case.tokens:
            info["tokens_per_s"] = round(case.tokens / median, 1)
        if "flops" in case.info:
            info["gflops_per_s"] = round(case.info["flops"] / median / 1e9, 2)
        if baseline_median:
            info["ratio_to_baseline"] = round(median / baseline_median, 4)
            info["baseline"] = case.baseline
    return info


def run_case(case: Case, medians: dict[str, float]) -> Result:
    """Run ``case``; ``medians`` (name -> seconds, this run's) supplies and receives baseline medians."""
    if case.measure is not None:
        return Result(case, [], {**case.info, **case.measure()})
    return _result(case, time_case(case), medians)


def run_group(cases: list[Case], medians: dict[str, float]) -> list[Result]:
    """Run the timed cases of one group interleaved (:func:`time_interleaved`), ratios against the group's
    baseline from the same rounds."""
    timings = time_interleaved(cases)
    for case, times in zip(cases, timings):
        medians[case.name] = statistics.median(times)
    return [_result(case, times, medians) for case, times in zip(cases, timings)]


def _result(case: Case, times: list[float], medians: dict[str, float]) -> Result:
    median = statistics.median(times)
    medians[case.name] = median
    base = medians.get(case.baseline) if case.baseline else None
    return Result(case, times, case_info(case, median, base))


# ----------------------------------------------------------------------------------------------------------------
# memory


class PeakMemory(TorchDispatchMode):
    """Live bytes of the tensors created while it is active, and their peak.

    Every op's outputs are counted by storage (views share one) until the storage is freed, so the peak is
    what a step needs on top of what existed before it (the parameters): activations saved for the
    backward pass, their gradients, and the parameter gradients. It sees every op that goes through the
    dispatcher (forward, the autograd backward on this thread, recomputation under checkpointing), is
    deterministic, and is independent of the allocator's caching, unlike a process's resident size.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self.live:
                continue
            self.live[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


def peak_bytes(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Peak bytes of the tensors ``fn`` creates (see :class:`PeakMemory`); on CUDA, the allocator's peak above
    what was allocated before."""
    gc.collect()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    tracker = PeakMemory()
    with tracker:
        fn()
    return tracker.peak


# ----------------------------------------------------------------------------------------------------------------
# the machine


def matmul_rate(n: int | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
                seconds: float = 0.5) -> float:
    """FLOP/s of an ``n x n @ n x n`` matmul on this machine, now (median over ~``seconds``): the yardstick
    that op throughputs are stated against. ``n`` defaults to 1024 on a CPU, 8192 on a GPU."""
    cuda = torch.device(device).type == "cuda"
    n = n or (8192 if cuda else 1024)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        t0 = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def machine_info() -> dict[str, Any]:
    """pytest-benchmark's ``machine_info`` fields, plus torch's version and thread count."""
    uname = platform.uname()
    info = {"node": uname.node, "processor": uname.processor or uname.machine, "machine": uname.machine,
            "python_compiler": platform.python_compiler(), "python_implementation": platform.python_implementation(),
            "python_implementation_version": platform.python_version(), "python_version": platform.python_version(),
            "python_build": list(platform.python_build()), "release": uname.release, "system": uname.system,
            "cpu": {"count": _cpu_count(), "brand_raw": _cpu_brand()},
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cpu_brand() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def commit_info() -> dict[str, Any]:
    """The git commit of the working tree (pytest-benchmark's ``commit_info``), or ``{"error": ...}``."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        return {"id": git("rev-parse", "HEAD"), "time": git("log", "-1", "--format=%cI"),
                "author_time": git("log", "-1", "--format=%aI"), "dirty": bool(git("status", "--porcelain")),
                "project": root.name, "branch": git("rev-parse", "--abbrev-ref", "HEAD")}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


# ----------------------------------------------------------------------------------------------------------------
# pytest-benchmark JSON


def quartiles(data: list[float]) -> tuple[float, float]:
    """Q1, Q3 of sorted ``data`` as pytest-benchmark computes them (Wikipedia's "Quartile", computing methods 2
    for an even count, 3 for an odd one), so IQRs agree with its tables."""
    n = len(data)
    if n == 1:
        return data[0], data[0]
    if n % 2 == 0:
        return statistics.median(data[: n // 2]), statistics.median(data[n // 2:])
    m, r = divmod(n, 4)
    if r == 1:
        return 0.25 * data[m - 1] + 0.75 * data[m], 0.75 * data[3 * m] + 0.25 * data[3 * m + 1]
    return 0.75 * data[m] + 0.25 * data[m + 1], 0.25 * data[3 * m + 1] + 0.75 * data[3 * m + 2]


def _stats(times: list[float]) -> dict[str, Any]:
    data = sorted(times)
    n = len(data)
    mean = statistics.fmean(data)
    stddev = statistics.stdev(data) if n > 1 else 0.0
    q1, q3 = quartiles(data)
    iqr = q3 - q1
    low, high = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    iqr_outliers = sum(1 for t in data if t < low or t > high)
    stddev_outliers = sum(1 for t in data if abs(t - mean) > stddev) if stddev else 0
    return {"min": data[0], "max": data[-1], "mean": mean, "stddev": stddev, "rounds": n,
            "median": statistics.median(data), "iqr": iqr, "q1": q1, "q3": q3,
            "iqr_outliers": iqr_outliers, "stddev_outliers": stddev_outliers,
            "outliers": f"{stddev_outliers};{iqr_outliers}", "ld15iqr": min(t for t in data if t >= low),
            "hd15iqr": max(t for t in data if t <= high), "ops": 1.0 / mean, "total": sum(data),
            "data": list(times), "iterations": 1}


def to_json(results: list[Result], checks: list[dict[str, Any]], *, suites: list[str]) -> dict[str, Any]:
    """A document pytest-benchmark reads (``pytest-benchmark compare FILE``): its ``machine_info``,
    ``commit_info``, ``benchmarks`` (untimed cases have no ``stats``), ``datetime``, ``version``; plus
    ``sleepzoo`` (the suites run and the acceptance checks)."""
    benchmarks = []
    for r in results:
        entry = {"group": r.case.group, "name": r.case.name, "fullname": r.case.fullname,
                 "params": r.case.params, "param": ",".join(f"{k}={v}" for k, v in r.case.params.items()),
                 "extra_info": r.extra_info,
                 "options": {"disable_gc": True, "timer": "perf_counter", "min_rounds": r.case.rounds,
                             "max_time": None, "min_time": None, "warmup": r.case.warmup}}
        if r.times:
            entry["stats"] = _stats(r.times)
        benchmarks.append(entry)
    return {"machine_info": machine_info(), "commit_info": commit_info(), "benchmarks": benchmarks,
            "datetime": _dt.datetime.now(_dt.timezone.utc).isoformat(), "version": _pytest_benchmark_version(),
            "sleepzoo": {"suites": suites, "checks": checks,
                         "devices": sorted({r.case.device for r in results})}}


def _pytest_benchmark_version() -> str:
    try:
        from importlib.metadata import version

        return version("pytest-benchmark")
    except Exception:  # noqa: BLE001 - not installed: the format is that of 5.x
        return "5.1.0"


def load_json(path: str | Path) -> dict[str, Any]:
    """A saved ``sleepzoo bench --json`` (or pytest-benchmark ``--benchmark-json``) file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SleepzooError(f"--compare {str(path)!r}: no such file (write one with `sleepzoo bench --json FILE`)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SleepzooError(f"--compare {str(path)!r} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise SleepzooError(f"--compare {str(path)!r} has no 'benchmarks' list: it is not a pytest-benchmark / "
                            f"`sleepzoo bench --json` file")
    return data


def saved_medians(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """fullname -> {"median": seconds or None, "extra_info": ...} of a saved run (bench/'s pytest names map to
    the suites' ``suite::name`` through ``extra_info['case']``)."""
    out = {}
    for b in data["benchmarks"]:
        name = b.get("extra_info", {}).get("case") or b.get("fullname") or b.get("name")
        stats = b.get("stats") or {}
        out[name] = {"median": stats.get("median"), "extra_info": b.get("extra_info", {})}
    return out
