"""The ``sleepzoo`` command line.

    sleepzoo train recipes/rule110-tiny.yaml sleep.loops=2 --out runs/tiny-N2
    sleepzoo train recipes/rule110-tiny.yaml sleep.loops=2 --out runs/tiny-N2 --resume
    sleepzoo eval runs/tiny-N2 --loops 4
    sleepzoo convert runs/ouro-N4 ~/models/Ouro-1.4B-sleep-N4 --dtype bfloat16 --max-shard-size 2GB
    sleepzoo sweep recipes/repro/rule110.yaml sleep.loops=1,2,4 train.seed=0,1,2 --out runs/repro/rule110-loops
    sleepzoo compare runs/repro/rule110-loops/* --key sleep.loops --out docs/img/rule110-loops.png
    sleepzoo task show rule110 steps=2 states=1 -n 3
    sleepzoo task export recipes/rule110-tiny.yaml task.steps=4 -n 1000 --split test --out rule110.jsonl
    sleepzoo recipe validate recipes/rule110.yaml task.steps=16
    sleepzoo plugins list --kind mixer --json
    sleepzoo demo --loops 1,2

A user error (a bad recipe, an unknown plugin, a bad option) prints one line ``error: <message>`` on stderr
and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import click
import torch
from rich.console import Console
from rich.table import Table

import sleepzoo

from . import distributed, registry, report, sweep
from .checkpoint import atomic_write_json, atomic_write_text, latest_checkpoint
from .config import Recipe, RecipeError, apply_overrides, check_kwargs, load_recipe
from .registry import SleepzooError
from .train import evaluate_run, jsonable, load_run, train

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
    # Under torchrun every rank runs this command; rank 0 speaks for the group: it prints (and train has it
    # hold the run directory's lock, which covers the run they all train), the other ranks only report errors.
    member = distributed.launched() and int(os.environ["RANK"]) != 0
    console = Console(file=open(os.devnull, "w")) if member else Console()  # noqa: SIM115
    console.print(f"{'resuming' if resume else 'training'} {recipe} -> {out}")
    result = train(parsed, out, resume=resume, progress=not no_progress)
    console.print(report.metrics_table(result, title=f"final evaluation ({out})"))
    per_bucket = report.buckets_table(result, title="per bucket")
    if per_bucket is not None:
        console.print(per_bucket)
    console.print(f"wrote {out}")


def _parse_loop_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list | None:
    """``4`` or ``1,2,4,8,auto``: loop counts (integers >= 1) and ``auto`` (adaptive sleep), in order, once each."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    out: list = []
    for item in items:
        if item == "auto":
            out.append(item)
        elif item.isascii() and item.isdecimal() and int(item) >= 1:
            out.append(int(item))
        else:
            raise click.BadParameter(f"{item!r} is not a loop count: give integers >= 1 and/or auto, comma "
                                     f"separated (e.g. 1,2,4,8,auto)")
    if not out:
        raise click.BadParameter("give at least one loop count, e.g. 4 or 1,2,4,auto")
    return list(dict.fromkeys(out))


def _one_loop_setting(ctx: click.Context, param: click.Parameter, value: str | None) -> int | str | None:
    """One loop count, or auto."""
    parsed = _parse_loop_list(ctx, param, value)
    if parsed is not None and len(parsed) != 1:
        raise click.BadParameter(f"{value!r}: give one loop count or auto (a sweep is `sleepzoo eval --loops`)")
    return None if parsed is None else parsed[0]


