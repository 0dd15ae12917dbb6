"""Recipes: YAML files that say which model, sleep schedule, task, training and evaluation to run.

A recipe has five sections, each a dataclass below, and optionally a list of training ``stages``.
Plugin-specific settings (a mixer's heads, a task's options) are free-form mappings that are checked against
the plugin's constructor signature, so a typo fails at ``sleepzoo recipe validate`` time with the file, the
field, the value and the allowed names, before any compute is spent.

    recipe = load_recipe("recipes/rule110-tiny.yaml", overrides=["sleep.loops=2", "train.steps=50"])

Override values are parsed as YAML (``model.layers=[attention,attention]`` gives a list). A list element is
addressed by its index or, for stages, by its name: ``stages.warmup.steps=20``, ``stages.1.sleep.loops=2``.

Stages (SPEC 1, sliding-window variant: warm up the SSM layers first, then train everything)::

    stages:
      - name: warmup
        steps: 100
        sleep: {eviction: full_flush}                 # overrides of the top-level sleep section
        train: {trainable: ["mixer:gated_deltanet"]}  # overrides of the top-level train section
      - name: main
        steps: 200

A stage's ``sleep`` and ``train`` override the top-level sections (not the previous stage's), so a
top-level override such as ``sleep.loops=2`` reaches every stage that does not set loops itself. Stages
may not change the model or the task, nor the run-wide train settings (:data:`RUN_WIDE_TRAIN`). With
stages, ``train.steps`` is their total: leave it out, or give exactly that number.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from . import rules
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
    # Pretrained architectures (jet_nemotron, ouro): a local folder with config.json + *.safetensors, or a
    # config (dict or config.json path) for random weights. The hybrid fields above do not apply to them.
    pretrained: str | None = None
    hf_config: dict[str, Any] | str | None = None
    # Ouro only (docs/pretrained.md): loop steps of the wake pass (None: the config's total_ut_steps, 4 for
    # Ouro-1.4B; the sleep recipes use 1, the paper's single prediction pass), and the loop-body layers after
    # which an MLP-free Jet layer is inserted (model.sleep_layers.{j}; None: 3, 7, ..., i.e. 3 7 11 15 19 23 for
    # a pretrained Ouro-1.4B and none from scratch; [] inserts none). model.mixers.jet sizes the inserted layers.
    wake_passes: int | None = None
    sleep_layers: list[int] | None = None


@dataclass
class SleepConfig:
    """``sleep:`` section: how a sequence is cut into windows and consolidated."""

    window: int = 24  # L: tokens per window; the attention cache never holds more
    loops: int | str = 1  # N: passes over a window before it is evicted (1 = the plain hybrid); "auto": adaptive
    max_loops: int | None = None  # loops: auto: the most passes a window may take (null: 8)
    tolerance: float | None = None  # loops: auto: a sequence stops when its fast weights change less (null: 0.01)
    eviction: str = "full_flush"  # what survives a sleep (kind `eviction`): full_flush, sliding_window
    sleep_every: int | None = None  # sliding_window: new tokens between sleeps (default: the window)
    checkpoint: bool = False  # activation checkpointing per pass over a window (recompute in backward)
    # Stabilisers of sleep (the paper's future work; see sleepzoo.engine.consolidate):
    gate: bool = False  # carry S_wake + g (S_sleep - S_wake), g a learned scalar per looped layer, from 0
    pass_norm: bool = False  # the model's final norm on the features between passes (as Ouro between loops)
    truncate: int | None = None  # fast weights are detached after every K-th window (null: full BPTT)
    # The blocks after the loop: "sleep" (SPEC 1) runs them once more over the last sleep pass's features and
    # keeps their fast weights from there; "wake" keeps the wake pass's (the coda never sees sleep: ablation)
    coda: str = "sleep"


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
    # Rows per forward/backward on each process (gradient accumulation); null: the whole (per-process) batch.
    # A step still updates on all batch_size rows: same loss, gradients and weights, to float rounding.
    micro_batch_size: int | None = None
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
    # Parameters to train, as fnmatch globs over parameter names ("model.layers.1.*") or "mixer:NAME" (every
    # parameter of every layer whose mixer is NAME, e.g. mixer:gated_deltanet). None trains everything;
    # the rest are frozen (requires_grad False) and left out of the optimizers.
    trainable: list[str] | None = None
    # Under torchrun (see sleepzoo.distributed): "ddp" replicates the model on every process, "fsdp" shards
    # parameters, gradients and optimizer states over them (FSDP2, for models too large to replicate).
    # batch_size stays the global batch either way. A single process ignores it.
    parallel: str = "ddp"
    # Mixed precision of the training forward pass: "none" (float32), "bf16" (torch.autocast to bfloat16,
    # CPU or CUDA) or "fp16" (float16 autocast with a GradScaler, CUDA only). The loss stays float32.
    autocast: str = "none"
    # Where metrics go (see sleepzoo.loggers): metrics.jsonl always (the source of truth for resume and
    # compare, so "jsonl" is implied), plus "tensorboard" (RUN_DIR/tensorboard/) and "wandb" (RUN_DIR/wandb/,
    # offline without an API key or a network), each an optional package. Rank 0 logs.
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    wandb_project: str | None = None  # the W&B project; null: $WANDB_PROJECT, else "sleepzoo"


@dataclass
class EvalConfig:
    """``eval:`` section: periodic and final evaluation on the task's held-out split."""

    every: int = 200  # steps between evaluations; 0 evaluates only at the end
    num_examples: int = 512
    batch_size: int = 256
    seed: int = 1234


