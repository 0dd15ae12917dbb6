"""Pretrained models from a user's local folder: ``config.json`` + safetensors weights (SPEC 3, docs/pretrained.md).

    import sleepzoo
    model = sleepzoo.from_pretrained("~/models/Jet-Nemotron-2B")          # as published: one pass, loops 1
    model = sleepzoo.from_pretrained(folder, window=2000, loops=4)         # sleep settings as overrides
    model = sleepzoo.from_pretrained("~/models/Ouro-1.4B", wake_passes=1, sleep_layers=[3, 7, 11, 15, 19, 23])
    with torch.device("meta"):
        model = sleepzoo.from_config("shared/reference/ouro-1.4b.config.json")   # shapes only, no memory
    save_pretrained(model, "out/", max_shard_size="2GB")                  # config.json + (sharded) safetensors
    convert("runs/jet-N4", "out/jet-N4")                                   # a run's weights as such a folder

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

**config.json's ``sleepzoo`` key.** :func:`save_pretrained` writes the settings of the model that differ from
the published model's (sleep settings and stabilisers, loop range, wake_passes, inserted sleep layers) under
``"sleepzoo"``, by their override names; :func:`from_pretrained` applies them before the caller's overrides,
so a saved model comes back as it was. Folders are written atomically (:func:`replace_folder`). The
published Jet-Nemotron code ignores the key (Hugging Face configs keep unknown fields). An Ouro with inserted
sleep layers can not be loaded by the published Ouro code (it has no such layers and would drop their
weights); its folder has no ``auto_map``, so transformers refuses it.
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
from .config import ModelConfig, RecipeError, SleepConfig
from .models.base import read_config_json
from .registry import SleepzooError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
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


SLEEPZOO_KEY = "sleepzoo"  # config.json's key for sleepzoo's own settings (see the module docstring)
SLEEP_OVERRIDES = ("window", "loops", "eviction", "sleep_every", "checkpoint")  # SleepConfig's fields
SAVED_SLEEP = ("window", "loops", "eviction", "sleep_every")  # what save_pretrained records (not checkpoint)
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
    window), checked as a recipe's sleep section is."""
    sleep = dataclasses.replace(base, **{k: v for k, v in settings.items() if v is not None or k == "sleep_every"})
    for name in ("window", "loops"):
        value = getattr(sleep, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SleepzooError(f"{where}: {name}={value!r} must be an integer >= 1")
    every = sleep.sleep_every
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or not 1 <= every <= sleep.window):
        raise SleepzooError(f"{where}: sleep_every={every!r} must be an integer in [1, window={sleep.window}] "
                            f"(None: every window)")
    if every not in (None, sleep.window) and sleep.eviction == "full_flush":
        raise SleepzooError(f"{where}: sleep_every={every} needs eviction='sliding_window' (full_flush sleeps on "
                            f"whole windows)")
    for name in ("checkpoint", "gate", "pass_norm"):
        if not isinstance(getattr(sleep, name), bool):
            raise SleepzooError(f"{where}: {name}={getattr(sleep, name)!r} must be true or false")
    if sleep.coda not in ("sleep", "wake"):
        raise SleepzooError(f"{where}: coda={sleep.coda!r} must be 'sleep' or 'wake'")
    from . import registry
    registry.get("eviction", sleep.eviction)  # an unknown policy fails now, with the known names
    return sleep


def _stored_settings(config: dict, where: str, sleep: SleepConfig | None) -> dict[str, Any]:
    """config.json's ``sleepzoo`` settings (popped from ``config``); its sleep settings are left out when the
    caller gives ``sleep`` (an explicit sleep setting wins over a stored one)."""
    stored = config.pop(SLEEPZOO_KEY, None) or {}
    if not isinstance(stored, dict):
        raise SleepzooError(f"{where}: {SLEEPZOO_KEY} must be a mapping of sleepzoo settings, got {stored!r}")
    if sleep is not None:
        stored = {k: v for k, v in stored.items() if k not in _SLEEP_NAMES}
    return stored


