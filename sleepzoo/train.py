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

Mixed precision (``train.autocast``): see :class:`Precision`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import fnmatch
import functools
import gc
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

import sleepzoo

from . import distributed, registry
from .build import check_fit
from .checkpoint import (Checkpoint, CheckpointDamaged, CheckpointError, atomic_write_json, atomic_write_text,
                         capture_rng, check_finite, latest_checkpoint, load_checkpoint, load_weights,
                         newest_intact_checkpoint, read_metadata, restore_rng, save_checkpoint, save_weights)
from .config import Recipe, RecipeError, TrainConfig, load_recipe
from .engine import IGNORE_INDEX
from .convert import keep_model_files, load_run_model, run_recipe
from .pretrained import MODEL_TYPES
from .registry import SleepzooError
from .report import HEADLINE, format_value, read_row
from .runlock import RunBusy, RunLock

MUON_MOMENTUM = 0.95  # Keller Jordan's default, also torch's
# torch.optim.Muon scales each matrix's step by this rule. "original" (Keller Jordan's, sqrt(max(1, A/B)))
# is the one the paper's Muon learning rates (2e-3 synthetic, 1e-3 pretrained) were tuned under; the
# alternative "match_rms_adamw" (0.2 sqrt(max(A, B))) would expect AdamW-sized learning rates instead.
MUON_ADJUST_LR = "original"


class Task(Protocol):
    """What the trainer needs from a task plugin (see sleepzoo.tasks)."""

    def generate(self, num_examples: int, seed: int, split: str = "train") -> dict[str, torch.Tensor]: ...

    def evaluate(self, model: nn.Module, *, num_examples: int, batch_size: int, seed: int,
                 window: int | None = None, loops: int | None = None,
                 device: torch.device | str = "cpu") -> dict[str, Any]: ...


# ---------------------------------------------------------------------------------------------------------
# data order, optimizers, schedule


def batch_seed(seed: int, step: int) -> int:
    """The data seed of training step ``step`` (0-based): a stable hash of (seed, step), 63 bits.

    A hash rather than ``seed + step`` so that runs with neighbouring seeds do not share shifted batches.
    """
    digest = hashlib.blake2b(f"sleepzoo-train:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that maps features to vocabulary logits, or None when the head is the tied embedding.

    Asks the model first (``get_output_embeddings()``, the Hugging Face convention); otherwise the last
    ``nn.Linear`` whose output size is an embedding's vocabulary size.
    """
    ask = getattr(model, "get_output_embeddings", None)
    if callable(ask):
        head = ask()
        if isinstance(head, nn.Module):
            return head
    vocab_sizes = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features in vocab_sizes]
    return heads[-1] if heads else None


def no_weight_decay(p: nn.Parameter) -> bool:
    """True for a parameter that AdamW must not decay: every parameter with fewer than 2 dimensions (norm
    weights, biases, ``A_log``, ``dt_bias``, ``D``, gates) and every parameter flagged ``_no_weight_decay``.

    Weight decay pulls a weight towards 0, a prior for matrices (embeddings, head, projections) but not for
    a log decay rate, a bias or a norm's gain, for which 0 is no neutral value (A_log = 0 means A = 1; a zero
    norm gain switches a block off). Conv kernels (3-D) are weights and are decayed, as
    in common practice (decay exactly the parameters with ndim >= 2). The flag is a plain attribute, so it
    survives ``model.to()`` but not a rebuild from the meta device; the flagged parameters sleepzoo has are
    1-D, which the first rule covers either way."""
    return p.ndim < 2 or bool(getattr(p, "_no_weight_decay", False))


def split_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split trainable parameters into ``{"muon": [...], "adamw": [...]}`` as ``(name, parameter)`` pairs.

    Muon gets every 2-D weight of the hidden layers; AdamW gets embeddings and the output head (found by
    module type, so a tied head is the embedding), every parameter that is not 2-D (norms, biases, conv
    kernels, ``A_log``, ``dt_bias``), every 2-D weight with a single row or column (a vector such as Ouro's
    early-exit gate ``Linear(d, 1)``: orthogonalising a 1 x d update only normalises it, and Muon's rule is
    meant for matrices) and every parameter flagged ``_no_weight_decay`` (Muon would decay it). A parameter
    shared by several modules is listed once. :func:`build_optimizers` splits AdamW's share again, into
    the parameters it decays and those it does not (:func:`no_weight_decay`).
    """
    io_params: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            io_params.update(id(p) for p in module.parameters())
    head = output_head(model)
    if head is not None:
        io_params.update(id(p) for p in head.parameters())
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "adamw": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            matrix = p.ndim == 2 and min(p.shape) > 1 and not getattr(p, "_no_weight_decay", False)
            groups["muon" if matrix and id(p) not in io_params else "adamw"].append((name, p))
    return groups


