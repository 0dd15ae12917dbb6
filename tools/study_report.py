"""Tables, curves and tests of the CPU sleep study (docs/results.md, "Sleep on a mixed-depth Rule 110").

    python tools/study_report.py runs/study --previous docs/results/study-rule110.json \
        --json docs/results/study-rule110.json --plot docs/img/study-rule110.png

Reads every run directory under the given folder (recipe.yaml, metrics.jsonl, eval.json), groups runs by
(variant, loops) where the variant names a non-default stabiliser setting (gate off, pass_norm, ...), and
prints markdown: per-run tokens and wall time; final accuracy per t bucket (mean +- std over seeds); the share of
seeds that solve a bucket (accuracy >= 0.95); the flatness of the N = 1 curves (range of accuracy over the last
30 % of steps); and, for every bucket, a test of N against N = 1 on the pooled test answers (two-proportion
z-test) and, with two or more seeds on each side, a bootstrap over seeds of the mean difference. Finished
runs only (an eval.json); running ones are listed as such.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import yaml

SOLVED = 0.95


def load(run: Path) -> dict | None:
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    evals, last_train = [], {}
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []  # none yet: a run that just started
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written last line of a running job
        if rec.get("split") == "test":
            evals.append({"step": rec["step"], "t": {k: v["token_accuracy"] for k, v in rec["buckets"]["t"].items()},
                          "all": rec["token_accuracy"]})
        else:
            last_train = rec
    sleep = recipe.get("sleep", {})
    variant = []
    if not sleep.get("gate", False):
        variant.append("ungated")
    if sleep.get("pass_norm"):
        variant.append("pass_norm")
    if sleep.get("truncate"):
        variant.append(f"truncate {sleep['truncate']}")
    done = (run / "eval.json").is_file()
    final = json.loads((run / "eval.json").read_text()) if done else None
    return {"run": run.name, "path": str(run), "loops": sleep.get("loops", 1), "seed": recipe["train"].get("seed", 0),
            "variant": " ".join(variant) or "gated", "steps": recipe["train"]["steps"], "done": done,
            "tokens": last_train.get("tokens"), "wall_s": final.get("train_time_s") if final else last_train.get("elapsed_s"),
            "final": {k: v["token_accuracy"] for k, v in final["buckets"]["t"].items()} if final else None,
            "final_n": {k: v["num_targets"] for k, v in final["buckets"]["t"].items()} if final else None,
            "curve": evals}


def majority_rates(run: Path) -> dict[str, float]:
    """Per t, the share of the test split's majority answer: what a constant prediction scores."""
    import sleepzoo

    path = run / "recipe.yaml"  # a run from --previous may not be on this machine: the study's recipe then
    recipe = sleepzoo.load_recipe(str(path if path.is_file() else Path("recipes/study/rule110-depth.yaml")))
    data = sleepzoo.build_task(recipe).generate(recipe.eval.num_examples, recipe.eval.seed, "test")
    out = {}
    for t in data["t"].unique().tolist():
        answers = data["targets"][data["t"] == t, -1].float()
        share = float((answers == answers.max()).float().mean())
        out[str(t)] = max(share, 1 - share)
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def two_proportion(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """(difference p2 - p1, two-sided p-value) of a pooled two-proportion z-test."""
    p1, p2, p = k1 / n1, k2 / n2, (k1 + k2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return p2 - p1, 1.0
    z = (p2 - p1) / se
    return p2 - p1, math.erfc(abs(z) / math.sqrt(2))


def bootstrap(a: list[float], b: list[float], reps: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of mean(b) - mean(a), resampling seeds."""
    rng = random.Random(seed)
    diffs = sorted(sum(rng.choices(b, k=len(b))) / len(b) - sum(rng.choices(a, k=len(a))) / len(a)
                   for _ in range(reps))
    return diffs[int(0.025 * reps)], diffs[int(0.975 * reps)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    ap.add_argument("--previous", help="a JSON this tool wrote: its finished runs count too unless a run "
                                       "directory of the same group and name is here (a new machine resumes the "
                                       "study without retraining what was committed)")
    a = ap.parse_args()
    runs = [r for r in (load(p.parent) for p in sorted(Path(a.root).glob("*/*/recipe.yaml"))
                        if not p.parent.parent.name == "lr") if r]
    if a.previous and Path(a.previous).is_file():
        here = {(Path(r["path"]).parent.name, r["run"]) for r in runs}
        runs += [r for r in json.loads(Path(a.previous).read_text())["runs"]
                 if r["done"] and (Path(r["path"]).parent.name, r["run"]) not in here]
    done = [r for r in runs if r["done"]]
    buckets = sorted({t for r in done for t in r["final"]}, key=int)
    groups: dict[tuple, list[dict]] = {}
    for r in done:
        groups.setdefault((r["variant"], r["loops"]), []).append(r)
    print("| run | variant | N | seed | steps | tokens | wall (s) | status |\n|---|---|---:|---:|---:|---:|---:|---|")
    for r in sorted(runs, key=lambda r: (r["variant"], r["loops"], r["seed"])):
        print(f"| {r['run']} | {r['variant']} | {r['loops']} | {r['seed']} | {r['steps']} | {r['tokens'] or 0:,} | "
              f"{(r['wall_s'] or 0):.0f} | {'done' if r['done'] else 'running'} |")
    print("\nFinal accuracy per t (mean ± std over seeds; solved = seeds with accuracy >= 0.95):\n")
    print("| variant | N | seeds | " + " | ".join(f"t={t}" for t in buckets) + " |")
    print("|---|---:|---:|" + "---:|" * len(buckets))
    for (variant, n), rs in sorted(groups.items()):
        cells = []
        for t in buckets:
            m, s = mean_std([r["final"][t] for r in rs])
            solved = sum(r["final"][t] >= SOLVED for r in rs)
            cells.append(f"{m:.3f} ± {s:.3f} ({solved}/{len(rs)})")
        print(f"| {variant} | {n} | {len(rs)} | " + " | ".join(cells) + " |")
    base = groups.get(("gated", 1), [])
    tests = []
    if base:
        print("\nAgainst N = 1 (gated N = 1 is the plain hybrid): difference of accuracy, pooled two-proportion "
              "z-test p, and a 95 % bootstrap interval over seeds where both sides have >= 2:\n")
        print("| variant | N | " + " | ".join(f"t={t}" for t in buckets) + " |")
        print("|---|---:|" + "---|" * len(buckets))
        for (variant, n), rs in sorted(groups.items()):
            if (variant, n) == ("gated", 1):
                continue
            cells = []
            for t in buckets:
                k1 = sum(round(r["final"][t] * r["final_n"][t]) for r in base)
                n1 = sum(r["final_n"][t] for r in base)
                k2 = sum(round(r["final"][t] * r["final_n"][t]) for r in rs)
                n2 = sum(r["final_n"][t] for r in rs)
                diff, p = two_proportion(k1, n1, k2, n2)
                cell = f"{diff:+.3f} (p {p:.2g})"
                row = {"variant": variant, "loops": n, "t": int(t), "diff": diff, "p": p}
                if len(base) >= 2 and len(rs) >= 2:
                    lo, hi = bootstrap([r["final"][t] for r in base], [r["final"][t] for r in rs])
                    cell += f" [{lo:+.3f}, {hi:+.3f}]"
                    row["bootstrap_95"] = [lo, hi]
                cells.append(cell)
                tests.append(row)
            print(f"| {variant} | {n} | " + " | ".join(cells) + " |")
        print("\nFlatness of the N = 1 curves: range of accuracy over the evaluations in the last 30 % of steps:\n")
        for r in base:
            tail = [e for e in r["curve"] if e["step"] >= 0.7 * r["steps"]]
            ranges = {t: max(e["t"][t] for e in tail) - min(e["t"][t] for e in tail) for t in buckets}
            overall = max(e["all"] for e in tail) - min(e["all"] for e in tail)
            print(f"- {r['run']}: all t {overall:.3f}; " + ", ".join(f"t={t} {v:.3f}" for t, v in ranges.items()))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"solved_threshold": SOLVED, "runs": runs, "tests": tests}, indent=1))
    if a.plot and done:
        from sleepzoo.report import _pyplot, _save

        plt = _pyplot()
        fig, axes = plt.subplots(1, len(buckets), figsize=(2.6 * len(buckets), 3.2), sharey=True)
        colors = {}
        for (variant, n), rs in sorted(groups.items()):
            label = f"N = {n}" + ("" if variant == "gated" else f" ({variant})")
            color = colors.setdefault(label, f"C{len(colors)}")
            steps = sorted({e["step"] for r in rs for e in r["curve"]})
            for ax, t in zip(axes, buckets):
                series = [[e["t"][t] for run in rs for e in run["curve"] if e["step"] == s] for s in steps]
                tok = [s * rs[0]["tokens"] / rs[0]["steps"] / 1e6 for s in steps]
                mean = [sum(v) / len(v) for v in series]
                ax.plot(tok, mean, color=color, label=label)
                ax.fill_between(tok, [min(v) for v in series], [max(v) for v in series], color=color, alpha=0.2)
                ax.set_title(f"t = {t}")
                ax.set_xlabel("tokens (M)")
        chance = majority_rates(Path(done[0]["path"]))
        for ax, t in zip(axes, buckets):
            if t in chance:
                ax.axhline(chance[t], color="grey", ls=":", lw=1)
        axes[0].set_ylabel("accuracy (band: seed min..max; dotted: chance)")
        axes[-1].legend(fontsize=7)
        _save(fig, a.plot)


if __name__ == "__main__":
    main()
