"""The CPU profiles and A/B measurements behind docs/performance.md.

    python bench/profile_cpu.py window --loops 2      # torch profiler: one consolidated window, top kernels
    python bench/profile_cpu.py decode                # torch profiler: one-token decoding
    python bench/profile_cpu.py short-conv           # A/B: the depthwise conv as a sum over taps vs conv1d

Same model and window as the ``loops`` and ``wake`` suites of ``sleepzoo bench``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import sleepzoo.mixers.parts as parts
from sleepzoo import engine
from sleepzoo.benchmarks.suites import _fast_weight_sum, _tokens, hybrid


def profile_window(loops: int, rows: int) -> None:
    model = hybrid(256)
    ids, tgt = _tokens(2, 256)
    start = [None] * len(model.layers)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        _, loss, states = engine._chunk(model, ids, tgt, start, loops, False, None)
        (loss + _fast_weight_sum(states)).backward()

    for _ in range(3):
        run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _decode_stream():
    model = hybrid(256).eval()
    stream = model.start_stream(window=256, loops=1)
    with torch.no_grad():
        stream.feed(torch.randint(0, 256, (1, 100)))
    return stream


@torch.no_grad()
def profile_decode(rows: int) -> None:
    stream = _decode_stream()
    token = torch.zeros(1, 1, dtype=torch.long)
    for _ in range(20):
        stream.feed(token)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            stream.feed(token)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _conv1d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The causal depthwise conv through ``F.conv1d`` (no history): the path the taps replaced."""
    width = weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight, padding=width - 1, groups=x.shape[-1])
    return y[..., :x.shape[1]].transpose(1, 2)


def short_conv_ab(repeats: int) -> None:
    """The causal depthwise conv, forward and backward, as a sum over taps (sleepzoo's) against ``F.conv1d``,
    the two alternated call by call at a decoding shape, the sleep study's shape and two long ones."""
    print("| B, T, C | sum over taps (ms) | conv1d (ms) | taps / conv1d (median of per-pair ratios) |")
    print("|---|---:|---:|---:|")
    for B, T, C in ((1, 1, 1024), (64, 25, 64), (8, 512, 192), (2, 256, 1024)):
        x = torch.randn(B, T, C, requires_grad=True)
        weight = torch.randn(C, 1, 4, requires_grad=True)
        cases = {"taps": lambda: parts.causal_depthwise_conv(x, weight)[0], "conv1d": lambda: _conv1d(x, weight)}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for i in range(repeats + 5):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn().sum().backward()
                if i >= 5:  # warm-up calls not counted
                    times[name].append(time.perf_counter() - t0)
        ratio = statistics.median(a / b for a, b in zip(times["taps"], times["conv1d"]))
        print(f"| {B}, {T}, {C} | {statistics.median(times['taps']) * 1e3:.3f} | "
              f"{statistics.median(times['conv1d']) * 1e3:.3f} | {ratio:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["window", "decode", "short-conv"])
    parser.add_argument("--loops", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if args.what == "window":
        profile_window(args.loops, args.rows)
    elif args.what == "decode":
        profile_decode(args.rows)
    else:
        short_conv_ab(args.repeats)


if __name__ == "__main__":
    main()
