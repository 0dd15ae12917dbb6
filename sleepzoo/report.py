"""Tables and plots of evaluation results, shared by ``sleepzoo eval``, ``demo``, ``compare`` and ``sweep``.

A *row* is one evaluation as the trainer writes it to ``eval.json``: settings (``step``, ``loops``,
``window``, ``num_examples``), scalar metrics (``exact_accuracy``, ``loss``, ...), list metrics (``label_accuracy``,
one value per label) and optionally ``train_time_s`` and ``run`` (its directory).

    rows = [load_eval(d) for d in ["runs/demo/loops1", "runs/demo/loops2"]]
    Console().print(runs_table(rows, key="loops"))
    plot_accuracy(rows, "runs/demo/demo.png", key="loops")

One evaluation with per-bucket metrics (``row["buckets"][name][value] = {loss, token_accuracy, ...}``):
:func:`buckets_table`, :func:`plot_eval`; loss against position for several ``task: text`` evaluations (one line
per N): :func:`plot_loss_by_position`. Many runs, grouped by a recipe setting and aggregated over seeds:

    results = [load_result(d) for d in find_runs(["runs/repro/rule110-loops"])]
    comparison = compare_runs(results, key="sleep.loops", metric="exact_accuracy")
    Console().print(comparison_table(comparison))
    plot_comparison(comparison, "docs/img/rule110-loops.png")
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml
from rich.table import Table

from .config import load_recipe
from .registry import SleepzooError

SETTINGS = ("run", "step", "loops", "window", "num_examples")
# Shown first, in this order, when present; every other metric follows alphabetically.
HEADLINE = ("exact_accuracy", "label_accuracy", "token_accuracy", "loss")
HIDDEN = ("num_targets", "buckets")  # buckets: see buckets_table


def load_eval(run_dir: str | Path, name: str = "eval.json") -> dict[str, Any]:
    """A run's evaluation row (``eval.json``) with ``run`` set to the directory."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise SleepzooError(f"{str(path)!r} does not exist: the run has not finished; "
                            f"`sleepzoo eval {run_dir}` evaluates its newest checkpoint")
    row, why = read_row(path)
    if row is None:
        raise SleepzooError(f"{str(path)!r} is damaged ({why}); `sleepzoo eval {run_dir}` writes it again")
    return {"run": str(run_dir), **row}


def read_row(path: Path) -> tuple[dict[str, Any] | None, str]:
    """An evaluation row from a JSON file (``eval.json``), or None and why it is not one: the one lenient
    reader of evaluation files (compare, the trainer's resume of a finished run, eval, sweep's plan)."""
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        return None, f"not valid JSON: {exc}"
    if not isinstance(row, dict):
        return None, f"a JSON {type(row).__name__}, not an evaluation"
    return row, ""


def _row_step(row: dict[str, Any]) -> int | None:
    step = row.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def format_value(value: Any) -> str:
    """Floats to 4 decimals, lists compactly as ``a/b/c`` (3 decimals), anything else as ``str``."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return "/".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, dict):  # a histogram such as passes_hist: {"2": 192, "3": 467} -> 2:192 3:467
        return " ".join(f"{k}:{format_value(v)}" for k, v in value.items())
    return str(value)


def header(column: str) -> str:
    """A short column title, so that a table of the usual metrics fits an 80-column terminal."""
    return column.replace("_accuracy", " acc").replace("train_time_s", "train s").replace("_", " ")


def _is_flattened_list(key: str, rows: Sequence[dict]) -> bool:
    # Tasks report a list metric both whole (label_accuracy) and per element (label_accuracy_1, ...);
    # the table shows the whole list once.
    m = re.match(r"^(.*)_\d+$", key)
    return bool(m) and any(isinstance(r.get(m.group(1)), list) for r in rows)


def metric_columns(rows: Sequence[dict], key: str | None = None) -> list[str]:
    """Columns for ``rows``: ``key``, settings that vary between rows, headline metrics, then the rest."""
    present = [k for r in rows for k in r]
    present = list(dict.fromkeys(present))
    settings = [k for k in SETTINGS if k in present and k != key
                and len({json.dumps(r.get(k)) for r in rows}) > 1]
    headline = [k for k in HEADLINE if k in present]
    rest = sorted(k for k in present if k not in SETTINGS and k not in HEADLINE and k not in HIDDEN
                  and k != "train_time_s" and k != key and not _is_flattened_list(k, rows))
    if all(r.get("loops") != "auto" for r in rows):  # fixed loop counts: the passes used are the loops column
        rest = [k for k in rest if k not in ("passes_mean", "passes_hist")]
    timing = ["train_time_s"] if "train_time_s" in present else []
    return ([key] if key else []) + settings + headline + rest + timing


def runs_table(rows: Sequence[dict], *, key: str | None = "loops", title: str | None = None,
               hide: Sequence[str] = ()) -> Table:
    """One row per evaluation, one column per metric (see :func:`metric_columns`), minus ``hide``."""
    columns = [c for c in metric_columns(rows, key) if c not in hide]
    table = Table(title=title)
    for c in columns:
        if c == "run":
            table.add_column(c, overflow="fold")
        else:
            table.add_column(header(c), justify="right", min_width=len(header(c)))
    for r in rows:
        table.add_row(*(format_value(r.get(c, "")) for c in columns))
    return table


def metrics_table(metrics: dict[str, Any], *, title: str | None = None) -> Table:
    """One evaluation as a two-column ``metric | value`` table."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for c in metric_columns([metrics]):
        if c in metrics:
            table.add_row(c, format_value(metrics[c]))
    for c in ("step", "loops", "window", "num_examples"):  # one row: its settings do not "vary"
        if c in metrics:
            table.add_row(c, format_value(metrics[c]))
    return table


