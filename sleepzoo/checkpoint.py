"""Checkpoints: model weights, optimizer and scheduler states and every RNG, written atomically.

A training checkpoint is a folder ``<root>/step_XXXXXXX/`` holding

* ``model.safetensors``      the weights (a tied weight is stored once, under its first name);
* ``optimizer.safetensors``  every tensor of every optimizer state, keyed ``<optimizer>/<param>/<name>``;
* ``rng.safetensors``        the torch CPU (and CUDA) generator states;
* ``state.json``             everything else: step, optimizer param groups and non-tensor state, scheduler
                             states, numpy and Python RNG states, and the trainer's own counters;
* ``manifest.json``          written last: the size and sha256 digest of each of the files above.

The folder is written under a hidden temporary name in the same parent, every file and the folder are
fsynced, and only then is it renamed to ``step_XXXXXXX`` (``os.replace`` is atomic within a file system).
A crash mid-write leaves at most a hidden ``.tmp-*`` folder that is never listed and is removed by the next
save, so :func:`latest_checkpoint` only ever returns complete checkpoints.

Loading checks a checkpoint before anything is restored (:func:`read_checkpoint`): every file against its
digest, state.json parsed, every safetensors file read, the weights and optimizer states finite, the RNG
states valid. A checkpoint that fails is :class:`CheckpointDamaged`, so a resume can skip it for an older
one (:func:`newest_intact_checkpoint`). Checkpoints written before manifests existed are checked by all of
that except the digests.

    save_checkpoint(run / "checkpoints", 200, model=m, optimizers=[muon, adamw], schedulers=[s1, s2],
                    trainer_state={"tokens": 1_000_000}, keep=2)
    ckpt = latest_checkpoint(run / "checkpoints")
    trainer_state = load_checkpoint(ckpt, model=m, optimizers=[muon, adamw], schedulers=[s1, s2])
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .registry import SleepzooError

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_MARKER = "state.json"  # a checkpoint folder without it is not one (never listed)
MANIFEST = "manifest.json"  # every other file's size and sha256, written last
_STATE_KEYS = {"step": int, "optimizers": list, "schedulers": list, "rng": dict, "trainer": dict}
_MAX_NAMES = 20  # names listed per category in a load error before "(+N more)"


class CheckpointError(SleepzooError):
    """A checkpoint or weights file is missing, unreadable or does not fit the model."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files are missing, cut short, garbage, differ from their digests or hold
    non-finite values (a resume skips it for an older one)."""


# ---------------------------------------------------------------------------------------------------------
# durable, atomic file system helpers


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes a rename durable; some file systems refuse it, which is harmless here.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _storage_key(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    """Equal for two tensors that are the same memory (a tied weight seen under two names)."""
    if not tensor.numel():  # empty tensors all report data_ptr 0; they alias nothing
        return (id(tensor), 0, ())
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    # safetensors wants contiguous CPU tensors that share no memory with each other; copy only the
    # tensors that would break that, so a large model is not duplicated in memory to be saved.
    flat = {}
    storages: set[int] = set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        if v.numel() and ptr in storages:
            v = v.clone()
        storages.add(v.untyped_storage().data_ptr())
        flat[k] = v
    save_file(flat, str(path), metadata=metadata)
    _fsync_file(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old file or the complete new one."""
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` for text (UTF-8)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """:func:`atomic_write_text` for a JSON document."""
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------------
# model weights


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every tensor that aliases an earlier one (a tied weight) left out."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = _storage_key(tensor)
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


def _alias_groups(model: nn.Module) -> dict[str, set[str]]:
    """State-dict name -> every name of the same tensor (tied weights), itself included. By object identity,
    which also works on the meta device (where every tensor has the same null data pointer)."""
    own = model.state_dict(keep_vars=True)
    by_id: dict[int, set[str]] = {}
    for name, t in own.items():
        by_id.setdefault(id(t), set()).add(name)
    return {name: by_id[id(t)] for name, t in own.items()}


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``model``'s weights to a safetensors file atomically (a tied weight is stored once).

    ``metadata`` (strings only, a safetensors rule) travels in the file's header; see :func:`read_metadata`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        _save_tensors(_unique_state_dict(model), tmp, metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors file's header."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"weights file {str(path)!r} is not a readable safetensors file: {exc}") from None


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMES])
    return shown + (f" (+{len(items) - _MAX_NAMES} more)" if len(items) > _MAX_NAMES else "")


def check_weight_names(model: nn.Module, shapes: dict[str, list[int]], *, source: str, strict: bool = True,
                       noun: str = "file") -> list[str]:
    """Compare stored tensor names and shapes with ``model``'s; raise one CheckpointError naming every problem.

    A model name is satisfied when it or a tied alias of it is stored (a tied head has no key of its own).
    ``strict=False`` allows missing and unexpected names, never mis-shaped ones. Returns the model names
    nothing provides (empty when strict)."""
    own = {n: list(t.shape) for n, t in model.state_dict(keep_vars=True).items()}
    aliases = _alias_groups(model)
    missing = [n for n in own if not (aliases[n] & shapes.keys())]
    unexpected = sorted(n for n in shapes if n not in own)
    misshaped = [f"{n} (file {shapes[n]}, model {own[n]})" for n in shapes if n in own and shapes[n] != own[n]]
    problems = []
    if misshaped:
        problems.append(f"mis-shaped: {_listing(misshaped)}")
    if strict and missing:
        problems.append(f"missing from the {noun}: {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected in the {noun}: {_listing(unexpected)}")
    if problems:
        raise CheckpointError(f"{source} do not fit {type(model).__name__}: " + "; ".join(problems))
    return missing


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Load a safetensors file into ``model`` in place, checking names and shapes first.

    A name the model has but the file lacks is fine when a tied alias of it is in the file. With
    ``strict=True`` missing and unexpected names are errors; mis-shaped ones always are. All problems are
    reported together, by name, in one :class:`CheckpointError`; nothing is loaded when one is raised.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"weights file {str(path)!r} is not a readable safetensors file: {exc}") from None
    _load_tensors(model, saved, source=f"weights {str(path)!r}", strict=strict)


def _load_tensors(model: nn.Module, saved: dict[str, torch.Tensor], *, source: str, strict: bool = True) -> None:
    check_weight_names(model, {n: list(t.shape) for n, t in saved.items()}, source=source, strict=strict,
                       noun="file")
    own = model.state_dict()
    model.load_state_dict({n: t for n, t in saved.items() if n in own}, strict=False)


def _non_finite(tensors: dict[str, torch.Tensor], source: str) -> str | None:
    """What is wrong with ``tensors`` if a floating-point one holds a NaN or an infinity, else None."""
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not bad:
        return None
    return f"{source} holds non-finite values (NaN or inf) in {len(bad)} of {len(tensors)} tensors: {_listing(bad)}"


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointDamaged` naming the floating-point tensors that hold a NaN or an infinity."""
    problem = _non_finite(tensors, source)
    if problem:
        raise CheckpointDamaged(problem)


# ---------------------------------------------------------------------------------------------------------
# RNG states


def capture_rng() -> dict[str, Any]:
    """Every random generator the trainer can touch: torch CPU and CUDA, numpy's global, Python's."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(legacy=True),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": state["torch"]}
    for i, s in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = state["numpy"]
    py_version, py_state, py_gauss = state["python"]
    return tensors, {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [py_version, list(py_state), py_gauss],
    }


