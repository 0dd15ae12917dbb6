"""The trainer: one recipe in, one run directory out, resumable exactly.

    from sleepzoo.config import load_recipe
    from sleepzoo.train import train

    metrics = train(load_recipe("recipes/rule110-tiny.yaml", ["sleep.loops=2"]), "runs/rule110-n2")

A run directory holds

    recipe.yaml                    the resolved recipe (``--resume`` refuses a different one)
    metrics.jsonl                  one JSON object a line: train lines every ``log_every`` steps, eval lines
    checkpoints/step_XXXXXXX/      the newest ``keep_checkpoints`` checkpoints (see sleepzoo.checkpoint)
    final/model.safetensors        the weights after the last step
    eval.json                      the final evaluation, with its step, loops and window

Determinism (SPEC 4, "every N sees the same data order"): torch is seeded with ``train.seed`` right before the
model is built, and the batch for step i is ``task.generate(batch_size, seed=batch_seed(train.seed, i))``.
So runs that differ only in ``sleep.loops`` see identical batches, and a resumed run sees exactly the
batches, RNG draws and optimizer states the uninterrupted run would have.
"""

from __future__ import annotations

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

from .checkpoint import (atomic_write_json, atomic_write_text, capture_rng, latest_checkpoint, load_checkpoint,
                         load_weights, read_metadata, restore_rng, save_checkpoint, save_weights)
from .config import Recipe, TrainConfig, load_recipe
from .registry import SleepzooError
from .report import HEADLINE, format_value

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


