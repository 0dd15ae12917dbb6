"""Pretrained models from a user's local folder: ``config.json`` + safetensors weights (SPEC 3, docs/pretrained.md).

    import sleepzoo
    model = sleepzoo.from_pretrained("~/models/Jet-Nemotron-2B")          # as published: one pass, loops 1
    model = sleepzoo.from_pretrained(folder, window=2000, loops=4)         # sleep settings as overrides
    model = sleepzoo.from_pretrained("~/models/Ouro-1.4B", wake_passes=1, sleep_layers=[3, 7, 11, 15, 19, 23])
    with torch.device("meta"):
        model = sleepzoo.from_config("shared/reference/ouro-1.4b.config.json")   # shapes only, no memory
    save_pretrained(model, "out/", max_shard_size="2GB")      # config.json + sleepzoo.json + (sharded) safetensors
    sleepzoo.convert.convert("runs/jet-N4", "out/jet-N4")      # a run's weights as such a folder

The folder holds either ``model.safetensors`` or a sharded ``model.safetensors.index.json`` whose
``weight_map`` names, for every tensor, the shard file holding it. The model class is chosen by the config's
``model_type`` (:data:`MODEL_TYPES`). Weights are read memory-mapped (``safetensors.safe_open``) one tensor at
a time into a model built on the meta device and then materialised, so loading never holds two copies.
Names and shapes are checked from the files' headers before any tensor is read; all problems are reported
together, by name. sleepzoo never ships weights (Jet-Nemotron's are under a non-commercial licence).

**Overrides** (keyword arguments of :func:`from_pretrained` and :func:`from_config`, :func:`allowed_overrides`):
the sleep settings ``window``, ``loops``, ``eviction``, ``sleep_every``, ``checkpoint`` (see
:class:`sleepzoo.config.SleepConfig`; default the published behaviour: a window of ``max_position_embeddings``
tokens, one pass), the sleep stabilisers ``gate``, ``pass_norm``, ``coda``, and each model's own:
Jet-Nemotron ``loop_start`` / ``loop_end`` (the looped blocks, default 7..20 of 28); Ouro ``wake_passes``
(loop steps of the wake pass, default ``total_ut_steps``), ``sleep_layers`` (loop-body layers followed by an
inserted Jet layer) and ``sleep_layer_options`` (their JetBlock sizes). An unknown name is an error that
lists the allowed ones.

**sleepzoo.json.** config.json is Hugging Face's config as published (only ``torch_dtype`` follows the saved
weights). :func:`save_pretrained` writes the settings of the model that differ from the published model's
(sleep settings and stabilisers, loop range, wake_passes, inserted sleep layers), by their override names,
to ``sleepzoo.json`` beside it (no file when there are none); :func:`from_pretrained` and :func:`from_config`
apply them before the caller's overrides, so a saved model comes back as it was. Folders written before
sleepzoo.json existed kept these settings under config.json's ``"sleepzoo"`` key; they load as they always
did. A folder with both: sleepzoo.json wins, the key is ignored. Folders are written atomically
(:func:`replace_folder`). An Ouro with inserted sleep layers can not be loaded by the published Ouro code (it
has no such layers and would drop their weights); its config.json has no ``auto_map``, so transformers
refuses it.

Runs <-> folders (``convert``, a run's model without its pretrained folder) are :mod:`sleepzoo.convert`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import json
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .checkpoint import (CheckpointError, _fsync_dir, _fsync_file, _listing, _save_tensors, _unique_state_dict,
                         check_weight_names, save_weights)
from .config import RecipeError, SleepConfig
from .models.base import read_config_json
from .registry import SleepzooError
from .rules import RuleError, check_count, check_schedule, check_sleep_every, merge_schedule

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
SETTINGS_NAME = "sleepzoo.json"  # sleepzoo's own settings, beside config.json (see the module docstring)
SLEEPZOO_KEY = "sleepzoo"  # where folders written before sleepzoo.json kept them: a key of config.json
# model_type -> "module:class"; the class has ``from_config(config_dict, *, sleep=None)``. A module that is not
# in this installation (e.g. Ouro while it is being written) gives a clear error when asked for, no other.
MODEL_TYPES = {
    "jet_nemotron": "sleepzoo.models.jet_nemotron:JetNemotronLM",
    "ouro": "sleepzoo.models.ouro:OuroLM",
}
def model_class(model_type: Any) -> type:
    """The class registered for ``model_type`` in :data:`MODEL_TYPES`, imported on first use."""
    if model_type not in MODEL_TYPES:
        raise SleepzooError(f"unknown model_type {model_type!r} in the config; sleepzoo knows: "
                            f"{', '.join(sorted(MODEL_TYPES))}")
    module_name, cls_name = MODEL_TYPES[model_type].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # the module exists but something it imports is missing: not ours to hide
            raise
        raise SleepzooError(f"model_type {model_type!r} is known but its module {module_name} is not in this "
                            f"installation of sleepzoo") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise SleepzooError(f"model_type {model_type!r}: {module_name} has no {cls_name}")
    return cls


# SleepConfig's fields (max_loops and tolerance: the bounds of loops: auto)
SLEEP_OVERRIDES = ("window", "loops", "max_loops", "tolerance", "eviction", "sleep_every", "checkpoint")
SCHEDULE = ("loops", "max_loops", "tolerance")  # how many passes: merged by rules.merge_schedule
SAVED_SLEEP = ("window", *SCHEDULE, "eviction", "sleep_every")  # what save_pretrained records (not checkpoint)
# The sleep stabilisers (SleepConfig; truncate is training only): overrides too, recorded when not the default.
STABILISERS = ("gate", "pass_norm", "coda")
_SLEEP_NAMES = SLEEP_OVERRIDES + STABILISERS
# Where the weights come from (the folder names are the ones the docs and recipes use).
DOWNLOAD = {
    "jet_nemotron": "huggingface-cli download jet-ai/Jet-Nemotron-2B --local-dir ~/models/Jet-Nemotron-2B",
    "ouro": "huggingface-cli download ByteDance/Ouro-1.4B --local-dir ~/models/Ouro-1.4B",
}
# Files of a Hugging Face folder that travel with the weights on convert (tokenizer, generation, licence).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
              "merges.txt", "tokenizer.model", "generation_config.json", "LICENSE", "LICENSE.md", "LICENSE.txt",
              "NOTICE")


def _model_overrides(cls: type) -> tuple[str, ...]:
    configure = getattr(cls, "configure", None)
    if configure is None:
        return ()
    return tuple(n for n, p in inspect.signature(configure).parameters.items() if p.kind == p.KEYWORD_ONLY)


def allowed_overrides(model_type: str) -> tuple[str, ...]:
    """The override names that :func:`from_pretrained` / :func:`from_config` accept for ``model_type``."""
    return SLEEP_OVERRIDES + _model_overrides(model_class(model_type)) + STABILISERS


def _split_overrides(model_type: str, overrides: dict[str, Any], where: str) -> tuple[dict, dict]:
    """(sleep settings, model settings) of ``overrides``; an unknown name is an error listing the allowed."""
    cls = model_class(model_type)
    own = _model_overrides(cls)
    unknown = sorted(k for k in overrides if k not in _SLEEP_NAMES and k not in own)
    if unknown:
        others = {t: _model_overrides(model_class(t)) for t in MODEL_TYPES if t != model_type}
        hints = [f"{k} is {t}'s" for k in unknown for t, names in others.items() if k in names]
        hints += [f"did you mean {close[0]!r}?" for k in unknown
                  for close in [difflib.get_close_matches(k, _SLEEP_NAMES + own, n=1, cutoff=0.6)] if close]
        raise SleepzooError(f"{where}: unknown override(s) {', '.join(unknown)} for model_type {model_type!r}"
                            + (f" ({'; '.join(hints)})" if hints else "")
                            + f"; allowed: {', '.join(SLEEP_OVERRIDES + own + STABILISERS)}")
    sleep = {k: v for k, v in overrides.items() if k in _SLEEP_NAMES}
    return sleep, {k: v for k, v in overrides.items() if k in own}


def published_sleep(config: dict) -> SleepConfig:
    """The published behaviour: one pass over a window of ``max_position_embeddings`` tokens (so no eviction
    for any input the model was trained for)."""
    window = config.get("max_position_embeddings")
    return SleepConfig(window=window if isinstance(window, int) and window >= 1 else 32768, loops=1)


def _sleep_config(base: SleepConfig, settings: dict[str, Any], where: str) -> SleepConfig:
    """``base`` with ``settings`` applied (None keeps a setting, except sleep_every where None means every
    window), checked by the rules a recipe's sleep section follows (:mod:`sleepzoo.rules`)."""
    sleep = dataclasses.replace(base, **{k: v for k, v in settings.items() if v is not None or k == "sleep_every"})
    try:
        check_count("window", sleep.window, "tokens per attention window")
        check_schedule(sleep.loops, sleep.max_loops, sleep.tolerance)
        check_sleep_every(sleep.window, sleep.sleep_every, sleep.eviction)
    except RuleError as exc:
        raise SleepzooError(f"{where}: {exc}") from None
    for name in ("checkpoint", "gate", "pass_norm"):
        if not isinstance(getattr(sleep, name), bool):
            raise SleepzooError(f"{where}: {name}={getattr(sleep, name)!r} must be true or false")
    if sleep.coda not in ("sleep", "wake"):
        raise SleepzooError(f"{where}: coda={sleep.coda!r} must be 'sleep' or 'wake'")
    from . import registry
    registry.get("eviction", sleep.eviction)  # an unknown policy fails now, with the known names
    return sleep


