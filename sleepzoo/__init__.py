"""sleepzoo: sleep-enabled hybrid language models.

    import sleepzoo
    recipe = sleepzoo.load_recipe("recipes/rule110-tiny.yaml", overrides=["sleep.loops=2"])
    task, model = sleepzoo.build_task(recipe), sleepzoo.build_model(recipe)
    batch = task.generate(8, seed=0)
    out = model(batch["input_ids"], batch["targets"])      # out.loss, out.logits
"""

from .build import build_model, build_task
from .config import Recipe, RecipeError, load_recipe
from .registry import SleepzooError

__version__ = "0.1.0"
__all__ = ["Recipe", "RecipeError", "SleepzooError", "build_model", "build_task", "load_recipe"]