def _parse_tolerances(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give numbers >= 0, comma separated (e.g. 0.3,0.1)") from None
    if not out or any(not (0 <= t < float("inf")) for t in out):
        raise click.BadParameter(f"{value!r}: give numbers >= 0, comma separated (e.g. 0.3,0.1)")
    return list(dict.fromkeys(out))


@main.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--num-examples", type=int, help="Test examples [default: the recipe's eval.num_examples].")
@click.option("--loops", callback=_parse_loop_list,
              help="Sleep passes per window, or auto (adaptive sleep); several, comma separated, for a sweep: "
                   "1,2,4,8,auto [default: the recipe's sleep.loops].")
@click.option("--max-loops", type=int, help="loops auto: the most passes per window [default: the recipe's, or 8].")
@click.option("--tolerance", callback=_parse_tolerances,
              help="loops auto: stop when the fast weights change by less than this; several, comma separated, "
                   "trace the adaptive curve [default: the recipe's, or 0.01].")
@click.option("--window", type=int, help="Window length L [default: the recipe's sleep.window].")
def eval_command(run_dir: str, num_examples: int | None, loops: list | None, max_loops: int | None,
                 tolerance: list[float] | None, window: int | None) -> None:
    """Evaluate the newest weights of RUN_DIR on the task's test split; print and save the metrics.

    Writes eval.json (metrics, and per-bucket metrics for tasks with buckets such as a hop count k) and
    eval.png (metric vs bucket; the headline metrics for a task without buckets). Other --loops/--window
    than the run's own go to eval-loops{N}-window{L}.json/.png, keeping the training result.

    Several settings (--loops 1,2,4,8,auto, and/or several --tolerance values) are a test-time sweep: each
    is evaluated and saved as above, then one table of accuracy against the sleep passes used is printed and
    eval-sweep.json / eval-sweep.png (accuracy against mean passes) are written."""
    if loops is None:  # the recipe's own loops (adaptive or not: evaluate_run refuses bounds without auto)
        settings = [(None, t) for t in tolerance or [None]]
    else:
        for given, name in ((tolerance, "--tolerance"), (max_loops, "--max-loops")):
            if given is not None and "auto" not in loops:
                raise click.BadParameter(f"{name} goes with --loops auto (adaptive sleep)", param_hint=name)
        settings = [(n, None) for n in loops if n != "auto"]
        settings += [("auto", t) for t in tolerance or [None]] if "auto" in loops else []
    if len(settings) == 1:
        (n, tol), = settings
        result, path = evaluate_run(run_dir, num_examples=num_examples, loops=n, window=window,
                                    max_loops=max_loops if n in (None, "auto") else None, tolerance=tol)
        _print_evaluation(run_dir, result, path)
        return
    rows = []
    for n, tol in settings:
        result, path = evaluate_run(run_dir, num_examples=num_examples, loops=n, window=window,
                                    max_loops=max_loops if n in (None, "auto") else None, tolerance=tol)
        rows.append({**result, "label": report.loops_label(result["loops"], result.get("tolerance"))})
        click.echo(f"loops {rows[-1]['label']}: passes {report.format_value(result.get('passes_mean'))} "
                   f"({report.format_value(result.get('passes_hist'))}), exact acc "
                   f"{report.format_value(result.get('exact_accuracy'))}" + (f" -> {path}" if path else ""))
    console = Console()
    console.print(report.loops_table(rows, title=f"{run_dir}: accuracy against sleep passes"))
    if path is None:
        return
    out = Path(run_dir) / "eval-sweep.json"
    atomic_write_json(out, {"rows": rows})
    png = report.plot_loops(rows, out.with_suffix(".png"), title=f"{Path(run_dir).name}: step {rows[0].get('step')}")
    console.print(f"wrote {out} and {png}")
    _plot_positions(run_dir, {f"loops {r['label']}": r for r in rows}, console)


def _plot_positions(run_dir: str, curves: dict[str, dict], console: Console) -> None:
    """For a task that reports loss by position (task: text): ``eval-position.png``, one line per setting."""
    curves = {k: r for k, r in curves.items() if (r.get("buckets") or {}).get("position")}
    if curves:
        png = report.plot_loss_by_position(curves, Path(run_dir) / "eval-position.png",
                                           title=f"{Path(run_dir).name}: loss by position")
        console.print(f"wrote {png} (loss by position, one line per loop setting)")


def _print_evaluation(run_dir: str, result: dict, path: Path | None) -> None:
    console = Console()
    console.print(report.metrics_table(result, title=f"evaluation of {run_dir}"))
    per_bucket = report.buckets_table(result, title="per bucket")
    if per_bucket is not None:
        console.print(per_bucket)
    if path is None:  # another process trains the run: nothing is written into it
        return
    png = report.plot_eval(result, path.with_suffix(".png"),
                           title=f"{Path(run_dir).name}: step {result.get('step')}, loops {result.get('loops')}")
    console.print(f"wrote {path} and {png}")
    if (result.get("buckets") or {}).get("position"):  # this evaluation beside the run's others, one line each
        rows = {}
        for file in sorted(Path(run_dir).glob("eval*.json")):
            row, _ = report.read_row(file)
            if row is not None and file.name != "eval-sweep.json" and "loops" in row:
                rows[f"loops {report.loops_label(row['loops'], row.get('tolerance'))}"] = row
        _plot_positions(run_dir, rows, console)


def _token(vocab: Sequence[str], i: int) -> str:
    """Token ``i`` as text; an id past the task's vocabulary (a pretrained model's embedding is padded beyond
    its tokenizer's, e.g. 151,936 rows for Qwen's 151,665 tokens) shows as ``<id i>``."""
    return vocab[i] if 0 <= i < len(vocab) else f"<id {i}>"


@main.command("generate")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--prompt", help="Space-separated tokens of the task's vocabulary [default: test examples, cut "
                               "just before their first answer].")
@click.option("-n", "num_prompts", type=int, default=2, show_default=True, help="Test examples to prompt with.")
@click.option("--max-new-tokens", type=int, default=8, show_default=True)
@click.option("--loops", callback=_one_loop_setting,
              help="Sleep passes per window, or auto (adaptive) [default: the recipe's sleep.loops].")
@click.option("--max-loops", type=int, help="loops auto: the most passes per window [default: the recipe's, or 8].")
@click.option("--tolerance", type=float, help="loops auto: stop when the fast weights change by less than this "
                                               "[default: the recipe's, or 0.01].")
@click.option("--window", type=int, help="Window length L [default: the recipe's sleep.window].")
@click.option("--eviction", help="Eviction policy [default: the recipe's sleep.eviction].")
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int)
@click.option("--seed", type=int, default=0, show_default=True, help="Test examples and sampling seed.")
@click.option("--memory", "memory_file", type=click.Path(dir_okay=False),
              help="A memory file: loaded first if it exists (the conversation so far), saved after.")