def _build(config: dict, path: Path | None, *, sleep: SleepConfig | None, settings: dict[str, Any]) -> nn.Module:
    """The model of ``config`` (its ``sleepzoo`` key already popped) on the current default device, with
    ``settings`` (sleep and model overrides) applied."""
    where = str(path) if path is not None else "config"
    if "model_type" not in config:
        raise SleepzooError(f"{where}: missing required field model_type (one of {', '.join(sorted(MODEL_TYPES))})")
    model_type = config["model_type"]
    cls = model_class(model_type)
    sleep_settings, model_settings = _split_overrides(model_type, settings, where)
    try:
        model = cls.from_config(config, sleep=None)
    except SleepzooError as exc:  # name the file, not "config"
        if path is None:
            raise
        raise SleepzooError(f"{where}: {str(exc).removeprefix('config: ')}") from None
    if model_settings:
        model.configure(**model_settings)
    model.sleep = _sleep_config(sleep if sleep is not None else published_sleep(config), sleep_settings, where)
    return model


def from_config(config: dict | str | Path, *, sleep: SleepConfig | None = None, **overrides: Any) -> nn.Module:
    """A randomly initialised model of the config's ``model_type`` (a dict, config.json, its folder, or the
    name of a published config that ships with sleepzoo: :data:`PUBLISHED_CONFIGS`, e.g. ``"ouro-1.4b"``).

    ``sleep`` is the base sleep setting (default :func:`published_sleep`); ``overrides`` are sleep settings
    and the model's own (:func:`allowed_overrides`), applied over the config's ``sleepzoo`` key. Under
    ``with torch.device("meta")`` nothing is allocated (shapes and parameter counts only).
    """
    data, path = read_config_json(published_config(config))
    stored = _stored_settings(data, str(path or "config"), sleep)
    model = _build(data, path, sleep=sleep, settings={**stored, **overrides})
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
            max_position_embeddings tokens), or what config.json's ``sleepzoo`` key records.
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
    stored = _stored_settings(config, str(config_path), sleep)
    if "model_type" not in config:
        raise SleepzooError(f"{config_path}: missing required field model_type (one of "
                            f"{', '.join(sorted(MODEL_TYPES))})")
    _split_overrides(config["model_type"], {**stored, **overrides}, str(config_path))  # names first, cheaply
    dtype = _resolve_dtype(dtype, config)
    where = weight_files(folder)
    # The architecture the files hold: the config and its stored settings; the caller's overrides come after
    # loading (an Ouro sleep layer they add is not in the files).
    # A saved sleep gate (sleep.gate) is a parameter of its own: built when the files hold one.
    model = _load(lambda: _with_gate(_build(dict(config), config_path, sleep=sleep, settings=stored),
                                     "sleep_gate" in where),
                  where, dtype=dtype, strict=strict, device=device, source=f"weights in {str(folder)!r}")
    if overrides:
        _, model_settings = _split_overrides(config["model_type"], overrides, str(config_path))
        if model_settings:
            model.configure(**model_settings)
        sleep_settings = {k: v for k, v in overrides.items() if k in _SLEEP_NAMES}
        model.sleep = _sleep_config(model.sleep, sleep_settings, str(config_path))
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


