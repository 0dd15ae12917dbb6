"""Grid sweeps: one recipe, the cartesian product of some settings, one run directory per grid point.

    sleepzoo sweep recipes/repro/rule110.yaml task.steps=2 sleep.loops=1,2,4 train.seed=0,1,2 \\
        --out runs/repro/rule110-loops

``key=v1,v2,...`` sweeps ``key`` over the values (split at top-level commas only, so ``model.layers=[a,b]``
is one value and ``model.layers=[a,b],[c]`` two); ``key=value`` without such a comma is a plain override of
every run. Grid point ``{sleep.loops: 2, train.seed: 1}`` trains into ``<out>/loops2-seed1`` (the last
component of each swept key, then its value, in the order given).

A run directory that already holds the finished run of the same recipe is skipped, one with a checkpoint is
resumed (see :func:`sleepzoo.train.train`), one that another live process is training (its ``train.lock``)
is left alone, and one that holds a *different* recipe stops the sweep before anything is trained. Runs go
one after another in this process, or ``jobs`` at a time as ``sleepzoo train`` subprocesses (each logs to
``<run>/train.log`` and gets ``train.threads=1`` unless the recipe sets it). A failed run does not stop the
others.

    plan = plan_sweep("recipes/repro/rule110.yaml", ["sleep.loops=1,2", "train.seed=0,1"], "runs/x")
    failures = run_sweep(plan, jobs=2)
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .checkpoint import latest_checkpoint
from .config import Recipe, RecipeError, load_recipe
from .registry import SleepzooError
from .report import read_row
from .runlock import LOCK_NAME, RunLock, lock_holder  # noqa: F401  (RunLock: part of this module's API)
from .rundir import recipe_diff
from .train import train

_OPEN = "[{("
_CLOSE = "]})"
#: Settings a sweep may set itself; a run saved with another value of them is still the same run.
_OWN = ("train.threads",)


def split_values(raw: str) -> list[str]:
    """Split ``raw`` at commas outside brackets, braces, parentheses and quotes: ``1,2`` -> ``["1", "2"]``,
    ``[a,b]`` -> ``["[a,b]"]``, ``[a,b],[c]`` -> ``["[a,b]", "[c]"]``, ``'x,y'`` -> ``["'x,y'"]``."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(raw):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            parts.append(raw[start:i])
            start = i + 1
    parts.append(raw[start:])
    return [p.strip() for p in parts]


def parse_grid(args: Sequence[str], source: str = "sweep") -> tuple[dict[str, list[str]], list[str]]:
    """``key=v1,v2`` arguments -> ``({key: [v1, v2]}, [plain overrides])``, in the order given."""
    swept: dict[str, list[str]] = {}
    plain: list[str] = []
    seen: set[str] = set()
    for item in args:
        if "=" not in item:
            raise RecipeError(f"{source}: {item!r}: expected key.path=value or key.path=v1,v2,..., "
                              f"e.g. sleep.loops=1,2,4")
        key, raw = (s.strip() for s in item.split("=", 1))
        if not key:
            raise RecipeError(f"{source}: {item!r}: empty key path")
        if key in seen:
            raise RecipeError(f"{source}: {key} is given twice; give all its values at once, e.g. {key}=1,2")
        seen.add(key)
        values = split_values(raw)
        if len(values) == 1:
            plain.append(f"{key}={raw}")
            continue
        if any(v == "" for v in values):
            raise RecipeError(f"{source}: {item!r}: empty value in the list (a stray comma?)")
        swept[key] = list(dict.fromkeys(values))
    return swept, plain


def _slug(value: str) -> str:
    value = value.strip().strip("'\"")
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", value).strip("_") or "_"


def run_name(point: dict[str, str]) -> str:
    """``{"sleep.loops": "4", "train.seed": "1"}`` -> ``loops4-seed1``."""
    return "-".join(f"{key.rsplit('.', 1)[-1]}{_slug(value)}" for key, value in point.items())


@dataclass
class SweepRun:
    """One grid point: where it trains, with which overrides, and what state its directory is in."""

    name: str
    out: Path
    point: dict[str, str]  # swept key -> value, as typed
    overrides: list[str]  # everything passed to load_recipe: plain overrides, the point, sweep adjustments
    recipe: Recipe
    status: str = "new"  # new | resume | restart | done | busy (another process trains it) | conflict
    detail: str = ""

    @property
    def todo(self) -> bool:
        return self.status in ("new", "resume", "restart")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "out": str(self.out), "point": self.point, "overrides": self.overrides,
                "status": self.status, "detail": self.detail}