def generate_command(run_dir: str, prompt: str | None, num_prompts: int, max_new_tokens: int, loops: int | None,
                     max_loops: int | None, tolerance: float | None, window: int | None, eviction: str | None,
                     sample: bool, temperature: float, top_k: int | None, seed: int, memory_file: str | None) -> None:
    """Stream a prompt through RUN_DIR's model and continue it token by token, sleeping whenever the
    window fills (the memory in use stays bounded by the window and the fast weights).

    With --memory FILE the prompts continue one stream: the memory saved by an earlier call if FILE exists
    (its window, loops and eviction hold), and the stream (prompts and generated tokens) is saved back to FILE,
    so two invocations continue one conversation."""
    _, model, task, step = load_run(run_dir)
    stream = None
    if memory_file is not None:
        from .memory import load_stream, stream_settings

        settings = {k: v for k, v in (("window", window), ("loops", loops), ("eviction", eviction),
                                      ("max_loops", max_loops), ("tolerance", tolerance)) if v is not None}
        if Path(memory_file).exists():
            stream = load_stream(model.eval(), memory_file, **settings)
            click.echo(f"memory {memory_file}: {stream.tokens} tokens so far, {stream.sleeps} sleeps")
        else:
            stream = model.eval().start_stream(window=window, loops=loops, eviction=eviction, max_loops=max_loops,
                                               tolerance=tolerance)
        window, loops, eviction = stream.policy.window, stream.loops, stream_settings(stream)["eviction"]
    if prompt is not None:
        index = {tok: i for i, tok in enumerate(task.vocab)}
        unknown = [tok for tok in prompt.split() if tok not in index]
        if unknown:
            raise SleepzooError(f"--prompt: {', '.join(map(repr, unknown))} not in the task's vocabulary "
                                f"(e.g. {', '.join(task.vocab[:12])}); `sleepzoo task show` prints examples")
        prompts = [(torch.tensor([[index[tok] for tok in prompt.split()]]), None)]
    else:
        data = task.generate(num_prompts, seed, "test")
        prompts = []
        for ids, tgt in zip(data["input_ids"], data["targets"]):
            first = int((tgt != -100).nonzero()[0]) if (tgt != -100).any() else ids.numel() - 1
            prompts.append((ids[None, :first + 1], int(tgt[first]) if (tgt != -100).any() else None))
    generator = torch.Generator().manual_seed(seed)
    click.echo(f"{run_dir} (step {step}): loops {loops or model.sleep.loops}, window {window or model.sleep.window}, "
               f"eviction {eviction or model.sleep.eviction}")
    for ids, expected in prompts:
        if stream is not None:
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k,
                                     generator=generator, stream=stream)
        else:
            out = model.generate(ids, max_new_tokens, window=window, loops=loops, eviction=eviction,
                                 do_sample=sample, temperature=temperature, top_k=top_k, generator=generator,
                                 max_loops=max_loops, tolerance=tolerance)
        new = out[0, ids.shape[1]:].tolist()
        click.echo(f"prompt ({ids.shape[1]} tokens): {task.decode(ids[0].tolist())}")
        line = " ".join(_token(task.vocab, i) for i in new)
        if expected is not None:
            line += f"   (expected first token: {_token(task.vocab, expected)})"
        click.echo(f"  -> {line}")
    if stream is not None:
        from .memory import save_stream

        save_stream(stream, memory_file)
        passes = stream.pass_summary()
        used = f" (passes per sleep: mean {passes['passes_mean']:.2f})" if passes["passes_mean"] is not None else ""
        click.echo(f"saved the memory to {memory_file}: {stream.tokens} tokens, {stream.sleeps} sleeps{used}")


