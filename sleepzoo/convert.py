"""Runs <-> Hugging Face folders: a training run's model without its pretrained folder, and ``convert``.

    convert("runs/jet-N4", "out/jet-N4")            # a run's newest weights as a folder from_pretrained loads
    convert("~/models/Ouro-1.4B", "out/ouro-bf16", dtype="bfloat16")   # a folder re-saved

A run keeps copies of the files its model and task read besides the weights (:func:`keep_model_files`:
``pretrained/`` holds config.json, sleepzoo.json and the tokenizer, generation and licence files of
``model.pretrained`` or the ``model.hf_config`` file; ``tokenizer/`` a ``task.tokenizer`` given as a path),
so eval, generate and convert need the run directory alone (:func:`run_recipe`, :func:`load_run_model`).
Folders are read and written by :mod:`sleepzoo.pretrained`.
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .pretrained import (CONFIG_NAME, MODEL_TYPES, SETTINGS_NAME, SIDE_FILES, WEIGHTS_NAME, _load, _resolve_dtype,
                         _write_hf_files, from_pretrained, hf_config_for, parse_size, published_config,
                         replace_folder, sleepzoo_settings)
from .registry import SleepzooError



def _run_weights(run: Path) -> tuple[Path, int | None]:
    """A run's newest weights file (final, else the newest checkpoint) and its step."""
    from .checkpoint import latest_checkpoint, read_metadata

    final = run / "final" / WEIGHTS_NAME
    if final.is_file():
        step = read_metadata(final).get("step")
        return final, int(step) if step is not None else None
    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is None:
        raise SleepzooError(f"{str(run)!r} has no weights yet (no final/model.safetensors and no checkpoint)")
    return ckpt / WEIGHTS_NAME, int(ckpt.name.split("_")[1])


# A run's copy of the files it reads besides the weights, so that eval, generate and convert work from the
# run directory alone: config.json, sleepzoo.json and the tokenizer/generation/licence files of
# model.pretrained (or the model.hf_config file and its sleepzoo.json), and a task.tokenizer given as a path
# (tokenizer/tokenizer.json).
RUN_MODEL_DIR = "pretrained"
RUN_TOKENIZER_DIR = "tokenizer"


def _hf_config_file(recipe: Any) -> Path | None:
    """The config.json file ``model.hf_config`` names, when it names one (not a dict or a shipped config)."""
    hf = recipe.model.hf_config
    if not isinstance(hf, str) or published_config(hf) != hf:
        return None
    path = Path(hf).expanduser()
    return path / CONFIG_NAME if path.is_dir() else path


def _task_tokenizer_file(recipe: Any) -> Path | None:
    spec = recipe.task.options.get("tokenizer")
    if not isinstance(spec, str) or spec == "builtin":
        return None
    path = Path(spec).expanduser()
    return path / "tokenizer.json" if path.is_dir() else path


def keep_model_files(run: str | Path, recipe: Any) -> list[str]:
    """Copy into the run directory what its model and task read besides the weights (see
    :data:`RUN_MODEL_DIR`), once: a copy that exists is the one the run started with and is kept. Sources
    that are not there (a folder not downloaded yet) are skipped. Returns the files copied."""
    run = Path(run)
    copied: list[str] = []
    model_dir = run / RUN_MODEL_DIR
    if not model_dir.exists():
        files: dict[str, Path] = {}
        if recipe.model.pretrained is not None:
            folder = Path(recipe.model.pretrained).expanduser()
            files = {name: folder / name for name in (CONFIG_NAME, SETTINGS_NAME, *SIDE_FILES)
                     if (folder / name).is_file()}
            if CONFIG_NAME not in files:
                files = {}
        elif (config := _hf_config_file(recipe)) is not None and config.is_file():
            files = {CONFIG_NAME: config}
            if config.name == CONFIG_NAME and (config.parent / SETTINGS_NAME).is_file():
                files[SETTINGS_NAME] = config.parent / SETTINGS_NAME
        if files:
            def fill(tmp: Path) -> None:
                for name, path in files.items():
                    shutil.copyfile(path, tmp / name)
            replace_folder(model_dir, fill)
            copied += [f"{RUN_MODEL_DIR}/{name}" for name in files]
    tokenizer = _task_tokenizer_file(recipe)
    if tokenizer is not None and tokenizer.is_file() and not (run / RUN_TOKENIZER_DIR).exists():
        replace_folder(run / RUN_TOKENIZER_DIR, lambda tmp: shutil.copyfile(tokenizer, tmp / "tokenizer.json"))
        copied.append(f"{RUN_TOKENIZER_DIR}/tokenizer.json")
    return copied


