"""Streaming inference: wake latency and memory against context length and loops (pytest-benchmark).

    make bench                                        # all suites
    .venv/bin/python -m pytest bench/test_bench_stream.py --benchmark-only -o addopts=""
    .venv/bin/python bench/test_bench_stream.py       # plain table

The claim under test: per-token decode time and memory do not grow with the context already streamed
(bounded by the window L and the fast weights) and do not depend on loops, while a full-attention model's
KV cache grows with the context. Ratios are taken against a baseline measured in the same run.
"""

from __future__ import annotations

import time

import pytest
import torch

import sleepzoo

WINDOW = 256


def small_model(window: int = WINDOW, layers=("attention", "gated_deltanet", "attention", "gated_deltanet")):
    torch.manual_seed(0)
    recipe = sleepzoo.load_recipe({
        "model": {"d_model": 128, "layers": list(layers), "vocab_size": 256,
                  "mixers": {"attention": {"num_heads": 4, "head_dim": 32},
                             "gated_deltanet": {"num_heads": 4, "head_dim": 32, "expand_v": 1.0}}},
        "sleep": {"window": window},
    })
    return sleepzoo.build_model(recipe).eval()


def state_bytes(stream) -> int:
    """Bytes held by the stream between tokens: every cached tensor, fast weights and pending features."""
    total = sum(f.numel() * f.element_size() for f in stream.feats)
    for state in stream.states:
        for value in (state or {}).values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


@torch.no_grad()
def stream_to(model, context: int, *, loops: int, window: int = WINDOW, eviction: str = "full_flush"):
    """A stream that has consumed ``context`` tokens (prefilled window by window)."""
    stream = model.start_stream(window=window, loops=loops, eviction=eviction)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, context, window):
        stream.feed(torch.randint(0, 256, (1, min(window, context - start)), generator=gen))
    return stream


@torch.no_grad()
def decode_ms(stream, tokens: int = 64) -> float:
    """Median milliseconds per decoded token (the stream sleeps whenever its window fills)."""
    times = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        stream.feed(torch.randint(0, 256, (1, 1)))
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


@pytest.mark.parametrize("loops", [1, 4], ids=lambda n: f"loops{n}")
@pytest.mark.parametrize("context", [1024, 32768], ids=lambda n: f"ctx{n // 1024}k")
def test_wake_latency(benchmark, context, loops):
    torch.set_num_threads(1)
    model = small_model()
    stream = stream_to(model, context, loops=loops)
    baseline = decode_ms(stream_to(model, 1024, loops=1))  # same run, same machine state
    benchmark.pedantic(lambda: stream.feed(torch.randint(0, 256, (1, 1))), rounds=64, iterations=1)
    ms = decode_ms(stream)
    benchmark.extra_info.update(context=context, loops=loops, ms_per_token=ms, baseline_ms_1k_loops1=baseline,
                                ratio_to_baseline=ms / baseline, state_bytes=state_bytes(stream))


@pytest.mark.parametrize("eviction", ["full_flush", "sliding_window"])
def test_memory_is_bounded_by_the_window(benchmark, eviction):
    torch.set_num_threads(1)
    model = small_model()
    small = state_bytes(stream_to(model, 8192, loops=2, eviction=eviction))
    big_stream = benchmark.pedantic(lambda: stream_to(model, 65536, loops=2, eviction=eviction), rounds=1,
                                    iterations=1)
    big = state_bytes(big_stream)
    full_attention = small_model(window=65536, layers=("attention",) * 4)
    grows_8k = state_bytes(stream_to(full_attention, 8192, loops=1, window=65536))
    benchmark.extra_info.update(state_bytes_8k=small, state_bytes_64k=big, ratio_64k_to_8k=big / small,
                                full_attention_bytes_8k=grows_8k,
                                full_attention_bytes_64k_extrapolated=grows_8k * 8)
    assert big <= 1.1 * small  # bounded: a property, not a timing


def main() -> None:
    torch.set_num_threads(1)
    model = small_model()
    print(f"{'context':>8} {'loops':>5} {'ms/token':>9} {'state KiB':>10}")
    for loops in (1, 4):
        for context in (1024, 8192, 32768):
            stream = stream_to(model, context, loops=loops)
            print(f"{context:>8} {loops:>5} {decode_ms(stream):>9.2f} {state_bytes(stream) / 1024:>10.1f}")
    full = small_model(window=65536, layers=("attention",) * 4)
    for context in (1024, 8192):
        stream = stream_to(full, context, loops=1, window=65536)
        print(f"{context:>8} {'full':>5} {decode_ms(stream):>9.2f} {state_bytes(stream) / 1024:>10.1f}"
              f"  (full attention, no eviction)")


if __name__ == "__main__":
    main()
