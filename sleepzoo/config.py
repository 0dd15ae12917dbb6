"""Recipes: YAML files that say which model, sleep schedule, task, training and evaluation to run.

A recipe has five sections, each a dataclass below. Plugin-specific settings (a mixer's heads, a task's
options) are free-form mappings that are checked against the plugin's constructor signature, so a typo
fails at ``sleepzoo recipe validate`` time with the file, the field, the value and the allowed names,
before any compute is spent.

    recipe = load_recipe("recipes/rule110-tiny.yaml", overrides=["sleep.loops=2", "train.steps=50"])

Override values are parsed as YAML (``model.layers=[attention,attention]`` gives a list).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .registry import SleepzooError


class RecipeError(SleepzooError, ValueError):
    """A recipe is malformed: the message names the file, the field, the value and what is allowed."""


@dataclass
class ModelConfig:
    """``model:`` section. Every field is passed to the model builder registered as ``name``."""

    name: str = "hybrid"
    d_model: int = 256
    layers: list[str] = field(default_factory=lambda: ["attention", "gated_deltanet", "attention", "gated_deltanet"])
    d_ff: int | None = None  # None: SwiGLU width 8/3 * d_model rounded up to a multiple of 64
    vocab_size: int | None = None  # None: taken from the task
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    # Blocks [loop_start, loop_end) are looped during sleep; blocks before run once per chunk (prelude),
    # blocks after run once after the loops (coda). None, None loops every block (the small hybrids).
    loop_start: int | None = None
    loop_end: int | None = None
    # Per-mixer-name keyword arguments, e.g. {"attention": {"num_heads": 4}, "gated_deltanet": {...}}.
    mixers: dict[str, dict] = field(default_factory=dict)


@dataclass
class SleepConfig:
    """``sleep:`` section: how a sequence is cut into windows and consolidated."""

    window: int = 24  # L: tokens per window; the attention cache never holds more
    loops: int = 1  # N: passes over a window before it is evicted (1 = the plain hybrid)
    eviction: str = "full_flush"  # what survives a sleep (kind `eviction`): full_flush, sliding_window
    sleep_every: int | None = None  # sliding_window: new tokens between sleeps (default: the window)
    checkpoint: bool = False  # activation checkpointing per window (recompute in backward)


@dataclass
class TaskConfig:
    """``task:`` section: ``name`` picks the task plugin, every other key goes to its constructor."""

    name: str = "rule110"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """``train:`` section. Muon for 2-D hidden weights, AdamW for the rest (SPEC 4)."""

    steps: int = 1000
    batch_size: int = 64
    seed: int = 0  # model init and data order; data for step i depends on (seed, i) only
    optimizer: str = "muon"  # "muon" (Muon + AdamW) or "adamw" (AdamW for everything)
    muon_lr: float = 2e-3
    adamw_lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # warmup-stable-decay: the last fraction of steps decays linearly to 0
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    device: str = "cpu"
    threads: int | None = None  # torch.set_num_threads; None leaves torch's default


@dataclass
class EvalConfig:
    """``eval:`` section: periodic and final evaluation on the task's held-out split."""

    every: int = 200  # steps between evaluations; 0 evaluates only at the end
    num_examples: int = 512
    batch_size: int = 256
    seed: int = 1234


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    sleep: SleepConfig = field(default_factory=SleepConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: str = field(default="<dict>", compare=False)  # where it came from, for error messages

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "source":
                continue
            section = dataclasses.asdict(getattr(self, f.name))
            if f.name == "task":
                section = {"name": section["name"], **section["options"]}
            out[f.name] = section
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "sleep": SleepConfig,
    "task": TaskConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


# --------------------------------------------------------------------------------------------------------------
# type checking of YAML values


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int->float, '1e-4'->float)."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return coerce(value, arm, where)
            except RecipeError as exc:
                errors.append(exc)
        raise RecipeError(f"{where}: {value!r} is not a {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise RecipeError(f"{where}: expected null, got {value!r}")
    if origin in (list, Sequence, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list ({_type_name(tp)}), got {type(value).__name__} {value!r}")
        (arm,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(v, arm, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    return value


def _unknown_key(where: str, key: str, allowed: Sequence[str]) -> RecipeError:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return RecipeError(f"{where}.{key}: unknown key{hint}; allowed keys: {', '.join(allowed)}")


def check_kwargs(fn: Any, kwargs: dict, where: str, skip: Sequence[str] = ()) -> dict:
    """Check ``kwargs`` against ``fn``'s signature (names and annotated types); return them coerced."""
    sig = inspect.signature(fn)
    params = {n: p for n, p in sig.parameters.items()
              if n not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"}
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # unresolvable annotations in a plugin: check names only
        hints = {}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    out = {}
    for key, value in kwargs.items():
        if key not in params:
            if takes_any:
                out[key] = value
                continue
            raise _unknown_key(where, key, list(params))
        out[key] = coerce(value, hints.get(key, Any), f"{where}.{key}")
    return out


def _build_section(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of settings, got {type(data).__name__} {data!r}")
    if cls is TaskConfig:
        data = dict(data)
        name = data.pop("name", TaskConfig.name)
        return TaskConfig(name=coerce(name, str, f"{where}.name"), options=data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(where, key, names)
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def _check_values(r: Recipe, where: str) -> None:
    def need(cond: bool, field_: str, value: Any, allowed: str) -> None:
        if not cond:
            raise RecipeError(f"{where}: {field_}: {value!r} is not allowed; {allowed}")

    need(r.sleep.window >= 1, "sleep.window", r.sleep.window, "the window must be >= 1 token")
    need(r.sleep.sleep_every is None or 1 <= r.sleep.sleep_every <= r.sleep.window, "sleep.sleep_every",
         r.sleep.sleep_every, f"must be in [1, sleep.window = {r.sleep.window}] (null: sleep every window)")
    need(r.sleep.sleep_every in (None, r.sleep.window) or r.sleep.eviction != "full_flush", "sleep.sleep_every",
         r.sleep.sleep_every, "full_flush sleeps on whole windows; use eviction: sliding_window to sleep more often")
    need(r.sleep.loops >= 1, "sleep.loops", r.sleep.loops, "loops must be >= 1 (1 = no sleep, the plain hybrid)")
    need(r.model.d_model >= 1, "model.d_model", r.model.d_model, "must be >= 1")
    need(len(r.model.layers) >= 1, "model.layers", r.model.layers, "give at least one mixer name")
    need(r.train.steps >= 0, "train.steps", r.train.steps, "must be >= 0")
    need(r.train.batch_size >= 1, "train.batch_size", r.train.batch_size, "must be >= 1")
    need(r.train.optimizer in ("muon", "adamw"), "train.optimizer", r.train.optimizer, "allowed: muon, adamw")
    need(0.0 <= r.train.decay_fraction <= 1.0, "train.decay_fraction", r.train.decay_fraction, "must be in [0, 1]")
    need(len(r.train.betas) == 2, "train.betas", r.train.betas, "give two numbers, e.g. [0.9, 0.95]")
    need(r.train.warmup_steps >= 0, "train.warmup_steps", r.train.warmup_steps, "must be >= 0")
    need(r.train.log_every >= 1, "train.log_every", r.train.log_every, "must be >= 1")
    need(r.train.checkpoint_every >= 0, "train.checkpoint_every", r.train.checkpoint_every,
         "must be >= 0 (0 = only at the end)")
    need(r.train.keep_checkpoints >= 0, "train.keep_checkpoints", r.train.keep_checkpoints, "must be >= 0 (0 = keep all)")
    need(r.train.grad_clip >= 0, "train.grad_clip", r.train.grad_clip, "must be >= 0 (0 = no clipping)")
    need(r.eval.batch_size >= 1, "eval.batch_size", r.eval.batch_size, "must be >= 1")
    need(r.eval.every >= 0, "eval.every", r.eval.every, "must be >= 0 (0 = only at the end)")
    need(r.eval.num_examples >= 1, "eval.num_examples", r.eval.num_examples, "must be >= 1")
    n = len(r.model.layers)
    lo = 0 if r.model.loop_start is None else r.model.loop_start
    hi = n if r.model.loop_end is None else r.model.loop_end
    need(0 <= lo < hi <= n, "model.loop_start/loop_end", [r.model.loop_start, r.model.loop_end],
         f"need 0 <= loop_start < loop_end <= {n} (the number of layers)")


def recipe_from_dict(data: Any, source: str = "<dict>") -> Recipe:
    """Validate a parsed recipe mapping (sections and their fields, types and ranges)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping with sections {', '.join(SECTIONS)}")
    sections = {}
    for key, value in data.items():
        if key not in SECTIONS:
            close = difflib.get_close_matches(str(key), list(SECTIONS), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{source}: {key}: unknown section{hint}; allowed sections: {', '.join(SECTIONS)}")
        sections[key] = _build_section(SECTIONS[key], value, f"{source}: {key}")
    recipe = Recipe(**sections, source=source)
    _check_values(recipe, source)
    return recipe


def apply_overrides(data: dict, overrides: Sequence[str], source: str) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested mapping, returning a copy."""
    data = copy.deepcopy(data) if data else {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"{source}: override {item!r}: expected key.path=value, e.g. sleep.loops=2")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise RecipeError(f"{source}: override {item!r}: empty key path")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise RecipeError(f"{source}: override {item!r}: value is not valid YAML ({exc.problem})") from None
        node = data
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(f"{source}: override {item!r}: {'.'.join(keys[:i + 1])} is {nxt!r}, not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def load_recipe(path: str | Path | dict, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe. ``path`` may also be an already parsed mapping."""
    if isinstance(path, dict):
        source, data = "<dict>", path
    else:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise RecipeError(f"recipe {source!r} does not exist (recipes ship in the repository's recipes/ folder)")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise RecipeError(f"{source}: not valid YAML: {exc}") from None
    data = apply_overrides(data or {}, overrides, source)
    return recipe_from_dict(data, source)
