"""The trainer: one recipe in, one run directory out, resumable exactly.

    from sleepzoo.config import load_recipe
    from sleepzoo.train import train

    metrics = train(load_recipe("recipes/rule110-tiny.yaml", ["sleep.loops=2"]), "runs/rule110-n2")

A run directory holds

    recipe.yaml                    the resolved recipe (``--resume`` refuses a different one)
    metrics.jsonl                  one JSON object a line: train lines every ``log_every`` steps, eval lines
    checkpoints/step_XXXXXXX/      the newest ``keep_checkpoints`` checkpoints (see sleepzoo.checkpoint)
    final/model.safetensors        the weights after the last step
    pretrained/, tokenizer/        copies of model.pretrained's config.json and tokenizer files (no weights) and
                                   of a task.tokenizer file, so eval / generate / convert need the run alone
    eval.json                      the final evaluation, with its step, loops and window
    train.lock                     while a process writes the directory (see sleepzoo.runlock)

``--resume`` continues from the newest intact checkpoint: a damaged newer one (a file missing, cut short or
changed since it was written, non-finite weights) is skipped with a note, and a torn last line of
metrics.jsonl is dropped with one; a damaged eval.json of a finished run makes it evaluate again.

Determinism (SPEC 4, "every N sees the same data order"): torch is seeded with ``train.seed`` right before the
model is built, and the batch for step i is ``task.generate(batch_size, seed=batch_seed(train.seed, i))``.
So runs that differ only in ``sleep.loops`` see identical batches, and a resumed run sees exactly the
batches, RNG draws and optimizer states the uninterrupted run would have.

Stages (``stages:`` in the recipe, see sleepzoo.config) run in order on the same model. Each stage freezes
what its ``train.trainable`` leaves out, builds its own optimizers over the rest and its own warmup-stable-
decay schedule over its steps, and hands its ``sleep`` section to the model (``model.sleep``, which the
forward pass and the task's evaluation default to). Steps are counted globally (data order, log and
checkpoint names); each stage ends with an evaluation and a checkpoint; log lines carry ``"stage"``;
checkpoints record the stage and the step within it, so ``--resume`` continues inside any stage exactly.

Several processes (``torchrun --nproc_per_node=K -m sleepzoo train RECIPE``, see sleepzoo.distributed):
``train.batch_size`` is the global batch. Every rank generates the same seeded batch for a step and trains
on its own contiguous slice (:func:`sleepzoo.distributed.shard_bounds`; sizes may differ by one row), so the
data order is the one-process order. The engine's loss is a mean over a slice's targets; each rank scales it
by its share of the step's targets before DDP (``train.parallel: ddp``) or FSDP2 (``fsdp``) averages the
gradients, so the update is the one-process update on the whole batch, and the logged loss is the global
mean (an all-reduce of the ranks' target-weighted losses). Rank 0 alone writes the run directory, logs, shows
progress, saves checkpoints and evaluates (under FSDP every rank evaluates, as the sharded forward needs them
all; rank 0 writes). Checkpoints hold the plain model and full optimizer states, so a K-process run resumes
on one process and the other way round. Random draws inside the forward (dropout) follow the same seed on
every rank but cover a slice, not the batch: with them a K-process run is a different, equally valid run;
sleepzoo's models draw none.

Mixed precision (``train.autocast``): see :class:`sleepzoo.precision.Precision`. Where metrics go besides
metrics.jsonl (``train.loggers``: tensorboard, wandb): see sleepzoo.loggers.

This module is the loop: :func:`train` takes the run directory, ``_train`` reads top to bottom (open the run,
train each stage, finish), ``_train_stage`` is one stage's steps and ``_update`` one step. What the loop
uses lives with its concern: optimizers, parameter groups and the schedule in sleepzoo.optim; the run
directory, its log, resume and the progress display in sleepzoo.rundir; DDP, FSDP2 and the plain twin
checkpoints are written from in sleepzoo.distributed; mixed precision in sleepzoo.precision.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

import sleepzoo

from . import distributed, registry, rules
from .build import check_fit
from .checkpoint import (Checkpoint, CheckpointDamaged, CheckpointError, atomic_write_json, capture_rng, check_finite,
                         load_checkpoint, load_weights, newest_intact_checkpoint, read_metadata, restore_rng,
                         save_checkpoint, save_weights)
from .config import Recipe, RecipeError, load_recipe
from .convert import load_run_model, run_recipe
from .distributed import PlainTwin, first_names, replicate, shard
from .engine import IGNORE_INDEX
from .loggers import Loggers, check_available
from .optim import build_optimizers, build_schedulers, select_parameters
from .precision import Precision
from .pretrained import MODEL_TYPES
from .registry import SleepzooError
from .report import read_row
from .rundir import (MetricsLog, Reporter, finished_result, prepare_run_dir, resume_checkpoint, resume_stage,
                     short_metrics)
from .runlock import RunBusy, RunLock


class Task(Protocol):
    """What the trainer needs from a task plugin (see sleepzoo.tasks)."""

    def generate(self, num_examples: int, seed: int, split: str = "train") -> dict[str, torch.Tensor]: ...

    def evaluate(self, model: nn.Module, *, num_examples: int, batch_size: int, seed: int,
                 window: int | None = None, loops: int | None = None,
                 device: torch.device | str = "cpu") -> dict[str, Any]: ...


# ---------------------------------------------------------------------------------------------------------
# data order, building, evaluating


def batch_seed(seed: int, step: int) -> int:
    """The data seed of training step ``step`` (0-based): a stable hash of (seed, step), 63 bits.

    A hash rather than ``seed + step`` so that runs with neighbouring seeds do not share shifted batches.
    """
    digest = hashlib.blake2b(f"sleepzoo-train:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1



def build(recipe: Recipe) -> tuple[nn.Module, Task]:
    """The recipe's model and task; torch is seeded with ``train.seed`` right before the model is built."""
    task = sleepzoo.build_task(recipe)
    torch.manual_seed(recipe.train.seed)
    model = sleepzoo.build_model(recipe)
    return model, task


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SleepzooError(f"train.device: {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SleepzooError(f"train.device: {name!r} asks for CUDA, which this machine does not have; "
                            f"use train.device=cpu")
    return device


