"""The GPU twin of the sleep study (issue 12): the paper's Rule 110 study on one GPU, inside 9 minutes.

    python bench/gpu_study.py --out gpu_study.json --plot gpu_study.png          # on a CUDA machine
    python bench/gpu_study.py --dry-run --out /tmp/s.json --plot /tmp/s.png      # tiny, on the CPU (a test)

The paper's set-up (SPEC 2, 3, 5): 4 random 24-bit states, one per window (L = 24, T = 100), evicted before
the 4 queries; the answer at Qi is cell 0 of state i after t Rule-110 steps. Model: 4 blocks attention -> Gated
DeltaNet -> attention -> Gated DeltaNet, d 256, head dim 64, SwiGLU; bf16 autocast, batch 512, AdamW
(``--lr``) with warm-up and a linear decay; fla's chunked Gated DeltaNet kernel when the ``sleepzoo-fla``
plugin runs here, else the torch rule (recorded). Grid: t in {4, 8, 16, 32} x N in {1, 2, 4}; for each t every
N trains the same number of steps on the same data order, chosen so that the whole grid fits ``--budget-s``
(from the step times measured first). Each run goes through ``sleepzoo.train.train`` (a run directory
under ``--runs``), and its final evaluation (2,048 test examples) gives exact accuracy (all 4 labels; chance
1/16) and per-label accuracy. Writes one JSON (``--out``) and one PNG (``--plot``): exact accuracy against t,
one line per N, and the learning curves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

TS, LOOPS = (4, 8, 16, 32), (1, 2, 4)


def study_recipe(t: int, loops: int, steps: int, *, dry_run: bool, device: str, rule: str, lr: float,
                 batch: int, seed: int = 0):
    import sleepzoo

    d, heads = (32, 2) if dry_run else (256, 4)
    gdn = {"num_heads": heads, "head_dim": d // heads, "expand_v": 1.0, "conv_size": 4}
    if rule != "gated_delta":
        gdn["rule"] = rule
    return sleepzoo.load_recipe({
        "model": {"name": "hybrid", "d_model": d, "layers": ["attention", "gated_deltanet", "attention", "gated_deltanet"],
                  "mixers": {"attention": {"num_heads": heads, "num_kv_heads": heads, "head_dim": d // heads},
                             "gated_deltanet": gdn}},
        "sleep": {"window": 24, "loops": loops, "eviction": "full_flush"},
        "task": {"name": "rule110", "steps": t, "states": 4, "bits": 24},
        "train": {"steps": steps, "batch_size": batch, "seed": seed, "optimizer": "adamw", "adamw_lr": lr,
                  "betas": [0.9, 0.95], "weight_decay": 1e-4, "grad_clip": 1.0,
                  "warmup_steps": max(1, steps // 50), "decay_fraction": 0.2, "log_every": max(1, steps // 20),
                  "checkpoint_every": 0, "keep_checkpoints": 0, "device": device,
                  "autocast": "none" if dry_run else "bf16"},
        "eval": {"every": 0 if dry_run else max(1, steps // 5), "num_examples": 32 if dry_run else 2048,
                 "batch_size": 32 if dry_run else 1024},
    })


def step_seconds(recipe, repeats: int = 3) -> float:
    """Seconds per training step of ``recipe``'s model (after a warm-up step), bf16 autocast as in training."""
    import sleepzoo
    from sleepzoo.precision import Precision

    dev = torch.device(recipe.train.device)
    model, task = sleepzoo.build_model(recipe).to(dev), sleepzoo.build_task(recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = task.generate(recipe.train.batch_size, seed=0)
    ids, tg = data["input_ids"].to(dev), data["targets"].to(dev)
    precision = Precision(recipe.train.autocast, dev)

    def step():
        with precision.autocast():
            loss = model(ids, tg, return_logits=False).loss
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()

    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def plan_steps(step_s: dict[int, float], budget_s: float, n_t: int, eval_share: float = 0.15,
               minimum: int = 1) -> int:
    """Steps per run so that n_t groups of (N = 1, 2, 4 at equal steps) fit ``budget_s`` (less an evaluation
    share)."""
    per_step = sum(step_s.values())  # one step of every N
    return max(minimum, int(budget_s * (1 - eval_share) / (n_t * per_step)))


def curves(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == "test":
            out.append({"step": rec["step"], "exact_accuracy": rec["exact_accuracy"],
                        "token_accuracy": rec["token_accuracy"], "loss": rec["loss"]})
    return out


def plot(report: dict, path: str) -> None:
    from sleepzoo.report import _pyplot, _save

    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for n in report["loops"]:
        rows = [r for r in report["runs"] if r["loops"] == n]
        a.plot([r["t"] for r in rows], [r["exact_accuracy"] for r in rows], marker="o", label=f"N = {n}")
    a.axhline(1 / 16, color="grey", ls=":", label="chance 1/16")
    a.set_xscale("log", base=2)
    a.set_xlabel("Rule 110 steps t")
    a.set_ylabel("exact accuracy (4 labels)")
    a.set_title("Rule 110, final accuracy")
    a.legend()
    t_big = max(report["ts"])
    for n in report["loops"]:
        for r in report["runs"]:
            if r["loops"] == n and r["t"] == t_big and r["curve"]:
                b.plot([c["step"] * r["tokens_per_step"] / 1e6 for c in r["curve"]],
                       [c["exact_accuracy"] for c in r["curve"]], marker=".", label=f"N = {n}")
    b.set_xlabel("training tokens (M)")
    b.set_ylabel("exact accuracy")
    b.set_title(f"learning curves at t = {t_big}")
    b.legend()
    _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the JSON report")
    ap.add_argument("--plot", required=True, help="the PNG")
    ap.add_argument("--runs", default="runs/gpu_study", help="run directories go here")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the code path")
    ap.add_argument("--budget-s", type=float, default=420.0, help="training time for the whole grid")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--ts", type=int, nargs="+", default=list(TS))
    ap.add_argument("--loops", type=int, nargs="+", default=list(LOOPS))
    args = ap.parse_args(argv)
    started = time.monotonic()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run to check the code path on a CPU")
        return 2
    device = "cuda" if cuda else "cpu"
    rule, why = "gated_delta", {}
    if cuda:
        from gpu_check import _choose_rule_and_backend

        rule, _, why = _choose_rule_and_backend(torch.device("cuda"))
    batch = 8 if args.dry_run else args.batch
    ts = [1, 2] if args.dry_run else args.ts
    loops = [1, 2] if args.dry_run else args.loops
    probe = {n: step_seconds(study_recipe(max(ts), n, 1, dry_run=args.dry_run, device=device, rule=rule,
                                          lr=args.lr, batch=batch)) for n in loops}
    steps = 3 if args.dry_run else plan_steps(probe, args.budget_s - (time.monotonic() - started), len(ts))
    tokens_per_step = batch * (4 * 24 + 4)
    print(f"device {device}, rule {rule} {why or ''}, step s {probe}, {steps} steps per run = "
          f"{steps * tokens_per_step / 1e6:.1f}M tokens")
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "rule": rule,
              "rule_fallback_reason": why, "dry_run": args.dry_run, "ts": ts, "loops": loops, "steps": steps,
              "batch": batch, "lr": args.lr, "step_s_probe": probe, "runs": []}
    from sleepzoo.train import train

    for t in ts:
        for n in loops:
            recipe = study_recipe(t, n, steps, dry_run=args.dry_run, device=device, rule=rule, lr=args.lr,
                                  batch=batch)
            out = Path(args.runs) / f"t{t}-loops{n}"
            t0 = time.monotonic()
            result = train(recipe, out, resume=out.exists(), progress=False)
            row = {"t": t, "loops": n, "steps": steps, "tokens": steps * tokens_per_step,
                   "tokens_per_step": tokens_per_step, "wall_s": round(time.monotonic() - t0, 1),
                   "exact_accuracy": result["exact_accuracy"], "token_accuracy": result["token_accuracy"],
                   "label_accuracy": result.get("label_accuracy"), "loss": result["loss"], "curve": curves(out)}
            report["runs"].append(row)
            print(f"t {t:2d} N {n}: exact {row['exact_accuracy']:.3f} labels {row['token_accuracy']:.3f} "
                  f"({row['wall_s']} s)", flush=True)
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:  # after every run: a timeout keeps the finished ones
                json.dump(report, f, indent=1)
            os.replace(tmp, args.out)
    report["seconds"] = round(time.monotonic() - started, 1)
    with open(args.out + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    plot(report, args.plot)
    print(f"wrote {args.out} and {args.plot} in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
