"""Persistent memory: a stream's state written to one file and read back in another process (issue 15).

A :class:`~sleepzoo.engine.Stream` holds, between two tokens, everything its model will ever know of the
context it has read: the fast weights, the caches the eviction policy kept, the wake features of the chunk
being filled, and where it stands (tokens seen, tokens in the current chunk, sleeps so far). That is small and
bounded by the window, so it can outlive the process: :func:`save_stream` writes it to one safetensors file
whose header carries the rest as JSON, and :func:`load_stream` rebuilds a stream that continues with exactly
the logits the uninterrupted stream would have produced.

The header also records what the memory is only valid for: a fingerprint of the model (its class, its config
and a digest of every weight) and the sleep settings (window, loops, eviction, sleep_every, the stabilisers).
Loading into anything else is one error naming what differs. Writes are atomic: a reader sees the old file
or the complete new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import registry
from .checkpoint import atomic_write_bytes
from .registry import SleepzooError

FORMAT = "sleepzoo-memory/1"
HEADER_KEY = "sleepzoo_memory"
_HEADER_KEYS = ("model", "settings", "tokens", "filled", "sleeps", "batch", "states", "chunk_start", "feats")


# ----------------------------------------------------------------------------------------------------------------
# what a memory is valid for


def model_fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """The model's class, a digest of its config and a digest of its weights (names, dtypes, shapes, bytes)."""
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    elif hasattr(config, "to_dict"):
        config = config.to_dict()
    config_text = json.dumps(config, sort_keys=True, default=repr)
    weights = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        weights.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            weights.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # the bytes, not a copy
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "config": hashlib.blake2b(config_text.encode(), digest_size=16).hexdigest(),
            "weights": weights.hexdigest()}


def _eviction_name(policy: Any) -> str:
    for name in registry.names("eviction"):
        try:
            if registry.get("eviction", name) is type(policy):
                return name
        except SleepzooError:
            continue
    raise SleepzooError(f"this stream's eviction policy ({type(policy).__name__}) is not a registered eviction "
                        f"plugin, so a saved memory could not name it; build the stream with a registered name "
                        f"({', '.join(registry.names('eviction'))})")


def stream_settings(stream: Any) -> dict[str, Any]:
    """The settings a stream's memory depends on: what :class:`Stream` was built with."""
    policy = stream.policy
    window = policy.window
    settings = {"window": window, "loops": stream.loops, "eviction": _eviction_name(policy),
                "sleep_every": None if policy.chunk == window else policy.chunk,
                **{k: v for k, v in stream.stabilise.items() if k != "tolerance"}}
    if stream.loops == "auto":  # adaptive sleep: its bounds are settings too
        settings.update(max_loops=stream.max_loops, tolerance=stream.tolerance)
    return settings


# ----------------------------------------------------------------------------------------------------------------
# states <-> tensors + a JSON skeleton


class _Packer:
    """Flattens nested states (dicts, lists, tuples, tensors, plain values) into named tensors and a JSON
    skeleton. A K/V buffer (decoding's preallocated cache) is kept as its capacity: on load a new buffer of that
    capacity is made, holding the state's own K/V, so decoding goes on writing in place."""

    def __init__(self, copy: bool = True) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.copy = copy  # False: keep the tensors as they are (sizes only, e.g. of a model on the meta device)

    def pack(self, value: Any, where: str) -> Any:
        from .mixers.attention import KVBuffer

        if isinstance(value, torch.Tensor):
            # a copy on the CPU: no shared storage in the file
            self.tensors[where] = value.detach().to("cpu").contiguous().clone() if self.copy else value
            return {"__tensor__": where}
        if isinstance(value, KVBuffer):
            return {"__kv_buffer__": value.capacity}
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise SleepzooError(f"a stream state at {where} has non-string keys; it can not be saved")
            return {"__dict__": {k: self.pack(v, f"{where}.{k}") for k, v in value.items()}}
        if isinstance(value, (list, tuple)):
            kind = "__list__" if isinstance(value, list) else "__tuple__"
            return {kind: [self.pack(v, f"{where}.{i}") for i, v in enumerate(value)]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise SleepzooError(f"a stream state at {where} holds a {type(value).__name__}, which a memory file can "
                            f"not store (tensors, numbers, strings, lists and dicts only)")


def _unpack(node: Any, tensors: dict[str, torch.Tensor], device: torch.device, source: str) -> Any:
    from .mixers.attention import KVBuffer

    if isinstance(node, dict):
        if "__tensor__" in node:
            name = node["__tensor__"]
            if name not in tensors:
                raise SleepzooError(f"{source}: the memory names a tensor {name!r} the file does not hold; the file "
                                    f"is damaged")
            return tensors[name].to(device)
        if "__list__" in node:
            return [_unpack(v, tensors, device, source) for v in node["__list__"]]
        if "__tuple__" in node:
            return tuple(_unpack(v, tensors, device, source) for v in node["__tuple__"])
        if "__dict__" in node:
            out = {k: _unpack(v, tensors, device, source) for k, v in node["__dict__"].items()}
            capacity = out.get("kv_buffer")
            if isinstance(capacity, dict) and "__kv_buffer__" in capacity:
                out.pop("kv_buffer")
                k, v = out.get("k"), out.get("v")
                if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor):
                    buf = KVBuffer(k, v, max(int(capacity["__kv_buffer__"]), k.shape[2]))
                    out["k"], out["v"] = buf.append(k, v)
                    out["kv_buffer"] = buf
            return out
        if "__kv_buffer__" in node:
            return node
        raise SleepzooError(f"{source}: unexpected entry {sorted(node)} in the memory's states; the file is damaged")
    return node


