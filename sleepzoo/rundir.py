"""The run directory: its recipe, its metrics log, its checkpoints on resume, and the progress shown.

A run directory (see sleepzoo.train) holds ``recipe.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``final/``,
``eval.json`` and ``train.lock``. This module starts one (:func:`prepare_run_dir`: a new run, or the checks
``--resume`` makes before it continues one), keeps its log (:class:`MetricsLog`, the source of truth for
resume and compare), finds where a resumed run continues (:func:`resume_checkpoint`, :func:`resume_stage`,
:func:`finished_result`) and shows progress on the terminal (:class:`Reporter`). Rank 0 alone writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from . import distributed
from .checkpoint import Checkpoint, atomic_write_text, latest_checkpoint, newest_intact_checkpoint
from .config import Recipe, load_recipe
from .convert import keep_model_files
from .registry import SleepzooError
from .report import HEADLINE, format_value, read_row


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):  # stages: stages.0.steps
            out.update(_flatten({str(i): x for i, x in enumerate(v)}, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_diff(saved: Recipe, given: Recipe) -> list[str]:
    """``"field: saved X, given Y"`` for every field in which two recipes differ (dotted paths)."""
    a, b = _flatten(saved.to_dict()), _flatten(given.to_dict())

    def shown(d: dict, k: str) -> str:
        return repr(d[k]) if k in d else "(unset)"

    return [f"{k}: saved {shown(a, k)}, given {shown(b, k)}"
            for k in sorted(a.keys() | b.keys()) if k not in a or k not in b or a[k] != b[k]]


class MetricsLog:
    """``metrics.jsonl``: appended and flushed line by line, so a killed run keeps everything it logged."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        """Every record. A last line that is not one (cut short by a full disk or a power loss) is dropped
        with a note; such a line anywhere else is an error naming it."""
        if not self.path.is_file():
            return []
        lines = [(i, line) for i, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1)
                 if line.strip()]
        records = []
        for i, line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            elif i == lines[-1][0]:
                print(f"note: {self.path}: dropped its last line ({i}), which is not a whole record (a write cut "
                      f"short): {line[:60]!r}", flush=True)
            else:
                raise SleepzooError(f"{str(self.path)!r}: line {i} is not a JSON record with a step: {line[:60]!r}; "
                                    f"repair or delete that line, then resume again")
        return records

    def truncate_after(self, step: int, *, final_eval: bool = True) -> None:
        """Drop lines logged after ``step``: a resumed run logs those steps again. ``final_eval=False`` drops
        the final evaluation's line (of the step of a finished run) too, for a run that evaluates again."""
        kept = [r for r in self.read()
                if r["step"] < step or (r["step"] == step and (final_eval or "split" not in r))]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


