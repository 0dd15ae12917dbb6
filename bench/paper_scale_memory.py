"""Peak memory of one training step at the paper's GSM-Infinite shapes (issue 11): V = 151,936, T = 3,300.

The width is reduced so that it runs on a CPU (d 64, attention + Gated DeltaNet); what is measured is the
part the vocabulary decides: the logits. "before" calls the model as the trainer used to (every position's
logits, then the loss); "after" is what the trainer calls now (``return_logits=False``: the head only at the
targets). Peak bytes are counted tensor by tensor (sleepzoo.benchmarks.core.PeakMemory), the same every run.

    python bench/paper_scale_memory.py            # T = 3,300, 5 targets per example, batch 1
    python bench/paper_scale_memory.py --T 2048 --targets 4
"""

from __future__ import annotations

import argparse

import torch

import sleepzoo
from sleepzoo.benchmarks.core import peak_bytes


def step_peak(model, ids, tg, return_logits: bool) -> int:
    def step():
        out = model(ids, tg, return_logits=return_logits)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
    return peak_bytes(step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=3300)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--targets", type=int, default=5, help="target tokens per example, at its end")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--window", type=int, default=2000)
    ap.add_argument("--loops", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    recipe = sleepzoo.load_recipe({
        "model": {"d_model": 64, "layers": ["attention", "gated_deltanet"], "vocab_size": a.vocab,
                  "mixers": {"attention": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16},
                             "gated_deltanet": {"num_heads": 4, "head_dim": 16}}},
        "sleep": {"window": a.window, "loops": a.loops, "checkpoint": True}})
    model = sleepzoo.build_model(recipe)
    ids = torch.randint(0, a.vocab, (a.batch, a.T))
    tg = torch.full_like(ids, -100)
    tg[:, -a.targets:] = ids[:, -a.targets:]
    btv = a.batch * a.T * a.vocab * 4
    rows = [("before: every position's logits", step_peak(model, ids, tg, True)),
            ("after: head at the targets only", step_peak(model, ids, tg, False))]
    print(f"training step, V {a.vocab:,}, T {a.T:,}, batch {a.batch}, {a.targets} targets per example, "
          f"window {a.window}, loops {a.loops}, d 64")
    print(f"one (B, T, V) float32 tensor: {btv / 2**20:,.0f} MiB")
    print("| forward + backward | peak MiB | / (B, T, V) float32 |")
    print("|---|---:|---:|")
    for name, peak in rows:
        print(f"| {name} | {peak / 2**20:,.1f} | {peak / btv:.3f} |")
    print(f"after / before: {rows[1][1] / rows[0][1]:.4f}")


if __name__ == "__main__":
    main()