def run_recipe(run: str | Path, recipe: Any, *, task: bool = True) -> Any:
    """``recipe`` (a run's own) reading the run's copies (:func:`keep_model_files`) instead of the original
    folder and files, where the run has them. Such a recipe builds the model on the meta device only (the
    copy holds no weights): the weights come from the run. With ``task`` (the recipe will build its task), a
    run without copies whose pretrained folder is gone, and whose task would take its tokenizer from that
    folder, is an error: the builtin tokenizer standing in would give other token ids than the model knows."""
    from . import registry

    run = Path(run)
    model, section = recipe.model, recipe.task
    copy = run / RUN_MODEL_DIR / CONFIG_NAME
    if model.pretrained is not None:
        if copy.is_file():
            model = dataclasses.replace(model, pretrained=str(copy.parent))
        elif task and not Path(model.pretrained).expanduser().is_dir() and "tokenizer" not in section.options \
                and "tokenizer" in inspect.signature(registry.get("task", section.name)).parameters:
            raise SleepzooError(
                f"{str(run)!r}: its model.pretrained folder {model.pretrained!r} is gone and the run holds no copy "
                f"of its config.json and tokenizer.json in {RUN_MODEL_DIR}/ (runs trained before sleepzoo kept "
                f"one); put the folder back or copy those files to {str(run / RUN_MODEL_DIR)!r}")
    elif _hf_config_file(recipe) is not None and copy.is_file():
        model = dataclasses.replace(model, hf_config=str(copy))
    tokenizer = run / RUN_TOKENIZER_DIR / "tokenizer.json"
    if _task_tokenizer_file(recipe) is not None and tokenizer.is_file():
        section = dataclasses.replace(section, options={**section.options, "tokenizer": str(tokenizer)})
    return dataclasses.replace(recipe, model=model, task=section)


def load_run_model(run: str | Path, recipe: Any, weights: str | Path, *, dtype: Any = torch.float32,
                   vocab_size: int | None = None) -> nn.Module:
    """A run's jet_nemotron or ouro model with ``weights`` (its final or a checkpoint's), built on the meta
    device from the run's copy of its config (:func:`run_recipe`) and filled from ``weights`` alone: the
    pretrained folder's weights are never read and the folder need not exist. The model has the last stage's
    sleep settings (the weights are that stage's) and ``recipe`` as its recipe."""
    from . import registry
    from .build import call_builder

    local = run_recipe(run, recipe, task=False)
    sleep = local.stage_recipes()[-1][1].sleep
    builder = registry.get("model", local.model.name)
    gate = local.sleep.gate or any(stage.sleep.get("gate") for stage in local.stages)

    def build() -> nn.Module:
        model = call_builder(builder, local.model, vocab_size=vocab_size, sleep=sleep, where=recipe.source)
        if gate:
            model.add_sleep_gate()
        return model

    weights = Path(weights)
    with safe_open(str(weights), framework="pt") as f:
        names = list(f.keys())
    model = _load(build, {n: weights for n in names}, dtype=_resolve_dtype(dtype, {}), strict=True, device="cpu",
                  source=f"weights {str(weights)!r}")
    model.sleep = sleep
    model.recipe = recipe
    return model