# ----------------------------------------------------------------------------------------------------------------
# save / load


def _chunk_start_read(stream: Any) -> list:
    """The part of the states at the current chunk's start that a sleep reads: the caches of the looped blocks
    (the context every pass re-reads) and the whole state of the blocks after the loop (their run after sleep
    starts there). The fast weights of the prelude and looped blocks at the chunk's start are never read (the
    passes continue the wake pass's), so they are not saved: for Jet-Nemotron-2B that halves the file."""
    from .engine import block_lists

    prelude, loop, _ = block_lists(stream.model)
    hi = len(prelude) + len(loop)
    out = []
    for i, (mixer, state) in enumerate(zip(stream.mixers, stream.chunk_start)):
        carried = getattr(mixer, "carried_state", ())
        if i < hi and state:
            state = {k: v for k, v in state.items() if k not in carried} or None
        out.append(state)
    return out


def save_stream(stream: Any, path: str | Path) -> Path:
    """Write ``stream``'s memory to ``path`` (one safetensors file, written atomically). Returns the path."""
    path = Path(path)
    packer = _Packer()
    same_start = stream.chunk_start is stream.states
    header = {
        "format": FORMAT,
        "model": model_fingerprint(stream.model),
        "settings": stream_settings(stream),
        "tokens": stream.tokens, "filled": stream.filled, "sleeps": stream.sleeps,
        "passes": {str(n): c for n, c in sorted(stream.pass_counts.items())},  # passes used -> how many
        "states": packer.pack(list(stream.states), "states"),
        "chunk_start": "states" if same_start else packer.pack(_chunk_start_read(stream), "chunk_start"),
        "feats": packer.pack(torch.cat(stream.feats, dim=1), "feats") if stream.feats else None,
    }
    header["batch"] = next((int(t.shape[0]) for t in packer.tensors.values() if t.dim()), None)
    data = st_save(packer.tensors, metadata={HEADER_KEY: json.dumps(header)})
    if not path.parent.is_dir():
        raise SleepzooError(f"memory file {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    atomic_write_bytes(path, data)
    return path


def _bytes_per_kind(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Tensor bytes by kind: ``feats``, ``chunk_start`` and ``states.<entry>`` (fast_weights, k, v, ...)."""
    per_kind: dict[str, int] = {}
    for name, t in tensors.items():
        kind = name.split(".")[0] if not name.startswith("states.") else "states." + name.split(".")[-1]
        per_kind[kind] = per_kind.get(kind, 0) + t.numel() * t.element_size()
    return per_kind


def memory_bytes(stream: Any) -> dict[str, int]:
    """The tensor bytes a memory file of ``stream`` would hold, by kind, without copying anything: works on
    the meta device, so a large model's memory can be sized from its config alone."""
    packer = _Packer(copy=False)
    packer.pack(list(stream.states), "states")
    if stream.chunk_start is not stream.states:
        packer.pack(_chunk_start_read(stream), "chunk_start")
    if stream.feats:
        packer.pack(torch.cat(stream.feats, dim=1), "feats")
    return _bytes_per_kind(packer.tensors)


def read_memory(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The header and the tensors of a memory file; a missing, unreadable or foreign file is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise SleepzooError(f"memory file {str(path)!r} does not exist")
    try:
        raw = path.read_bytes()
        tensors = st_load(raw)
        size = int.from_bytes(raw[:8], "little")  # safetensors: the JSON header's length, then the header
        header = json.loads(json.loads(raw[8:8 + size])["__metadata__"][HEADER_KEY])
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise SleepzooError(f"memory file {str(path)!r} is not a readable sleepzoo memory ({type(exc).__name__}: "
                            f"{str(exc)[:120]}); it is damaged or was not written by Stream.save") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise SleepzooError(f"memory file {str(path)!r} has format {found!r}; this sleepzoo reads {FORMAT!r}")
    missing = [k for k in _HEADER_KEYS if k not in header]
    if missing or not isinstance(header["settings"], dict) or not isinstance(header["model"], dict):
        raise SleepzooError(f"memory file {str(path)!r} lacks {', '.join(missing) or 'valid settings'} in its "
                            f"header; it is damaged")
    return header, tensors


def _differences(saved: dict, current: dict, what: str) -> list[str]:
    return [f"{what}.{k}: saved {saved.get(k)!r}, here {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def load_stream(model: torch.nn.Module, path: str | Path, **settings: Any) -> Any:
    """A :class:`~sleepzoo.engine.Stream` of ``model`` in the state saved at ``path``.

    The stream's settings come from the file; any given in ``settings`` (window, loops, eviction, sleep_every,
    gate, pass_norm, coda) must equal the saved ones. A file saved from another model class, config or weights,
    or with other settings, is one error naming every difference."""
    from .engine import Stream

    header, tensors = read_memory(path)
    source = str(path)
    saved_settings = header.get("settings", {})
    unknown = sorted(set(settings) - set(saved_settings))
    if unknown:
        raise SleepzooError(f"Stream.load: unknown setting(s) {', '.join(unknown)}; a memory records "
                            f"{', '.join(sorted(saved_settings))}")
    problems = _differences(header.get("model", {}), model_fingerprint(model), "model")
    problems += [f"settings.{k}: saved {saved_settings[k]!r}, asked for {v!r}" for k, v in settings.items()
                 if saved_settings[k] != v]
    if problems:
        raise SleepzooError(f"memory file {source!r} does not fit this stream: {'; '.join(problems)}")
    stream = Stream(model, **saved_settings)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    states = _unpack(header["states"], tensors, device, source)
    if not isinstance(states, list) or len(states) != len(stream.states):
        raise SleepzooError(f"memory file {source!r} holds {len(states) if isinstance(states, list) else '?'} "
                            f"layer states, the model has {len(stream.states)}; the file is damaged")
    stream.states = states
    stream.chunk_start = states if header["chunk_start"] == "states" else _unpack(header["chunk_start"], tensors,
                                                                                   device, source)
    feats = header.get("feats")
    stream.feats = [] if feats is None else [_unpack(feats, tensors, device, source)]
    stream.tokens, stream.filled, stream.sleeps = int(header["tokens"]), int(header["filled"]), int(header["sleeps"])
    stream.pass_counts = _pass_counts(header.get("passes"))
    stream.batch = header["batch"]
    return stream


def _pass_counts(saved: Any) -> dict[int, int]:
    """The histogram of passes a header holds (absent in files written before adaptive sleep: empty)."""
    if not isinstance(saved, dict):
        return {}
    try:
        return {int(n): int(c) for n, c in saved.items()}
    except (TypeError, ValueError):
        return {}


def describe(path: str | Path) -> dict[str, Any]:
    """What a memory file holds, for ``sleepzoo memory show``: settings, position, model and tensor bytes."""
    from .engine import summary_of_counts

    header, tensors = read_memory(path)
    return {"file": str(path), "file_bytes": Path(path).stat().st_size, "settings": header["settings"],
            "tokens": header["tokens"], "filled": header["filled"], "sleeps": header["sleeps"],
            "passes": summary_of_counts(_pass_counts(header.get("passes"))), "batch": header.get("batch"),
            "model": header["model"], "tensor_bytes": _bytes_per_kind(tensors)}