@dataclass
class SweepPlan:
    recipe_path: str
    out: Path
    swept: dict[str, list[str]]
    plain: list[str]
    runs: list[SweepRun] = field(default_factory=list)

    @property
    def conflicts(self) -> list[SweepRun]:
        return [r for r in self.runs if r.status == "conflict"]

    def compare_key(self) -> str:
        """The first swept setting that is not a seed; ``sleep.loops`` when only seeds are swept."""
        for key in self.swept:
            if key.rsplit(".", 1)[-1] != "seed":
                return key
        return "sleep.loops"

    def as_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe_path, "out": str(self.out), "swept": self.swept, "overrides": self.plain,
                "runs": [r.as_dict() for r in self.runs]}


def _eval_step(out: Path) -> Any:
    row, _ = read_row(out / "eval.json")
    return None if row is None else row.get("step")


def _classify(run: SweepRun, recipe_path: str, jobs: int) -> None:
    """Set ``run.status`` from its directory; adopt the saved ``train.threads`` so a resume is not refused."""
    saved = run.out / "recipe.yaml"
    holder = lock_holder(run.out)
    if holder is not None:
        who = f"pid {holder['pid']}" if holder.get("pid") is not None else "a process starting right now"
        run.status, run.detail = "busy", f"being trained by {who} ({LOCK_NAME}): left alone"
        return
    if not saved.is_file():
        run.status = "new"
    else:
        try:
            saved_recipe = load_recipe(saved)
        except SleepzooError as exc:
            run.status, run.detail = "conflict", f"its recipe.yaml does not load: {exc}"
            return
        diffs = recipe_diff(saved_recipe, run.recipe)
        real = [d for d in diffs if not d.startswith(tuple(f"{k}:" for k in _OWN))]
        if real:
            run.status, run.detail = "conflict", "; ".join(real)
            return
        if saved_recipe.train.threads != run.recipe.train.threads:
            threads = "null" if saved_recipe.train.threads is None else saved_recipe.train.threads
            run.overrides.append(f"train.threads={threads}")
            run.recipe = load_recipe(recipe_path, run.overrides)
        steps = run.recipe.train.steps
        ckpt = latest_checkpoint(run.out / "checkpoints")
        if (run.out / "eval.json").is_file() and _eval_step(run.out) == steps:
            run.status, run.detail = "done", f"finished, step {steps}"
        elif ckpt is not None:
            run.status, run.detail = "resume", f"from step {int(ckpt.name.split('_')[1])}/{steps}"
        else:
            run.status, run.detail = "restart", "no checkpoint yet: starts over"
    if run.status in ("new", "restart") and jobs > 1 and run.recipe.train.threads is None:
        run.overrides.append("train.threads=1")  # N processes of one thread each, not N x all cores
        run.recipe = load_recipe(recipe_path, run.overrides)


def plan_sweep(recipe_path: str | Path, args: Sequence[str], out_dir: str | Path, *, jobs: int = 1) -> SweepPlan:
    """Every grid point of ``args`` with its loaded (validated) recipe and the state of its run directory."""
    recipe_path = str(recipe_path)
    swept, plain = parse_grid(args, source=recipe_path)
    if not swept:
        raise RecipeError(f"{recipe_path}: nothing to sweep: give at least one key with several values, "
                          f"e.g. sleep.loops=1,2,4 (for a single run use `sleepzoo train`)")
    if jobs < 1:
        raise SleepzooError(f"--jobs {jobs}: give 1 or more")
    out = Path(out_dir)
    plan = SweepPlan(recipe_path, out, swept, plain)
    names: dict[str, dict[str, str]] = {}
    for values in itertools.product(*swept.values()):
        point = dict(zip(swept, values))
        name = run_name(point)
        if name in names:
            raise SleepzooError(f"grid points {names[name]} and {point} would both train into "
                                f"{str(out / name)!r}; make the values differ in letters or digits")
        names[name] = point
        common = plain
        if point.get("sleep.loops", "auto").strip() != "auto":  # the bounds of loops: auto go to its points only
            common = [o for o in plain if not o.startswith(("sleep.max_loops=", "sleep.tolerance="))]
        overrides = [*common, *(f"{k}={v}" for k, v in point.items())]
        run = SweepRun(name, out / name, point, overrides, load_recipe(recipe_path, overrides))
        _classify(run, recipe_path, jobs)
        plan.runs.append(run)
    return plan


