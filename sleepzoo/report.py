"""Tables and plots of evaluation results, shared by ``sleepzoo eval``, ``sleepzoo demo`` and comparisons.

A *row* is one evaluation as the trainer writes it to ``eval.json``: settings (``step``, ``loops``,
``window``, ``num_examples``), scalar metrics (``exact_accuracy``, ``loss``, ...), list metrics (``label_accuracy``,
one value per label) and optionally ``train_time_s`` and ``run`` (its directory).

    rows = [load_eval(d) for d in ["runs/demo/loops1", "runs/demo/loops2"]]
    Console().print(runs_table(rows, key="loops"))
    plot_accuracy(rows, "runs/demo/demo.png", key="loops")
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from rich.table import Table

from .registry import SleepzooError

SETTINGS = ("run", "step", "loops", "window", "num_examples")
# Shown first, in this order, when present; every other metric follows alphabetically.
HEADLINE = ("exact_accuracy", "label_accuracy", "token_accuracy", "loss")
HIDDEN = ("num_targets",)


def load_eval(run_dir: str | Path, name: str = "eval.json") -> dict[str, Any]:
    """A run's evaluation row (``eval.json``) with ``run`` set to the directory."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise SleepzooError(f"{str(path)!r} does not exist: the run has not finished; "
                            f"`sleepzoo eval {run_dir}` evaluates its newest checkpoint")
    return {"run": str(run_dir), **json.loads(path.read_text())}


def format_value(value: Any) -> str:
    """Floats to 4 decimals, lists compactly as ``a/b/c`` (3 decimals), anything else as ``str``."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return "/".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in value)
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
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

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