@main.group("memory")
def memory_group() -> None:
    """Saved stream memories (`sleepzoo generate --memory FILE`, `Stream.save`)."""


@memory_group.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON.")
def memory_show(file: str, as_json: bool) -> None:
    """What a memory FILE holds: its settings, how far the stream got, the model it belongs to, its bytes."""
    from .memory import describe

    info = describe(file)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    s = info["settings"]
    click.echo(f"{info['file']}: {info['file_bytes']:,} bytes")
    click.echo(f"  stream: {info['tokens']} tokens seen, {info['filled']} in the current window, "
               f"{info['sleeps']} sleeps, batch {info['batch']}")
    click.echo("  settings: " + ", ".join(f"{k} {v}" for k, v in s.items()))
    passes = info.get("passes") or {}
    if passes.get("passes_mean") is not None:
        click.echo(f"  passes per sleep: mean {passes['passes_mean']:.2f} ({report.format_value(passes['passes_hist'])})")
    click.echo(f"  model: {info['model']['class']} (config {info['model']['config'][:12]}, "
               f"weights {info['model']['weights'][:12]})")
    for kind, n in sorted(info["tensor_bytes"].items()):
        click.echo(f"  {kind}: {n:,} bytes")


# ---------------------------------------------------------------------------------------------------------
# convert


@main.command("convert")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--dtype", help="Weights' dtype in DST, e.g. bfloat16 [default: a run's float32, a folder's "
                              "config torch_dtype].")
@click.option("--max-shard-size", help="Shard the weights above this size, e.g. 2GB, 500MB, 2GiB or bytes "
                                       "(model-0000i-of-0000n.safetensors + model.safetensors.index.json) "
                                       "[default: one model.safetensors].")
@click.option("--force", is_flag=True, help="Write into a DST folder that already holds files.")
def convert_command(src: str, dst: str, dtype: str | None, max_shard_size: str | None, force: bool) -> None:
    """Write SRC as a Hugging Face-style folder DST (config.json + safetensors, and sleepzoo.json for
    sleepzoo's own settings) that sleepzoo.from_pretrained loads with the same logits.

    SRC is a run directory of a jet_nemotron or ouro recipe (its newest weights, the last stage's sleep
    settings recorded in sleepzoo.json beside the published config.json) or a Hugging Face folder (re-saved, e.g. with
    --dtype bfloat16 or --max-shard-size). Tokenizer and licence files are copied along. See docs/pretrained.md.
    """
    from .convert import convert

    summary = convert(src, dst, dtype=dtype, max_shard_size=max_shard_size, force=force)
    what = (f"run {src} (weights {summary['weights']}, step {summary['step']})" if summary["source"] == "run"
            else f"folder {src}")
    click.echo(f"converted {what} -> {dst}: {summary['parameters']:,} parameters in {summary['dtype']}, "
               f"{sum(f.endswith('.safetensors') for f in summary['files'])} safetensors file(s)")
    if summary["sleepzoo"]:
        click.echo(f"  sleepzoo settings in sleepzoo.json: {json.dumps(summary['sleepzoo'])}")
    click.echo(f"  copied: {', '.join(summary['copied'])}" if summary["copied"] else
               "  no tokenizer files copied (none found next to the source)")


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
    from .rules import check_schedule

    passes, tol = check_schedule(s.loops, s.max_loops, s.tolerance)
    bounds = f" (at most {passes} passes, tolerance {tol:g})" if tol is not None else ""
    click.echo(f"  sleep  window {s.window}, loops {s.loops}{bounds}, eviction {s.eviction}")
    click.echo(f"  task   {parsed.task.name}({options}), seq_len {task.seq_len}, vocab {task.vocab_size}")
    click.echo(f"  train  {t.steps} steps x batch {t.batch_size}, {t.optimizer}, seed {t.seed}")
    for stage, (name, staged) in zip(parsed.stages or (), parsed.stage_recipes() if parsed.stages else ()):
        ss, st = staged.sleep, staged.train
        click.echo(f"  stage  {name}: {stage.steps} steps, loops {ss.loops}, eviction {ss.eviction}, "
                   f"trainable {st.trainable or 'all'}")


# ---------------------------------------------------------------------------------------------------------
# plugins


@main.group("plugins")
def plugins_group() -> None:
    """Inspect installed plugins."""