@dataclass
class StageConfig:
    """One entry of ``stages:``: ``steps`` updates with its own optimizers and warmup-stable-decay schedule.

    ``sleep`` and ``train`` hold only the settings the stage changes (validated, typed); the stage's full
    settings are :meth:`Recipe.stage_recipes`.
    """

    name: str
    steps: int
    sleep: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "steps": self.steps}
        if self.sleep:
            out["sleep"] = copy.deepcopy(self.sleep)
        if self.train:
            out["train"] = copy.deepcopy(self.train)
        return out


# Train settings that belong to the run, not to a stage: the data order and model init (seed), the step
# count (a stage has its own), and bookkeeping that indexes global steps.
RUN_WIDE_TRAIN = ("steps", "seed", "log_every", "checkpoint_every", "keep_checkpoints", "device", "threads",
                  "parallel", "autocast", "loggers", "wandb_project")
STAGE_KEYS = ("name", "steps", "sleep", "train")
PARALLEL = ("ddp", "fsdp")  # train.parallel
AUTOCAST = ("none", "bf16", "fp16")  # train.autocast
LOGGERS = ("jsonl", "tensorboard", "wandb")  # train.loggers


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    sleep: SleepConfig = field(default_factory=SleepConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stages: list[StageConfig] = field(default_factory=list)  # empty: one implicit stage of train.steps
    source: str = field(default="<dict>", compare=False)  # where it came from, for error messages

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("source", "stages"):
                continue
            section = dataclasses.asdict(getattr(self, f.name))
            if f.name == "task":
                section = {"name": section["name"], **section["options"]}
            if f.name == "train" and section["trainable"] is None:
                del section["trainable"]  # recipes that do not freeze anything read as they always have
            out[f.name] = section
        if self.stages:
            out["stages"] = [stage.to_dict() for stage in self.stages]
        return out

    def stage_recipes(self) -> list[tuple[str | None, "Recipe"]]:
        """``[(stage name, the recipe that stage trains with)]``; ``[(None, self)]`` without stages.

        A stage's recipe is this one with the stage's sleep and train settings applied, ``train.steps`` set
        to the stage's steps, and no stages of its own.
        """
        if not self.stages:
            return [(None, self)]
        return [(stage.name, _resolve_stage(self, stage)) for stage in self.stages]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "sleep": SleepConfig,
    "task": TaskConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}
TOP_LEVEL = (*SECTIONS, "stages")