# ---------------------------------------------------------------------------------------------------------
# running


def _last_error(log: Path) -> str | None:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    tail = [line for line in lines if line.strip()][-1:]
    return tail[0].strip() if tail else None


def default_launcher() -> list[str]:
    """How a ``--jobs`` subprocess runs the sleepzoo command line: this Python, sleepzoo.cli.main."""
    return [sys.executable, "-c", "from sleepzoo.cli import main; main(prog_name='sleepzoo')"]


def _finished(run: SweepRun) -> bool:
    return _eval_step(run.out) == run.recipe.train.steps


def run_sweep(plan: SweepPlan, *, jobs: int = 1, progress: bool = True,
              echo: Callable[[str], None] = print, launcher: Sequence[str] | None = None,
              poll_s: float = 0.2) -> dict[str, str]:
    """Train every run of ``plan`` that is not done; return ``{name: why}`` for those that failed.

    A failed run (a :class:`SleepzooError` in this process, or a subprocess that exits non-zero) does not
    stop the others. Any other exception is a bug and propagates.
    """
    if plan.conflicts:
        raise SleepzooError(_conflict_message(plan))
    todo = [r for r in plan.runs if r.todo]
    failures: dict[str, str] = {}
    for r in plan.runs:
        if not r.todo:
            echo(f"skip {r.name}: {r.detail}")
    if jobs <= 1:
        for i, r in enumerate(todo, 1):
            verb = "resuming" if r.status == "resume" else "training"
            echo(f"[{i}/{len(todo)}] {r.name}: {verb} -> {r.out}")
            try:  # train holds the run's lock
                train(r.recipe, r.out, resume=r.status == "resume", progress=progress)
            except SleepzooError as exc:
                failures[r.name] = str(exc)
                echo(f"[{i}/{len(todo)}] {r.name} failed: {exc}")
        return failures
    return _run_parallel(plan, todo, jobs, echo, list(launcher or default_launcher()), poll_s)


def _run_parallel(plan: SweepPlan, todo: list[SweepRun], jobs: int, echo: Callable[[str], None],
                  launcher: list[str], poll_s: float) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # a recipe's train.threads still wins
        env.setdefault(var, "1")
    pending = deque(enumerate(todo, 1))
    active: dict[subprocess.Popen, tuple[int, SweepRun, Path, Any]] = {}
    failures: dict[str, str] = {}
    try:
        while pending or active:
            while pending and len(active) < jobs:
                i, r = pending.popleft()
                r.out.mkdir(parents=True, exist_ok=True)
                log_path = r.out / "train.log"
                log = open(log_path, "a")
                cmd = [*launcher, "train", plan.recipe_path, *r.overrides, "--out", str(r.out), "--no-progress"]
                if r.status == "resume":
                    cmd.append("--resume")
                log.write(f"$ {shlex.join(cmd)}\n")
                log.flush()
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL)
                active[proc] = (i, r, log_path, log)
                verb = "resuming" if r.status == "resume" else "training"
                echo(f"[{i}/{len(todo)}] {r.name}: {verb} -> {r.out} (log: {log_path})")
            time.sleep(poll_s)
            for proc in [p for p in active if p.poll() is not None]:
                i, r, log_path, log = active.pop(proc)
                log.close()
                if proc.returncode == 0 and _finished(r):
                    echo(f"[{i}/{len(todo)}] {r.name}: done")
                    continue
                if proc.returncode == 0:  # e.g. a launcher that did not run `train`
                    why = f"the subprocess exited without finishing the run (no eval.json of step " \
                          f"{r.recipe.train.steps}; log {log_path})"
                else:
                    why = f"{_last_error(log_path) or 'no output'} (exit status {proc.returncode}, log {log_path})"
                failures[r.name] = why
                echo(f"[{i}/{len(todo)}] {r.name} failed: {why}")
    finally:
        for proc, (_, _, _, log) in active.items():  # interrupted: stop what is still running
            proc.terminate()
        for proc, (_, _, _, log) in active.items():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    return failures


def _conflict_message(plan: SweepPlan) -> str:
    first = plan.conflicts[0]
    more = f" (and {len(plan.conflicts) - 1} more)" if len(plan.conflicts) > 1 else ""
    return (f"{str(first.out)!r} holds a run of a different recipe{more}: {first.detail}. "
            f"Sweep into another --out, or move those runs away")
