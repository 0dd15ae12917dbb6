"""sleepzoo: sleep-enabled hybrid language models.

    import sleepzoo
    recipe = sleepzoo.load_recipe("recipes/rule110-tiny.yaml", overrides=["sleep.loops=2"])
    task, model = sleepzoo.build_task(recipe), sleepzoo.build_model(recipe)
    batch = task.generate(8, seed=0)
    out = model(batch["input_ids"], batch["targets"])      # out.loss, out.logits

    model = sleepzoo.from_pretrained("~/models/Ouro-1.4B", wake_passes=1, loops=4, window=2000)
    with torch.device("meta"):
        model = sleepzoo.from_config("config.json")     # shapes and parameter counts, no memory

(``from_pretrained`` and ``from_config`` are imported on first use, so ``import sleepzoo`` stays cheap; see
docs/pretrained.md.)
"""

from .build import build_model, build_task
from .config import Recipe, RecipeError, load_recipe
from .registry import SleepzooError

__version__ = "0.1.0"
__all__ = ["Recipe", "RecipeError", "SleepzooError", "build_model", "build_task", "from_config", "from_pretrained",
           "load_recipe"]
_LAZY = {"from_pretrained": "sleepzoo.pretrained", "from_config": "sleepzoo.pretrained"}


def __getattr__(name: str):  # PEP 562: torch and safetensors load only when a pretrained model is asked for
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sleepzoo' has no attribute {name!r}")
