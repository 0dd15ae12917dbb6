"""Tables (rich) and plots (matplotlib) of a benchmark run, and a saved run beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from rich.markup import escape
from rich.table import Table

from ..report import _pyplot, _save
from .core import Result, quartiles


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:,.2f}"


def _bytes(n: float | None) -> str:
    return "" if n is None else f"{n / 2 ** 20:,.1f} MiB"


def results_tables(results: Sequence[Result], saved: dict[str, dict[str, Any]] | None = None) -> list[Table]:
    """One table per group: median and IQR (ms), tokens/s, ratio to the group's baseline, what else was
    recorded; with ``saved`` (from :func:`~sleepzoo.benchmarks.core.saved_medians`), the saved median and
    now / saved."""
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.case.group, []).append(r)
    tables = []
    for group, rows in groups.items():
        timed = any(r.times for r in rows)
        table = Table(title=group, title_justify="left")
        table.add_column("case")
        if timed:
            for col in ("median ms", "IQR ms", "tokens/s", "vs baseline"):
                table.add_column(col, justify="right")
        extra_cols = sorted({k for r in rows for k in r.extra_info} - _SHOWN)
        for col in extra_cols:
            table.add_column(col.replace("_", " "), justify="right")
        if saved is not None:
            table.add_column("saved median ms", justify="right")
            table.add_column("now / saved", justify="right")
        for r in rows:
            cells = [escape(r.case.name)]
            if timed:
                q1, q3 = quartiles(sorted(r.times)) if r.times else (0.0, 0.0)
                iqr = q3 - q1
                ratio = r.extra_info.get("ratio_to_baseline")
                tps = r.extra_info.get("tokens_per_s")
                cells += [_ms(r.median), _ms(iqr) if r.times else "", "" if tps is None else f"{tps:,.0f}",
                          "" if ratio is None else f"{ratio:.3f}x"]
            for col in extra_cols:
                v = r.extra_info.get(col)
                cells.append(_bytes(v) if col.endswith("_bytes") and v is not None else
                             "" if v is None else f"{v:,}" if isinstance(v, int) else str(v))
            if saved is not None:
                old = saved.get(r.case.fullname, {})
                old_med = old.get("median")
                if old_med is None and "peak_bytes" in r.extra_info and "peak_bytes" in old.get("extra_info", {}):
                    now, before = r.extra_info["peak_bytes"], old["extra_info"]["peak_bytes"]
                    cells += [_bytes(before), f"{now / before:.3f}x" if before else ""]
                else:
                    cells += [_ms(old_med), f"{r.median / old_med:.3f}x" if old_med and r.median else ""]
            table.add_row(*cells)
        tables.append(table)
    return tables


_SHOWN = {"ms", "tokens_per_s", "ratio_to_baseline", "baseline", "case"}


def checks_table(checks: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="acceptance checks (measured in this run)", title_justify="left")
    for col in ("check", "measured", "target", "holds", "detail"):
        table.add_column(col, justify="right" if col in ("measured",) else "left")
    for c in checks:
        ok = {True: "[green]yes[/green]", False: "[red]NO[/red]", None: ""}[c["ok"]]
        table.add_row(escape(c["check"]), "" if c["value"] is None else f"{c['value']:.3f}", c["target"], ok, c["detail"])
    return table


def plot(results: Sequence[Result], path: str | Path, *, title: str | None = None) -> Path:
    """One panel per suite run: time against N (with the ideal N x line), tokens/s against L, ms/token against
    context, peak memory against N, op speeds. Returns the path written."""
    plt = _pyplot()
    suites = [s for s in ("loops", "window", "wake", "memory", "ops") if any(r.case.suite == s for r in results)]
    fig, axes = plt.subplots(1, len(suites), figsize=(4.6 * len(suites), 3.8), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        rows = [r for r in results if r.case.suite == suite]
        globals()[f"_plot_{suite}"](ax, rows)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _plot_loops(ax, rows: Sequence[Result]) -> None:
    for prefix, label in (("window[", "one consolidated window"), ("step[", "training step (last window not slept)")):
        pts = sorted((r.case.params["N"], r.median) for r in rows if r.case.name.startswith(prefix))
        if not pts:
            continue
        base = pts[0][1] / pts[0][0]
        ax.plot([n for n, _ in pts], [t / base for _, t in pts], "o-", label=label)
    ns = sorted({r.case.params["N"] for r in rows})
    ax.plot(ns, ns, "k--", lw=1, label="N x (linear)")
    ax.set(xlabel="loops N", ylabel="time / time at N=1", title="cost of sleep against N")
    ax.legend(fontsize=8)


def _plot_window(ax, rows: Sequence[Result]) -> None:
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        p = r.case.params
        label = "parallel SWA hybrid" if p["method"] == "swa" else f"sleep, N={p['N']}"
        series.setdefault(label, []).append((p["L"], r.extra_info.get("tokens_per_s", 0)))
    for label, pts in series.items():
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=label)
    ax.set(xscale="log", xlabel="window L (tokens)", ylabel="training tokens/s", title="throughput against window")
    _plain_ticks(ax.xaxis, sorted({r.case.params["L"] for r in rows}))
    ax.legend(fontsize=8)


def _plot_wake(ax, rows: Sequence[Result]) -> None:
    series: dict[str, list[tuple[int, float]]] = {}
    rows = [r for r in rows if r.case.params.get("method") in ("sleep", "full_attention")]  # against context
    for r in rows:
        p = r.case.params
        label = "full attention" if p["method"] == "full_attention" else f"sleep, N={p['N']}"
        series.setdefault(label, []).append((p["context"], r.median * 1e3))
    for label, pts in series.items():
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=label)
    ax.set(xscale="log", yscale="log", xlabel="context streamed (tokens)", ylabel="ms per decoded token",
           title="wake latency against context")
    _plain_ticks(ax.xaxis, sorted({r.case.params["context"] for r in rows}))
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=8)


def _plain_ticks(axis, values: Sequence[int]) -> None:
    """Ticks at ``values`` only, written as numbers (1k for 1024 and up), on a log axis."""
    from matplotlib.ticker import FixedLocator, NullLocator

    axis.set_major_locator(FixedLocator(values))
    axis.set_minor_locator(NullLocator())
    axis.set_ticklabels([f"{v // 1024}k" if v >= 1024 else str(v) for v in values])


def _plot_memory(ax, rows: Sequence[Result]) -> None:
    for ckpt, label in ((False, "no checkpointing"), (True, "checkpointing per pass")):
        pts = sorted((r.case.params["N"], r.extra_info["peak_bytes"] / 2 ** 20) for r in rows
                     if r.case.params["checkpoint"] == ckpt)
        if pts:
            ax.plot([n for n, _ in pts], [m for _, m in pts], "o-", label=label)
    ax.set(xlabel="loops N", ylabel="peak MiB (training step)", title="memory against N")
    ax.legend(fontsize=8)


def _plot_ops(ax, rows: Sequence[Result]) -> None:
    timed = [r for r in rows if r.times]
    ax.bar([r.case.name for r in timed], [r.median * 1e3 for r in timed])
    ax.set(yscale="log", ylabel="ms per fwd+bwd", title="gated delta rule op")
    ax.tick_params(axis="x", labelrotation=20)