def _layer_mixers(model: nn.Module, layer_names: list[str] | None) -> list[tuple[str, nn.Module]]:
    """``(registered mixer name, mixer)`` for every block: ``block.self_attn`` of ``model.model.layers``
    (or ``model.layers``). Names come from the recipe's ``model.layers`` when it has one per block, else
    from the registry: the names whose class is exactly the mixer's."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if blocks is None:
        blocks = getattr(model, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        return []
    mixers = [getattr(block, "self_attn", None) for block in blocks]
    if layer_names is not None and len(layer_names) == len(mixers):
        return [(name, m) for name, m in zip(layer_names, mixers) if isinstance(m, nn.Module)]
    # blocks that models insert beside their own (Ouro's sleep layers) are named from the registry too
    extra = getattr(getattr(model, "model", None), "sleep_layers", None)
    if isinstance(extra, nn.ModuleList):
        mixers += [getattr(block, "self_attn", None) for block in extra]
    out = []
    for m in mixers:
        if not isinstance(m, nn.Module):
            continue
        for name in registry.names("mixer"):
            try:
                if registry.get("mixer", name) is type(m):
                    out.append((name, m))
            except SleepzooError:  # a plugin that fails to load names none of this model's mixers
                continue
    return out


def select_parameters(model: nn.Module, patterns: list[str] | None,
                      layer_names: list[str] | None = None) -> list[tuple[str, nn.Parameter]]:
    """The parameters that ``train.trainable`` patterns select, as ``(name, parameter)``, each listed once.

    A pattern is an fnmatch glob over parameter names (``model.layers.1.*``; a tied weight answers to
    every name it has), or ``mixer:NAME``: every parameter of every block's mixer registered as NAME
    (``layer_names`` gives each block's mixer name, normally ``recipe.model.layers``). ``None`` selects the
    parameters the model itself leaves trainable. A pattern that selects nothing is an error.
    """
    if patterns is None:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    named = list(model.named_parameters(remove_duplicate=False))
    first_name = {}
    for name, p in named:
        first_name.setdefault(id(p), name)
    chosen: dict[int, nn.Parameter] = {}
    for pattern in patterns:
        if pattern.startswith("mixer:"):
            wanted = pattern[len("mixer:"):].strip()
            mixers = _layer_mixers(model, layer_names)
            hits = [p for name, m in mixers if name == wanted for p in m.parameters()]
            if not hits:
                present = list(dict.fromkeys(name for name, _ in mixers))
                close = difflib.get_close_matches(wanted, present, n=1, cutoff=0.6)
                hint = f" (did you mean 'mixer:{close[0]}'?)" if close else ""
                where = (f"its layers' mixers are {', '.join(present)}" if present else
                         f"{type(model).__name__} has no mixer layers (block.self_attn of model.model.layers)")
                raise SleepzooError(f"train.trainable: {pattern!r} matches no parameter{hint}: {where}")
        else:
            hits = [p for name, p in named if fnmatch.fnmatchcase(name, pattern)]
            if not hits:
                names = list(dict.fromkeys(n for n, _ in named))
                shown = names if len(names) <= 6 else [names[round(i * (len(names) - 1) / 5)] for i in range(6)]
                raise SleepzooError(
                    f"train.trainable: {pattern!r} matches no parameter of {type(model).__name__} "
                    f"({len(names)} parameters, e.g. {', '.join(shown)}); give fnmatch globs over these "
                    f"names (model.layers.1.*) or mixer:NAME (mixer:gated_deltanet)")
        for p in hits:
            chosen.setdefault(id(p), p)
    return [(first_name[pid], p) for pid, p in {id(p): p for _, p in named}.items() if pid in chosen]


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """``[Muon, AdamW]`` for ``optimizer: muon`` (Muon left out if no hidden 2-D weight exists), or ``[AdamW]``.

    Muon decays its weights by ``train.weight_decay``. AdamW has up to two parameter groups, in this order:
    the parameters it decays by ``train.weight_decay`` (embeddings, head, conv kernels: ndim >= 2) and those
    it does not decay (weight_decay 0: :func:`no_weight_decay`); an empty group is left out. Both groups
    share the learning rate, betas and schedule.
    """
    groups = split_parameters(model)
    adamw_params = [p for _, p in groups["adamw"]]
    muon_params = [p for _, p in groups["muon"]]
    if cfg.optimizer == "adamw":
        adamw_params, muon_params = muon_params + adamw_params, []
    optimizers: list[torch.optim.Optimizer] = []
    if muon_params:
        optimizers.append(torch.optim.Muon(muon_params, lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                                           momentum=MUON_MOMENTUM, adjust_lr_fn=MUON_ADJUST_LR))
    if adamw_params:
        decayed = [p for p in adamw_params if not no_weight_decay(p)]
        plain = [p for p in adamw_params if no_weight_decay(p)]
        param_groups = [{"params": decayed, "weight_decay": cfg.weight_decay}] if decayed else []
        param_groups += [{"params": plain, "weight_decay": 0.0}] if plain else []
        optimizers.append(torch.optim.AdamW(param_groups, lr=cfg.adamw_lr, betas=tuple(cfg.betas),
                                            weight_decay=cfg.weight_decay))
    if not optimizers:
        raise SleepzooError(f"{type(model).__name__} has no trainable parameters")
    return optimizers


@dataclass
class WarmupStableDecay:
    """Learning-rate multiplier for update ``i`` (0-based): linear warmup, constant, linear decay to 0.

    Warmup: ``(i + 1) / warmup_steps`` for the first ``warmup_steps`` updates (the first update is not
    wasted at lr 0). Decay: over the last ``d = round(decay_fraction * steps)`` updates the multiplier is
    ``(steps - i) / d``, so it reaches 0 right after the last update. Where both apply, the smaller wins.
    A plain dataclass so LambdaLR's state dict (and so a checkpoint) records its fields.
    """

    steps: int
    warmup_steps: int = 0
    decay_fraction: float = 0.0

    def __call__(self, i: int) -> float:
        scale = 1.0
        if self.warmup_steps > 0 and i < self.warmup_steps:
            scale = (i + 1) / self.warmup_steps
        decay_steps = round(self.decay_fraction * self.steps)
        if decay_steps > 0 and i >= self.steps - decay_steps:
            scale = min(scale, max(0.0, (self.steps - i) / decay_steps))
        return scale


def build_schedulers(optimizers: list[torch.optim.Optimizer],
                     cfg: TrainConfig) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One LambdaLR per optimizer, all on the same warmup-stable-decay multiplier."""
    schedule = WarmupStableDecay(cfg.steps, cfg.warmup_steps, cfg.decay_fraction)
    return [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in optimizers]


# ---------------------------------------------------------------------------------------------------------
# building, evaluating


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
             num_examples: int | None = None, loops: int | None = None, window: int | None = None) -> dict:
    """``task.evaluate`` on the recipe's eval settings, in eval mode, without gradients.

    All RNG states are restored afterwards, so evaluating (or not) never changes what training does next.
    """
    was_training = model.training
    rng = capture_rng()
    model.eval()
    try:
        with torch.no_grad():
            metrics = task.evaluate(
                model, num_examples=num_examples or recipe.eval.num_examples, batch_size=recipe.eval.batch_size,
                seed=recipe.eval.seed, window=window, loops=loops, device=device)
    finally:
        restore_rng(rng)
        model.train(was_training)
    return jsonable(metrics)