def stored_settings(config: dict, path: Path | None) -> tuple[dict[str, Any], str]:
    """sleepzoo's settings of a config and where they come from: ``sleepzoo.json`` beside ``path`` (a
    config.json) when there is one, else config.json's ``sleepzoo`` key (a folder written before
    sleepzoo.json). The key is popped from ``config`` either way: a folder with both takes the file's."""
    stored = config.pop(SLEEPZOO_KEY, None)
    where = f"{path or 'config'}: {SLEEPZOO_KEY}"
    file = path.parent / SETTINGS_NAME if path is not None and path.name == CONFIG_NAME else None
    if file is not None and file.is_file():
        where = str(file)
        try:
            stored = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SleepzooError(f"{where}: not readable JSON ({exc}); it holds sleepzoo's settings of the model "
                                f"beside it, a JSON object such as {{\"loops\": 4}}: repair or delete it") from None
    if stored is None:
        return {}, where
    if not isinstance(stored, dict):
        raise SleepzooError(f"{where}: must be a JSON object of sleepzoo settings (override names such as loops, "
                            f"window, sleep_layers), got {type(stored).__name__} {stored!r}")
    return stored, where


def _apply(model: nn.Module, model_type: str, settings: dict[str, Any], where: str) -> nn.Module:
    """``settings`` (sleep and model overrides, names checked) applied to ``model`` in place."""
    sleep_settings, model_settings = _split_overrides(model_type, settings, where)
    if model_settings:
        model.configure(**model_settings)
    loops, max_loops, tolerance = merge_schedule(model.sleep, *(sleep_settings.get(k) for k in SCHEDULE))
    model.sleep = _sleep_config(dataclasses.replace(model.sleep, max_loops=max_loops, tolerance=tolerance),
                                sleep_settings, where)
    return model


