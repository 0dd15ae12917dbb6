"""Streaming inference: the memory a stream holds against the context streamed (pytest-benchmark).

    make bench                                        # every file in bench/
    .venv/bin/python -m pytest bench/test_bench_stream.py --benchmark-only -o addopts=""

The claim under test: the bytes held between tokens (caches, fast weights, pending wake features) do not grow
with the context already streamed, while a full-attention model's KV cache does. Wake latency against
context and loops is the ``wake`` suite of ``sleepzoo bench`` (bench/test_bench_suites.py).
"""

from __future__ import annotations

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
    """Bytes held by the stream between tokens: every cached tensor, fast weights and pending features. An
    attention cache decoded without gradients lives in a preallocated buffer: its whole capacity counts."""
    from sleepzoo.mixers.attention import KVBuffer

    total = sum(f.numel() * f.element_size() for f in stream.feats)
    for state in stream.states:
        buf = (state or {}).get("kv_buffer")
        for key, value in (state or {}).items():
            if isinstance(value, KVBuffer):
                total += sum(t.numel() * t.element_size() for t in (value.k, value.v))
            elif isinstance(value, torch.Tensor) and not (buf is not None and key in ("k", "v")):  # views of it
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