def _rng_from_files(tensors: dict[str, torch.Tensor], js: dict[str, Any]) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = js["numpy"]
    py_version, py_state, py_gauss = js["python"]
    state: dict[str, Any] = {
        "torch": tensors["torch"],
        "numpy": (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
        "python": (py_version, tuple(py_state), py_gauss),
    }
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda:
        state["cuda"] = cuda
    return state


# ---------------------------------------------------------------------------------------------------------
# optimizer states


def _optimizer_to_files(optimizers: Sequence[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list]:
    tensors: dict[str, torch.Tensor] = {}
    meta = []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for pid, pstate in sd["state"].items():
            for name, value in pstate.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{i}/{pid}/{name}"] = value
                else:
                    scalars.setdefault(str(pid), {})[name] = value
        meta.append({"type": type(opt).__name__, "param_groups": sd["param_groups"], "scalars": scalars})
    return tensors, meta


def _optimizer_from_files(opt: torch.optim.Optimizer, index: int, tensors: dict[str, torch.Tensor],
                          meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    prefix = f"{index}/"
    for key, value in tensors.items():
        if key.startswith(prefix):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = value
    groups = []
    # JSON turned tuples (betas, ns_coefficients) into lists; give hyperparameters back their own types.
    for saved, current in zip(meta["param_groups"], opt.param_groups):
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) and isinstance(v, list) else v
                       for k, v in saved.items()})
    return {"state": state, "param_groups": groups}