def _model_type(config: dict, where: str) -> str:
    if "model_type" not in config:
        raise SleepzooError(f"{where}: missing required field model_type (one of {', '.join(sorted(MODEL_TYPES))})")
    return config["model_type"]


def _build(config: dict, path: Path | None, *, sleep: SleepConfig | None, stored: dict[str, Any],
           stored_where: str, overrides: dict[str, Any]) -> nn.Module:
    """The model of ``config`` (its settings already taken out: :func:`stored_settings`) on the current default
    device, with the ``stored`` settings and then ``overrides`` applied (an override wins over a stored
    setting; with ``sleep`` given, the stored sleep settings are left out)."""
    where = str(path) if path is not None else "config"
    model_type = _model_type(config, where)
    base = sleep if sleep is not None else published_sleep(config)
    if sleep is not None:
        stored = {k: v for k, v in stored.items() if k not in _SLEEP_NAMES}
    stored_sleep, _ = _split_overrides(model_type, stored, stored_where)  # a damaged file is named as such
    _sleep_config(base, stored_sleep, stored_where)
    try:
        model = model_class(model_type).from_config(config, sleep=None)
    except SleepzooError as exc:  # name the file, not "config"
        if path is None:
            raise
        raise SleepzooError(f"{where}: {str(exc).removeprefix('config: ')}") from None
    model.sleep = base
    if overrides.get("loops") not in (None, "auto"):  # a fixed count given: the stored bounds of loops: auto go
        stored = {k: v for k, v in stored.items() if k not in ("max_loops", "tolerance")}
    return _apply(model, model_type, {**stored, **overrides}, where)