def jsonable(value: Any) -> Any:
    """Metrics as plain JSON values: tensors and numpy values become numbers and lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return value.tolist()
    return value


def evaluate(model: nn.Module, task: Task, recipe: Recipe, *, device: torch.device,
             num_examples: int | None = None, loops: int | str | None = None, window: int | None = None,
             max_loops: int | None = None, tolerance: float | None = None) -> dict:
    """``task.evaluate`` on the recipe's eval settings, in eval mode, without gradients. Under
    ``loops="auto"`` the bounds of adaptive sleep are ``max_loops`` / ``tolerance``, else the recipe's own
    when it sleeps adaptively too.

    All RNG states are restored afterwards, so evaluating (or not) never changes what training does next.
    """
    adaptive = {}
    if loops == "auto":
        _, bound, tol = rules.merge_schedule(recipe.sleep, loops, max_loops, tolerance)
        adaptive = {"max_loops": bound, "tolerance": tol}
    was_training = model.training
    rng = capture_rng()
    model.eval()
    try:
        with torch.no_grad():
            metrics = task.evaluate(
                model, num_examples=num_examples or recipe.eval.num_examples, batch_size=recipe.eval.batch_size,
                seed=recipe.eval.seed, window=window, loops=loops, device=device, **adaptive)
    finally:
        restore_rng(rng)
        model.train(was_training)
    return jsonable(metrics)


# ---------------------------------------------------------------------------------------------------------
# stages


@dataclass
class _Stage:
    """One stage of a run as the trainer sees it: its recipe, where it starts and what it trains."""

    index: int
    name: str | None  # None: a recipe without stages
    recipe: Recipe  # the run's recipe with the stage's settings applied (train.steps = the stage's steps)
    offset: int  # global steps done before it
    trainable: set[int]  # ids of the parameters it trains

    @property
    def end(self) -> int:
        return self.offset + self.recipe.train.steps

    def where(self, source: str) -> str:
        return source if self.name is None else f"{source}: stages[{self.index}] ({self.name})"


def _plan(recipe: Recipe, model: nn.Module, task: Task) -> list[_Stage]:
    """Every stage with its trainable set, each checked against the model, the task and the plugins."""
    stages, offset = [], 0
    for i, (name, staged) in enumerate(recipe.stage_recipes()):
        stage = _Stage(i, name, staged, offset, set())
        where = stage.where(recipe.source)
        if name is not None:
            try:
                check_fit(staged, task)  # its window fits the task's sequences
            except RecipeError as exc:
                raise RecipeError(f"{where}: {str(exc).removeprefix(f'{recipe.source}: ')}") from None
            try:
                registry.get("eviction", staged.sleep.eviction)(window=staged.sleep.window,
                                                                sleep_every=staged.sleep.sleep_every)
            except SleepzooError as exc:
                raise RecipeError(f"{where}: sleep.eviction: {exc}") from None
        try:
            names = recipe.model.layers if recipe.model.name == "hybrid" else None  # others: from the registry
            selected = select_parameters(model, staged.train.trainable, names)
        except SleepzooError as exc:
            raise RecipeError(f"{where}: {exc}") from None
        stage.trainable = {id(p) for _, p in selected}
        stages.append(stage)
        offset = stage.end
    return stages


def _enter_stage(model: nn.Module, stage: _Stage, everything: list[nn.Parameter]) -> list[nn.Parameter]:
    """Freeze what the stage does not train, give the model the stage's sleep settings; return the trained."""
    if stage.name is not None:
        model.sleep = stage.recipe.sleep
    for p in everything:
        p.requires_grad_(id(p) in stage.trainable)
        p.grad = None  # a gradient left by the previous stage must not reach this one's clipping
    return [p for p in everything if p.requires_grad]