class Reporter:
    """A rich progress bar on a terminal; otherwise one compact line per logged step."""

    def __init__(self, total: int, start: int, enabled: bool, silent: bool = False):
        self.total = total
        self.progress = None
        self.silent = silent  # a rank other than 0: rank 0 reports for the whole group
        if enabled and not silent and sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
            self.task_id = self.progress.add_task("train", total=total, completed=start, loss="-", tps="-")
            self.progress.start()

    def step(self, done: int, loss: float, tokens_per_s: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, completed=done, loss=f"{loss:.4f}", tps=f"{tokens_per_s:,.0f}")

    def logged(self, record: dict) -> None:
        if self.progress is None and not self.silent:
            rate = record["tokens_per_s"]
            eta = (self.total - record["step"]) * record["elapsed_s"] / max(record["step"], 1)
            print(f"step {record['step']}/{self.total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                  f"{rate:,.0f} tok/s  elapsed {record['elapsed_s']:.0f}s  eta {eta:.0f}s", flush=True)

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        elif not self.silent:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def short_metrics(metrics: dict) -> str:
    """The headline metrics on one line (``exact_accuracy 0.25  loss 1.2``), for progress messages."""
    return "  ".join(f"{k} {format_value(metrics[k])}" for k in HEADLINE if k in metrics)


def prepare_run_dir(out: Path, recipe: Recipe, resume: bool) -> None:
    """Start a run in ``out`` (refused where one with a checkpoint or final weights is), or check that
    ``--resume`` can continue the run there: the same recipe, and a checkpoint to continue from."""
    saved = out / "recipe.yaml"
    if resume:
        if not saved.is_file():
            raise SleepzooError(f"cannot resume {str(out)!r}: it holds no run (no recipe.yaml); "
                                f"start it without --resume")
        diffs = recipe_diff(load_recipe(saved), recipe)
        if diffs:
            raise SleepzooError(f"cannot resume {str(out)!r}: the recipe given differs from the run's "
                                f"{str(saved)!r} in {'; '.join(diffs)}. Resume with the run's own recipe, "
                                f"or train into a new directory")
        if latest_checkpoint(out / "checkpoints") is None:
            raise SleepzooError(f"cannot resume {str(out)!r}: it has no complete checkpoint yet "
                                f"(checkpoints/ is empty); start it again without --resume")
        keep_model_files(out, recipe)  # a run started before runs kept them
        return
    if latest_checkpoint(out / "checkpoints") is not None or (out / "final").exists():
        raise SleepzooError(f"{str(out)!r} already holds a run; pass --resume to continue it, "
                            f"or choose another output directory")
    if saved.exists():
        # A run that died before its first checkpoint: nothing to resume, so it starts over, logs included.
        print(f"note: {out} holds a run that never reached a checkpoint; starting it over", flush=True)
        for stale in ("metrics.jsonl", "eval.json"):
            (out / stale).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, recipe.to_yaml())
    keep_model_files(out, recipe)  # eval, generate and convert then need the run directory alone


def resume_checkpoint(out: Path, main: bool) -> Checkpoint:
    """The newest intact checkpoint of the run in ``out``, read whole; each damaged newer one is skipped with
    a note (on rank 0), and none intact is one error saying how to go on."""
    ckpt, skipped = newest_intact_checkpoint(out / "checkpoints")
    if main:
        for exc in skipped:
            print(f"note: skipping damaged {exc}", flush=True)
        if skipped and ckpt is not None:
            print(f"note: resuming from the newest intact checkpoint, step {ckpt.step} ({ckpt.path})", flush=True)
    if distributed.active():  # every rank resumes from the step rank 0 chose, or none does (no rank waits alone)
        mine = -1 if ckpt is None else ckpt.step
        chosen = distributed.broadcast_object(mine)
        if float(distributed.all_reduce_sum([float(mine != chosen)])[0]):
            raise SleepzooError(f"cannot resume {str(out)!r}: the processes found different newest intact "
                                f"checkpoints (rank 0: step {chosen}; this rank: step {mine}; -1 is none); check "
                                f"that every process reads the same files, then resume again")
    if ckpt is None:
        raise SleepzooError(f"cannot resume {str(out)!r}: none of its {len(skipped)} checkpoint(s) is intact (the "
                            f"newest: {skipped[0] if skipped else 'none'}); start the run over: delete {str(out)!r} "
                            f"(or train into another --out) and train without --resume")
    return ckpt


def finished_result(path: Path, step: int, main: bool) -> dict | None:
    """A finished run's eval.json when it holds the evaluation of ``step``; None when it is missing, of another
    step or damaged (noted on rank 0): the run then evaluates again."""
    if not path.is_file():
        return None
    result, why = read_row(path)
    if result is None:
        if main:
            print(f"note: {path} is damaged ({why}); evaluating the finished run again", flush=True)
        return None
    return result if result.get("step") == step else None


def resume_stage(ckpt: Checkpoint, stage_names: list[str | None]) -> int:
    """The index of the stage a checkpoint was saved in (0 for a run without stages); ``stage_names`` are the
    recipe's stages in order (``[None]`` without stages)."""
    trainer = ckpt.meta["trainer"]
    index = trainer.get("stage_index", 0)
    if not isinstance(index, int) or not 0 <= index < len(stage_names) or trainer.get("stage") != stage_names[index]:
        raise SleepzooError(f"cannot resume from {str(ckpt.path)!r}: it was saved in stage {trainer.get('stage')!r} "
                            f"(index {index}), which the recipe's stages "
                            f"({', '.join(str(name) for name in stage_names)}) do not have there")
    return index
