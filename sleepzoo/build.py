"""Recipe -> objects: the one place that turns a validated recipe into a task and a model."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from . import registry
from .config import Recipe, RecipeError, check_kwargs


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
    return task


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
        if not isinstance(options, dict):
            raise RecipeError(f"{where}: model.mixers.{name}: expected a mapping of settings, got {options!r}")
        check_kwargs(registry.get("mixer", name), options, f"{where}: model.mixers.{name}",
                     skip=("d_model", "layer_idx"))


def build_model(recipe: Recipe, *, vocab_size: int | None = None) -> Any:
    """The model named in ``recipe.model``; its vocabulary defaults to the task's."""
    if vocab_size is None:
        vocab_size = recipe.model.vocab_size or build_task(recipe).vocab_size
    elif recipe.model.vocab_size not in (None, vocab_size):
        raise RecipeError(f"{recipe.source}: model.vocab_size={recipe.model.vocab_size} but {vocab_size} was asked for")
    registry.get("eviction", recipe.sleep.eviction)  # fail now, not after the first window
    builder = registry.get("model", recipe.model.name)
    try:
        model = builder(recipe.model, vocab_size=vocab_size, sleep=recipe.sleep)
    except RecipeError as exc:  # builders check their options without knowing the file: name it here
        if str(exc).startswith(recipe.source):
            raise
        raise RecipeError(f"{recipe.source}: {exc}") from None
    if recipe.sleep.gate or any(stage.sleep.get("gate") for stage in recipe.stages):
        model.add_sleep_gate()
    model.recipe = recipe
    return model
