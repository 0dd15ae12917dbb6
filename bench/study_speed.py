"""The sleep study's training step, before against after, in one interleaved run (issue 12, item 2).

    python bench/study_speed.py --before 1aa95c5                 # that commit's sleepzoo against this tree's
    python bench/study_speed.py --before 1aa95c5 --loops 1 4 --steps 40 --json b.json

Two worker processes build the same model from ``recipes/study/rule110-depth.yaml`` (one imports the
``sleepzoo`` package of ``--before``, extracted with ``git archive``; the other this checkout's), train on the
same batches, and take one step each in turn, so that the machine's drift (10-30 % here) falls on both alike.
Each worker runs on one thread, like the study's jobs. Reported: median ms per step, tokens/s, and the median of
the per-pair ratios (before / after: the speed-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "study" / "rule110-depth.yaml"


def worker(loops: int, batch: int, distinct: int) -> None:
    """Read a command per line on stdin ('step' or 'quit'); answer each step with its time in seconds."""
    import torch

    import sleepzoo
    from sleepzoo.config import load_recipe
    from sleepzoo.optim import build_optimizers
    from sleepzoo.train import batch_seed, build

    torch.set_num_threads(1)
    recipe = load_recipe(str(RECIPE), [f"sleep.loops={loops}", f"train.batch_size={batch}"])
    model, task = build(recipe)
    optimizers = build_optimizers(model, recipe.train)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [task.generate(batch, seed=batch_seed(recipe.train.seed, i), split="train") for i in range(distinct)]
    print(json.dumps({"ready": str(Path(sleepzoo.__file__).parent), "tokens": batches[0]["input_ids"].numel()}),
          flush=True)
    calls = 0
    for line in sys.stdin:
        if line.strip() != "step":
            break
        b = batches[calls % distinct]
        calls += 1
        t0 = time.perf_counter()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        model(b["input_ids"], b["targets"], return_logits=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for opt in optimizers:
            opt.step()
        print(json.dumps({"s": time.perf_counter() - t0}), flush=True)


class Worker:
    def __init__(self, pythonpath: str | None, loops: int, batch: int, distinct: int):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        if pythonpath:
            env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        # run from a neutral folder: the checkout on sys.path[0] would shadow the extracted package
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(loops),
                                      str(batch), str(distinct)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=tempfile.gettempdir())
        hello = self._read()
        self.package, self.tokens = hello["ready"], hello["tokens"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: a benchmark worker stopped (exit code {self.proc.wait()}); see its output above")
        return json.loads(line)

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read()["s"]

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


def extract(ref: str, into: Path) -> None:
    """The ``sleepzoo`` package at git revision ``ref`` under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "sleepzoo"], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"error: git archive {ref!r} failed: {archive.stderr.decode().strip()}")
    tar = into / "before.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision whose sleepzoo is the baseline")
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side (after 3 warm-up steps)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", help="write the timings here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        extract(args.before, Path(tmp))
        print("| loops | before ms/step | after ms/step | before tok/s | after tok/s | speed-up (median of pairs) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for loops in args.loops:
            before = Worker(tmp, loops, args.batch, 4)
            after = Worker(None, loops, args.batch, 4)
            if Path(before.package).resolve() == Path(after.package).resolve():
                raise SystemExit(f"error: both workers imported {after.package}; the baseline did not load")
            for _ in range(3):
                before.step(), after.step()
            tb, ta = [], []
            for i in range(args.steps):
                pair = (before, tb), (after, ta)
                for w, times in (pair if i % 2 == 0 else pair[::-1]):  # alternate which side goes first
                    times.append(w.step())
            before.close(), after.close()
            mb, ma = statistics.median(tb), statistics.median(ta)
            ratio = statistics.median(b / a for b, a in zip(tb, ta))
            tokens = after.tokens
            rows.append({"loops": loops, "before_s": tb, "after_s": ta, "tokens_per_step": tokens,
                         "speedup": ratio})
            print(f"| {loops} | {mb * 1e3:.1f} | {ma * 1e3:.1f} | {tokens / mb:,.0f} | {tokens / ma:,.0f} | "
                  f"{ratio:.2f}x |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"before": args.before, "batch": args.batch, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
