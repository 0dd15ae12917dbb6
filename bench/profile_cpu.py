"""The CPU profiles and A/B measurements behind docs/performance.md.

    python bench/profile_cpu.py window --loops 2      # torch profiler: one consolidated window, top kernels
    python bench/profile_cpu.py decode                # torch profiler: one-token decoding
    python bench/profile_cpu.py short-conv            # A/B: decode with the short-conv sum over taps vs conv1d

Same model and window as the ``loops`` and ``wake`` suites of ``sleepzoo bench``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import sleepzoo.mixers.gated_deltanet as gdn
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


@torch.no_grad()
def short_conv_ab(tokens: int) -> None:
    """Two forks of one stream decode alternately, one with the sum over taps, one with conv1d."""
    stream = _decode_stream()
    taps, conv = stream.fork(), stream.fork()
    token = torch.zeros(1, 1, dtype=torch.long)
    saved = gdn._SHORT_CONV
    t_taps, t_conv = [], []
    try:
        for _ in range(tokens):
            for fork, threshold, times in ((taps, saved, t_taps), (conv, 0, t_conv)):
                gdn._SHORT_CONV = threshold
                t0 = time.perf_counter()
                fork.feed(token)
                times.append(time.perf_counter() - t0)
    finally:
        gdn._SHORT_CONV = saved
    ratio = statistics.median(a / b for a, b in zip(t_taps, t_conv))
    print(f"sum over taps {statistics.median(t_taps) * 1e3:.2f} ms/token, conv1d "
          f"{statistics.median(t_conv) * 1e3:.2f} ms/token, median per-token ratio {ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["window", "decode", "short-conv"])
    parser.add_argument("--loops", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--tokens", type=int, default=150)
    args = parser.parse_args()
    if args.what == "window":
        profile_window(args.loops, args.rows)
    elif args.what == "decode":
        profile_decode(args.rows)
    else:
        short_conv_ab(args.tokens)


if __name__ == "__main__":
    main()
