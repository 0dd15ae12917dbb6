"""Recipe -> objects: the one place that turns a validated recipe into a task and a model."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from . import registry
from .config import (ModelConfig, Recipe, RecipeError, SleepConfig, check_kwargs, check_mixer_options,
                     check_model_options, takes_section)
from .registry import SleepzooError
from .tasks.base import check_memory


def task_options(recipe: Recipe, cls: Any) -> dict[str, Any]:
    """The task's options, with a pretrained model's tokenizer wired in.

    When ``model.pretrained`` names a folder and the task takes a ``tokenizer`` option (gsm_infinite) that the
    recipe does not set, the folder's ``tokenizer.json`` is used, so lengths are in the model's tokens. A
    folder without one is an error (set ``task.tokenizer``). A folder that is not there yet (validating a
    recipe before the download) leaves the task's default (the builtin tokenizer) standing in: building the
    model then says that the folder is missing.
    """
    options = dict(recipe.task.options)
    folder = recipe.model.pretrained
    if folder is None or "tokenizer" in options or "tokenizer" not in inspect.signature(cls).parameters:
        return options
    path = Path(folder).expanduser()
    if (path / "tokenizer.json").is_file():
        options["tokenizer"] = str(path)
    elif path.is_dir():
        raise RecipeError(f"{recipe.source}: model.pretrained: {folder!r} has no tokenizer.json, which task "
                          f"{recipe.task.name!r} would read its lengths in; copy it there or set task.tokenizer")
    return options


def build_task(recipe: Recipe) -> Any:
    """The task named in ``recipe.task`` with its options checked against the task's constructor (a
    pretrained model's tokenizer wired in: :func:`task_options`)."""
    cls = registry.get("task", recipe.task.name)
    where = f"{recipe.source}: task"
    task = cls(**check_kwargs(cls, task_options(recipe, cls), where))
    check_fit(recipe, task)
    check_sizes(recipe, task)
    return task


def check_sizes(recipe: Recipe, task: Any) -> None:
    """A training batch (of every stage) and the evaluation's test set must fit in memory; checked from the
    task's sizes (:meth:`Task.check_size`) before anything is generated. A task without ``check_size``
    (a plugin not built on sleepzoo's Task) is not checked."""
    check = getattr(task, "check_size", None)
    if not callable(check):
        return
    sizes = {("train.batch_size", staged.train.batch_size) for _, staged in recipe.stage_recipes()}
    sizes.add(("eval.num_examples", recipe.eval.num_examples))
    for name, n in sorted(sizes):
        try:
            check(n)
        except SleepzooError as exc:
            raise RecipeError(f"{recipe.source}: {name}: {exc}") from None


def check_fit(recipe: Recipe, task: Any) -> None:
    """The task's sequences must fit the recipe's window and vocabulary."""
    src, window, vocab = recipe.source, recipe.sleep.window, recipe.model.vocab_size
    if window > task.seq_len:
        raise RecipeError(f"{src}: sleep.window: {window} is larger than the task's sequences ({task.seq_len} "
                          f"tokens), so nothing would ever be evicted; use a window <= {task.seq_len} "
                          f"(= {task.seq_len} is the full-attention baseline)")
    if vocab is not None and vocab < task.vocab_size:
        raise RecipeError(f"{src}: model.vocab_size: {vocab} is smaller than the task's vocabulary "
                          f"({task.vocab_size} tokens); remove model.vocab_size to take the task's")


def check_mixers(recipe: Recipe) -> None:
    """Every mixer named in ``model.layers`` exists, and every ``model.mixers.<name>`` mapping names a
    registered mixer and only arguments of its constructor (``d_model`` and ``layer_idx`` come from the
    model). Settings of a registered mixer that the layers do not use are allowed, so switching
    ``model.layers`` by an override needs no other edit."""
    where = recipe.source
    for name in dict.fromkeys(recipe.model.layers):
        registry.get("mixer", name)
    for name, options in recipe.model.mixers.items():
        check_mixer_options(registry.get("mixer", name), options, f"{where}: model.mixers.{name}")


def call_builder(builder: Any, config: ModelConfig, *, vocab_size: int | None, sleep: SleepConfig | None,
                 where: str) -> Any:
    """``builder`` (a registered ``model``) called with the model section's fields its signature takes
    (:func:`sleepzoo.config.check_model_options`: a field it does not take is a RecipeError), or with the
    section whole when it takes it as its one positional argument (:func:`sleepzoo.config.takes_section`)."""
    if takes_section(builder):
        return builder(config, vocab_size=vocab_size, sleep=sleep)
    return builder(**check_model_options(builder, config, where), vocab_size=vocab_size, sleep=sleep)


def _meta_model(recipe: Recipe, builder: Any, vocab_size: int) -> Any:
    """The recipe's model built on the meta device (no memory; the random state left as it was), or None
    when it can not be built there. Only its size is used: any failure of the probe, a SleepzooError too,
    leaves the verdict to the real build, which reports its own failures (a probe's check can differ from the
    real load's, e.g. whether a pretrained folder's sleep gate is built, and must never refuse a valid run)."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            return call_builder(builder, recipe.model, vocab_size=vocab_size, sleep=recipe.sleep, where=recipe.source)
    except Exception:  # noqa: BLE001
        return None


def check_model_size(recipe: Recipe, model: Any) -> None:
    """The weights of ``model`` (a meta-device one: counted, not allocated) must fit in memory."""
    params = {id(p): p for p in model.parameters()}.values()  # a tied weight counts once
    count = sum(p.numel() for p in params)
    try:
        check_memory(sum(p.numel() * p.element_size() for p in params),
                     f"model: the {count:,} parameters of this {recipe.model.name} model", "make the model smaller")
    except SleepzooError as exc:
        raise RecipeError(str(exc)) from None  # build_model names the recipe


def build_model(recipe: Recipe, *, vocab_size: int | None = None) -> Any:
    """The model named in ``recipe.model``; its vocabulary defaults to the task's."""
    if vocab_size is None:
        vocab_size = recipe.model.vocab_size or build_task(recipe).vocab_size
    elif recipe.model.vocab_size not in (None, vocab_size):
        raise RecipeError(f"{recipe.source}: model.vocab_size={recipe.model.vocab_size} but {vocab_size} was asked for")
    registry.get("eviction", recipe.sleep.eviction)  # fail now, not after the first window
    builder = registry.get("model", recipe.model.name)
    on_meta = torch.get_default_device().type == "meta"
    try:
        if not takes_section(builder):  # a field the model does not take fails before anything is built
            check_model_options(builder, recipe.model, recipe.source)
        probe = None if on_meta else _meta_model(recipe, builder, vocab_size)
        if probe is not None:  # weights that can not fit are refused before they are allocated
            check_model_size(recipe, probe)
        model = call_builder(builder, recipe.model, vocab_size=vocab_size, sleep=recipe.sleep, where=recipe.source)
        if isinstance(getattr(model, "config", None), ModelConfig):  # the recipe's section as given (vocab_size
            model.config = recipe.model  # included): what a saved memory's fingerprint was taken of
        if on_meta:
            check_model_size(recipe, model)
    except RecipeError as exc:  # builders check their options without knowing the file: name it here
        if str(exc).startswith(recipe.source):
            raise
        raise RecipeError(f"{recipe.source}: {exc}") from None
    if recipe.sleep.gate or any(stage.sleep.get("gate") for stage in recipe.stages):
        model.add_sleep_gate()
    model.recipe = recipe
    return model
