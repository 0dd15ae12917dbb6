"""The ``sleepzoo`` command line.

    sleepzoo train recipes/rule110-tiny.yaml sleep.loops=2 --out runs/tiny-N2
    sleepzoo train recipes/rule110-tiny.yaml sleep.loops=2 --out runs/tiny-N2 --resume
    sleepzoo eval runs/tiny-N2 --loops 4
    sleepzoo recipe validate recipes/rule110.yaml task.steps=16
    sleepzoo plugins list --kind mixer --json
    sleepzoo demo --loops 1,2

A user error (a bad recipe, an unknown plugin, a bad option) prints one line ``error: <message>`` on stderr
and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import click
import torch
from rich.console import Console
from rich.table import Table

import sleepzoo

from . import registry, report
from .checkpoint import atomic_write_json
from .config import Recipe, RecipeError, check_kwargs, load_recipe
from .registry import SleepzooError
from .train import evaluate_run, train

USAGE_ERROR = 2


def _fail(message: str, code: int = USAGE_ERROR) -> None:
    # One line, so that scripts and people see the whole message at once.
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


class _Main(click.Group):
    """The root group: turns user errors into one ``error:`` line and exit status 2."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `sleepzoo`: help, not an error line
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), USAGE_ERROR if isinstance(exc, click.UsageError) else exc.exit_code)
        except click.Abort:
            _fail("interrupted", 130)
        except SleepzooError as exc:
            _fail(str(exc))
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)  # super().main returns the exit code of --help & co.


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """sleepzoo: sleep-enabled hybrid language models (offline recurrent consolidation of evicted context)."""


# ---------------------------------------------------------------------------------------------------------
# train, eval


@main.command("train")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Run directory [default: runs/<recipe name>-<date>-<time>].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its newest checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bar: one line per logged step.")
def train_command(recipe: str, overrides: tuple[str, ...], out_dir: str | None, resume: bool,
                  no_progress: bool) -> None:
    """Train RECIPE (a YAML file) with optional key.path=value OVERRIDES, e.g. sleep.loops=2."""
    if resume and out_dir is None:
        raise click.UsageError("--resume needs --out RUN_DIR (the run to continue)")
    parsed = load_recipe(recipe, overrides=list(overrides))
    out = Path(out_dir) if out_dir else Path("runs") / f"{Path(recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    console = Console()
    console.print(f"{'resuming' if resume else 'training'} {recipe} -> {out}")
    result = train(parsed, out, resume=resume, progress=not no_progress)
    console.print(report.metrics_table(result, title=f"final evaluation ({out})"))
    console.print(f"wrote {out}")


