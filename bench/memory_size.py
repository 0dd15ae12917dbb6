"""Bytes of a saved stream memory (issue 15), one row, after 700 tokens past the first window:

* the bench model (window 256, loops 2), saved to a file and read back (``describe``);
* Jet-Nemotron-2B's shapes (``shared/reference/jet-nemotron-2b.config.json``, or the config given), window
  2,000, built on the meta device, so no weights are made: ``memory_bytes`` counts what the file would hold.

    python bench/memory_size.py [--jet-config PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import sleepzoo
from sleepzoo.benchmarks.suites import hybrid
from sleepzoo.memory import describe, memory_bytes

JET_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "reference" / "jet-nemotron-2b.config.json"
EVICTIONS = ("full_flush", "sliding_window")


def _line(name: str, total: int, parts: dict[str, int]) -> str:
    shown = ", ".join(f"{k} {v:,}" for k, v in sorted(parts.items()))
    return f"{name}: {total:,} bytes ({total / 2**20:.2f} MiB; {shown})"


def bench_model() -> None:
    torch.manual_seed(0)
    model = hybrid(256).eval()
    with tempfile.TemporaryDirectory() as tmp:
        for eviction in EVICTIONS:
            stream = model.start_stream(window=256, loops=2, eviction=eviction)
            with torch.no_grad():
                stream.feed(torch.randint(0, 256, (1, 256 + 700)))
            info = describe(stream.save(Path(tmp) / f"{eviction}.safetensors"))
            print(_line(f"bench model, {eviction}, file", info["file_bytes"], info["tensor_bytes"]))


def jet_nemotron(config: Path, window: int = 2000) -> None:
    cfg = json.loads(config.read_text())
    dtype = getattr(torch, str(cfg.get("torch_dtype", "float32")))  # the published weights' dtype
    with torch.device("meta"):
        model = sleepzoo.from_config(cfg).to(dtype).eval()
    for eviction in EVICTIONS:
        stream = model.start_stream(window=window, loops=2, eviction=eviction)
        with torch.no_grad():
            stream.feed(torch.zeros(1, window + 700, dtype=torch.long, device="meta"))
        parts = memory_bytes(stream)
        print(_line(f"Jet-Nemotron-2B shapes ({dtype}), window {window}, {eviction}", sum(parts.values()), parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jet-config", type=Path, default=JET_CONFIG)
    args = parser.parse_args()
    bench_model()
    if args.jet_config.is_file():
        jet_nemotron(args.jet_config)
    else:
        print(f"no Jet-Nemotron config at {args.jet_config}: skipped (give --jet-config PATH)")


if __name__ == "__main__":
    main()