def split_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split trainable parameters into ``{"muon": [...], "adamw": [...]}`` as ``(name, parameter)`` pairs.

    Muon gets every 2-D weight of the hidden layers; AdamW gets embeddings and the output head (found by
    module type, so a tied head is the embedding), and every parameter that is not 2-D: norms, biases, conv
    kernels, ``A_log``, ``dt_bias``. A parameter shared by several modules is listed once.
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
            groups["muon" if p.ndim == 2 and id(p) not in io_params else "adamw"].append((name, p))
    return groups


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """``[Muon, AdamW]`` for ``optimizer: muon`` (Muon left out if no hidden 2-D weight exists), or ``[AdamW]``."""
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
        optimizers.append(torch.optim.AdamW(adamw_params, lr=cfg.adamw_lr, betas=tuple(cfg.betas),
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
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step``: a resumed run logs those steps again."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


class _Reporter:
    """A rich progress bar on a terminal; otherwise one compact line per logged step."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total = total
        self.progress = None
        if enabled and sys.stdout.isatty():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
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
        if self.progress is None:
            rate = record["tokens_per_s"]
            eta = (self.total - record["step"]) * record["elapsed_s"] / max(record["step"], 1)
            print(f"step {record['step']}/{self.total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                  f"{rate:,.0f} tok/s  elapsed {record['elapsed_s']:.0f}s  eta {eta:.0f}s", flush=True)

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
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


# ---------------------------------------------------------------------------------------------------------
# training


def train(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train ``recipe`` into ``out_dir``; return the final evaluation (also written to ``eval.json``).

    ``resume=True`` continues the run in ``out_dir`` from its newest checkpoint, exactly as if it had not
    stopped; the recipe must be the run's own. A finished run is not trained again.
    """
    out = Path(out_dir)
    cfg = recipe.train
    _prepare_run_dir(out, recipe, resume)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    model, task = build(recipe)
    model.to(device)
    optimizers = build_optimizers(model, cfg)
    schedulers = build_schedulers(optimizers, cfg)
    log = MetricsLog(out / "metrics.jsonl")
    ckpt_root = out / "checkpoints"

    state: dict[str, Any] = {"tokens": 0, "elapsed_s": 0.0, "loss_sum": 0.0, "loss_count": 0}
    start = 0
    if resume:
        ckpt = latest_checkpoint(ckpt_root)
        state = load_checkpoint(ckpt, model=model, optimizers=optimizers, schedulers=schedulers)
        start = state.pop("step")
        log.truncate_after(start)
        finished = out / "eval.json"
        if start == cfg.steps and finished.is_file():
            result = json.loads(finished.read_text())
            if result.get("step") == start:
                return result

    params = [p for p in model.parameters() if p.requires_grad]
    reporter = _Reporter(cfg.steps, start, progress)
    t_start = time.perf_counter()
    elapsed_before = state["elapsed_s"]
    t_interval, tokens_interval = t_start, 0
    model.train()
    try:
        for step in range(start, cfg.steps):
            batch = task.generate(cfg.batch_size, seed=batch_seed(cfg.seed, step), split="train")
            input_ids = batch["input_ids"].to(device)  # (B, T)
            targets = batch["targets"].to(device)  # (B, T), -100 where no loss is taken
            loss = model(input_ids, targets).loss
            if loss is None:
                raise SleepzooError(f"the model returned no loss at step {step + 1}: the {recipe.task.name} "
                                    f"training batch has no targets")
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
            lrs = [opt.param_groups[0]["lr"] for opt in optimizers]  # the rates this update uses
            for opt in optimizers:
                opt.step()
            for sched in schedulers:
                sched.step()

            done = step + 1
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise SleepzooError(f"the training loss is {loss_value} at step {done}; lower train.muon_lr / "
                                    f"train.adamw_lr or train.grad_clip")
            state["tokens"] += input_ids.numel()
            tokens_interval += input_ids.numel()
            state["loss_sum"] += loss_value
            state["loss_count"] += 1
            now = time.perf_counter()
            tokens_per_s = tokens_interval / max(now - t_interval, 1e-9)
            reporter.step(done, loss_value, tokens_per_s)

            if done % cfg.log_every == 0 or done == cfg.steps:
                record = {"step": done, "loss": state["loss_sum"] / state["loss_count"], "lr": lrs[0]}
                if len(lrs) > 1:
                    record["adamw_lr"] = lrs[1]
                record.update(grad_norm=grad_norm, tokens=state["tokens"], tokens_per_s=tokens_per_s,
                              elapsed_s=elapsed_before + now - t_start)
                log.write(record)
                reporter.logged(record)
                state["loss_sum"], state["loss_count"] = 0.0, 0
                t_interval, tokens_interval = time.perf_counter(), 0

            if recipe.eval.every and done % recipe.eval.every == 0 and done != cfg.steps:
                metrics = evaluate(model, task, recipe, device=device)
                log.write({"step": done, "split": "test", **metrics})
                reporter.message(f"eval step {done}: {_short(metrics)}")
                t_interval, tokens_interval = time.perf_counter(), 0  # evaluation time is not training speed

            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
                state["elapsed_s"] = elapsed_before + time.perf_counter() - t_start
                save_checkpoint(ckpt_root, done, model=model, optimizers=optimizers, schedulers=schedulers,
                                trainer_state=state, keep=cfg.keep_checkpoints)
    finally:
        reporter.close()

    elapsed = elapsed_before + time.perf_counter() - t_start
    save_weights(model, out / "final" / "model.safetensors", metadata={"step": str(cfg.steps)})
    metrics = evaluate(model, task, recipe, device=device)
    log.write({"step": cfg.steps, "split": "test", **metrics})
    result = {"step": cfg.steps, "loops": recipe.sleep.loops, "window": recipe.sleep.window,
              "num_examples": recipe.eval.num_examples, "train_time_s": elapsed, **metrics}
    atomic_write_json(out / "eval.json", result)
    return result


# ---------------------------------------------------------------------------------------------------------
# evaluating a finished (or running) run


def load_run(run_dir: str | Path) -> tuple[Recipe, nn.Module, Task, int]:
    """A run's recipe, its model with the newest weights (final, else the newest checkpoint), task and step."""
    run = Path(run_dir)
    saved = run / "recipe.yaml"
    if not saved.is_file():
        raise SleepzooError(f"{str(run)!r} is not a run directory (no recipe.yaml); "
                            f"`sleepzoo train` writes one")
    recipe = load_recipe(saved)
    model, task = build(recipe)
    final = run / "final" / "model.safetensors"
    if final.is_file():
        weights, step = final, int(read_metadata(final).get("step", recipe.train.steps))
    else:
        ckpt = latest_checkpoint(run / "checkpoints")
        if ckpt is None:
            raise SleepzooError(f"{str(run)!r} has no weights yet (no final/model.safetensors and no checkpoint)")
        weights, step = ckpt / "model.safetensors", int(ckpt.name.split("_")[1])
    load_weights(model, weights)
    return recipe, model, task, step


def evaluate_run(run_dir: str | Path, *, num_examples: int | None = None, loops: int | None = None,
                 window: int | None = None) -> tuple[dict, Path]:
    """Evaluate a run's newest weights; return the metrics and the JSON file they were written to.

    With the recipe's own loops and window that file is ``eval.json``; other settings (e.g. more sleep
    passes than were trained with) go to ``eval-loops{N}-window{L}.json`` so the training result is kept.
    """
    for name, value in (("--num-examples", num_examples), ("--loops", loops), ("--window", window)):
        if value is not None and value < 1:
            raise SleepzooError(f"{name}: {value} is not allowed; it must be >= 1")
    recipe, model, task, step = load_run(run_dir)
    device = _device(recipe.train.device)
    model.to(device)
    loops_used = loops or recipe.sleep.loops
    window_used = window or recipe.sleep.window
    metrics = evaluate(model, task, recipe, device=device, num_examples=num_examples, loops=loops_used,
                       window=window_used)
    result = {"step": step, "loops": loops_used, "window": window_used,
              "num_examples": num_examples or recipe.eval.num_examples, **metrics}
    own = loops_used == recipe.sleep.loops and window_used == recipe.sleep.window
    path = Path(run_dir) / ("eval.json" if own else f"eval-loops{loops_used}-window{window_used}.json")
    if own and path.is_file():  # keep the training time the trainer recorded
        previous = json.loads(path.read_text())
        if "train_time_s" in previous:
            result["train_time_s"] = previous["train_time_s"]
    atomic_write_json(path, result)
    return result, path