def accuracy_series(rows: Sequence[dict]) -> dict[str, list[float]]:
    """Accuracy-like metrics per row: scalars by name, list elements as ``name[i]`` (missing = NaN)."""
    series: dict[str, list[float]] = {}
    names = [k for k in metric_columns(rows) if k.endswith("accuracy")]
    for name in names:
        if any(isinstance(r.get(name), list) for r in rows):
            width = max(len(r.get(name) or []) for r in rows)
            for i in range(width):
                series[f"{name}[{i + 1}]"] = [
                    float(r[name][i]) if isinstance(r.get(name), list) and i < len(r[name]) else float("nan")
                    for r in rows]
        else:
            series[name] = [float(r[name]) if isinstance(r.get(name), (int, float)) else float("nan")
                            for r in rows]
    return series


def plot_accuracy(rows: Sequence[dict], path: str | Path, *, key: str = "loops",
                  title: str | None = None) -> Path:
    """Grouped bar chart of every accuracy metric per value of ``key`` (e.g. sleep loops), saved to ``path``."""
    plt = _pyplot()
    series = accuracy_series(rows)
    if not series:
        raise SleepzooError("nothing to plot: the evaluations have no accuracy metric")
    labels = [format_value(r.get(key, i)) for i, r in enumerate(rows)]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(4 + 1.5 * len(rows), 3.5))  # room for the legend on the right
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, values, width=width, label=name)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_xlabel(key)
    ax.set_ylabel("accuracy (test)")
    ax.set_ylim(0, 1)
    ax.set_title(title or f"accuracy per {key}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# buckets: metrics per value of a per-example key (Depo's hop count k, GSM-Infinite's op)

BUCKET_METRICS = ("exact_accuracy", "token_accuracy", "loss")


def _bucket_order(value: str) -> tuple:
    """Sort bucket values numerically when they are numbers (``"10"`` after ``"9"``), else as text."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def sorted_bucket_values(values: Iterable[str]) -> list[str]:
    return sorted(dict.fromkeys(str(v) for v in values), key=_bucket_order)


def _numeric(values: Sequence[Any]) -> list[float] | None:
    """``values`` as floats when every one is a number (bools are not), else None."""
    out = []
    for v in values:
        if isinstance(v, bool):
            return None
        if isinstance(v, (int, float)):
            out.append(float(v))
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            return None
    return out


def buckets_table(result: dict[str, Any], *, title: str | None = None) -> Table | None:
    """One row per bucket value of every bucket key in ``result["buckets"]``; None when there are none."""
    buckets = result.get("buckets") or {}
    if not buckets:
        return None
    table = Table(title=title)
    table.add_column("bucket")
    for c in (*BUCKET_METRICS, "num_examples"):
        table.add_column(header(c), justify="right")
    for name, per_value in buckets.items():
        for value in sorted_bucket_values(per_value):
            scores = per_value[value]
            table.add_row(f"{name}={value}", *(format_value(scores.get(c, "")) for c in BUCKET_METRICS),
                          format_value(scores.get("num_examples", "")))
    return table


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_eval(result: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Plot one evaluation: metric vs bucket value when the task has buckets, else its headline metrics.

    With buckets, one panel per bucket key: exact and token accuracy (left axis) and loss (right axis,
    dashed) against the bucket value. Without, bars of every accuracy metric and of the loss.
    """
    plt = _pyplot()
    buckets = result.get("buckets") or {}
    if buckets:
        fig, axes = plt.subplots(1, len(buckets), figsize=(5 * len(buckets), 3.6), squeeze=False)
        for ax, (name, per_value) in zip(axes[0], buckets.items()):
            values = sorted_bucket_values(per_value)
            xs = _numeric(values) or list(range(len(values)))
            for metric, marker in (("exact_accuracy", "o"), ("token_accuracy", "s")):
                ys = [per_value[v].get(metric, float("nan")) for v in values]
                ax.plot(xs, ys, marker=marker, label=header(metric))
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel(name)
            ax.set_ylabel("accuracy (test)")
            ax.set_xticks(xs, values)
            twin = ax.twinx()
            twin.plot(xs, [per_value[v].get("loss", float("nan")) for v in values], color="tab:red",
                      linestyle="--", marker="^", label="loss")
            twin.set_ylabel("loss", color="tab:red")
            handles = ax.get_legend_handles_labels()
            more = twin.get_legend_handles_labels()
            ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize="small", loc="best")
            ax.set_title(f"per {name}")
        fig.suptitle(title or "evaluation per bucket")
        return _save(fig, path)
    series = {k: v[0] for k, v in accuracy_series([result]).items()}
    loss = result.get("loss")
    if not series and not isinstance(loss, (int, float)):
        raise SleepzooError("nothing to plot: the evaluation has no accuracy metric and no loss")
    fig, axes = plt.subplots(1, 2, figsize=(4 + 0.6 * len(series), 3.5), squeeze=False,
                             gridspec_kw={"width_ratios": [max(len(series), 1), 1]})
    acc, loss_ax = axes[0]
    acc.bar(range(len(series)), list(series.values()), color="tab:blue")
    acc.set_xticks(range(len(series)), [header(k) for k in series], rotation=30, ha="right")
    acc.set_ylim(0, 1)
    acc.set_ylabel("accuracy (test)")
    if isinstance(loss, (int, float)):
        loss_ax.bar([0], [loss], color="tab:red")
    loss_ax.set_xticks([0], ["loss"])
    fig.suptitle(title or "evaluation")
    return _save(fig, path)