def from_config(config: dict | str | Path, *, sleep: SleepConfig | None = None, **overrides: Any) -> nn.Module:
    """A randomly initialised model of the config's ``model_type`` (a dict, config.json, its folder, or the
    name of a published config that ships with sleepzoo: :data:`PUBLISHED_CONFIGS`, e.g. ``"ouro-1.4b"``).

    ``sleep`` is the base sleep setting (default :func:`published_sleep`); ``overrides`` are sleep settings
    and the model's own (:func:`allowed_overrides`), applied over the stored ones (the sleepzoo.json beside
    config.json, or an old folder's ``sleepzoo`` key: :func:`stored_settings`). Under
    ``with torch.device("meta")`` nothing is allocated (shapes and parameter counts only).
    """
    data, path = read_config_json(published_config(config))
    stored, stored_where = stored_settings(data, path)
    model = _build(data, path, sleep=sleep, stored=stored, stored_where=stored_where, overrides=overrides)
    return _with_gate(model, model.sleep.gate)


def _with_gate(model: nn.Module, gate: bool) -> nn.Module:
    """``model`` with its sleep gate parameter (``sleep.gate``: zero, see engine.consolidate) when ``gate``."""
    if gate:
        model.add_sleep_gate()
    return model


# The published models' config.json (architecture facts, no weights), so that their shapes can be built
# (random or on the meta device) without a download: ``from_config("jet-nemotron-2b")``.
PUBLISHED_CONFIGS = ("jet-nemotron-2b", "ouro-1.4b")


def published_config(config: Any) -> Any:
    """``config`` itself, or the path of the shipped config.json it names (see :data:`PUBLISHED_CONFIGS`)."""
    if isinstance(config, str) and config in PUBLISHED_CONFIGS and not Path(config).exists():
        return Path(__file__).parent / "models" / "configs" / f"{config}.json"
    return config


def _resolve_dtype(dtype: Any, config: dict) -> torch.dtype:
    """``dtype`` given (a torch.dtype or its name), else the config's torch_dtype (or dtype), else float32."""
    if dtype is None:
        dtype = config.get("torch_dtype") or config.get("dtype") or torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise SleepzooError(f"dtype {dtype!r} is not a torch dtype (e.g. float32, bfloat16, float16)")
        dtype = resolved
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SleepzooError(f"dtype {dtype!r} must be a floating-point torch dtype")
    return dtype


