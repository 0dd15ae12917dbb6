"""Adaptive sleep against fixed loop counts on trained runs (issue 15): accuracy at equal mean passes.

Each run is evaluated on its task's test split at fixed loop counts and at ``loops: auto`` over a range of
tolerances (the same examples every time). An adaptive point at mean passes m is compared with the fixed
counts' accuracy interpolated linearly at m (passes on the x axis), per run; the table gives the mean and the
spread over runs (seeds).

    python tools/adaptive_report.py runs/study/grid/seed*-loops4 --json docs/results/adaptive-rule110.json \\
        --plot docs/img/adaptive-rule110.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    """Linear interpolation of (xs, ys) (xs increasing) at x; None outside [xs[0], xs[-1]]."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[0] if xs and x == xs[0] else None


def evaluate(run: Path, fixed: list[int], tolerances: list[float], max_loops: int, num_examples: int | None,
             bucket: str | None) -> list[dict]:
    from sleepzoo.train import load_run

    recipe, model, task, step = load_run(run)
    n = num_examples or recipe.eval.num_examples
    rows = []
    settings = [(n_, None) for n_ in fixed] + [("auto", t) for t in tolerances]
    for loops, tol in settings:
        start = time.perf_counter()
        kw = {} if tol is None else {"max_loops": max_loops, "tolerance": tol}
        m = task.evaluate(model, num_examples=n, batch_size=recipe.eval.batch_size, seed=recipe.eval.seed,
                          window=recipe.sleep.window, loops=loops, **kw)
        row = {"run": str(run), "step": step, "loops": loops, "tolerance": tol, "max_loops": max_loops if tol else None,
               "passes_mean": m.get("passes_mean"), "passes_hist": m.get("passes_hist"),
               "exact_accuracy": m["exact_accuracy"], "loss": m["loss"], "eval_s": time.perf_counter() - start}
        if bucket:
            row["buckets"] = {v: {"exact_accuracy": b["exact_accuracy"], "passes_mean": b.get("passes_mean")}
                              for v, b in m["buckets"][bucket].items()}
        rows.append(row)
        print(f"{run.name}: loops {loops}{'' if tol is None else f' tol {tol:g}'}: passes {row['passes_mean']:.3f}, "
              f"exact {row['exact_accuracy']:.4f} ({row['eval_s']:.1f} s)", flush=True)
    return rows


def compare(rows: list[dict], bucket_values: list[str]) -> list[dict]:
    """Per adaptive setting: mean passes, accuracy, and accuracy minus fixed-N accuracy interpolated at the
    same mean passes (overall and per bucket value), each as mean and spread over runs."""
    out = []
    runs = sorted({r["run"] for r in rows})
    tolerances = sorted({r["tolerance"] for r in rows if r["tolerance"] is not None}, reverse=True)
    for tol in tolerances:
        diffs: dict[str, list[float]] = {"all": [], **{v: [] for v in bucket_values}}
        passes, accs = [], []
        for run in runs:
            mine = [r for r in rows if r["run"] == run]
            fixed = sorted((r for r in mine if r["tolerance"] is None), key=lambda r: r["passes_mean"])
            point = next(r for r in mine if r["tolerance"] == tol)
            xs = [r["passes_mean"] for r in fixed]
            passes.append(point["passes_mean"])
            accs.append(point["exact_accuracy"])
            ref = interpolate(xs, [r["exact_accuracy"] for r in fixed], point["passes_mean"])
            if ref is not None:
                diffs["all"].append(point["exact_accuracy"] - ref)
            for v in bucket_values:
                ref_v = interpolate(xs, [r["buckets"][v]["exact_accuracy"] for r in fixed], point["passes_mean"])
                if ref_v is not None:
                    diffs[v].append(point["buckets"][v]["exact_accuracy"] - ref_v)
        out.append({"tolerance": tol, "passes_mean": statistics.fmean(passes), "exact_accuracy": statistics.fmean(accs),
                    "runs": len(runs),
                    "minus_fixed": {k: ({"mean": statistics.fmean(d), "min": min(d), "max": max(d), "n": len(d)}
                                        if d else None) for k, d in diffs.items()}})
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, run in enumerate(sorted({r["run"] for r in rows})):
        mine = [r for r in rows if r["run"] == run]
        for adaptive, style in ((False, "o-"), (True, "*:")):
            part = sorted((r for r in mine if (r["tolerance"] is not None) == adaptive), key=lambda r: r["passes_mean"])
            ax.plot([r["passes_mean"] for r in part], [r["exact_accuracy"] for r in part], style, color=f"C{i}",
                    label=f"{Path(run).name} {'auto' if adaptive else 'fixed'}", markersize=7 if adaptive else 4)
    ax.set_xlabel("passes used per window (mean over test examples)")
    ax.set_ylabel("exact accuracy (test)")
    ax.set_title(title)
    ax.legend(fontsize="xx-small", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--fixed", default="1,2,4,8", help="fixed loop counts [1,2,4,8]")
    p.add_argument("--tolerances", default="0.5,0.3,0.2,0.15,0.1,0.05", help="tolerances of loops: auto")
    p.add_argument("--max-loops", type=int, default=8)
    p.add_argument("--num-examples", type=int)
    p.add_argument("--bucket", default="t", help="bucket key of the task to break accuracy down by ('' for none)")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    fixed = [int(x) for x in a.fixed.split(",")]
    tolerances = [float(x) for x in a.tolerances.split(",")]
    rows = []
    for run in a.runs:
        rows += evaluate(run, fixed, tolerances, a.max_loops, a.num_examples, a.bucket or None)
    values = sorted({v for r in rows for v in r.get("buckets", {})}, key=float) if a.bucket else []
    summary = compare(rows, values)
    print(f"\n{'tol':>6} {'passes':>7} {'exact':>7} {'minus fixed at equal passes (mean [min, max] over runs)':>10}")
    for s in summary:
        d = s["minus_fixed"]["all"]
        per = "  ".join(f"{a.bucket}={v}: {s['minus_fixed'][v]['mean']:+.3f}" for v in values if s["minus_fixed"][v])
        shown = f"{d['mean']:+.4f} [{d['min']:+.4f}, {d['max']:+.4f}]" if d else "n/a"
        print(f"{s['tolerance']:>6g} {s['passes_mean']:>7.3f} {s['exact_accuracy']:>7.4f} {shown}   {per}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows, "summary": summary}, indent=1))
    if a.plot:
        plot(rows, a.plot, f"adaptive against fixed sleep ({len(a.runs)} runs)")


if __name__ == "__main__":
    main()