@plugins_group.command("list")
@click.option("--kind", type=click.Choice(registry.KINDS), help="Only this kind of plugin.")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of {kind, name, provider, status, target}.")
def plugins_list_command(kind: str | None, as_json: bool) -> None:
    """List plugins with their provider and status (each is imported to learn whether it loads).

    A plugin that does not load gets one line on stderr saying why; what plugins print while importing goes
    to stderr too, so --json output is always JSON.
    """
    infos = registry.info(kind, load=True)
    for i in infos:
        if i.error:
            click.echo(f"warning: {' '.join(i.error.split())}", err=True)
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

    A loop count whose run directory holds a checkpoint is resumed (a finished one is not trained again);
    one that never reached a checkpoint starts over.
    """
    out = Path(out_dir)
    recipes = {n: load_recipe(recipe_path, overrides=[*overrides, f"sleep.loops={n}"]) for n in loops}
    console = Console()
    rows = []
    for n, recipe in recipes.items():
        run_dir = out / f"loops{n}"
        resume = latest_checkpoint(run_dir / "checkpoints") is not None
        console.print(f"[bold]loops {n}[/bold]: {'resuming' if resume else 'training'} {recipe_path} -> {run_dir}")
        result = train(recipe, run_dir, resume=resume, progress=not no_progress)
        rows.append({"run": str(run_dir), **result})
    title = f"{Path(recipe_path).stem}: test accuracy per sleep loop count"
    console.print(report.runs_table(rows, key="loops", title=title, hide=("run",)))  # run dirs: printed above
    png = report.plot_accuracy(rows, out / "demo.png", key="loops", title=title)
    atomic_write_json(out / "demo.json", {"recipe": recipe_path, "overrides": list(overrides), "runs": rows})
    console.print(f"wrote {out / 'demo.json'} and {png}")


# ---------------------------------------------------------------------------------------------------------
# task show, task export


def _is_recipe(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or "/" in spec or Path(spec).is_file()


def load_task(spec: str, options: Sequence[str] = ()) -> tuple[str, Any, dict[str, Any]]:
    """``(registry name, task, options)`` from a task name or a recipe path, with ``key=value`` task OPTIONS.

    Options are YAML values checked against the task's constructor; ``task.key=value`` is the same as
    ``key=value``. With a recipe they override its ``task:`` section.
    """
    where = spec if _is_recipe(spec) else "task"
    keys = []
    for item in options:
        if "=" not in item:
            raise RecipeError(f"{where}: option {item!r}: expected key=value, e.g. steps=4")
        key, value = item.split("=", 1)
        key = key.strip()
        key = key[len("task."):] if key.startswith("task.") else key
        if not key or "." in key:
            raise RecipeError(f"{where}: option {item!r}: give a task option as key=value or task.key=value "
                              f"(other recipe sections do not change the data)")
        keys.append(f"{key}={value}")
    if _is_recipe(spec):
        recipe = load_recipe(spec, overrides=[f"task.{k}" for k in keys])
        name, given, where = recipe.task.name, dict(recipe.task.options), f"{recipe.source}: task"
    else:
        name, given = spec, apply_overrides({}, keys, "task")
    cls = registry.get("task", name)
    checked = check_kwargs(cls, given, where)
    return name, cls(**checked), checked


def _task_config(task: Any, given: dict[str, Any]) -> dict[str, Any]:
    """``task.config()`` (every constructor argument); the options given for a task without one."""
    config = getattr(task, "config", None)
    return jsonable(config() if callable(config) else given)


def _decode(task: Any, ids: Any, targets: Any) -> str:
    decode = getattr(task, "decode", None)
    if callable(decode):
        return decode(ids, targets)
    return " ".join(f"{i}=>{t}" if t != -100 else str(i) for i, t in zip(ids.tolist(), targets.tolist()))


def _buckets(task: Any, data: dict) -> list[str]:
    return [b for b in getattr(task, "buckets", ()) if b in data]


_split_option = click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
                             help="Which split to draw from.")
_seed_option = click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                            help="Data seed: the same (task options, seed, split) gives the same examples.")


@main.group("task")
def task_group() -> None:
    """Look at a task's data, or export it."""