def plot_loss_by_position(curves: dict[str, dict[str, Any]], path: str | Path, *,
                          title: str | None = None) -> Path:
    """Loss against position, one line per label (e.g. ``{"N=1": row, "N=4": row}``), saved to ``path``.

    Each value is an evaluation row of ``task: text`` (``row["buckets"]["position"]``: ``{start: {loss,
    start, end, ...}}``, plotted at the bucket's centre; ``row["buckets"]["window"]``, when present, adds a
    second panel of loss against window index and dotted lines at the window boundaries of the first label).
    A row without position buckets raises SleepzooError naming its label.
    """
    if not curves:
        raise SleepzooError("plot_loss_by_position: no curves to plot (give {label: evaluation row})")
    for label, row in curves.items():
        if not isinstance(row, dict) or not (row.get("buckets") or {}).get("position"):
            raise SleepzooError(f"plot_loss_by_position: {label!r} has no loss by position "
                                f"(row['buckets']['position'], which task: text evaluations have)")
    with_windows = any((row.get("buckets") or {}).get("window") for row in curves.values())
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if with_windows else 1, figsize=(11 if with_windows else 6.5, 3.8),
                             squeeze=False, gridspec_kw={"width_ratios": [2, 1]} if with_windows else None)
    ax = axes[0][0]
    for label, row in curves.items():
        per = row["buckets"]["position"]
        keys = sorted_bucket_values(per)
        xs = [(per[k].get("start", float(k)) + per[k].get("end", float(k) + 1)) / 2 for k in keys]
        ax.plot(xs, [per[k].get("loss", float("nan")) for k in keys], marker=".", label=str(label))
    first = next(iter(curves.values()))["buckets"].get("window") or {}
    for k in sorted_bucket_values(first)[1:]:  # where each window after the first starts: an eviction
        ax.axvline(first[k].get("start", 0), color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("position (tokens; dotted: window starts after an eviction)" if first else "position (tokens)")
    ax.set_ylabel("loss (test, nats/token)")
    ax.legend(fontsize="small", loc="best")
    if with_windows:
        wax = axes[0][1]
        indices: set[int] = set()
        for label, row in curves.items():
            per = (row.get("buckets") or {}).get("window") or {}
            keys = sorted_bucket_values(per)
            indices.update(int(float(k)) for k in keys)
            wax.plot([int(float(k)) for k in keys], [per[k].get("loss", float("nan")) for k in keys],
                     marker="o", label=str(label))
        wax.set_xticks(sorted(indices))
        wax.set_xlabel("window index")
        wax.set_ylabel("loss (test)")
        wax.legend(fontsize="small", loc="best")
    fig.suptitle(title or "loss by position")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------
# one run at several loop counts: accuracy against the passes used (`sleepzoo eval RUN --loops 1,2,4,auto`)


def loops_label(loops: Any, tolerance: float | None = None) -> str:
    """``"4"`` for a fixed count, ``"auto 0.1"`` (the tolerance) for adaptive sleep."""
    return str(loops) if tolerance is None else f"{loops} {tolerance:g}"


def _first_bucket(rows: Sequence[dict[str, Any]]) -> tuple[str | None, list[str]]:
    """The first bucket key any row has (e.g. ``t``) and every value of it over the rows, in order."""
    bucket = next((name for r in rows for name in (r.get("buckets") or {})), None)
    if bucket is None:
        return None, []
    return bucket, sorted_bucket_values({v for r in rows for v in (r.get("buckets") or {}).get(bucket, {})})


def loops_table(rows: Sequence[dict[str, Any]], *, title: str | None = None) -> Table:
    """One row per loop setting (``row["label"]``; auto rows: ``auto TOLERANCE``): the mean passes used,
    exact accuracy and loss and, for a task with buckets, the exact accuracy per value of its first bucket
    key (three decimals and light borders, so that it fits a terminal)."""
    from rich import box

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1))
    bucket, values = _first_bucket(rows)
    width = max([5, *(len(str(r["label"])) for r in rows)])
    for c in ["loops", "passes", "exact", "loss", *(f"{bucket}={v}" for v in values)]:
        table.add_column(c, justify="right", no_wrap=True, min_width=width if c == "loops" else max(len(c), 5))

    def short(x: Any) -> str:
        return f"{x:.3f}" if isinstance(x, float) else str(x)

    for r in rows:
        per = (r.get("buckets") or {}).get(bucket, {})
        table.add_row(r["label"], short(r.get("passes_mean")), short(r.get("exact_accuracy", "")),
                      short(r.get("loss", "")), *(short(per.get(v, {}).get("exact_accuracy", "")) for v in values))
    return table