def build_pretrained(model_type: str, config: ModelConfig, *, sleep: SleepConfig | None,
                     reference: dict[str, Any]) -> nn.Module:
    """A recipe's pretrained model: ``model.pretrained`` (a local folder, weights loaded in float32, the
    training precision) or ``model.hf_config`` (a config dict or path, random weights), else ``reference``
    (the published architecture, random weights); with ``sleep`` (the recipe's sleep section).

    On the meta device no weights are read: a folder's config.json gives the shapes (its weights' names and
    shapes are checked against them when present), and a folder that is not there yet stands for the
    published architecture (``reference``), so a recipe validates before the download. Anywhere else a
    missing folder is a RecipeError with the download command.
    """
    folder = config.pretrained
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
        model = from_config(config.hf_config if config.hf_config is not None else reference, sleep=sleep)
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
    """What config.json's ``sleepzoo`` key records for ``model``: its sleep settings when they differ from the
    published behaviour, and the model's own settings that differ from the defaults."""
    out: dict[str, Any] = {}
    sleep = getattr(model, "sleep", None)
    config = getattr(model, "hf_config", {}) or {}
    if isinstance(sleep, SleepConfig):
        published = published_sleep(config)
        if any(getattr(sleep, k) != getattr(published, k) for k in SAVED_SLEEP):
            out.update({k: getattr(sleep, k) for k in SAVED_SLEEP})
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
    """True for a file name that :func:`save_pretrained` writes (config.json, weights, shards, index): what a
    save replaces. Everything else in the folder (a tokenizer, a README, a licence) is the user's and kept."""
    return name in (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME) or bool(_SHARD.fullmatch(name) or _STALE_TMP.fullmatch(name))


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
    """The config.json that :func:`save_pretrained` writes for ``model`` (see there)."""
    config = getattr(model, "hf_config", None)
    if not isinstance(config, dict):
        raise SleepzooError(f"{type(model).__name__} has no hf_config (the config it was built from): only "
                            f"jet_nemotron and ouro models can be saved in the Hugging Face layout")
    config = {k: v for k, v in config.items() if k != SLEEPZOO_KEY}
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) == 1:
        config["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.")
        config.pop("dtype", None)
    settings = sleepzoo_settings(model)
    if settings:
        config[SLEEPZOO_KEY] = settings
    if settings.get("sleep_layers"):
        # The published Ouro code has no sleep layers: without auto_map transformers refuses the folder
        # instead of loading it and silently dropping their weights.
        config.pop("auto_map", None)
    return config


def _write_hf_files(model: nn.Module, folder: Path, config: dict[str, Any], limit: int | None) -> list[str]:
    """config.json and the weights (one file or shards + index) into ``folder``; the names written."""
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
    return written


def save_pretrained(model: nn.Module, folder: str | Path, *, max_shard_size: int | str | None = None) -> list[Path]:
    """Write ``folder/config.json`` and the weights so that :func:`from_pretrained` rebuilds the same model.

    config.json is the model's ``hf_config`` with torch_dtype set to its weights' dtype and, when the model
    differs from the published one (sleep settings, loop range, wake_passes, inserted sleep layers), those
    settings under ``"sleepzoo"``. Weights go to ``model.safetensors`` (a tied weight once, under its first
    name: no lm_head key when tied), or, above ``max_shard_size`` bytes (an int or "2GB"), to shards
    ``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json`` as Hugging Face writes them.

    The folder is written whole beside the target and renamed into place (:func:`replace_folder`): a save
    that fails leaves an existing folder as it was; one that succeeds replaces its config and weight files
    (stale shards of an earlier save included) and keeps the user's other files (tokenizer, README, ...).
    Returns the files written.
    """
    config = hf_config_for(model)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    folder = Path(folder)
    names = replace_folder(folder, lambda tmp: _write_hf_files(model, tmp, config, limit))
    return [folder / name for name in names]


# ---------------------------------------------------------------------------------------------------------
# convert: a run or a folder -> a Hugging Face-style folder


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
# run directory alone: config.json and the tokenizer/generation/licence files of model.pretrained (or the
# model.hf_config file), and a task.tokenizer given as a path (tokenizer/tokenizer.json).
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
            files = {name: folder / name for name in (CONFIG_NAME, *SIDE_FILES) if (folder / name).is_file()}
            if CONFIG_NAME not in files:
                files = {}
        elif (config := _hf_config_file(recipe)) is not None and config.is_file():
            files = {CONFIG_NAME: config}
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
    import dataclasses

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

    local = run_recipe(run, recipe, task=False)
    sleep = local.stage_recipes()[-1][1].sleep
    builder = registry.get("model", local.model.name)
    gate = local.sleep.gate or any(stage.sleep.get("gate") for stage in local.stages)

    def build() -> nn.Module:
        model = builder(local.model, vocab_size=vocab_size, sleep=sleep)
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
    Returns a summary (source kind, files written, parameters, dtype).
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