def _check_optimizer_layout(path: Path, index: int, opt: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """The saved state must have the optimizer's parameter groups (count and sizes) and, per parameter, state
    tensors of the parameter's shape; else one CheckpointError (torch would raise a bare ValueError for the
    groups and silently load mis-shaped moments)."""
    name = type(opt).__name__
    have = [len(g["params"]) for g in saved["param_groups"]]
    want = [len(g["params"]) for g in opt.param_groups]
    if have != want:
        raise CheckpointError(
            f"{str(path)!r}: optimizer {index} ({name}) was saved with parameter groups of {have} tensors, the "
            f"run builds groups of {want}: the split of the parameters between the optimizers or their groups "
            f"changed (this sleepzoo gives AdamW a decayed and a not-decayed group and keeps 1-row weights out "
            f"of Muon); resume with the sleepzoo version that wrote the checkpoint, or start the run again")
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, values in saved["state"].items():
        if not 0 <= pid < len(params):
            raise CheckpointError(f"{str(path)!r}: optimizer {index} ({name}) holds state for parameter {pid}, "
                                  f"but it has {len(params)} parameters")
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != params[pid].shape:
                raise CheckpointError(
                    f"{str(path)!r}: optimizer {index} ({name}) state {key} of parameter {pid} has shape "
                    f"{list(value.shape)}, the parameter {list(params[pid].shape)}: the checkpoint's parameter "
                    f"order does not match the run's; resume with the sleepzoo version that wrote it")


# ---------------------------------------------------------------------------------------------------------
# training checkpoints


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary and unmarked folders are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / _MARKER).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def _remove_tree(path: Path) -> None:
    # Rename first so a half-deleted folder never carries a checkpoint's name.
    doomed = path.with_name(f"{_TMP_PREFIX}rm-{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _clean_leftovers(root: Path) -> None:
    """Remove what a crash during an earlier save or removal left behind; such folders are never complete."""
    for child in root.iterdir():
        if child.name.startswith(_TMP_PREFIX):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def save_checkpoint(root: str | Path, step: int, *, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                    schedulers: Sequence[Any], trainer_state: dict[str, Any], keep: int = 0) -> Path:
    """Write a complete checkpoint for ``step`` atomically and keep only the newest ``keep`` (0 keeps all).

    ``trainer_state`` must be JSON-serialisable; the RNG states are captured here, so call this at the point
    the run should continue from.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(root)
    final = root / step_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _save_tensors(_unique_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
        opt_tensors, opt_meta = _optimizer_to_files(optimizers)
        _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        rng_tensors, rng_meta = _rng_to_files(capture_rng())
        _save_tensors(rng_tensors, tmp / "rng.safetensors")
        _write_json(tmp / _MARKER, {
            "format": FORMAT_VERSION,
            "step": step,
            "optimizers": opt_meta,
            "schedulers": [s.state_dict() for s in schedulers],
            "rng": rng_meta,
            "trainer": trainer_state,
            "manifest": True,  # a manifest.json goes with it: one missing later is damage, not an old format
        })
        _write_json(tmp / MANIFEST, {"format": FORMAT_VERSION, "files": {
            f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}})
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a finished run resumed): replace it whole
            _remove_tree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            _remove_tree(old)
    return final


@dataclass
class Checkpoint:
    """A checkpoint read and checked whole (:func:`read_checkpoint`), ready to restore."""

    path: Path
    meta: dict[str, Any]  # state.json
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor] | None  # None when read with weights_only
    rng: dict[str, Any] | None

    @property
    def step(self) -> int:
        return self.meta["step"]


def _damaged(path: Path, what: str) -> CheckpointDamaged:
    return CheckpointDamaged(f"checkpoint {str(path)!r}: {what}")


def _check_digests(path: Path, names: Sequence[str] | None = None) -> None:
    """Every file listed in the manifest (or those of ``names`` it lists) is there, of its size and digest
    (no manifest: nothing to check)."""
    manifest = path / MANIFEST
    if not manifest.exists():
        try:
            expected = json.loads((path / _MARKER).read_text()).get("manifest") is True
        except (OSError, ValueError, AttributeError):
            expected = False  # state.json's own damage is reported when it is read
        if expected:
            raise _damaged(path, f"{MANIFEST} is missing (its {_MARKER} was written with one)")
        return  # written before checkpoints had manifests
    try:
        files = json.loads(manifest.read_text())["files"]
        listed = {str(name): (int(e["bytes"]), str(e["sha256"])) for name, e in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _damaged(path, f"{MANIFEST} is not a valid manifest ({type(exc).__name__}: {exc})") from None
    for name, (size, digest) in listed.items():
        if names is not None and name not in names:
            continue
        file = path / name
        if not file.is_file():
            raise _damaged(path, f"{name} is missing")
        if file.stat().st_size != size:
            raise _damaged(path, f"{name} is {file.stat().st_size:,} bytes, {MANIFEST} says {size:,} (cut short or "
                                 f"overwritten)")
        if _sha256(file) != digest:
            raise _damaged(path, f"{name} does not match its sha256 digest in {MANIFEST} (its bytes changed "
                                 f"after it was written)")


def _read_state(path: Path) -> dict[str, Any]:
    marker = path / _MARKER
    if not marker.is_file():
        raise _damaged(path, f"it is not a complete checkpoint (no {_MARKER})")
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise _damaged(path, f"{_MARKER} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise _damaged(path, f"{_MARKER} holds no checkpoint state (a JSON {type(meta).__name__})")
    if meta["format"] != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint format {meta['format']!r}; "
                              f"this sleepzoo reads format {FORMAT_VERSION}")
    wrong = [k for k, kind in _STATE_KEYS.items() if not isinstance(meta.get(k), kind)]
    if not wrong and not all(isinstance(o, dict) and {"type", "param_groups", "scalars"} <= o.keys()
                             for o in meta["optimizers"]):
        wrong = ["optimizers"]
    if wrong:
        raise _damaged(path, f"{_MARKER} lacks or garbles {', '.join(wrong)}")
    return meta


def _read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    file = path / f"{name}.safetensors"
    if not file.is_file():
        raise _damaged(path, f"{file.name} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise _damaged(path, f"{file.name} is not a readable safetensors file ({exc})") from None


def _read_rng(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The RNG states, each checked on a throwaway generator of its kind (the global ones are not touched)."""
    tensors = _read_tensors(path, "rng")
    try:
        state = _rng_from_files(tensors, meta["rng"])
        torch.Generator().set_state(state["torch"])
        np.random.RandomState().set_state(state["numpy"])
        random.Random().setstate(state["python"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise _damaged(path, f"its RNG states (rng.safetensors, {_MARKER}) do not restore "
                             f"({type(exc).__name__}: {exc})") from None
    return state


def read_checkpoint(path: str | Path, *, weights_only: bool = False) -> Checkpoint:
    """Read a checkpoint and check it whole: digests, state.json, every file readable, weights (and optimizer
    states) finite, RNG states valid. Raises :class:`CheckpointDamaged` (or, for a checkpoint of another
    format, :class:`CheckpointError`). ``weights_only`` reads state.json and the weights alone (evaluation)."""
    path = Path(path)
    _check_digests(path, ("model.safetensors", _MARKER) if weights_only else None)
    meta = _read_state(path)
    model = _read_tensors(path, "model")
    optimizer = None if weights_only else _read_tensors(path, "optimizer")
    for name, tensors in (("model", model), ("optimizer", optimizer or {})):
        problem = _non_finite(tensors, f"{name}.safetensors")
        if problem:
            raise _damaged(path, problem)
    rng = None if weights_only else _read_rng(path, meta)
    return Checkpoint(path, meta, model, optimizer, rng)


def newest_intact_checkpoint(root: str | Path, *, weights_only: bool = False
                             ) -> tuple[Checkpoint | None, list[CheckpointDamaged]]:
    """The newest checkpoint under ``root`` that :func:`read_checkpoint` accepts (None if none does), and
    why each newer one was skipped (newest first)."""
    skipped = []
    for path in reversed(list_checkpoints(root)):
        try:
            return read_checkpoint(path, weights_only=weights_only), skipped
        except CheckpointDamaged as exc:
            skipped.append(exc)
    return None, skipped


def load_checkpoint(path: str | Path | Checkpoint, *, model: nn.Module,
                    optimizers: Sequence[torch.optim.Optimizer] = (), schedulers: Sequence[Any] = (),
                    restore_rng_state: bool = True) -> dict[str, Any]:
    """Restore a checkpoint (a path, or one :func:`read_checkpoint` returned) into the given objects in place;
    return ``{"step": ..., **trainer_state}``. It is checked whole before anything is restored."""
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    if ckpt.optimizer is None:
        raise ValueError("load_checkpoint needs a checkpoint read without weights_only")
    path, meta = ckpt.path, ckpt.meta
    if len(meta["optimizers"]) != len(optimizers) or len(meta["schedulers"]) != len(schedulers):
        raise CheckpointError(
            f"{str(path)!r} holds {len(meta['optimizers'])} optimizer(s) "
            f"({', '.join(str(o['type']) for o in meta['optimizers'])}) and {len(meta['schedulers'])} scheduler(s); "
            f"the run has {len(optimizers)} ({', '.join(type(o).__name__ for o in optimizers)}) "
            f"and {len(schedulers)}")
    opt_states = []
    for i, (opt, opt_meta) in enumerate(zip(optimizers, meta["optimizers"])):
        if opt_meta["type"] != type(opt).__name__:
            raise CheckpointError(f"{str(path)!r}: optimizer {i} is {opt_meta['type']}, the run's is "
                                  f"{type(opt).__name__}")
        opt_states.append(_optimizer_from_files(opt, i, ckpt.optimizer, opt_meta))
        _check_optimizer_layout(path, i, opt, opt_states[-1])  # before anything is loaded
    _load_tensors(model, ckpt.model, source=f"weights {str(path / 'model.safetensors')!r}")
    for opt, saved in zip(optimizers, opt_states):
        opt.load_state_dict(saved)
    for sched, state in zip(schedulers, meta["schedulers"]):
        sched.load_state_dict(state)
    if restore_rng_state:
        restore_rng(ckpt.rng)
    return {"step": meta["step"], **meta["trainer"]}
