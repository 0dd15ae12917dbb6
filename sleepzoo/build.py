"""Recipe -> objects: the one place that turns a validated recipe into a task and a model."""

from __future__ import annotations

from typing import Any

from . import registry
from .config import Recipe, RecipeError, check_kwargs


def build_task(recipe: Recipe) -> Any:
    """The task named in ``recipe.task`` with its options checked against the task's constructor."""
    cls = registry.get("task", recipe.task.name)
    where = f"{recipe.source}: task"
    return cls(**check_kwargs(cls, recipe.task.options, where))


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
    model.recipe = recipe
    return model