def weight_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index's weight_map or the single file.

    Only headers are read. A name in two files, an index naming a missing shard, or no weights at all are
    errors."""
    folder = Path(folder)
    index, single = folder / INDEX_NAME, folder / WEIGHTS_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{str(index)!r} is not a safetensors index with a weight_map: {exc!r}") from None
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not (folder / s).is_file()]
        if absent:
            raise CheckpointError(f"{str(index)!r} names shard file(s) that are not in the folder: {_listing(absent)}")
        files = [folder / s for s in shards]
    elif single.is_file():
        weight_map, files = None, [single]
    else:
        raise CheckpointError(f"{str(folder)!r} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    where: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                names = list(f.keys())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{str(file)!r} is not a readable safetensors file: {exc}") from None
        for name in names:
            if name in where:
                raise CheckpointError(f"tensor {name} is in both {where[name].name} and {file.name}")
            where[name] = file
    if weight_map is not None:
        # The index is the contract: a tensor it lists must be in the shard it names.
        wrong = [n for n, s in weight_map.items() if n not in where or where[n].name != Path(s).name]
        if wrong:
            raise CheckpointError(f"{str(index)!r}: weight_map entries not found in the shard they name: "
                                  f"{_listing(sorted(wrong))}")
    return where


def _shapes(where: dict[str, Path]) -> dict[str, list[int]]:
    """Tensor name -> shape, from the files' headers (no tensor data is read)."""
    shapes: dict[str, list[int]] = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in where.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                shapes[name] = list(f.get_slice(name).get_shape())
    return shapes


def check_weights(model: nn.Module, shapes: dict[str, list[int]], *, strict: bool = True,
                  source: str = "weights") -> list[str]:
    """:func:`sleepzoo.checkpoint.check_weight_names` over every file of a (sharded) checkpoint."""
    return check_weight_names(model, shapes, source=source, strict=strict, noun="files")