@task_group.command("show")
@click.argument("task_spec", metavar="TASK")
@click.argument("options", nargs=-1)
@_seed_option
@click.option("-n", "num", type=click.IntRange(min=1), default=3, show_default=True, help="Examples to show.")
@_split_option
def task_show_command(task_spec: str, options: tuple[str, ...], seed: int, num: int, split: str) -> None:
    """Describe TASK (a task name or a recipe) and print a few decoded examples, answers marked token=>answer.

    OPTIONS are task options as key=value (e.g. steps=4 bits=16), or task.key=value.
    """
    name, task, given = load_task(task_spec, options)
    data = task.generate(num, seed=seed, split=split)
    describe = getattr(task, "describe", None)
    info = jsonable(describe()) if callable(describe) else {}
    doc = (type(task).__doc__ or "").strip().splitlines()
    click.echo(f"{name}: {doc[0]}" if doc else name)
    config = _task_config(task, given)
    rows = [("class", info.get("class", f"{type(task).__module__}:{type(task).__qualname__}")),
            ("options", ", ".join(f"{k}={v}" for k, v in config.items()) or "(none)"),
            ("seq_len", getattr(task, "seq_len", data["input_ids"].shape[1]))]
    vocab = getattr(task, "vocab", None)
    if isinstance(vocab, list):
        shown = " ".join(vocab[:24]) + (f" ... (+{len(vocab) - 24} more)" if len(vocab) > 24 else "")
        rows.append(("vocab", f"{len(vocab)} tokens: {shown}"))
    elif hasattr(task, "vocab_size"):
        rows.append(("vocab", f"{task.vocab_size} tokens"))
    if "test_fraction" in info:
        rows.append(("test split", f"{info['test_fraction']:.3g} of the example space"))
    if _buckets(task, data):
        rows.append(("buckets", ", ".join(_buckets(task, data))))
    standard = {"name", "class", "config", "seq_len", "vocab_size", "pad_id", "test_fraction"}
    rows += [(k, v) for k, v in info.items() if k not in standard]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"  {k:<{width}}  {v}")
    click.echo(f"\n{num} {split} example{'s' if num > 1 else ''} (seed {seed}), answers marked token=>answer:")
    buckets = _buckets(task, data)
    for i in range(num):
        tags = "  ".join(f"{b}={int(data[b][i])}" for b in buckets)
        click.echo(f"  #{i}{'  ' + tags if tags else ''}  {_decode(task, data['input_ids'][i], data['targets'][i])}")


@task_group.command("export")
@click.argument("task_spec", metavar="TASK")
@click.argument("options", nargs=-1)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="The JSONL file to write (replaced atomically).")
@click.option("-n", "num", type=click.IntRange(min=1), default=1000, show_default=True, help="Examples.")
@_seed_option
@_split_option
def task_export_command(task_spec: str, options: tuple[str, ...], out_path: str, num: int, seed: int,
                        split: str) -> None:
    """Write N examples of TASK (a task name or a recipe, with key=value OPTIONS) as a JSONL data set.

    The first line is {"_meta": {task, config, seed, split, num_examples, ...}}: the task built from
    config and generate(num_examples, seed, split) reproduce the file. Then one object per example:
    input_ids, targets (-100: no loss), the bucket keys of tasks that have them, and the decoded text.
    """
    name, task, given = load_task(task_spec, options)
    data = task.generate(num, seed=seed, split=split)
    buckets = _buckets(task, data)
    meta = {"task": name, "config": _task_config(task, given), "seed": seed, "split": split, "num_examples": num,
            "seq_len": int(data["input_ids"].shape[1]), "vocab_size": getattr(task, "vocab_size", None),
            "buckets": buckets, "sleepzoo_version": sleepzoo.__version__}
    lines = [json.dumps({"_meta": meta})]
    ids, targets = data["input_ids"], data["targets"]
    for i in range(num):
        row: dict[str, Any] = {"input_ids": ids[i].tolist(), "targets": targets[i].tolist()}
        row.update({b: jsonable(data[b][i]) for b in buckets})
        row["text"] = _decode(task, ids[i], targets[i])
        lines.append(json.dumps(row, separators=(",", ":")))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines) + "\n")
    args = ", ".join(f"{k}={v}" for k, v in meta["config"].items())
    click.echo(f"wrote {out}: {num} {split} examples of {name}({args}), seed {seed}")


# ---------------------------------------------------------------------------------------------------------
# compare, sweep


def _default_plot_path(runs: Sequence[Path]) -> Path:
    parents = {str(r.resolve().parent) for r in runs}
    common = Path(os.path.commonpath(sorted(parents)))
    return common / "compare.png"


