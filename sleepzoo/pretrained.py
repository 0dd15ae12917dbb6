"""Pretrained models from a user's local folder: ``config.json`` + safetensors weights (SPEC 3).

    model = from_pretrained("~/models/Jet-Nemotron-2B")                  # as published: one pass, loops 1
    model = from_pretrained(folder, sleep=SleepConfig(window=2048, loops=4))
    save_pretrained(model, "out/")                                       # config.json + model.safetensors

The folder holds either ``model.safetensors`` or a sharded ``model.safetensors.index.json`` whose
``weight_map`` names, for every tensor, the shard file holding it. The model class is chosen by the config's
``model_type`` (:data:`MODEL_TYPES`). Weights are read memory-mapped (``safetensors.safe_open``) one tensor at
a time into a model built on the meta device and then materialised, so loading never holds two copies.
Names and shapes are checked from the files' headers before any tensor is read; all problems are reported
together, by name. sleepzoo never ships weights (Jet-Nemotron's are under a non-commercial licence).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .checkpoint import CheckpointError, _listing, check_weight_names, save_weights
from .config import SleepConfig
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


def from_config(config: dict | str | Path, *, sleep: SleepConfig | None = None) -> nn.Module:
    """A randomly initialised model of the config's ``model_type`` (a dict, config.json, or its folder)."""
    data, path = read_config_json(config)
    if "model_type" not in data:
        raise SleepzooError(f"{path or 'config'}: missing required field model_type (one of "
                            f"{', '.join(sorted(MODEL_TYPES))})")
    cls = model_class(data["model_type"])
    return cls.from_config(data if path is None else path, sleep=sleep)


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
                    sleep: SleepConfig | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model of ``folder/config.json`` and load its safetensors weights (single file or sharded).

    Args:
        folder: a local folder with config.json and model.safetensors or model.safetensors.index.json.
        dtype: parameter dtype (torch.dtype or name); default the config's torch_dtype, else float32.
        strict: missing and unexpected tensors are errors (mis-shaped ones always are). With ``strict=False``
            a missing tensor keeps its random initialisation.
        sleep: sleep settings; default the published behaviour (one pass, no eviction within
            max_position_embeddings tokens).
        device: where the weights go (default cpu).

    Returns the model in eval mode.
    """
    folder = Path(folder).expanduser()
    config, config_path = read_config_json(folder)
    if "model_type" not in config:
        raise SleepzooError(f"{config_path}: missing required field model_type (one of "
                            f"{', '.join(sorted(MODEL_TYPES))})")
    cls = model_class(config["model_type"])
    dtype = _resolve_dtype(dtype, config)
    where = weight_files(folder)
    shapes = _shapes(where)
    # Meta first: names and shapes are checked against the headers before a byte of memory is spent.
    with torch.device("meta"):
        model = cls.from_config(config_path, sleep=sleep)
    missing = check_weights(model, shapes, strict=strict, source=f"weights in {str(folder)!r}")
    if missing:
        # Tensors the files do not provide need their initialisation: build for real (strict=False only).
        with torch.device(device):
            model = cls.from_config(config_path, sleep=sleep)
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
    return model.eval()


def _check_no_buffers_left(model: nn.Module, where: dict[str, Path], missing: Sequence[str]) -> None:
    """After ``to_empty``, a non-persistent buffer would hold garbage: a model class must not have one."""
    persistent = set(model.state_dict().keys())
    stray = [n for n, _ in model.named_buffers() if n not in persistent]
    if stray and not missing:
        raise SleepzooError(f"{type(model).__name__} has non-persistent buffers ({_listing(stray)}) that loading "
                            f"from the meta device can not fill; compute them on the fly instead")


def save_pretrained(model: nn.Module, folder: str | Path) -> None:
    """Write ``folder/config.json`` (the model's ``hf_config``, torch_dtype set to its weights' dtype) and
    ``folder/model.safetensors`` (a tied weight once, under its first name: no lm_head key when tied), so that
    :func:`from_pretrained` rebuilds the same model."""
    config = getattr(model, "hf_config", None)
    if not isinstance(config, dict):
        raise SleepzooError(f"{type(model).__name__} has no hf_config (the config it was built from): only models "
                            f"built by sleepzoo.pretrained can be saved this way")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) == 1:
        config["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.")
        config.pop("dtype", None)
    save_weights(model, folder / WEIGHTS_NAME)  # atomic; ties stored once
    tmp = folder / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, folder / CONFIG_NAME)