@main.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--num-examples", type=int, help="Test examples [default: the recipe's eval.num_examples].")
@click.option("--loops", type=int, help="Sleep passes per window [default: the recipe's sleep.loops].")
@click.option("--window", type=int, help="Window length L [default: the recipe's sleep.window].")
def eval_command(run_dir: str, num_examples: int | None, loops: int | None, window: int | None) -> None:
    """Evaluate the newest weights of RUN_DIR on the task's test split; print and save the metrics."""
    result, path = evaluate_run(run_dir, num_examples=num_examples, loops=loops, window=window)
    console = Console()
    console.print(report.metrics_table(result, title=f"evaluation of {run_dir}"))
    console.print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------------
# recipe validate


def check_recipe(recipe: Recipe) -> dict[str, Any]:
    """Check every plugin name and plugin setting of ``recipe`` against the installed plugins.

    Returns what was built to check it: the task and the model's parameter count (the model is built on
    the meta device, so no memory is spent; ``None`` when that model cannot be built there).
    """
    where = recipe.source
    sleepzoo.build.check_mixers(recipe)
    # build_task checks the options against the task's signature (check_kwargs), then its constructor
    # checks their values; tasks are cheap to build.
    try:
        task = sleepzoo.build_task(recipe)
    except RecipeError:
        raise  # already names the file and the field
    except SleepzooError as exc:
        raise RecipeError(f"{where}: task: {exc}") from exc
    try:
        with torch.device("meta"):
            model = sleepzoo.build_model(recipe, vocab_size=task.vocab_size)
    except RecipeError:
        raise
    except SleepzooError as exc:  # a constructor's value check (e.g. heads that do not divide)
        raise RecipeError(f"{where}: model: {exc}") from exc
    except Exception as exc:  # a plugin that can not be built on the meta device: only the count is lost
        return {"task": task, "parameters": None, "why_not": f"{type(exc).__name__}: {exc}"}
    params = {id(p): p.numel() for p in model.parameters()}  # a tied weight counts once
    return {"task": task, "parameters": sum(params.values())}


@main.group("recipe")
def recipe_group() -> None:
    """Work with recipes."""


@recipe_group.command("validate")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
def validate_command(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check RECIPE (with OVERRIDES) against the installed plugins before any compute is spent."""
    parsed = load_recipe(recipe, overrides=list(overrides))
    checked = check_recipe(parsed)
    task, m, s, t = checked["task"], parsed.model, parsed.sleep, parsed.train
    params = (f"{checked['parameters']:,} parameters" if checked["parameters"] is not None
              else f"parameters not counted ({checked['why_not']})")
    options = ", ".join(f"{k}={v}" for k, v in parsed.task.options.items())
    click.echo(f"ok: {recipe}")
    click.echo(f"  model  {m.name}, {len(m.layers)} layers ({', '.join(m.layers)}), d_model {m.d_model}, {params}")
    click.echo(f"  sleep  window {s.window}, loops {s.loops}, eviction {s.eviction}")
    click.echo(f"  task   {parsed.task.name}({options}), seq_len {task.seq_len}, vocab {task.vocab_size}")
    click.echo(f"  train  {t.steps} steps x batch {t.batch_size}, {t.optimizer}, seed {t.seed}")


# ---------------------------------------------------------------------------------------------------------
# plugins


@main.group("plugins")
def plugins_group() -> None:
    """Inspect installed plugins."""


@plugins_group.command("list")
@click.option("--kind", type=click.Choice(registry.KINDS), help="Only this kind of plugin.")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of {kind, name, provider, status, target}.")
def plugins_list_command(kind: str | None, as_json: bool) -> None:
    """List plugins with their provider and status (each is imported to learn whether it loads)."""
    infos = registry.info(kind, load=True)
    if as_json:
        click.echo(json.dumps([i.as_dict() for i in infos], indent=1))
        return
    table = Table(title="sleepzoo plugins")
    for column in ("kind", "name", "provider", "status"):
        table.add_column(column)
    table.add_column("target", overflow="fold")
    for i in infos:
        style = "" if i.status in ("available", "loaded") else "red"
        table.add_row(i.kind, i.name, i.provider, i.status, i.target, style=style)
    Console().print(table)


# ---------------------------------------------------------------------------------------------------------
# demo


def _parse_loops(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        loops = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 1,2,4") from None
    if not loops or min(loops) < 1:
        raise click.BadParameter(f"{value!r}: give loop counts >= 1, e.g. 1,2,4")
    return list(dict.fromkeys(loops))


@main.command("demo")
@click.option("--recipe", "recipe_path", default="recipes/rule110-tiny.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="Recipe to train once per loop count.")
@click.option("--loops", default="1,2,4", show_default=True, callback=_parse_loops,
              help="Comma-separated sleep loop counts N.")
@click.option("--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="One run directory per loop count goes under it, with demo.json and demo.png.")
@click.option("--no-progress", is_flag=True, help="No progress bar: one line per logged step.")
@click.argument("overrides", nargs=-1)
def demo_command(recipe_path: str, loops: list[int], out_dir: str, no_progress: bool,
                 overrides: tuple[str, ...]) -> None:
    """Train one recipe once per sleep loop count, same seed and data, and compare test accuracy.

    A loop count whose run directory already exists is resumed (a finished one is not trained again).
    """
    out = Path(out_dir)
    recipes = {n: load_recipe(recipe_path, overrides=[*overrides, f"sleep.loops={n}"]) for n in loops}
    console = Console()
    rows = []
    for n, recipe in recipes.items():
        run_dir = out / f"loops{n}"
        resume = (run_dir / "recipe.yaml").is_file()
        console.print(f"[bold]loops {n}[/bold]: {'resuming' if resume else 'training'} {recipe_path} -> {run_dir}")
        result = train(recipe, run_dir, resume=resume, progress=not no_progress)
        rows.append({"run": str(run_dir), **result})
    title = f"{Path(recipe_path).stem}: test accuracy per sleep loop count"
    console.print(report.runs_table(rows, key="loops", title=title, hide=("run",)))  # run dirs: printed above
    png = report.plot_accuracy(rows, out / "demo.png", key="loops", title=title)
    atomic_write_json(out / "demo.json", {"recipe": recipe_path, "overrides": list(overrides), "runs": rows})
    console.print(f"wrote {out / 'demo.json'} and {png}")