def from_pretrained(folder: str | Path, *, dtype: Any = None, strict: bool = True,
                    sleep: SleepConfig | None = None, device: str | torch.device = "cpu",
                    **overrides: Any) -> nn.Module:
    """Build the model of ``folder/config.json`` and load its safetensors weights (single file or sharded).

    Args:
        folder: a local folder with config.json and model.safetensors or model.safetensors.index.json.
        dtype: parameter dtype (torch.dtype or name); default the config's torch_dtype, else float32.
        strict: missing and unexpected tensors are errors (mis-shaped ones always are). With ``strict=False``
            a missing tensor keeps its random initialisation.
        sleep: base sleep settings; default the published behaviour (one pass, no eviction within
            max_position_embeddings tokens), or what the folder's sleepzoo.json records.
        device: where the weights go (default cpu).
        overrides: sleep settings (``window``, ``loops``, ``eviction``, ``sleep_every``, ``checkpoint``) and the
            model's own (Jet-Nemotron ``loop_start``, ``loop_end``; Ouro ``wake_passes``, ``sleep_layers``,
            ``sleep_layer_options``); :func:`allowed_overrides`. Layers they add (Ouro's sleep layers) are
            initialised after the weights are loaded (their ``o_proj`` zero: the function is unchanged).

    Returns the model in eval mode.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise SleepzooError(f"pretrained folder {str(folder)!r} does not exist (a local folder with config.json and "
                            f"safetensors weights, e.g. `{DOWNLOAD['jet_nemotron']}`)")
    config, config_path = read_config_json(folder)
    stored, stored_where = stored_settings(config, config_path)
    _split_overrides(_model_type(config, str(config_path)), overrides, str(config_path))  # names first, cheaply
    dtype = _resolve_dtype(dtype, config)
    where = weight_files(folder)
    # The architecture the files hold: the config and its stored settings; the caller's overrides come after
    # loading (an Ouro sleep layer they add is not in the files).
    # A saved sleep gate (sleep.gate) is a parameter of its own: built when the files hold one.
    model = _load(lambda: _with_gate(_build(dict(config), config_path, sleep=sleep, stored=stored,
                                            stored_where=stored_where, overrides={}), "sleep_gate" in where),
                  where, dtype=dtype, strict=strict, device=device, source=f"weights in {str(folder)!r}")
    _apply(model, config["model_type"], overrides, str(config_path))
    return _with_gate(model, model.sleep.gate).eval()  # a gate not in the files starts at 0 (no change)


def _load(build: Any, where: dict[str, Path], *, dtype: torch.dtype, strict: bool, device: str | torch.device,
          source: str) -> nn.Module:
    """``build()`` on the meta device, names and shapes checked against the files' headers, then materialised
    on ``device`` in ``dtype`` and filled tensor by tensor (memory-mapped) from the files in ``where``."""
    shapes = _shapes(where)
    with torch.device("meta"):  # names and shapes are checked before a byte of memory is spent
        model = build()
    missing = check_weights(model, shapes, strict=strict, source=source)
    if missing:
        # Tensors the files do not provide need their initialisation: build for real (strict=False only).
        with torch.device(device):
            model = build()
        model.to(dtype)
    else:
        model.to(dtype)  # on meta: only the recorded dtype changes
        model.to_empty(device=device)
        if hasattr(model, "tie_weights"):  # to_empty may give each module of a tied pair its own tensor
            model.tie_weights()
    own = model.state_dict(keep_vars=True)
    by_file: dict[Path, list[str]] = {}
    for name, file in where.items():
        if name in own:
            by_file.setdefault(file, []).append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as f:  # memory-mapped: one tensor in memory at a time
                for name in names:
                    own[name].copy_(f.get_tensor(name))  # copy_ casts to the parameter's dtype and device
    _check_no_buffers_left(model, where, missing)
    return model


def _check_no_buffers_left(model: nn.Module, where: dict[str, Path], missing: Sequence[str]) -> None:
    """After ``to_empty``, a non-persistent buffer would hold garbage: a model class must not have one."""
    persistent = set(model.state_dict().keys())
    stray = [n for n, _ in model.named_buffers() if n not in persistent]
    if stray and not missing:
        raise SleepzooError(f"{type(model).__name__} has non-persistent buffers ({_listing(stray)}) that loading "
                            f"from the meta device can not fill; compute them on the fly instead")


def on_meta() -> bool:
    """True inside ``with torch.device("meta")`` (how ``sleepzoo recipe validate`` builds models)."""
    return torch.get_default_device().type == "meta"


def build_pretrained(model_type: str, pretrained: str | None, hf_config: dict[str, Any] | str | None, *,
                     sleep: SleepConfig | None, reference: dict[str, Any]) -> nn.Module:
    """A recipe's pretrained model: ``model.pretrained`` (a local folder, weights loaded in float32, the
    training precision) or ``model.hf_config`` (a config dict or path, random weights), else ``reference``
    (the published architecture, random weights); with ``sleep`` (the recipe's sleep section).

    On the meta device no weights are read: a folder's config.json gives the shapes (its weights' names and
    shapes are checked against them when present), and a folder that is not there yet stands for the
    published architecture (``reference``), so a recipe validates before the download. Anywhere else a
    missing folder is a RecipeError with the download command.
    """
    folder = pretrained
    if folder is not None:
        path = Path(folder).expanduser()
        if on_meta():
            if not (path / CONFIG_NAME).is_file():
                return from_config(reference, sleep=sleep)
            model = from_config(path, sleep=sleep)
            if (path / WEIGHTS_NAME).is_file() or (path / INDEX_NAME).is_file():
                shapes = _shapes(weight_files(path))
                if getattr(model, "sleep_gate", None) is not None and "sleep_gate" not in shapes:
                    shapes["sleep_gate"] = list(model.sleep_gate.shape)  # from_pretrained adds it, at zero
                check_weights(model, shapes, source=f"weights in {str(path)!r}")
        else:
            if not path.is_dir():
                raise RecipeError(f"model.pretrained: {folder!r} does not exist; download the weights first, e.g. "
                                  f"`{DOWNLOAD.get(model_type, DOWNLOAD['jet_nemotron'])}` (see docs/pretrained.md)")
            model = from_pretrained(path, dtype=torch.float32, sleep=sleep)
    else:
        model = from_config(hf_config if hf_config is not None else reference, sleep=sleep)
    return model


def parse_size(size: int | str) -> int:
    """Bytes from ``size``: an integer, or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"`` (GB = 10**9 as
    in Hugging Face's max_shard_size, GiB = 2**30)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), flags=re.IGNORECASE)
        if m is None:
            raise SleepzooError(f"max_shard_size {size!r}: give bytes or a size such as 5GB, 500MB, 2GiB")
        unit = m.group(2).upper().rstrip("B")
        scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                 "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
        value = int(float(m.group(1)) * scale)
    if value < 1:
        raise SleepzooError(f"max_shard_size {size!r} must be positive")
    return value