def _load_run(run: Path, dtype: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a run directory with its newest weights, without reading the pretrained folder's weights
    (the architecture comes from the run's copy of its config.json, else the recipe's folder, or the published
    one if that is gone)."""
    import sleepzoo

    from .config import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    if recipe.model.name not in MODEL_TYPES:
        raise SleepzooError(f"{str(run)!r} trained a {recipe.model.name!r} model; convert writes Hugging Face "
                            f"folders of {', '.join(sorted(MODEL_TYPES))} models only")
    file, step = _run_weights(run)
    vocab = None
    if recipe.model.pretrained is None and recipe.model.hf_config is None:
        vocab = sleepzoo.build_task(recipe).vocab_size  # a model built from scratch takes the task's vocabulary
    model = load_run_model(run, recipe, file, dtype=dtype or "float32", vocab_size=vocab)
    info = {"source": "run", "weights": str(file), "step": step, "pretrained": recipe.model.pretrained,
            "tokenizer": recipe.task.options.get("tokenizer"),
            "copies": [str(run / RUN_TOKENIZER_DIR), str(run / RUN_MODEL_DIR)]}
    return model.eval(), info


def convert(src: str | Path, dst: str | Path, *, dtype: Any = None, max_shard_size: int | str | None = None,
            force: bool = False) -> dict[str, Any]:
    """Write ``src`` as a Hugging Face-style folder ``dst`` (config.json + safetensors, sharded above
    ``max_shard_size``) that :func:`from_pretrained` loads back with the same logits.

    ``src`` is a sleepzoo run directory (recipe.yaml + checkpoints, from a jet_nemotron or ouro recipe: its
    newest weights with the last stage's sleep settings, kept in float32 unless ``dtype``) or a Hugging Face
    folder (re-saved, e.g. in another ``dtype``). Tokenizer, generation and licence files
    (:data:`SIDE_FILES`) are copied from the source folder (for a run: from its ``task.tokenizer`` path, else
    its ``model.pretrained`` folder, when there). ``dst`` must not hold files unless ``force``.
    Returns a summary (source kind, files written, parameters, dtype, the sleepzoo.json settings).
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.exists():
        raise SleepzooError(f"convert: {str(src)!r} does not exist")
    if dst.exists() and dst.resolve() == src.resolve():
        raise SleepzooError("convert: DST must differ from SRC (write the new folder elsewhere)")
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not force)):
        raise SleepzooError(f"convert: {str(dst)!r} already exists and is not an empty folder; choose another DST "
                            f"or pass --force to replace the weights and config in it")
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    if (src / "recipe.yaml").is_file():
        model, info = _load_run(src, dtype)
        side_dirs = [Path(p).expanduser() for p in (info["tokenizer"], info["pretrained"], *info.pop("copies"))
                     if isinstance(p, str) and p != "builtin"]
    elif (src / CONFIG_NAME).is_file():
        model = from_pretrained(src, dtype=dtype)
        info = {"source": "folder"}
        side_dirs = [src]
    else:
        raise SleepzooError(f"convert: {str(src)!r} is neither a sleepzoo run directory (recipe.yaml) nor a "
                            f"Hugging Face folder (config.json + safetensors)")
    config = hf_config_for(model)
    copied: list[str] = []

    def fill(tmp: Path) -> list[str]:
        names = _write_hf_files(model, tmp, config, limit)
        for directory in side_dirs:
            directory = directory.parent if directory.is_file() else directory
            if not directory.is_dir():
                continue
            for name in SIDE_FILES:  # a file DST already holds is the user's: it is carried over instead
                if (directory / name).is_file() and not (tmp / name).exists() and not (dst / name).exists():
                    shutil.copyfile(directory / name, tmp / name)
                    copied.append(name)
        return names

    written = [dst / name for name in replace_folder(dst, fill)]
    params = {id(p): p.numel() for p in model.parameters()}
    return {**info, "dst": str(dst), "files": [str(p) for p in written], "copied": copied,
            "parameters": sum(params.values()), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "sleepzoo": sleepzoo_settings(model)}