# ---------------------------------------------------------------------------------------------------------
# run directory


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


class _Reporter:
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


def _short(metrics: dict) -> str:
    return "  ".join(f"{k} {format_value(metrics[k])}" for k in HEADLINE if k in metrics)


def _prepare_run_dir(out: Path, recipe: Recipe, resume: bool) -> None:
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


# ---------------------------------------------------------------------------------------------------------
# training


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


def _resume_checkpoint(out: Path, main: bool) -> Checkpoint:
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


def _finished_result(path: Path, step: int, main: bool) -> dict | None:
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


def _resume_point(ckpt: Checkpoint, stages: list[_Stage]) -> int:
    """The index of the stage a checkpoint was saved in (0 for a run without stages)."""
    trainer = ckpt.meta["trainer"]
    index = trainer.get("stage_index", 0)
    if not isinstance(index, int) or not 0 <= index < len(stages) or trainer.get("stage") != stages[index].name:
        raise SleepzooError(f"cannot resume from {str(ckpt.path)!r}: it was saved in stage {trainer.get('stage')!r} "
                            f"(index {index}), which the recipe's stages "
                            f"({', '.join(str(s.name) for s in stages)}) do not have there")
    return index


AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.autocast


class Precision:
    """``train.autocast``: the dtype the training forward runs in, and the GradScaler float16 needs.

    ``none``: everything float32, as without this setting. ``bf16`` / ``fp16``: the training forward runs
    under ``torch.autocast(device_type, dtype)``, so matmuls, linear and convolution layers and attention run
    in bfloat16 / float16 while autocast keeps norms, softmax and reductions in float32; the engine computes
    the loss on float32 logits (the loss is float32) and the fast-weight recurrence in float32. Parameters,
    gradients and optimizer states stay float32 (autocast casts copies, not the weights), the backward pass
    and the optimizer step run outside autocast, and evaluation runs in float32. ``bf16`` runs on a CPU and
    on CUDA devices that support bfloat16; ``fp16`` runs on CUDA only, with a ``torch.amp.GradScaler``
    (loss scaled before backward, gradients unscaled before clipping, steps with inf/NaN gradients skipped),
    whose state the checkpoints keep.
    """

    def __init__(self, mode: str, device: torch.device, source: str = "<recipe>"):
        if mode not in AUTOCAST_DTYPES:
            raise RecipeError(f"{source}: train.autocast: {mode!r} is not allowed; allowed: "
                              f"{', '.join(AUTOCAST_DTYPES)}")
        if mode == "fp16" and device.type != "cuda":
            raise RecipeError(f"{source}: train.autocast: 'fp16' needs a CUDA device (train.device is "
                              f"{str(device)!r}): float16 training needs a GradScaler, which sleepzoo runs on "
                              f"CUDA only; use train.autocast=bf16 on a CPU")
        if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RecipeError(f"{source}: train.autocast: 'bf16' is not supported by "
                              f"{torch.cuda.get_device_name(device)}; use train.autocast=fp16 or none")
        self.mode, self.device = mode, device
        self.dtype = AUTOCAST_DTYPES[mode]
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Bring scaled gradients back to their true size (before clipping)."""
        if self.scaler is not None:
            for opt in optimizers:
                self.scaler.unscale_(opt)

    def step(self, optimizers: list[torch.optim.Optimizer]) -> None:
        if self.scaler is None:
            for opt in optimizers:
                opt.step()
            return
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()

    def state_dict(self) -> dict:
        return {} if self.scaler is None else {"grad_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved = state.pop("grad_scaler", None)
        if self.scaler is not None and saved is not None:
            self.scaler.load_state_dict(saved)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """FSDP's units of sharding: the model's ``shard_units()`` (every distinct block once, registered under the
    model: for Ouro the loop body, not its shared step), else ``model.layers`` or ``model.model.layers``."""
    if hasattr(model, "shard_units"):
        return list(model.shard_units())
    for owner in (model, getattr(model, "model", None)):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    return []


def _shard(model: nn.Module, device: torch.device, source: str) -> nn.Module:
    """FSDP2: shard every block, then the rest (embedding, norms, head) as the root; in place."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise SleepzooError(f"{source}: train.parallel: 'fsdp' needs torch.distributed.fsdp.fully_shard "
                            f"(torch >= 2.6), which this torch ({torch.__version__}) lacks; use "
                            f"train.parallel=ddp") from None
    try:
        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
    except Exception as exc:
        raise SleepzooError(f"{source}: train.parallel: 'fsdp' could not shard {type(model).__name__} on "
                            f"{device.type} ({type(exc).__name__}: {exc}); use train.parallel=ddp") from exc
    return model