def sleepzoo_settings(model: nn.Module) -> dict[str, Any]:
    """What sleepzoo.json records for ``model``: its sleep settings when they differ from the
    published behaviour, and the model's own settings that differ from the defaults."""
    out: dict[str, Any] = {}
    sleep = getattr(model, "sleep", None)
    config = getattr(model, "hf_config", {}) or {}
    if isinstance(sleep, SleepConfig):
        published = published_sleep(config)
        if any(getattr(sleep, k) != getattr(published, k) for k in SAVED_SLEEP):
            out.update({k: getattr(sleep, k) for k in SAVED_SLEEP  # the bounds of loops: auto only when set
                        if getattr(sleep, k) is not None or k not in ("max_loops", "tolerance")})
        default = SleepConfig()
        out.update({k: getattr(sleep, k) for k in STABILISERS if getattr(sleep, k) != getattr(default, k)})
    own = getattr(model, "sleepzoo_settings", None)
    if callable(own):
        out.update(own())
    return out


_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
# Temporary names of earlier saves (this module's and sleepzoo.checkpoint's): never worth keeping.
_STALE_TMP = re.compile(r"\.(tmp-.*|.*\.tmp)")
T = TypeVar("T")


def own_output(name: str) -> bool:
    """True for a file name that :func:`save_pretrained` writes (config.json, sleepzoo.json, weights, shards,
    index): what a save replaces. Everything else in the folder (a tokenizer, a README, a licence) is the
    user's and kept."""
    return (name in (CONFIG_NAME, SETTINGS_NAME, WEIGHTS_NAME, INDEX_NAME)
            or bool(_SHARD.fullmatch(name) or _STALE_TMP.fullmatch(name)))


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` holding what ``src`` holds: a hard link where the file system allows it (no bytes copied),
    else a copy (with its metadata); symbolic links stay links, folders are linked file by file."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=lambda a, b: _link_or_copy(Path(a), Path(b)))
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def replace_folder(folder: str | Path, fill: Callable[[Path], T]) -> T:
    """Write a folder atomically: ``fill(tmp)`` writes the new contents into a temporary folder beside
    ``folder`` (same parent, ``.{name}.tmp-XXXXXXXX``), files of the old folder that are not sleepzoo's
    outputs (:func:`own_output`) and that ``fill`` did not write are carried over (hard links, else copies),
    everything is fsynced, and renames swap the folders: the old one aside (``.{name}.old-XXXXXXXX``), the new
    one in, the old one removed. A reader sees the old folder or the new one, whole.

    If ``fill`` or anything before the swap fails, the old folder is left exactly as it was and the temporary
    one is removed. The old and the new weights are on disk together until the swap (hard links make the
    carried files free). A symbolic link ``folder`` stays a link: the folder it points to is replaced.
    Returns what ``fill`` returns.
    """
    folder = Path(folder).expanduser()
    if folder.is_symlink():
        folder = folder.resolve()
    folder = folder.absolute()
    if folder.exists() and not folder.is_dir():
        raise SleepzooError(f"{str(folder)!r} exists and is not a folder")
    parent = folder.parent
    tmp = parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # the umask's permissions, as a folder made by mkdir
    except OSError as exc:
        raise SleepzooError(f"can not write {str(folder)!r}: creating a temporary folder beside it failed "
                            f"({exc})") from None
    aside = None
    try:
        try:
            result = fill(tmp)
            written = [p for p in tmp.iterdir() if p.is_file()]
            if folder.is_dir():
                os.chmod(tmp, stat.S_IMODE(folder.stat().st_mode))
                for entry in sorted(folder.iterdir()):
                    if not own_output(entry.name) and not os.path.lexists(tmp / entry.name):
                        _link_or_copy(entry, tmp / entry.name)
            for path in written:
                _fsync_file(path)
            _fsync_dir(tmp)
            if folder.is_dir():
                aside = parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(folder, aside)
                try:
                    os.rename(tmp, folder)
                except BaseException:
                    os.rename(aside, folder)
                    raise
            else:
                os.rename(tmp, folder)
        except OSError as exc:  # a full disk, a permission: not a bug, one line
            raise SleepzooError(f"writing {str(folder)!r} failed ({type(exc).__name__}: {exc}); the folder was "
                                f"left as it was") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return result


def hf_config_for(model: nn.Module) -> dict[str, Any]:
    """The config.json that :func:`save_pretrained` writes for ``model``: the published config (see there)."""
    config = getattr(model, "hf_config", None)
    if not isinstance(config, dict):
        raise SleepzooError(f"{type(model).__name__} has no hf_config (the config it was built from): only "
                            f"jet_nemotron and ouro models can be saved in the Hugging Face layout")
    config = {k: v for k, v in config.items() if k != SLEEPZOO_KEY}
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) == 1:
        config["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.")
        config.pop("dtype", None)
    if sleepzoo_settings(model).get("sleep_layers"):
        # The published Ouro code has no sleep layers: without auto_map transformers refuses the folder
        # instead of loading it and silently dropping their weights.
        config.pop("auto_map", None)
    return config


def _write_hf_files(model: nn.Module, folder: Path, config: dict[str, Any], limit: int | None) -> list[str]:
    """config.json, sleepzoo.json (when the model has settings to record) and the weights (one file or
    shards + index) into ``folder``; the names written."""
    tensors = _unique_state_dict(model)
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    written: list[str] = []
    if limit is None or sum(sizes.values()) <= limit:
        save_weights(model, folder / WEIGHTS_NAME)  # ties stored once
        written.append(WEIGHTS_NAME)
    else:
        shards: list[list[str]] = [[]]
        used = 0
        for name, size in sizes.items():  # in state-dict order; a tensor larger than the limit gets its own shard
            if shards[-1] and used + size > limit:
                shards.append([])
                used = 0
            shards[-1].append(name)
            used += size
        n = len(shards)
        weight_map = {}
        for i, names in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{n:05d}.safetensors"
            _save_tensors({k: tensors[k] for k in names}, folder / file, metadata={"format": "pt"})
            weight_map.update({k: file for k in names})
            written.append(file)
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        written.append(INDEX_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    written.append(CONFIG_NAME)
    settings = sleepzoo_settings(model)
    if settings:
        (folder / SETTINGS_NAME).write_text(json.dumps(settings, indent=2) + "\n")
        written.append(SETTINGS_NAME)
    return written


def save_pretrained(model: nn.Module, folder: str | Path, *, max_shard_size: int | str | None = None) -> list[Path]:
    """Write ``folder/config.json`` and the weights so that :func:`from_pretrained` rebuilds the same model.

    config.json is the model's ``hf_config`` (the published config) with torch_dtype set to its weights'
    dtype (and no auto_map once sleep layers are inserted: the published code has none). When the model
    differs from the published one (sleep settings, loop range, wake_passes, inserted sleep layers), those
    settings go to ``sleepzoo.json`` beside it (:func:`sleepzoo_settings`). Weights go to
    ``model.safetensors`` (a tied weight once, under its first name: no lm_head key when tied), or, above
    ``max_shard_size`` bytes (an int or "2GB"), to shards ``model-0000i-of-0000n.safetensors`` with a
    ``model.safetensors.index.json`` as Hugging Face writes them.

    The folder is written whole beside the target and renamed into place (:func:`replace_folder`): a save
    that fails leaves an existing folder as it was; one that succeeds replaces its config and weight files
    (stale shards and sleepzoo.json of an earlier save included) and keeps the user's other files
    (tokenizer, README, ...).
    Returns the files written.
    """
    config = hf_config_for(model)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    folder = Path(folder)
    names = replace_folder(folder, lambda tmp: _write_hf_files(model, tmp, config, limit))
    return [folder / name for name in names]


def __getattr__(name: str) -> Any:  # PEP 562: convert moved to sleepzoo.convert; the old import keeps working
    if name == "convert":
        from .convert import convert

        return convert
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