# ---------------------------------------------------------------------------------------------------------
# one step's forward and backward: micro-batches, gradients accumulating


def _micro_batches(rows: int, size: int | None) -> list[tuple[int, int]]:
    """[start, end) row ranges of at most ``size`` rows covering ``rows`` (one range when size is None)."""
    size = rows if size is None or size >= rows else size
    return [(s, min(s + size, rows)) for s in range(0, max(rows, 1), size)]


def _accumulate(runner: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, micro: int | None,
                total_targets: float, world: int, precision: Precision, params: list[nn.Parameter],
                max_rows: int | None = None, passes: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Forward and backward of this rank's rows in micro-batches of ``micro`` rows (``train.micro_batch_size``),
    gradients accumulating. Each micro-batch's mean loss is weighted by its share of the step's targets over all
    ranks (times ``world``, which DDP/FSDP divide out), so the summed gradient is that of one batch. Only the
    last backward synchronises gradients under DDP and FSDP. Returns the rank's weighted loss (detached): the
    step's mean loss on one process.

    Under several processes every rank runs the same number of forwards and backwards (the collectives of DDP
    and FSDP pair up call by call): as many micro-batches as the largest slice (``max_rows`` rows) needs, and a
    micro-batch without targets (or a rank's extra one) runs as a forward and backward with weight 0.

    ``passes``: a list that receives each real micro-batch's sleep passes used (``SleepOutput.passes``)."""
    rows = input_ids.shape[0]
    ranges = _micro_batches(rows, micro)
    real = len(ranges)  # micro-batches of this rank's own rows; any after them are zero-weight repeats
    if world > 1 and max_rows is not None:
        count = len(_micro_batches(max_rows, micro))
        ranges += [(rows - 1, rows)] * (count - len(ranges))  # zero-weight repeats of the last row
    inner = getattr(runner, "module", runner)  # under DDP, the model it wraps
    # sleepzoo models compute the head at the target positions only; other models are called as they were
    kwargs = {"return_logits": False} if getattr(inner, "supports_target_logits", False) else {}
    total = torch.zeros((), dtype=torch.float32, device=input_ids.device)
    for i, (a, b) in enumerate(ranges):
        tg = targets[a:b]
        has = int((tg != IGNORE_INDEX).sum())
        n = has if i < real else 0  # an extra micro-batch repeats a real row with weight 0
        if n == 0 and world == 1:
            continue  # nothing to learn from, nobody to keep in step with
        last = i + 1 == len(ranges)
        if hasattr(runner, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last backward only
            runner.set_requires_gradient_sync(last)
        sync = contextlib.nullcontext() if last or not hasattr(runner, "no_sync") else runner.no_sync()
        with sync:
            if has == 0:  # keep the collectives in step: a forward and backward that changes nothing, with a
                # target where tasks put theirs (the end), so the backward reaches the blocks other ranks' does
                tg = torch.full_like(tg, IGNORE_INDEX)
                tg[:, -1] = input_ids[a:b, -1]
            with precision.autocast():
                out = runner(input_ids[a:b], tg, **kwargs)
            if out.loss is None:
                raise SleepzooError("the model returned no loss for a micro-batch with targets")
            weight = distributed.loss_weight(n, total_targets, world) if n else 0.0
            loss = out.loss.float() * weight
            precision.backward(loss)
        if passes is not None and n and getattr(out, "passes", None) is not None:
            passes.append(out.passes.detach())
        total += loss.detach()
    return total


def _grad_norm(norm: torch.Tensor) -> float:
    full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP
    return float((full() if callable(full) else norm).item())


# ---------------------------------------------------------------------------------------------------------
# training: train() takes the run directory's lock; _train is the loop, its steps are the functions below it


def train(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train ``recipe`` into ``out_dir``; return the final evaluation (also written to ``eval.json``).

    ``resume=True`` continues the run in ``out_dir`` from its newest checkpoint, exactly as if it had not
    stopped; the recipe must be the run's own. A finished run is not trained again. Under torchrun this
    joins the process group (and leaves it at the end); every rank returns the same evaluation.
    """
    cfg = recipe.train
    check_available(recipe)  # a logger's missing package stops the run before anything is spent or written
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    started = distributed.setup(_device(cfg.device))
    try:
        out = Path(distributed.broadcast_object(str(out_dir)))  # rank 0's, should the ranks' defaults differ
        lock = RunLock(out)  # one process writes a run directory; rank 0 writes it for the group

        def take() -> None:
            lock.acquire()

        distributed.on_main(take)
        try:
            return _train(recipe, out, resume, progress)
        finally:
            lock.release()
    finally:
        if started:
            distributed.teardown()


def _train(recipe: Recipe, out: Path, resume: bool, progress: bool) -> dict:
    """Build and check everything, train the stages, then finish: the final weights, the final evaluation
    and eval.json. A finished run that is resumed returns its result without training."""
    run = _open_run(recipe, out, resume, progress)
    try:
        result = _train_stages(run, resume)
        if result is None:
            result = _finish(run)
    except BaseException:
        run.loggers.close(failed=True)
        raise
    run.loggers.close()
    return result


def _train_stages(run: _Run, resume: bool) -> dict | None:
    """Each stage from the one a resumed run stopped in: set it up, restore the checkpoint (once), train its
    steps. Returns the result of a finished run that was evaluated already, else None."""
    ckpt = resume_checkpoint(run.out, run.main) if resume else None
    first = 0 if ckpt is None else resume_stage(ckpt, [stage.name for stage in run.stages])
    try:
        for stage in run.stages[first:]:
            run.current = _setup_stage(run, stage)
            if ckpt is not None:
                finished = _restore(run, run.current, ckpt)
                ckpt = None
                if finished is not None:
                    return finished
            _start_stage(run, run.current)
            _train_stage(run, run.current)
    finally:
        if run.reporter is not None:
            run.reporter.close()
    return None


@dataclass
class _Run:
    """One training run as the loop sees it: what is built once, and what its checkpoints keep."""

    recipe: Recipe
    out: Path
    device: torch.device
    precision: Precision
    model: nn.Module
    task: Task
    twin: PlainTwin | None  # under FSDP, the plain copy that checkpoints are written from and read into
    stages: list[_Stage]
    progress: bool
    log: MetricsLog
    everything: list[nn.Parameter] = field(init=False)  # every parameter once, frozen or not
    runner: nn.Module = field(init=False)  # what the forward runs: the model, or its DDP wrapper
    current: _StageRun | None = None  # the stage being trained
    state: dict[str, Any] = field(default_factory=lambda: {"tokens": 0, "elapsed_s": 0.0, "loss_sum": 0.0,
                                                           "loss_count": 0})  # the counters checkpoints keep
    reporter: Reporter | None = None  # from the first step this process trains
    loggers: Loggers = field(default_factory=Loggers)  # tensorboard, wandb: opened with the reporter
    elapsed_before: float = 0.0  # training seconds of the processes before a resume
    t_start: float = 0.0  # perf_counter() when this process started training
    world: int = field(init=False)
    rank: int = field(init=False)
    main: bool = field(init=False)  # rank 0, which writes the run directory
    fsdp: bool = field(init=False)

    def __post_init__(self) -> None:
        self.everything = list({id(p): p for p in self.model.parameters()}.values())
        self.runner = self.model
        self.world, self.rank, self.main = distributed.world_size(), distributed.rank(), distributed.is_main()
        self.fsdp = self.twin is not None

    def elapsed(self, now: float | None = None) -> float:
        """Training seconds of the whole run, resumes included."""
        return self.elapsed_before + (time.perf_counter() if now is None else now) - self.t_start

    def write(self, record: dict) -> None:
        """A record into metrics.jsonl, then to the loggers (rank 0 only)."""
        if self.main:
            self.log.write(record)
            self.loggers.log(record)

    def evaluate(self, stage_recipe: Recipe) -> dict:
        """The task's evaluation with a stage's settings, on rank 0 (under FSDP on every rank: the sharded
        forward needs them all; they compute the same metrics)."""
        if self.fsdp:
            return evaluate(self.model, self.task, stage_recipe, device=self.device)
        return distributed.on_main(lambda: evaluate(self.model, self.task, stage_recipe, device=self.device))


@dataclass
class _StageRun:
    """A stage being trained: what it trains, its optimizers and schedules, and the global step it starts at."""

    stage: _Stage
    params: list[nn.Parameter]
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LambdaLR]
    start: int


def _open_run(recipe: Recipe, out: Path, resume: bool, progress: bool) -> _Run:
    """Build the model (sharded under FSDP), plan and check every stage, then prepare the run directory:
    nothing is written before the whole recipe has been checked."""
    cfg = recipe.train
    device = distributed.device_for(_device(cfg.device))
    precision = Precision(cfg.autocast, device, recipe.source)
    fsdp = distributed.active() and cfg.parallel == "fsdp"
    model, task = build(recipe)
    twin = PlainTwin(model) if fsdp else None
    model.to(device)
    if fsdp:
        shard(model, device, recipe.source)
    stages = _plan(recipe, model, task)  # every stage checked before anything is written
    distributed.on_main(lambda: prepare_run_dir(out, recipe, resume))
    model.train()
    return _Run(recipe, out, device, precision, model, task, twin, stages, progress, MetricsLog(out / "metrics.jsonl"))


def _setup_stage(run: _Run, stage: _Stage) -> _StageRun:
    """Freeze what the stage does not train; build its optimizers and schedules (on the FSDP twin too)."""
    scfg = stage.recipe.train
    params = _enter_stage(run.model, stage, run.everything)
    optimizers = build_optimizers(run.model, scfg)
    schedulers = build_schedulers(optimizers, scfg)
    if run.twin is not None:
        names = first_names(run.model)
        run.twin.follow({names[id(p)] for p in params}, scfg)
    return _StageRun(stage, params, optimizers, schedulers, start=stage.offset)


def _restore(run: _Run, current: _StageRun, ckpt: Checkpoint) -> dict | None:
    """Load the checkpoint a resumed run continues from into the stage's model, optimizers, schedules, RNGs
    and counters, and drop the log lines after its step. Returns the result of a finished run that was
    evaluated already, else None."""
    if run.twin is None:
        state = load_checkpoint(ckpt, model=run.model, optimizers=current.optimizers,
                                schedulers=current.schedulers)
    else:
        state = load_checkpoint(ckpt, model=run.twin.model, optimizers=run.twin.optimizers,
                                schedulers=current.schedulers)
        run.twin.scatter(run.model, current.optimizers)
    current.start = state.pop("step")
    for key in ("stage", "stage_index", "stage_step"):
        state.pop(key, None)
    run.precision.load_state_dict(state)
    run.state = state
    steps = run.recipe.train.steps
    result = finished_result(run.out / "eval.json", current.start, run.main) if current.start == steps else None
    if run.main:  # a finished run evaluated again logs its final evaluation again
        run.log.truncate_after(current.start, final_eval=result is not None or current.start != steps)
    return result


def _start_stage(run: _Run, current: _StageRun) -> None:
    """DDP over the stage's parameters; on the first stage this process trains, the progress display, the
    loggers and the clock; a line saying what a stage of a staged run trains."""
    stage = current.stage
    if distributed.active() and not run.fsdp:
        run.runner = run.model  # the previous stage's DDP and its gradient hooks go before the next comes
        gc.collect()
        run.runner = replicate(run.model, run.device)
    if run.reporter is None:
        run.reporter = Reporter(run.recipe.train.steps, current.start, run.progress, silent=not run.main)
        run.loggers = Loggers.open(run.recipe, run.out, current.start, run.main)
        run.elapsed_before = run.state["elapsed_s"]
        run.t_start = time.perf_counter()
    if run.recipe.stages and current.start < stage.end:
        frozen = len(run.everything) - len(current.params)
        run.reporter.message(f"stage {stage.name}: steps {current.start + 1}-{stage.end}, eviction "
                             f"{stage.recipe.sleep.eviction}, loops {stage.recipe.sleep.loops}, training "
                             f"{sum(p.numel() for p in current.params):,} parameters"
                             + (f" ({frozen} tensors frozen)" if frozen else ""))


def _train_stage(run: _Run, current: _StageRun) -> None:
    """The stage's steps: one update each, then a log line, an evaluation and a checkpoint when their
    cadences come round (the stage's last step has all three; the run's last evaluates in _finish)."""
    stage, cfg, every_eval = current.stage, run.recipe.train, run.recipe.eval.every
    t_interval, tokens_interval = time.perf_counter(), 0  # training speed since the last log line
    for step in range(current.start, stage.end):
        loss, grad_norm, lrs, step_tokens, passes = _update(run, current, step)
        done = step + 1
        run.state["tokens"] += step_tokens
        run.state["loss_sum"] += loss
        run.state["loss_count"] += 1
        if passes:  # sleep.loops: auto (older checkpoints' counters lack these)
            run.state["passes_sum"] = run.state.get("passes_sum", 0.0) + passes[0]
            run.state["passes_count"] = run.state.get("passes_count", 0) + int(passes[1])
        tokens_interval += step_tokens
        now = time.perf_counter()
        tokens_per_s = tokens_interval / max(now - t_interval, 1e-9)
        run.reporter.step(done, loss, tokens_per_s)

        if done % cfg.log_every == 0 or done == stage.end:
            _log_train(run, stage, done, lrs, grad_norm, tokens_per_s, now)
            t_interval, tokens_interval = time.perf_counter(), 0
        stage_ends = done == stage.end and done != cfg.steps  # a stage other than the last
        if (every_eval and done % every_eval == 0 and done != cfg.steps) or stage_ends:
            _log_eval(run, stage, done, stage_ends)
            t_interval, tokens_interval = time.perf_counter(), 0  # evaluation time is not training speed
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == stage.end:
            _save(run, current, done)


def _update(run: _Run, current: _StageRun, step: int) -> tuple[float, float, list[float], int, list[float]]:
    """One optimizer step on this rank's slice of the seeded global batch of ``step``. Returns the step's
    mean loss over every target of every rank, the gradient norm before clipping, the learning rates this
    update used (one per optimizer), the tokens of the global batch and, under ``sleep.loops: auto``, the
    sleep passes used [sum, count] over every rank's sequences and windows ([] otherwise)."""
    scfg, world, device = current.stage.recipe.train, run.world, run.device
    batch = run.task.generate(scfg.batch_size, seed=batch_seed(run.recipe.train.seed, step), split="train")
    lo, hi = distributed.shard_bounds(scfg.batch_size, world, run.rank)  # this rank's rows
    input_ids = batch["input_ids"][lo:hi].to(device)  # (B / world, T)
    targets = batch["targets"][lo:hi].to(device)  # (B / world, T), -100 where no loss is taken
    num_targets = int((targets != IGNORE_INDEX).sum())
    total_targets = float(distributed.all_reduce_sum([num_targets])[0])
    if total_targets == 0:
        raise SleepzooError(f"the {run.recipe.task.name} training batch of step {step + 1} has no targets")
    for opt in current.optimizers:
        opt.zero_grad(set_to_none=True)
    max_rows = -(-scfg.batch_size // world)  # the largest slice (shard_bounds: sizes differ by <= 1)
    adaptive = current.stage.recipe.sleep.loops == "auto"
    passes: list[torch.Tensor] | None = [] if adaptive else None
    loss = _accumulate(run.runner, input_ids, targets, scfg.micro_batch_size, total_targets, world,
                       run.precision, current.params, max_rows, passes)
    run.precision.unscale(current.optimizers)
    max_norm = scfg.grad_clip if scfg.grad_clip > 0 else math.inf
    grad_norm = _grad_norm(torch.nn.utils.clip_grad_norm_(current.params, max_norm))
    lrs = [opt.param_groups[0]["lr"] for opt in current.optimizers]  # the rates this update uses
    run.precision.step(current.optimizers)
    for sched in current.schedulers:
        sched.step()
    loss_value = loss.item()
    if world > 1:  # the mean over every target of the step, as one process computes it
        loss_value = float(distributed.all_reduce_sum([loss_value])[0]) / world
    if not math.isfinite(loss_value):
        raise SleepzooError(f"the training loss is {loss_value} at step {step + 1}; lower train.muon_lr / "
                            f"train.adamw_lr or train.grad_clip")
    used = []
    if adaptive:  # every rank takes part in the sum, so the collectives pair up
        used = distributed.all_reduce_sum([float(sum(float(p.sum()) for p in passes)),
                                           float(sum(p.numel() for p in passes))])
    return loss_value, grad_norm, lrs, batch["input_ids"].numel(), [float(x) for x in used]


def _tag(stage: _Stage) -> dict:
    return {} if stage.name is None else {"stage": stage.name}


def _log_train(run: _Run, stage: _Stage, done: int, lrs: list[float], grad_norm: float, tokens_per_s: float,
               now: float) -> None:
    """A train line: the mean loss since the previous one, the learning rates, speed and time."""
    state = run.state
    record = {"step": done, **_tag(stage), "loss": state["loss_sum"] / state["loss_count"], "lr": lrs[0]}
    if len(lrs) > 1:
        record["adamw_lr"] = lrs[1]
    if state.get("passes_count"):  # sleep.loops: auto: mean passes used per sequence and window since the last
        record["passes"] = state["passes_sum"] / state["passes_count"]
        state["passes_sum"], state["passes_count"] = 0.0, 0
    record.update(grad_norm=grad_norm, tokens=state["tokens"], tokens_per_s=tokens_per_s,
                  elapsed_s=run.elapsed(now))
    run.write(record)
    run.reporter.logged(record)
    state["loss_sum"], state["loss_count"] = 0.0, 0


def _log_eval(run: _Run, stage: _Stage, done: int, stage_ends: bool) -> None:
    """A periodic evaluation, or the one at the end of a stage other than the last, into the log."""
    metrics = run.evaluate(stage.recipe)
    run.write({"step": done, **_tag(stage), "split": "test", **metrics})
    label = f"eval step {done}" + (f" (end of stage {stage.name})" if stage_ends else "")
    run.reporter.message(f"{label}: {short_metrics(metrics)}")


def _save(run: _Run, current: _StageRun, done: int) -> None:
    """A checkpoint after step ``done`` (plain format, from the twin under FSDP), written by rank 0."""
    stage, cfg = current.stage, run.recipe.train
    run.state["elapsed_s"] = run.elapsed()
    position = {} if stage.name is None else {
        "stage": stage.name, "stage_index": stage.index, "stage_step": done - stage.offset}
    saved_model, saved_optimizers = run.model, current.optimizers
    if run.twin is not None:
        run.twin.gather(run.model, current.optimizers)
        saved_model, saved_optimizers = run.twin.model, run.twin.optimizers
    distributed.on_main(functools.partial(
        save_checkpoint, run.out / "checkpoints", done, model=saved_model, optimizers=saved_optimizers,
        schedulers=current.schedulers, trainer_state={**run.state, **position, **run.precision.state_dict()},
        keep=cfg.keep_checkpoints))


def _finish(run: _Run) -> dict:
    """The final weights, the final evaluation (with the last stage's settings) into the log and eval.json."""
    cfg, last = run.recipe.train, run.stages[-1]
    elapsed = run.elapsed()
    if run.twin is not None:
        run.twin.gather(run.model, run.current.optimizers)
    plain = run.model if run.twin is None else run.twin.model
    distributed.on_main(lambda: save_weights(plain, run.out / "final" / "model.safetensors",
                                             metadata={"step": str(cfg.steps)}))
    metrics = run.evaluate(last.recipe)
    bounds = _eval_schedule(last.recipe.sleep, None, None, None)[1]  # loops: auto: its max_loops and tolerance
    result = {"step": cfg.steps, "loops": last.recipe.sleep.loops, **bounds, "window": last.recipe.sleep.window,
              "num_examples": run.recipe.eval.num_examples, "train_time_s": elapsed, **metrics}

    def write_result() -> dict:
        run.write({"step": cfg.steps, **_tag(last), "split": "test", **metrics})
        atomic_write_json(run.out / "eval.json", result)
        return result

    return distributed.on_main(write_result)


# ---------------------------------------------------------------------------------------------------------
# evaluating a finished (or running) run


def load_run(run_dir: str | Path) -> tuple[Recipe, nn.Module, Task, int]:
    """A run's recipe, its model with the newest weights (final, else the newest intact checkpoint), task and
    step. Weights that hold a NaN or an infinity are refused."""
    run = Path(run_dir)
    saved = run / "recipe.yaml"
    if not saved.is_file():
        raise SleepzooError(f"{str(run)!r} is not a run directory (no recipe.yaml); "
                            f"`sleepzoo train` writes one")
    recipe = load_recipe(saved)
    final = run / "final" / "model.safetensors"
    if final.is_file():
        weights = final
        how = (f"delete {str(final.parent)!r} and resume the run (sleepzoo train ... --out {str(run)!r} --resume) "
               f"to write it again from its newest checkpoint")
        try:
            metadata = read_metadata(final)  # reads the header and checks that the file is whole
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; {how}") from None
        try:
            step = int(metadata.get("step", recipe.train.steps))
        except ValueError:
            step = recipe.train.steps
    else:
        ckpt, skipped = newest_intact_checkpoint(run / "checkpoints", weights_only=True)
        for exc in skipped:
            print(f"note: skipping damaged {exc}", flush=True)
        if ckpt is None:
            raise SleepzooError(f"{str(run)!r} has no weights to evaluate: no final/model.safetensors and "
                                + (f"none of its {len(skipped)} checkpoint(s) is intact (the newest: {skipped[0]})"
                                   if skipped else "no checkpoint yet"))
        weights, step, how = ckpt.path / "model.safetensors", ckpt.step, "resume the run to write new weights"
        del ckpt
    try:
        if recipe.model.name in MODEL_TYPES:
            # A pretrained architecture: built on the meta device from the run's copy of its config and filled
            # from the run's weights alone, so neither the pretrained folder nor its weights are read.
            task = sleepzoo.build_task(run_recipe(run, recipe))
            model = load_run_model(run, recipe, weights, vocab_size=task.vocab_size)
        else:
            model, task = build(recipe)
            load_weights(model, weights)
            if recipe.stages:  # the weights are the last stage's: run them with its sleep settings
                model.sleep = recipe.stage_recipes()[-1][1].sleep
        check_finite(model.state_dict(), f"weights file {str(weights)!r}")
    except CheckpointDamaged as exc:
        raise CheckpointDamaged(f"{exc}; refusing to use them: {how}") from None
    return recipe, model, task, step


def eval_file_name(loops: int | str, window: int, max_loops: int | None = None,
                   tolerance: float | None = None) -> str:
    """``eval-loops{N}-window{L}.json``; adaptive sleep: ``eval-loopsauto-max{M}-tol{T}-window{L}.json``."""
    if loops == "auto":
        return f"eval-loopsauto-max{max_loops}-tol{tolerance:g}-window{window}.json"
    return f"eval-loops{loops}-window{window}.json"


def _eval_schedule(own: Any, loops: int | str | None, max_loops: int | None,
                   tolerance: float | None) -> tuple[int | str, dict[str, Any]]:
    """The loops an evaluation uses (``loops``, else the recipe's ``own`` sleep section's) and, for ``auto``,
    its bounds: those given, else the recipe's own when it sleeps adaptively too, else the defaults."""
    used, max_loops, tolerance = rules.merge_schedule(own, loops, max_loops, tolerance)
    try:
        passes, tol = rules.check_schedule(used, max_loops, tolerance)
    except rules.RuleError as exc:
        raise SleepzooError(f"--{exc.field.replace('_', '-')}: {exc.value!r} is not allowed; {exc.allowed}") from None
    return used, ({} if tol is None else {"max_loops": passes, "tolerance": tol})


def evaluate_run(run_dir: str | Path, *, num_examples: int | None = None, loops: int | str | None = None,
                 window: int | None = None, max_loops: int | None = None,
                 tolerance: float | None = None) -> tuple[dict, Path | None]:
    """Evaluate a run's newest weights; return the metrics and the JSON file they were written to (None when
    another process is training the run: the result is not saved then).

    With the recipe's own loops and window that file is ``eval.json``; other settings (e.g. more sleep
    passes than were trained with, or ``loops="auto"`` with ``max_loops`` / ``tolerance``) go to
    :func:`eval_file_name`'s file, so the training result is kept.
    """
    for name, value in (("--num-examples", num_examples), ("--window", window)):
        if value is not None and value < 1:
            raise SleepzooError(f"{name}: {value} is not allowed; it must be >= 1")
    recipe, model, task, step = load_run(run_dir)
    lock: RunLock | None = RunLock(run_dir)  # the result goes into the run directory
    try:
        lock.acquire()
    except RunBusy as busy:
        lock = None
        print(f"note: {run_dir} is being trained by pid {busy.holder.get('pid')} on {busy.holder.get('host')}: "
              f"its evaluation is shown, not saved (the trainer writes the run directory)", flush=True)
    try:
        device = _device(recipe.train.device)
        model.to(device)
        own_sleep = recipe.stage_recipes()[-1][1].sleep  # the last stage's (the recipe's own without stages)
        loops_used, bounds = _eval_schedule(own_sleep, loops, max_loops, tolerance)
        window_used = window or own_sleep.window
        metrics = evaluate(model, task, recipe, device=device, num_examples=num_examples, loops=loops_used,
                           window=window_used, **bounds)
        result = {"step": step, "loops": loops_used, **bounds, "window": window_used,
                  "num_examples": num_examples or recipe.eval.num_examples, **metrics}
        if lock is None:
            return result, None
        own = (loops_used, bounds, window_used) == (*_eval_schedule(own_sleep, None, None, None), own_sleep.window)
        path = Path(run_dir) / ("eval.json" if own else eval_file_name(loops_used, window_used, **bounds))
        if own and path.is_file():  # keep the training time the trainer recorded (a damaged file has none)
            previous, _ = read_row(path)
            if previous is None:
                print(f"note: {path} was damaged; written again (without the training time it held)", flush=True)
            elif "train_time_s" in previous:
                result["train_time_s"] = previous["train_time_s"]
        atomic_write_json(path, result)
        return result, path
    finally:
        if lock is not None:
            lock.release()