def _replicate(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the parameters the current stage trains (built per stage: DDP fixes its set at construction).

    ``find_unused_parameters``: a trained parameter need not take part in every forward (an early-exit
    gate, a block a loop range skips); DDP then still finishes the step instead of waiting for it.
    """
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def _first_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


class _PlainTwin:
    """A one-process copy of an FSDP-sharded model with its optimizers, to save and load checkpoints in
    the plain format (full tensors, no sharding): a K-process FSDP run resumes on one process with DDP or
    none, and the other way round. Holds a full copy of the weights (and, while saving or loading, of the
    optimizer states) in CPU memory."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).to("cpu")  # taken before sharding

    def follow(self, stage_params: set[str], cfg: TrainConfig) -> list[torch.optim.Optimizer]:
        """Freeze what the stage freezes and build the stage's optimizers over the copy (same order)."""
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in stage_params)
        self.optimizers = build_optimizers(self.model, cfg)
        names = _first_names(self.model)
        # per optimizer, its parameters' names in the order of its state dict's indices (groups concatenated)
        self.order = [[names[id(p)] for group in opt.param_groups for p in group["params"]]
                      for opt in self.optimizers]
        return self.optimizers

    def gather(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        """Collective: the sharded model's full weights and optimizer states into the copy."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=full)
        states = [get_optimizer_state_dict(model, opt, options=full) for opt in optimizers]
        if not distributed.is_main():
            return
        self.model.load_state_dict(weights, strict=False)  # a tied weight may be listed under one name
        for twin, state in zip(self.optimizers, states):
            names = [n for group in state["param_groups"] for n in group["params"]]
            index = {n: i for i, n in enumerate(names)}
            twin.load_state_dict({
                "state": {index[n]: v for n, v in state["state"].items()},
                "param_groups": [{**group, "params": [index[n] for n in group["params"]]}
                                 for group in state["param_groups"]]})

    def scatter(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        """The copy's weights and optimizer states (every rank loaded them) into the sharded model."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, self.model.state_dict(), options=full)
        for twin, opt, names in zip(self.optimizers, optimizers, self.order):
            state = twin.state_dict()  # indices count this optimizer's parameters only
            set_optimizer_state_dict(model, opt, {
                "state": {names[i]: v for i, v in state["state"].items()},
                "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                 for group in state["param_groups"]]}, options=full)


def _micro_batches(rows: int, size: int | None) -> list[tuple[int, int]]:
    """[start, end) row ranges of at most ``size`` rows covering ``rows`` (one range when size is None)."""
    size = rows if size is None or size >= rows else size
    return [(s, min(s + size, rows)) for s in range(0, max(rows, 1), size)]


def _accumulate(runner: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, micro: int | None,
                total_targets: float, world: int, precision: "Precision", params: list[nn.Parameter],
                max_rows: int | None = None) -> torch.Tensor:
    """Forward and backward of this rank's rows in micro-batches of ``micro`` rows (``train.micro_batch_size``),
    gradients accumulating. Each micro-batch's mean loss is weighted by its share of the step's targets over all
    ranks (times ``world``, which DDP/FSDP divide out), so the summed gradient is that of one batch. Only the
    last backward synchronises gradients under DDP and FSDP. Returns the rank's weighted loss (detached): the
    step's mean loss on one process.

    Under several processes every rank runs the same number of forwards and backwards (the collectives of DDP
    and FSDP pair up call by call): as many micro-batches as the largest slice (``max_rows`` rows) needs, and a
    micro-batch without targets (or a rank's extra one) runs as a forward and backward with weight 0."""
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
        total += loss.detach()
    return total


def _grad_norm(norm: torch.Tensor) -> float:
    full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP
    return float((full() if callable(full) else norm).item())


def train(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train ``recipe`` into ``out_dir``; return the final evaluation (also written to ``eval.json``).

    ``resume=True`` continues the run in ``out_dir`` from its newest checkpoint, exactly as if it had not
    stopped; the recipe must be the run's own. A finished run is not trained again. Under torchrun this
    joins the process group (and leaves it at the end); every rank returns the same evaluation.
    """
    cfg = recipe.train
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
    cfg = recipe.train  # run-wide settings; with stages, steps is their total
    staged = bool(recipe.stages)
    device = distributed.device_for(_device(cfg.device))
    precision = Precision(cfg.autocast, device, recipe.source)
    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    fsdp = distributed.active() and cfg.parallel == "fsdp"
    model, task = build(recipe)
    twin = _PlainTwin(model) if fsdp else None
    model.to(device)
    if fsdp:
        _shard(model, device, recipe.source)
    stages = _plan(recipe, model, task)  # every stage checked before anything is written
    distributed.on_main(lambda: _prepare_run_dir(out, recipe, resume))
    log = MetricsLog(out / "metrics.jsonl")
    ckpt_root = out / "checkpoints"
    everything = list({id(p): p for p in model.parameters()}.values())

    state: dict[str, Any] = {"tokens": 0, "elapsed_s": 0.0, "loss_sum": 0.0, "loss_count": 0}
    first, ckpt = 0, None
    if resume:
        ckpt = _resume_checkpoint(out, main)
        first = _resume_point(ckpt, stages)

    def evaluate_here(stage_recipe: Recipe) -> dict:
        if fsdp:  # the sharded forward needs every rank; they all compute the same metrics
            return evaluate(model, task, stage_recipe, device=device)
        return distributed.on_main(lambda: evaluate(model, task, stage_recipe, device=device))

    reporter: _Reporter | None = None
    t_start = time.perf_counter()
    elapsed_before = 0.0
    model.train()
    runner: nn.Module = model
    try:
        for stage in stages[first:]:
            scfg = stage.recipe.train
            params = _enter_stage(model, stage, everything)
            optimizers = build_optimizers(model, scfg)
            schedulers = build_schedulers(optimizers, scfg)
            if twin is not None:
                names = _first_names(model)
                twin.follow({names[id(p)] for p in params}, scfg)
            start = stage.offset  # global step this stage starts (or resumes) at
            if ckpt is not None:
                if twin is None:
                    state = load_checkpoint(ckpt, model=model, optimizers=optimizers, schedulers=schedulers)
                else:
                    state = load_checkpoint(ckpt, model=twin.model, optimizers=twin.optimizers,
                                            schedulers=schedulers)
                    twin.scatter(model, optimizers)
                start = state.pop("step")
                for key in ("stage", "stage_index", "stage_step"):
                    state.pop(key, None)
                precision.load_state_dict(state)
                ckpt = None
                result = _finished_result(out / "eval.json", start, main) if start == cfg.steps else None
                if main:  # a finished run evaluated again logs its final evaluation again
                    log.truncate_after(start, final_eval=result is not None or start != cfg.steps)
                if result is not None:
                    return result
            if distributed.active() and not fsdp:
                runner = model  # the previous stage's DDP and its gradient hooks go before the next comes
                gc.collect()
                runner = _replicate(model, device)
            if reporter is None:
                reporter = _Reporter(cfg.steps, start, progress, silent=not main)
                elapsed_before = state["elapsed_s"]
                t_start = time.perf_counter()
            if staged and start < stage.end:
                frozen = len(everything) - len(params)
                reporter.message(f"stage {stage.name}: steps {start + 1}-{stage.end}, eviction "
                                 f"{stage.recipe.sleep.eviction}, loops {stage.recipe.sleep.loops}, training "
                                 f"{sum(p.numel() for p in params):,} parameters"
                                 + (f" ({frozen} tensors frozen)" if frozen else ""))
            tag = {} if stage.name is None else {"stage": stage.name}
            t_interval, tokens_interval = time.perf_counter(), 0
            for step in range(start, stage.end):
                batch = task.generate(scfg.batch_size, seed=batch_seed(cfg.seed, step), split="train")
                lo, hi = distributed.shard_bounds(scfg.batch_size, world, rank)  # this rank's rows
                input_ids = batch["input_ids"][lo:hi].to(device)  # (B / world, T)
                targets = batch["targets"][lo:hi].to(device)  # (B / world, T), -100 where no loss is taken
                num_targets = int((targets != IGNORE_INDEX).sum())
                total_targets = float(distributed.all_reduce_sum([num_targets])[0])
                if total_targets == 0:
                    raise SleepzooError(f"the {recipe.task.name} training batch of step {step + 1} has no targets")
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                max_rows = -(-scfg.batch_size // world)  # the largest slice (shard_bounds: sizes differ by <= 1)
                loss = _accumulate(runner, input_ids, targets, scfg.micro_batch_size, total_targets, world,
                                   precision, params, max_rows)
                precision.unscale(optimizers)
                max_norm = scfg.grad_clip if scfg.grad_clip > 0 else math.inf
                grad_norm = _grad_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))
                lrs = [opt.param_groups[0]["lr"] for opt in optimizers]  # the rates this update uses
                precision.step(optimizers)
                for sched in schedulers:
                    sched.step()

                done = step + 1
                loss_value = loss.item()
                if world > 1:  # the mean over every target of the step, as one process computes it
                    loss_value = float(distributed.all_reduce_sum([loss_value])[0]) / world
                if not math.isfinite(loss_value):
                    raise SleepzooError(f"the training loss is {loss_value} at step {done}; lower train.muon_lr / "
                                        f"train.adamw_lr or train.grad_clip")
                step_tokens = batch["input_ids"].numel()  # the whole global batch
                state["tokens"] += step_tokens
                tokens_interval += step_tokens
                state["loss_sum"] += loss_value
                state["loss_count"] += 1
                now = time.perf_counter()
                tokens_per_s = tokens_interval / max(now - t_interval, 1e-9)
                reporter.step(done, loss_value, tokens_per_s)

                stage_ends = done == stage.end and done != cfg.steps  # a stage other than the last
                if done % cfg.log_every == 0 or done == stage.end:
                    record = {"step": done, **tag, "loss": state["loss_sum"] / state["loss_count"], "lr": lrs[0]}
                    if len(lrs) > 1:
                        record["adamw_lr"] = lrs[1]
                    record.update(grad_norm=grad_norm, tokens=state["tokens"], tokens_per_s=tokens_per_s,
                                  elapsed_s=elapsed_before + now - t_start)
                    if main:
                        log.write(record)
                    reporter.logged(record)
                    state["loss_sum"], state["loss_count"] = 0.0, 0
                    t_interval, tokens_interval = time.perf_counter(), 0

                if (recipe.eval.every and done % recipe.eval.every == 0 and done != cfg.steps) or stage_ends:
                    metrics = evaluate_here(stage.recipe)
                    if main:
                        log.write({"step": done, **tag, "split": "test", **metrics})
                    label = f"eval step {done}" + (f" (end of stage {stage.name})" if stage_ends else "")
                    reporter.message(f"{label}: {_short(metrics)}")
                    t_interval, tokens_interval = time.perf_counter(), 0  # evaluation time is not training speed

                if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == stage.end:
                    state["elapsed_s"] = elapsed_before + time.perf_counter() - t_start
                    position = {} if stage.name is None else {
                        "stage": stage.name, "stage_index": stage.index, "stage_step": done - stage.offset}
                    saved_model, saved_optimizers = model, optimizers
                    if twin is not None:
                        twin.gather(model, optimizers)
                        saved_model, saved_optimizers = twin.model, twin.optimizers
                    distributed.on_main(functools.partial(
                        save_checkpoint, ckpt_root, done, model=saved_model, optimizers=saved_optimizers,
                        schedulers=schedulers, trainer_state={**state, **position, **precision.state_dict()},
                        keep=cfg.keep_checkpoints))
    finally:
        if reporter is not None:
            reporter.close()

    last = stages[-1]
    elapsed = elapsed_before + time.perf_counter() - t_start
    if twin is not None:
        twin.gather(model, optimizers)
    distributed.on_main(lambda: save_weights(model if twin is None else twin.model, out / "final" / "model.safetensors",
                                             metadata={"step": str(cfg.steps)}))
    metrics = evaluate_here(last.recipe)
    tag = {} if last.name is None else {"stage": last.name}
    result = {"step": cfg.steps, "loops": last.recipe.sleep.loops, "window": last.recipe.sleep.window,
              "num_examples": recipe.eval.num_examples, "train_time_s": elapsed, **metrics}

    def write_result() -> dict:
        log.write({"step": cfg.steps, **tag, "split": "test", **metrics})
        atomic_write_json(out / "eval.json", result)
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


def evaluate_run(run_dir: str | Path, *, num_examples: int | None = None, loops: int | None = None,
                 window: int | None = None) -> tuple[dict, Path | None]:
    """Evaluate a run's newest weights; return the metrics and the JSON file they were written to (None when
    another process is training the run: the result is not saved then).

    With the recipe's own loops and window that file is ``eval.json``; other settings (e.g. more sleep
    passes than were trained with) go to ``eval-loops{N}-window{L}.json`` so the training result is kept.
    """
    for name, value in (("--num-examples", num_examples), ("--loops", loops), ("--window", window)):
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
        loops_used = loops or own_sleep.loops
        window_used = window or own_sleep.window
        metrics = evaluate(model, task, recipe, device=device, num_examples=num_examples, loops=loops_used,
                           window=window_used)
        result = {"step": step, "loops": loops_used, "window": window_used,
                  "num_examples": num_examples or recipe.eval.num_examples, **metrics}
        if lock is None:
            return result, None
        own = loops_used == own_sleep.loops and window_used == own_sleep.window
        path = Path(run_dir) / ("eval.json" if own else f"eval-loops{loops_used}-window{window_used}.json")
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