def show_comparison(run_dirs: Sequence[str | Path], *, key: str | None, metric: str, bucket: str | None,
                    out: str | Path | None, json_path: str | Path | None, console: Console,
                    title: str | None = None) -> dict[str, Any]:
    """Load runs, aggregate (report.compare_runs), print the table, write the plot and optionally the JSON."""
    runs = report.find_runs(run_dirs)
    if not runs:
        raise SleepzooError("no run directories given (files such as plots are skipped)")
    results, waiting = [], []
    for run in runs:
        try:
            results.append(report.load_result(run, note=lambda line: click.echo(line, err=True)))
        except report.NoEvaluation:
            waiting.append(str(run))
        except report.DamagedRun as exc:
            click.echo(f"note: {run} left out: {exc}", err=True)
    if not results:
        raise SleepzooError(f"none of the {len(runs)} runs has an evaluation yet")
    if key is None:
        key = report.choose_key(results)
    comparison = report.compare_runs(results, key=key, metric=metric, bucket=bucket)
    if waiting:  # runs that have not evaluated yet (or died before): left out, said once
        shown = ", ".join(waiting[:6]) + (f" (+{len(waiting) - 6} more)" if len(waiting) > 6 else "")
        click.echo(f"note: {len(waiting)} run(s) without an evaluation yet left out: {shown}", err=True)
    console.print(report.comparison_table(comparison, title=title))
    for r in comparison["runs"]:
        if not r["finished"]:
            console.print(f"* {r['run']}: not finished, step {r['step']}/{r['steps']} ({r['source']})",
                          soft_wrap=True, markup=False, highlight=False)
    png = report.plot_comparison(comparison, Path(out) if out else _default_plot_path(runs))
    written = [str(png)]
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(json_path, comparison)
        written.append(str(json_path))
    console.print(f"wrote {' and '.join(written)}", soft_wrap=True, markup=False, highlight=False)
    return comparison


@main.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--key", default=None,
              help="Recipe setting to compare, a dotted path such as sleep.loops or task.steps (or its last "
                   "part if unambiguous) [default: sleep.loops, or the one non-seed setting that varies].")
@click.option("--metric", default="exact_accuracy", show_default=True, help="Metric of the plot and table.")
@click.option("--bucket", default=None, help="Bucket key to break the metric down by (tasks with buckets, "
                                             "e.g. k) [default: the task's first].")
@click.option("--out", "out", type=click.Path(dir_okay=False),
              help="Plot file [default: compare.png next to the runs].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the aggregates as JSON.")
def compare_command(run_dirs: tuple[str, ...], key: str | None, metric: str, bucket: str | None,
                    out: str | None, json_path: str | None) -> None:
    """Compare runs grouped by a recipe setting, mean ± std over seeds (train.seed).

    RUN_DIRS are run directories (files are skipped; a directory of runs, e.g. a sweep's --out, stands for
    the runs in it). A run still training counts with its newest periodic evaluation and is marked *.
    """
    show_comparison(run_dirs, key=key, metric=metric, bucket=bucket, out=out, json_path=json_path,
                    console=Console())


@main.command("sweep")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("grid", nargs=-1)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="One run directory per grid point goes under it, named like loops4-seed1.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs at a time; above 1 each is a `sleepzoo train` subprocess logging to <run>/train.log.")
@click.option("--dry-run", is_flag=True, help="Print the runs, their overrides and state; train nothing.")
@click.option("--metric", default="exact_accuracy", show_default=True, help="Metric of the final comparison.")
@click.option("--no-progress", is_flag=True, help="No progress bar: one line per logged step.")
def sweep_command(recipe: str, grid: tuple[str, ...], out_dir: str, jobs: int, dry_run: bool, metric: str,
                  no_progress: bool) -> None:
    """Train RECIPE once per point of a grid: key=v1,v2,... sweeps a setting, key=value sets it for all.

    Values split at top-level commas only (model.layers=[a,b] is one value). Finished runs are skipped,
    interrupted ones resumed. At the end the runs are compared (table, <out>/compare.png, compare.json).
    """
    plan = sweep.plan_sweep(recipe, grid, out_dir, jobs=jobs)
    for r in plan.runs:
        if r.todo:
            check_recipe(r.recipe)  # every plugin setting of every point, before any compute is spent
    console = Console()
    if dry_run:
        table = Table(title=f"sweep of {recipe}: {len(plan.runs)} runs into {out_dir}")
        table.add_column("run")
        table.add_column("state")
        table.add_column("overrides", overflow="fold")
        for r in plan.runs:
            table.add_row(r.name, r.status + (f" ({r.detail})" if r.detail else ""),
                          " ".join(o for o in r.overrides if o not in plan.plain))
        console.print(table)
        if plan.plain:
            console.print(f"every run: {' '.join(plan.plain)}")
        if plan.conflicts:
            raise SleepzooError(sweep._conflict_message(plan))
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep.json", plan.as_dict())
    states = {s: sum(r.status == s for r in plan.runs) for s in ("new", "restart", "resume", "done", "busy")}
    console.print(f"sweep of {recipe}: {len(plan.runs)} runs into {out} ("
                  + ", ".join(f"{n} {s}" for s, n in states.items() if n) + f"), {jobs} at a time",
                  soft_wrap=True, markup=False, highlight=False)
    failures = sweep.run_sweep(plan, jobs=jobs, progress=not no_progress,
                               echo=lambda line: console.print(line, markup=False, highlight=False))
    finished = [r.out for r in plan.runs if r.name not in failures and (r.out / "recipe.yaml").is_file()]
    try:
        show_comparison(finished, key=plan.compare_key(), metric=metric, bucket=None, out=out / "compare.png",
                        json_path=out / "compare.json", console=console,
                        title=f"{Path(recipe).stem}: {metric} by {plan.compare_key()} ({out_dir})")
    except SleepzooError as exc:
        if not failures:
            raise
        click.echo(f"note: no comparison: {exc}", err=True)  # the failures below are the error to report
    if failures:
        listed = "; ".join(f"{name}: {why}" for name, why in failures.items())
        raise SleepzooError(f"{len(failures)} of {len(plan.runs)} runs failed: {listed}")


