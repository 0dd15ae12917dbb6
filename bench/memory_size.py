"""Bytes of a saved stream memory (issue 15): the bench model, window 256, loops 2, one row, after 700 tokens.

    python bench/memory_size.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from sleepzoo.benchmarks.suites import hybrid
from sleepzoo.memory import describe


def main() -> None:
    torch.manual_seed(0)
    model = hybrid(256).eval()
    with tempfile.TemporaryDirectory() as tmp:
        for eviction in ("full_flush", "sliding_window"):
            stream = model.start_stream(window=256, loops=2, eviction=eviction)
            with torch.no_grad():
                stream.feed(torch.randint(0, 256, (1, 700)))
            info = describe(stream.save(Path(tmp) / f"{eviction}.safetensors"))
            parts = ", ".join(f"{k} {v:,}" for k, v in sorted(info["tensor_bytes"].items()))
            print(f"{eviction}: {info['file_bytes']:,} bytes ({parts})")


if __name__ == "__main__":
    main()