def plot_loops(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """Exact accuracy against the mean passes used: fixed loop counts joined by a line, adaptive settings
    (``row["tolerance"]`` not None) as separate points; with buckets, one thin line per bucket value too."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bucket, values = _first_bucket(rows)
    for adaptive, style in ((False, dict(marker="o", linestyle="-")), (True, dict(marker="*", linestyle=":"))):
        part = sorted((r for r in rows if (r.get("tolerance") is not None) == adaptive and
                       isinstance(r.get("passes_mean"), (int, float))), key=lambda r: r["passes_mean"])
        if not part:
            continue
        kind = "adaptive (loops: auto)" if adaptive else "fixed loops"
        xs = [r["passes_mean"] for r in part]
        ax.plot(xs, [r.get("exact_accuracy", float("nan")) for r in part], color="black", markersize=8,
                label=f"{kind}: all", **style)
        for i, v in enumerate(values):
            ys = [(r.get("buckets") or {}).get(bucket, {}).get(v, {}).get("exact_accuracy", float("nan"))
                  for r in part]
            ax.plot(xs, ys, color=f"C{i}", alpha=0.7, linewidth=1, label=f"{bucket}={v}" if not adaptive else None,
                    **style)
        for r in part:
            ax.annotate(r["label"], (r["passes_mean"], r.get("exact_accuracy", float("nan"))), fontsize="x-small",
                        textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("passes used per window (mean over examples)")
    ax.set_ylabel("exact accuracy (test)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize="x-small", loc="best", ncol=2)
    ax.set_title(title or "accuracy against sleep passes")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------
# comparing runs: group by a recipe setting, aggregate over seeds

#: Settings that never make two runs different experiments (how fast or how often, not what).
BOOKKEEPING = ("train.threads", "train.device", "train.log_every", "train.checkpoint_every",
               "train.keep_checkpoints", "train.loggers", "train.wandb_project", "eval.every", "eval.batch_size")
#: Row settings and counters that are not metrics.
NOT_METRICS = ("step", "loops", "max_loops", "tolerance", "window", "num_examples", "num_targets", "train_time_s",
               "split")
_MISSING = object()


class NoEvaluation(SleepzooError):
    """A run directory without any evaluation yet (just started, or died before its first)."""


class DamagedRun(SleepzooError):
    """A run directory whose recipe.yaml can not be read (compare leaves the run out, with a note)."""


@dataclass
class RunResult:
    """A run's recipe (as saved, nested) and its newest evaluation row."""

    run: str
    recipe: dict[str, Any]
    metrics: dict[str, Any]
    step: int | None
    steps: int | None  # train.steps of the recipe
    source: str  # "eval.json" or "metrics.jsonl" (the newest periodic evaluation of a run not finished)

    @property
    def finished(self) -> bool:
        return self.steps is None or (self.step is not None and self.step >= self.steps)


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories among ``paths``: a directory with ``recipe.yaml`` is a run; a directory without one
    stands for the runs directly inside it (``sweep --out DIR``); plain files (plots, JSON) are skipped."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            continue
        if not p.exists():
            raise SleepzooError(f"{str(p)!r} does not exist")
        if (p / "recipe.yaml").is_file():
            runs.append(p)
            continue
        inner = sorted(c for c in p.iterdir() if c.is_dir() and (c / "recipe.yaml").is_file())
        if not inner:
            if all(c.name == "train.log" or c.name.startswith(("train.lock", ".train.lock")) for c in p.iterdir()):
                continue  # a sweep's run that has not written its recipe yet
            raise SleepzooError(f"{str(p)!r} is not a run directory (no recipe.yaml) and holds none")
        runs.extend(inner)
    return list(dict.fromkeys(runs))


def load_result(run_dir: str | Path, note: Callable[[str], None] | None = None) -> RunResult:
    """The newest evaluation of a run: ``eval.json``, or for a run still training (or stopped early) the
    newest ``split: test`` line of ``metrics.jsonl`` when it is newer. Raises when there is none yet.

    A damaged eval.json counts as none, said through ``note`` (a line for each such file; default: stderr)."""
    if note is None:
        def note(line: str) -> None:
            print(line, file=sys.stderr, flush=True)
    run = Path(run_dir)
    saved = run / "recipe.yaml"
    if not saved.is_file():
        raise SleepzooError(f"{str(run)!r} is not a run directory (no recipe.yaml)")
    try:
        recipe = yaml.safe_load(saved.read_text(errors="replace")) or {}
    except yaml.YAMLError as exc:
        raise DamagedRun(f"{str(saved)!r} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(recipe, dict):
        raise DamagedRun(f"{str(saved)!r} holds no recipe (a YAML {type(recipe).__name__})")
    try:  # with every default filled in, runs saved before a field existed compare equal to newer ones
        recipe = load_recipe(recipe, ()).to_dict()
    except SleepzooError:
        pass  # a recipe this version can not read is still compared by what it says
    train = recipe.get("train")
    steps = train.get("steps") if isinstance(train, dict) else None
    steps = steps if isinstance(steps, int) else None
    candidates: list[tuple[int, str, dict]] = []
    final = run / "eval.json"
    if final.is_file():
        row, why = read_row(final)
        if row is None:
            note(f"note: {final} is damaged ({why}); {run} counts with its newest evaluation in metrics.jsonl, "
                 f"if any (`sleepzoo eval {run}` writes eval.json again)")
        else:
            candidates.append((-1 if _row_step(row) is None else _row_step(row), "eval.json", row))
    log = run / "metrics.jsonl"
    if log.is_file():
        for line in reversed(log.read_text(errors="replace").splitlines()):
            try:
                row = json.loads(line)
            except ValueError:  # a line being written right now, or garbage
                continue
            if isinstance(row, dict) and row.get("split") == "test" and _row_step(row) is not None:
                candidates.append((_row_step(row), "metrics.jsonl", row))
                break
    if not candidates:
        raise NoEvaluation(f"{str(run)!r} has no evaluation yet (no eval.json, no eval line in metrics.jsonl)")
    # The newest step wins; on a tie eval.json (listed first) wins: max keeps the first maximum.
    step, source, row = max(candidates, key=lambda c: c[0])
    row = {k: v for k, v in row.items() if k != "split"}
    return RunResult(run=str(run), recipe=recipe, metrics=row, step=step if step >= 0 else None,
                     steps=steps, source=source)


def flatten_settings(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested recipe mapping as ``{"sleep.loops": 2, "model.layers": [...], ...}`` (leaves only)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten_settings(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _lookup(recipe: dict, key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _ident(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def resolve_key(results: Sequence[RunResult], key: str) -> str:
    """``key`` as a full dotted recipe path: as given, or the one path that ends with ``.key``."""
    if any(_lookup(r.recipe, key) is not _MISSING for r in results):
        return key
    paths = sorted({k for r in results for k in flatten_settings(r.recipe)})
    ends = [p for p in paths if p.endswith("." + key)]
    if len(ends) == 1:
        return ends[0]
    if len(ends) > 1:
        raise SleepzooError(f"--key {key!r} is ambiguous: {', '.join(ends)}")
    import difflib

    close = difflib.get_close_matches(key, paths, n=3, cutoff=0.5)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise SleepzooError(f"--key {key!r}: no run's recipe has that setting{hint}; give a dotted recipe path "
                        f"such as sleep.loops or task.steps")


def varying_settings(results: Sequence[RunResult], exclude: str | None = None) -> list[str]:
    """Recipe paths whose value differs between runs (bookkeeping and ``exclude`` and below left out)."""
    flat = [flatten_settings(r.recipe) for r in results]
    paths = list(dict.fromkeys(k for f in flat for k in f))
    out = []
    for p in paths:
        if p in BOOKKEEPING or (exclude and (p == exclude or p.startswith(exclude + "."))):
            continue
        if len({_ident(f.get(p, "(unset)")) for f in flat}) > 1:
            out.append(p)
    return out


def is_seed(path: str) -> bool:
    """Seeds (``train.seed``, ``eval.seed``) are aggregated over rather than compared."""
    return path.rsplit(".", 1)[-1] == "seed"


def choose_key(results: Sequence[RunResult], default: str = "sleep.loops") -> str:
    """``default``, unless it does not vary while exactly one other (non-seed) setting does: then that one."""
    varying = varying_settings(results)
    if default not in varying:
        others = [p for p in varying if not is_seed(p)]
        if len(others) == 1:
            return others[0]
    return default


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for a single value), min, max and n of ``values``."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def _scalar_metrics(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _key_order(value: Any) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, _ident(value))


def compare_runs(results: Sequence[RunResult], *, key: str = "sleep.loops", metric: str = "exact_accuracy",
                 bucket: str | None = None) -> dict[str, Any]:
    """Group runs by the recipe value at ``key`` and aggregate each group over its seeds.

    Runs whose recipes differ in a seed (``train.seed``) are repetitions and are aggregated with
    :func:`spread`; any other setting that differs (besides ``key`` and :data:`BOOKKEEPING`) splits groups
    further and is listed in ``"settings"``. Returns a JSON-ready mapping: ``key``, ``metric``, ``bucket``
    (the bucket key shown, None without buckets), ``settings`` (the other grouping paths), ``seed_keys``,
    ``groups`` (sorted by key value: ``value``, ``settings``, ``seeds``, ``runs``, ``unfinished``,
    ``metrics: {name: spread}``, ``buckets: {name: {value: {metric: spread}}}``) and ``runs`` (one row each).
    """
    if not results:
        raise SleepzooError("no runs to compare")
    key = resolve_key(results, key)
    missing = [r.run for r in results if _lookup(r.recipe, key) is _MISSING]
    if missing:
        raise SleepzooError(f"--key {key}: not set in the recipe of {', '.join(missing)}")
    varying = varying_settings(results, exclude=key)
    seed_keys = [p for p in varying if is_seed(p)]
    others = [p for p in varying if not is_seed(p)]

    available = sorted({m for r in results for m in _scalar_metrics(r.metrics)})
    if metric not in available:
        raise SleepzooError(f"--metric {metric!r} is not in the evaluations; available: {', '.join(available)}")
    bucket_keys = list(dict.fromkeys(b for r in results for b in (r.metrics.get("buckets") or {})))
    if bucket is not None and bucket not in bucket_keys:
        have = f"the runs have {', '.join(bucket_keys)}" if bucket_keys else "the task reports no buckets"
        raise SleepzooError(f"--bucket {bucket!r}: {have}")
    shown_bucket = bucket or (bucket_keys[0] if bucket_keys else None)
    if shown_bucket is not None and metric not in BUCKET_METRICS:
        raise SleepzooError(f"--metric {metric!r} is not reported per bucket; choose one of "
                            f"{', '.join(BUCKET_METRICS)}")

    groups: dict[tuple, dict[str, Any]] = {}
    rows = []
    for r in results:
        flat = flatten_settings(r.recipe)
        value = _lookup(r.recipe, key)
        settings = {p: flat.get(p) for p in others}
        seeds = {p: flat.get(p) for p in seed_keys}
        ident = (_ident(value), tuple(_ident(settings[p]) for p in others))
        g = groups.setdefault(ident, {"value": value, "settings": settings, "seeds": [], "runs": [],
                                      "unfinished": [], "_rows": []})
        g["seeds"].append(seeds[seed_keys[0]] if len(seed_keys) == 1 else seeds)
        g["runs"].append(r.run)
        if not r.finished:
            g["unfinished"].append(r.run)
        g["_rows"].append(r.metrics)
        rows.append({"run": r.run, "value": value, "settings": settings, "seeds": seeds, "step": r.step,
                     "steps": r.steps, "finished": r.finished, "source": r.source,
                     "metrics": _scalar_metrics(r.metrics)})

    for g in groups.values():
        members = g.pop("_rows")
        per_metric: dict[str, list[float]] = {}
        for m in members:
            for name, v in _scalar_metrics(m).items():
                per_metric.setdefault(name, []).append(v)
        g["metrics"] = {name: spread(vs) for name, vs in sorted(per_metric.items())}
        g["buckets"] = {}
        for bname in bucket_keys:
            collected: dict[str, dict[str, list[float]]] = {}
            for m in members:
                for bvalue, scores in ((m.get("buckets") or {}).get(bname) or {}).items():
                    for name in BUCKET_METRICS:
                        if isinstance(scores.get(name), (int, float)):
                            collected.setdefault(str(bvalue), {}).setdefault(name, []).append(float(scores[name]))
            g["buckets"][bname] = {bv: {name: spread(vs) for name, vs in collected[bv].items()}
                                   for bv in sorted_bucket_values(collected)}
    ordered = sorted(groups.values(), key=lambda g: (_key_order(g["value"]),
                                                    [_key_order(g["settings"][p]) for p in others]))
    return {"key": key, "metric": metric, "bucket": shown_bucket, "settings": others, "seed_keys": seed_keys,
            "groups": ordered, "runs": rows}


def _cell(stats: dict[str, Any] | None, spread_too: bool = True) -> str:
    """``mean ±std`` (the space lets a narrow table wrap the cell there), the mean alone for one run."""
    if not stats:
        return "-"
    if stats["n"] == 1 or not spread_too:
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} ±{stats['std']:.3f}"


def _show(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return format_value(value)


def comparison_table(comparison: dict[str, Any], *, title: str | None = None) -> Table:
    """One row per group: key value, other settings, run count (``*``: with unfinished runs) and seeds, then

    * with buckets: the metric over all examples and per bucket value, as mean ±std over seeds;
    * without: the metric as mean ±std and min..max, then the other headline metrics (means).
    """
    key, metric, bucket = comparison["key"], comparison["metric"], comparison["bucket"]
    groups = comparison["groups"]
    table = Table(title=title or f"{metric} by {key}" + (f" and {bucket}" if bucket else ""))
    table.add_column(key, justify="right", min_width=len(key))
    for p in comparison["settings"]:
        table.add_column(p, justify="right", min_width=len(p))
    table.add_column("n", justify="right", no_wrap=True)
    if comparison["seed_keys"]:
        table.add_column("seeds", justify="right")
    if bucket:
        values = sorted_bucket_values(v for g in groups for v in g["buckets"].get(bucket, {}))
        table.add_column(f"{header(metric)} (all)", justify="right")
        for v in values:
            table.add_column(f"{bucket}={v}", justify="right")
        notes = [f"mean ±std over {', '.join(comparison['seed_keys'])}"] if comparison["seed_keys"] else []
    else:
        others = [m for m in ("exact_accuracy", "token_accuracy", "loss")
                  if m != metric and any(m in g["metrics"] for g in groups)]
        table.add_column(header(metric), justify="right")
        table.add_column("min..max", justify="right", no_wrap=True)
        for m in others:
            table.add_column(header(m), justify="right")
        notes = ([f"{header(metric)}: mean ±std over {', '.join(comparison['seed_keys'])}"]
                 if comparison["seed_keys"] else []) + (["other metrics: means"] if others else [])
    for g in groups:
        n = len(g["runs"])
        cells = [_show(g["value"]), *(_show(g["settings"][p]) for p in comparison["settings"]),
                 f"{n}{'*' if g['unfinished'] else ''}"]
        if comparison["seed_keys"]:
            cells.append(",".join(_show(s) for s in g["seeds"]))
        if bucket:
            per = g["buckets"].get(bucket, {})
            cells.append(_cell(g["metrics"].get(metric)))
            cells.extend(_cell(per.get(v, {}).get(metric)) for v in values)
        else:
            s = g["metrics"].get(metric)
            cells.append(_cell(s))
            cells.append(f"{s['min']:.3f}..{s['max']:.3f}" if s else "-")
            cells.extend(_cell(g["metrics"].get(m), spread_too=False) for m in others)
        table.add_row(*cells)
    if any(g["unfinished"] for g in groups):
        notes.append("* includes runs not finished: their newest periodic evaluation")
    if notes:
        table.caption = "; ".join(notes)
    return table


def _label(comparison: dict[str, Any], group: dict[str, Any], with_key: bool = True) -> str:
    parts = [f"{comparison['key'].rsplit('.', 1)[-1]}={_show(group['value'])}"] if with_key else []
    parts += [f"{p.rsplit('.', 1)[-1]}={_show(group['settings'][p])}" for p in comparison["settings"]]
    label = ", ".join(parts) or "runs"
    n, unfinished = len(group["runs"]), len(group["unfinished"])
    return f"{label} (n={n}{f', {unfinished} unfinished' if unfinished else ''})"


def plot_comparison(comparison: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """With buckets: the metric against the bucket value, one line per group, coloured by key value (e.g. the
    loop count). Without: the metric against the key value, one line per combination of other settings.
    Error bars: standard deviation over seeds; the shaded band: min to max."""
    plt = _pyplot()
    key, metric, bucket = comparison["key"], comparison["metric"], comparison["bucket"]
    groups = comparison["groups"]
    key_values = list(dict.fromkeys(_ident(g["value"]) for g in groups))
    cmap = plt.get_cmap("viridis")

    def colour(g: dict) -> Any:
        i = key_values.index(_ident(g["value"]))
        return cmap(0.85 * i / max(len(key_values) - 1, 1))

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    styles = ["-", "--", ":", "-."]
    if bucket:
        values = sorted_bucket_values(v for g in groups for v in g["buckets"].get(bucket, {}))
        numeric = _numeric(values)
        xs_all = numeric or list(range(len(values)))
        setting_combos = list(dict.fromkeys(_ident(g["settings"]) for g in groups))
        for g in groups:
            per = g["buckets"].get(bucket, {})
            pts = [(x, per[v][metric]) for x, v in zip(xs_all, values) if metric in per.get(v, {})]
            if not pts:
                continue
            xs, st = [p[0] for p in pts], [p[1] for p in pts]
            c = colour(g)
            style = styles[setting_combos.index(_ident(g["settings"])) % len(styles)]
            ax.errorbar(xs, [s["mean"] for s in st], yerr=[s["std"] for s in st], color=c, marker="o",
                        capsize=3, linestyle=style, label=_label(comparison, g),
                        markerfacecolor="none" if g["unfinished"] else c)
            ax.fill_between(xs, [s["min"] for s in st], [s["max"] for s in st], color=c, alpha=0.12)
        ax.set_xticks(xs_all, values)
        ax.set_xlabel(bucket)
    else:
        combos: dict[str, list[dict]] = {}
        for g in groups:
            combos.setdefault(_ident(g["settings"]), []).append(g)
        numeric = _numeric([g["value"] for g in groups])
        labels = list(dict.fromkeys(_show(g["value"]) for g in groups))
        for j, members in enumerate(combos.values()):
            xs = [float(g["value"]) for g in members] if numeric is not None else \
                [labels.index(_show(g["value"])) for g in members]
            st = [g["metrics"].get(metric) for g in members]
            keep = [(x, s, g) for x, s, g in zip(xs, st, members) if s]
            if not keep:
                continue
            xs, st, members = [k[0] for k in keep], [k[1] for k in keep], [k[2] for k in keep]
            c = cmap(0.85 * j / max(len(combos) - 1, 1))
            label = _label(comparison, {**members[0], "runs": [r for g in members for r in g["runs"]],
                                        "unfinished": [u for g in members for u in g["unfinished"]]},
                           with_key=False)
            ax.errorbar(xs, [s["mean"] for s in st], yerr=[s["std"] for s in st], color=c, marker="o",
                        capsize=3, linestyle=styles[j % len(styles)], label=label)
            ax.fill_between(xs, [s["min"] for s in st], [s["max"] for s in st], color=c, alpha=0.12)
            for x, s, g in zip(xs, st, members):
                if g["unfinished"]:  # hollow marker: not finished yet
                    ax.plot([x], [s["mean"]], marker="o", markersize=10, markerfacecolor="none", color=c)
        if numeric is None:
            ax.set_xticks(range(len(labels)), labels)
        else:
            ticks = sorted(set(numeric))
            if len(ticks) > 1 and ticks[0] > 0 and ticks[-1] / ticks[0] >= 8:
                ax.set_xscale("log", base=2)  # loop counts 1, 2, 4, 8, 16 are evenly spaced
            ax.set_xticks(ticks, [format_value(int(v) if v.is_integer() else v) for v in ticks])
            ax.minorticks_off()
        ax.set_xlabel(key)
    ax.set_ylabel(f"{metric} (test)")
    if metric.endswith("accuracy"):
        ax.set_ylim(-0.02, 1.05)
    ax.set_title(title or f"{metric} by {key}" + (f" per {bucket}" if bucket else "")
                 + (f" (mean ± std over {', '.join(comparison['seed_keys'])})" if comparison["seed_keys"] else ""),
                 fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return _save(fig, path)