@main.command("bench")
@click.argument("suites", nargs=-1)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the run as pytest-benchmark JSON (readable by `pytest-benchmark compare`).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG with one panel per suite.")
@click.option("--compare", "compare_path", type=click.Path(dir_okay=False), default=None,
              help="A saved --json run (or pytest-benchmark JSON) to show beside this one.")
@click.option("--size", type=click.Choice(["default", "tiny"]), default="default", show_default=True,
              help="tiny: toy sizes that only check the machinery.")
@click.option("--threads", type=int, default=None, help="torch.set_num_threads for the run (default: torch's).")
@click.option("--device", default="cpu", show_default=True, help="Where the models run: cpu, cuda, cuda:1, ...")
@click.option("--list", "list_cases", is_flag=True, help="List the cases of the suites and exit.")
def bench_command(suites: tuple[str, ...], json_path: str | None, plot_path: str | None, compare_path: str | None,
                  size: str, threads: int | None, device: str, list_cases: bool) -> None:
    """Measure the cost of sleep on this machine. SUITES: ops, loops, window, wake, memory, study (default: all).

    \b
      sleepzoo bench                                   # every suite, a table each and the acceptance checks
      sleepzoo bench loops wake --json b.json --plot b.png
      sleepzoo bench --compare b.json                  # this run beside a saved one
    """
    from . import benchmarks
    from .benchmarks import output

    chosen = list(suites) or list(benchmarks.SUITES)
    for s in chosen:
        if s not in benchmarks.SUITES:
            raise SleepzooError(f"unknown benchmark suite {s!r}; suites: {', '.join(benchmarks.SUITES)}")
    saved = benchmarks.saved_medians(benchmarks.load_json(compare_path)) if compare_path else None  # fail early
    if threads is not None:
        if threads < 1:
            raise SleepzooError(f"--threads {threads} must be >= 1")
        torch.set_num_threads(threads)
    try:
        where = torch.device(device)
    except RuntimeError as exc:
        raise SleepzooError(f"--device {device!r} is not a torch device ({exc}); use cpu, cuda or cuda:N") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise SleepzooError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    if where.type not in ("cpu", "cuda"):
        raise SleepzooError(f"--device {device}: the suites run on cpu or cuda")
    console = Console() if sys.stdout.isatty() else Console(width=160)  # a log keeps whole rows
    if list_cases:
        for s in chosen:
            for case in benchmarks.cases(s, size, device):
                console.print(f"{case.fullname:<40} {case.group}", markup=False, highlight=False)
        return
    total = sum(len(benchmarks.cases(s, size, device)) for s in chosen)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    started = time.perf_counter()
    with Progress(TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[case]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task("bench", total=total, case="")

        def on_case(case: Any, result: Any) -> None:
            if result is None:
                progress.update(task, case=case.fullname)
            else:
                progress.advance(task)
                if not console.is_terminal:
                    ms = "" if result.median is None else f" {result.median * 1e3:.2f} ms"
                    click.echo(f"done {case.fullname}{ms}", err=True)

        results = benchmarks.run(chosen, size=size, device=device, on_case=on_case)
    elapsed = time.perf_counter() - started
    for table in output.results_tables(results, saved):
        console.print(table)
    found = benchmarks.checks(results)
    if found:
        console.print(output.checks_table(found))
    console.print(f"{len(results)} cases in {elapsed:.0f} s on {device}, torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads", markup=False, highlight=False)
    if json_path:
        console.print(f"wrote {benchmarks.write_json(results, json_path, chosen)}", markup=False, highlight=False)
    if plot_path:
        console.print(f"wrote {output.plot(results, plot_path)}", markup=False, highlight=False)


if __name__ == "__main__":  # `python -m sleepzoo.cli ...` works like the `sleepzoo` script
    main(prog_name="sleepzoo")