def _resolve_stage(recipe: Recipe, stage: StageConfig) -> Recipe:
    own = copy.deepcopy(stage.sleep)
    if "loops" in own:  # the bounds of a top-level loops: auto go with it (rules.merge_schedule)
        schedule = rules.merge_schedule(recipe.sleep, own["loops"], own.get("max_loops"), own.get("tolerance"))
        own.update(zip(("loops", "max_loops", "tolerance"), schedule))
    sleep = dataclasses.replace(recipe.sleep, **own)
    train = dataclasses.replace(recipe.train, **{**copy.deepcopy(stage.train), "steps": stage.steps})
    return dataclasses.replace(recipe, sleep=sleep, train=train, stages=[])


# --------------------------------------------------------------------------------------------------------------
# type checking of YAML values


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


_DESCRIBED = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
              bool: ("true or false", "booleans"), type(None): ("null", "nulls")}


def _describe(tp: Any) -> str:
    """``int`` -> 'an integer', ``list[int]`` -> 'a list of integers': for error lines."""
    if tp in _DESCRIBED:
        return _DESCRIBED[tp][0]
    if typing.get_origin(tp) is list:
        (arm,) = typing.get_args(tp)[:1] or (Any,)
        return f"a list of {_DESCRIBED[arm][1]}" if arm in _DESCRIBED else "a list"
    return _type_name(tp)


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 400-digit integer in an error line helps no one)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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
        expected = " or ".join(_describe(arm) for arm in typing.get_args(tp))
        raise RecipeError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise RecipeError(f"{where}: expected null, got {value!r}")
    if origin in (list, Sequence, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list ({_type_name(tp)}), got {type(value).__name__} {value!r}")
        (arm,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(v, arm, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {coerce(k, key_tp, f"{where} key {k!r}"): coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        # PyYAML reads 1e-4 (no dot) as a string; an integer too large for a float overflows
        number = math.nan
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except ValueError:
                raise RecipeError(f"{where}: expected a number, got {type(value).__name__} {value!r}") from None
            except OverflowError:
                pass
        else:
            raise RecipeError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(number):
            raise RecipeError(f"{where}: {_short(value)} is not allowed; expected a finite number")
        return number
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


def _section_settings(cls: type, data: Any, where: str) -> dict[str, Any]:
    """The settings of a section mapping, names checked against ``cls``'s fields and values typed."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of settings, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(where, key, names)
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}")
    return kwargs


def _build_section(cls: type, data: Any, where: str) -> Any:
    if cls is TaskConfig:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a mapping of settings, got {type(data).__name__} {data!r}")
        data = dict(data)
        name = data.pop("name", TaskConfig.name)
        return TaskConfig(name=coerce(name, str, f"{where}.name"), options=data)
    return cls(**_section_settings(cls, data, where))


def _build_stages(data: Any, source: str) -> list[StageConfig]:
    """Check the ``stages:`` list: keys, types, unique names; ranges are checked on each stage's recipe."""
    if not isinstance(data, list) or not data:
        raise RecipeError(f"{source}: stages: expected a non-empty list of stages, each "
                          f"{{name: ..., steps: ..., sleep: {{...}}, train: {{...}}}}, got {data!r} "
                          f"(leave stages out to train in one stage)")
    stages: list[StageConfig] = []
    for i, item in enumerate(data):
        where = f"{source}: stages[{i}]"
        if not isinstance(item, dict):
            raise RecipeError(f"{where}: expected a mapping with keys {', '.join(STAGE_KEYS)}, "
                              f"got {type(item).__name__} {item!r}")
        for key in item:
            if key in ("model", "task"):
                raise RecipeError(f"{where}.{key}: a stage may not change the model or the task (the weights "
                                  f"and the data carry over from stage to stage); a stage sets only "
                                  f"{', '.join(STAGE_KEYS)}")
            if key not in STAGE_KEYS:
                raise _unknown_key(where, str(key), STAGE_KEYS)
        for key in ("name", "steps"):
            if key not in item:
                raise RecipeError(f"{where}: {key} is missing; every stage needs a name and a number of steps")
        name = coerce(item["name"], str, f"{where}.name")
        if not name.strip():
            raise RecipeError(f"{where}.name: {name!r} is not allowed; give the stage a name")
        where = f"{source}: stages[{i}] ({name})"
        if name in [s.name for s in stages]:
            raise RecipeError(f"{where}.name: {name!r} is the name of an earlier stage; stage names must differ")
        steps = coerce(item["steps"], int, f"{where}.steps")
        if steps < 1:
            raise RecipeError(f"{where}.steps: {steps!r} is not allowed; a stage must train for >= 1 step")
        sleep = _section_settings(SleepConfig, item.get("sleep"), f"{where}.sleep")
        train = _section_settings(TrainConfig, item.get("train"), f"{where}.train")
        for key in train:
            if key in RUN_WIDE_TRAIN:
                why = ("a stage's length is its own steps" if key == "steps" else
                       "it is a run-wide setting; set it in the top-level train section")
                allowed = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RUN_WIDE_TRAIN]
                raise RecipeError(f"{where}.train.{key}: a stage may not set it: {why}. A stage's train may "
                                  f"set {', '.join(allowed)}")
        stages.append(StageConfig(name=name, steps=steps, sleep=sleep, train=train))
    return stages


@dataclass(frozen=True)
class Bound:
    """The values a numeric setting allows: ``low <= x <= high`` (``<`` at an open end), ``None`` unbounded."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    note: str = ""  # what the value means, or what a special value does

    def allows(self, x: float) -> bool:
        return ((self.low is None or x > self.low or (x == self.low and not self.open_low))
                and (self.high is None or x < self.high or (x == self.high and not self.open_high)))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            text = (f"must be in {'(' if self.open_low else '['}{self.low}, {self.high}"
                    f"{')' if self.open_high else ']'}")
        elif self.low is not None:
            text = f"must be {'>' if self.open_low else '>='} {self.low}"
        else:
            text = f"must be {'<' if self.open_high else '<='} {self.high}"
        return f"{text} ({self.note})" if self.note else text


SEED = Bound(0, 2**64 - 1, note="torch takes seeds of at most 64 bits")

# The range of every numeric setting of the sections (a list's bound holds for each element). A test checks
# that every int and float field has one, so a new field cannot go unchecked. Relations between settings
# (sleep_every <= window, loop_start < loop_end, ...) are checked in _check_values.
BOUNDS: dict[str, Bound] = {
    "model.d_model": Bound(1),
    "model.d_ff": Bound(0, note="the MLP width; 0: no MLP; null: 8/3 d_model rounded up to a multiple of 64"),
    "model.vocab_size": Bound(1, note="null: the task's vocabulary"),
    "model.norm_eps": Bound(0, open_low=True, note="the RMSNorm epsilon, e.g. 1e-6"),
    "model.init_std": Bound(0, open_low=True, note="the standard deviation of the initial weights, e.g. 0.02"),
    "model.loop_start": Bound(0),
    "model.loop_end": Bound(1),
    "model.wake_passes": Bound(1, note="loop steps of the wake pass; null: the config's total_ut_steps"),
    "model.sleep_layers": Bound(0, note="loop-body layer indices"),
    "sleep.window": Bound(1, note="tokens per window"),
    "sleep.loops": Bound(1, note="passes over a window; 1 = no sleep, the plain hybrid; or auto"),
    "sleep.max_loops": Bound(1, note="loops: auto: the most passes over a window"),
    "sleep.tolerance": Bound(0, note="loops: auto: the relative change of the fast weights under which a "
                                     "sequence stops sleeping; 0: never stop"),
    "sleep.sleep_every": Bound(1, note="new tokens between sleeps; null: sleep every window"),
    "sleep.truncate": Bound(1, note="windows after which fast weights pass no gradient; null: full BPTT"),
    "train.steps": Bound(0),
    "train.batch_size": Bound(1),
    "train.micro_batch_size": Bound(1, note="rows per forward, for gradient accumulation; null: the whole batch"),
    "train.seed": SEED,
    "train.muon_lr": Bound(0, note="a learning rate"),
    "train.adamw_lr": Bound(0, note="a learning rate"),
    "train.betas": Bound(0, 1, open_high=True, note="Adam's beta1 and beta2, e.g. [0.9, 0.95]"),
    "train.weight_decay": Bound(0),
    "train.grad_clip": Bound(0, note="0 = no clipping"),
    "train.warmup_steps": Bound(0),
    "train.decay_fraction": Bound(0, 1),
    "train.log_every": Bound(1),
    "train.checkpoint_every": Bound(0, note="0 = only at the end"),
    "train.keep_checkpoints": Bound(0, note="0 = keep all"),
    "train.threads": Bound(1, note="torch's CPU threads; null: torch's default"),
    "eval.every": Bound(0, note="0 = only at the end"),
    "eval.num_examples": Bound(1),
    "eval.batch_size": Bound(1),
    "eval.seed": SEED,
}


# Options that sleepzoo's mixers share by name (``model.mixers.<mixer>.<option>``) and the values they allow;
# the mixers themselves check how options relate (heads that divide, an even head_dim, ...).
MIXER_OPTION_BOUNDS: dict[str, Bound] = {
    **{name: Bound(1) for name in ("num_heads", "num_kv_heads", "head_dim", "conv_size", "chunk_size", "state_size",
                                   "num_groups", "dconv_generator_reduction")},
    "window": Bound(1, note="null: no sliding window"),
    "rope_theta": Bound(0, open_low=True, note="the RoPE base, e.g. 10000"),
    "norm_eps": Bound(0, open_low=True, note="the norm's epsilon, e.g. 1e-5"),
    "expand_v": Bound(0, open_low=True),
    "expand": Bound(0, open_low=True),
}


def check_mixer_options(cls: Any, options: Any, where: str) -> dict:
    """``model.mixers.<name>`` for the mixer class ``cls``: a mapping of its constructor's arguments (``d_model``
    and ``layer_idx`` come from the model), typed, within :data:`MIXER_OPTION_BOUNDS`; returned coerced."""
    if not isinstance(options, dict):
        raise RecipeError(f"{where}: expected a mapping of settings, got {type(options).__name__} {_short(options)}")
    kwargs = check_kwargs(cls, options, where, skip=("d_model", "layer_idx"))
    for key, value in kwargs.items():
        bound = MIXER_OPTION_BOUNDS.get(key)
        if bound is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and not bound.allows(value):
            raise RecipeError(f"{where}.{key}: {_short(value)} is not allowed; {bound}")
    return kwargs


# Fields of the model section that every builder receives in its own way: ``name`` chooses the builder, and
# ``vocab_size`` (the recipe's, else the task's) reaches it as its ``vocab_size`` argument.
MODEL_WIDE = ("name", "vocab_size")
BUILDER_ARGS = ("vocab_size", "sleep")  # what sleepzoo.build passes to every model builder besides the fields


def takes_section(builder: Any) -> bool:
    """Whether a model builder takes the model section whole, as its one positional argument
    (``builder(config, *, vocab_size, sleep)``: a plugin's builder may), rather than field by field."""
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               for p in inspect.signature(builder).parameters.values())


def builder_fields(builder: Any) -> list[str]:
    """The ModelConfig fields a model builder takes: its keyword-only parameters, less :data:`BUILDER_ARGS`
    (every field when it takes ``**kwargs`` or the section whole)."""
    params = inspect.signature(builder).parameters.values()
    if takes_section(builder) or any(p.kind == p.VAR_KEYWORD for p in params):
        return [f.name for f in dataclasses.fields(ModelConfig) if f.name not in MODEL_WIDE]
    return [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.name not in BUILDER_ARGS]


def check_model_options(builder: Any, config: ModelConfig, where: str) -> dict[str, Any]:
    """The model section's fields as ``builder``'s keyword arguments (:func:`builder_fields`). A field the
    builder does not take must keep its default (a recipe written out in full holds every field): one set to
    anything else is an error naming the field, the model and the fields that model takes."""
    takes = builder_fields(builder)
    default = ModelConfig()
    for f in dataclasses.fields(ModelConfig):
        value = getattr(config, f.name)
        if f.name not in MODEL_WIDE and f.name not in takes and value != getattr(default, f.name):
            raise RecipeError(f"{where}: model.{f.name}: {_short(value)} is not allowed; model {config.name!r} does "
                              f"not take {f.name} (it takes {', '.join(takes)}, and vocab_size); remove it")
    return {name: getattr(config, name) for name in takes if hasattr(config, name)}


def check_bounds(section: str, settings: Any, where: str) -> None:
    """Every numeric field of ``settings`` (a section's dataclass) within its :data:`BOUNDS` entry."""
    for f in dataclasses.fields(settings):
        bound = BOUNDS.get(f"{section}.{f.name}")
        value = getattr(settings, f.name)
        if bound is None or value is None or isinstance(value, str):  # a word (loops: auto): checked by its rule
            continue
        for i, x in enumerate(value) if isinstance(value, list) else [(None, value)]:
            if not bound.allows(x):
                name = f"{section}.{f.name}" + ("" if i is None else f"[{i}]")
                raise RecipeError(f"{where}: {name}: {_short(x)} is not allowed; {bound}")


def _is_device(name: str) -> bool:
    """Whether torch reads ``name`` as a device (whether this machine has it is the trainer's to check)."""
    import torch

    try:
        torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def _check_values(r: Recipe, where: str) -> None:
    def need(cond: bool, field_: str, value: Any, allowed: str) -> None:
        if not cond:
            raise RecipeError(f"{where}: {field_}: {value!r} is not allowed; {allowed}")

    for section in SECTIONS:
        if section != "task":
            check_bounds(section, getattr(r, section), where)
    _check_rule(lambda: rules.check_sleep_every(r.sleep.window, r.sleep.sleep_every, r.sleep.eviction),
                "sleep", where)
    _check_rule(lambda: rules.check_schedule(r.sleep.loops, r.sleep.max_loops, r.sleep.tolerance), "sleep", where)
    need(r.sleep.coda in ("sleep", "wake"), "sleep.coda", r.sleep.coda,
         "choose sleep (the coda runs after the last sleep pass, SPEC 1) or wake (it sees only the wake pass)")
    need(len(r.model.layers) >= 1, "model.layers", r.model.layers, "give at least one mixer name")
    need(r.train.optimizer in ("muon", "adamw"), "train.optimizer", r.train.optimizer, "allowed: muon, adamw")
    need(_is_device(r.train.device), "train.device", r.train.device, "give a torch device: cpu, cuda, cuda:N, ...")
    need(r.train.parallel in PARALLEL, "train.parallel", r.train.parallel, f"allowed: {', '.join(PARALLEL)}")
    need(r.train.autocast in AUTOCAST, "train.autocast", r.train.autocast, f"allowed: {', '.join(AUTOCAST)}")
    for name in r.train.loggers:
        close = difflib.get_close_matches(str(name), LOGGERS, n=1, cutoff=0.6)
        need(name in LOGGERS, "train.loggers", name, (f"did you mean {close[0]!r}? " if close else "")
             + f"allowed: {', '.join(LOGGERS)} (metrics.jsonl is written either way)")
    need(len(set(r.train.loggers)) == len(r.train.loggers), "train.loggers", r.train.loggers, "list each logger once")
    need(len(r.train.betas) == 2, "train.betas", r.train.betas, "give two numbers, e.g. [0.9, 0.95]")
    need(r.train.trainable is None or len(r.train.trainable) >= 1, "train.trainable", r.train.trainable,
         "give at least one pattern (null trains every parameter)")
    for pattern in r.train.trainable or ():
        need(bool(pattern.strip()) and pattern.strip() != "mixer:", "train.trainable", pattern,
             "give a glob over parameter names (model.layers.1.*) or mixer:NAME (mixer:gated_deltanet)")
    sl = r.model.sleep_layers
    need(sl is None or sl == sorted(set(sl)), "model.sleep_layers", sl,
         "list distinct loop-body layer indices >= 0 in increasing order ([] inserts none)")
    need(r.model.pretrained is None or r.model.hf_config is None, "model.pretrained", r.model.pretrained,
         "give model.pretrained (a folder with config.json and weights) or model.hf_config (random weights), "
         "not both")
    # The upper bound (the number of blocks) is the model builder's to check: a pretrained model's depth
    # comes from its config.json, not from model.layers.
    lo, hi = r.model.loop_start, r.model.loop_end
    if lo is not None and hi is not None:
        _check_rule(lambda: rules.check_loop_range(lo, hi), "model", where)


def _check_rule(check: Any, section: str, where: str) -> None:
    """Run a :mod:`sleepzoo.rules` check; its RuleError becomes a RecipeError naming the recipe's field."""
    try:
        check()
    except rules.RuleError as exc:
        raise RecipeError(f"{where}: {section}.{exc.field}: {_short(exc.value)} is not allowed; {exc.allowed}") \
            from None


def recipe_from_dict(data: Any, source: str = "<dict>") -> Recipe:
    """Validate a parsed recipe mapping (sections and their fields, types and ranges)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping with sections {', '.join(SECTIONS)}")
    sections: dict[str, Any] = {}
    for key, value in data.items():
        if key not in TOP_LEVEL:
            close = difflib.get_close_matches(str(key), list(TOP_LEVEL), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{source}: {key}: unknown section{hint}; allowed sections: {', '.join(TOP_LEVEL)}")
        if key == "stages":
            if value is not None:
                sections["stages"] = _build_stages(value, source)
            continue
        sections[key] = _build_section(SECTIONS[key], value, f"{source}: {key}")
    recipe = Recipe(**sections, source=source)
    _check_values(recipe, source)
    if recipe.stages:
        total = sum(stage.steps for stage in recipe.stages)
        given = data.get("train") or {}
        if isinstance(given, dict) and "steps" in given and recipe.train.steps != total:
            parts = " + ".join(f"{s.name} {s.steps}" for s in recipe.stages)
            raise RecipeError(f"{source}: train.steps: {recipe.train.steps} but the stages add up to {total} "
                              f"({parts}); with stages, train.steps is their total: leave it out or give "
                              f"{total}, and change the stages' steps instead")
        recipe.train.steps = total
        for i, (name, staged) in enumerate(recipe.stage_recipes()):
            _check_values(staged, f"{source}: stages[{i}] ({name})")
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
        node: Any = data
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):
                nxt = node[_list_index(node, k, keys[:i], item, source)]
            else:
                nxt = node.get(k)
                if nxt is None:
                    nxt = node[k] = {}
            if not isinstance(nxt, (dict, list)):
                raise RecipeError(f"{source}: override {item!r}: {'.'.join(keys[:i + 1])} is {nxt!r}, not a section")
            node = nxt
        if isinstance(node, list):
            node[_list_index(node, keys[-1], keys[:-1], item, source)] = value
        else:
            node[keys[-1]] = value
    return data


def _list_index(items: list, key: str, path: Sequence[str], item: str, source: str) -> int:
    """The position in a list (e.g. ``stages``) that an override key names: an index, or an element's name."""
    names = [x.get("name") if isinstance(x, dict) else None for x in items]
    if key.lstrip("-").isdigit() and -len(items) <= int(key) < len(items):
        return int(key)
    if key in names:
        return names.index(key)
    shown = ", ".join(str(n) for n in names if n is not None)
    raise RecipeError(f"{source}: override {item!r}: {'.'.join(path)} has no element {key!r}; give an index "
                      f"0..{len(items) - 1}" + (f" or a name ({shown})" if shown else ""))


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
            text = p.read_bytes().decode("utf-8")
        except OSError as exc:
            raise RecipeError(f"recipe {source!r} can not be read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise RecipeError(f"{source}: not a text file (byte {exc.start} is not UTF-8); a recipe is a YAML "
                              f"text file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
    data = apply_overrides(data or {}, overrides, source)
    return recipe_from_dict(data, source)
