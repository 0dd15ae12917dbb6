"""Optimizers, parameter groups and the learning-rate schedule of a training run (SPEC 4).

    from sleepzoo.optim import build_optimizers, build_schedulers, select_parameters

    optimizers = build_optimizers(model, recipe.train)      # [Muon, AdamW] or [AdamW]
    schedulers = build_schedulers(optimizers, recipe.train)  # warmup-stable-decay, one per optimizer

Muon takes the 2-D weights of the hidden layers; AdamW the embeddings, the output head, every parameter
that is not a matrix and the parameters that must not decay (:func:`split_parameters`,
:func:`no_weight_decay`). ``train.trainable`` chooses what a run (or a stage) trains
(:func:`select_parameters`); the rest stay frozen and out of the optimizers.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from . import registry
from .config import TrainConfig
from .registry import SleepzooError

MUON_MOMENTUM = 0.95  # Keller Jordan's default, also torch's
# torch.optim.Muon scales each matrix's step by this rule. "original" (Keller Jordan's, sqrt(max(1, A/B)))
# is the one the paper's Muon learning rates (2e-3 synthetic, 1e-3 pretrained) were tuned under; the
# alternative "match_rms_adamw" (0.2 sqrt(max(A, B))) would expect AdamW-sized learning rates instead.
MUON_ADJUST_LR = "original"


def output_head(model: nn.Module) -> nn.Module | None:
    """The module that maps features to vocabulary logits, or None when the head is the tied embedding.

    Asks the model first (``get_output_embeddings()``, the Hugging Face convention); otherwise the last
    ``nn.Linear`` whose output size is an embedding's vocabulary size.
    """
    ask = getattr(model, "get_output_embeddings", None)
    if callable(ask):
        head = ask()
        if isinstance(head, nn.Module):
            return head
    vocab_sizes = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features in vocab_sizes]
    return heads[-1] if heads else None


def no_weight_decay(p: nn.Parameter) -> bool:
    """True for a parameter that AdamW must not decay: every parameter with fewer than 2 dimensions (norm
    weights, biases, ``A_log``, ``dt_bias``, ``D``, gates) and every parameter flagged ``_no_weight_decay``.

    Weight decay pulls a weight towards 0, a prior for matrices (embeddings, head, projections) but not for
    a log decay rate, a bias or a norm's gain, for which 0 is no neutral value (A_log = 0 means A = 1; a zero
    norm gain switches a block off). Conv kernels (3-D) are weights and are decayed, as
    in common practice (decay exactly the parameters with ndim >= 2). The flag is a plain attribute, so it
    survives ``model.to()`` but not a rebuild from the meta device; the flagged parameters sleepzoo has are
    1-D, which the first rule covers either way."""
    return p.ndim < 2 or bool(getattr(p, "_no_weight_decay", False))


def split_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split trainable parameters into ``{"muon": [...], "adamw": [...]}`` as ``(name, parameter)`` pairs.

    Muon gets every 2-D weight of the hidden layers; AdamW gets embeddings and the output head (found by
    module type, so a tied head is the embedding), every parameter that is not 2-D (norms, biases, conv
    kernels, ``A_log``, ``dt_bias``), every 2-D weight with a single row or column (a vector such as Ouro's
    early-exit gate ``Linear(d, 1)``: orthogonalising a 1 x d update only normalises it, and Muon's rule is
    meant for matrices) and every parameter flagged ``_no_weight_decay`` (Muon would decay it). A parameter
    shared by several modules is listed once. :func:`build_optimizers` splits AdamW's share again, into
    the parameters it decays and those it does not (:func:`no_weight_decay`).
    """
    io_params: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            io_params.update(id(p) for p in module.parameters())
    head = output_head(model)
    if head is not None:
        io_params.update(id(p) for p in head.parameters())
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "adamw": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            matrix = p.ndim == 2 and min(p.shape) > 1 and not getattr(p, "_no_weight_decay", False)
            groups["muon" if matrix and id(p) not in io_params else "adamw"].append((name, p))
    return groups


def _layer_mixers(model: nn.Module, layer_names: list[str] | None) -> list[tuple[str, nn.Module]]:
    """``(registered mixer name, mixer)`` for every block: ``block.self_attn`` of ``model.model.layers``
    (or ``model.layers``). Names come from the recipe's ``model.layers`` when it has one per block, else
    from the registry: the names whose class is exactly the mixer's."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if blocks is None:
        blocks = getattr(model, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        return []
    mixers = [getattr(block, "self_attn", None) for block in blocks]
    if layer_names is not None and len(layer_names) == len(mixers):
        return [(name, m) for name, m in zip(layer_names, mixers) if isinstance(m, nn.Module)]
    # blocks that models insert beside their own (Ouro's sleep layers) are named from the registry too
    extra = getattr(getattr(model, "model", None), "sleep_layers", None)
    if isinstance(extra, nn.ModuleList):
        mixers += [getattr(block, "self_attn", None) for block in extra]
    out = []
    for m in mixers:
        if not isinstance(m, nn.Module):
            continue
        for name in registry.names("mixer"):
            try:
                if registry.get("mixer", name) is type(m):
                    out.append((name, m))
            except SleepzooError:  # a plugin that fails to load names none of this model's mixers
                continue
    return out


def select_parameters(model: nn.Module, patterns: list[str] | None,
                      layer_names: list[str] | None = None) -> list[tuple[str, nn.Parameter]]:
    """The parameters that ``train.trainable`` patterns select, as ``(name, parameter)``, each listed once.

    A pattern is an fnmatch glob over parameter names (``model.layers.1.*``; a tied weight answers to
    every name it has), or ``mixer:NAME``: every parameter of every block's mixer registered as NAME
    (``layer_names`` gives each block's mixer name, normally ``recipe.model.layers``). ``None`` selects the
    parameters the model itself leaves trainable. A pattern that selects nothing is an error.
    """
    if patterns is None:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    named = list(model.named_parameters(remove_duplicate=False))
    first_name = {}
    for name, p in named:
        first_name.setdefault(id(p), name)
    chosen: dict[int, nn.Parameter] = {}
    for pattern in patterns:
        if pattern.startswith("mixer:"):
            wanted = pattern[len("mixer:"):].strip()
            mixers = _layer_mixers(model, layer_names)
            hits = [p for name, m in mixers if name == wanted for p in m.parameters()]
            if not hits:
                present = list(dict.fromkeys(name for name, _ in mixers))
                close = difflib.get_close_matches(wanted, present, n=1, cutoff=0.6)
                hint = f" (did you mean 'mixer:{close[0]}'?)" if close else ""
                where = (f"its layers' mixers are {', '.join(present)}" if present else
                         f"{type(model).__name__} has no mixer layers (block.self_attn of model.model.layers)")
                raise SleepzooError(f"train.trainable: {pattern!r} matches no parameter{hint}: {where}")
        else:
            hits = [p for name, p in named if fnmatch.fnmatchcase(name, pattern)]
            if not hits:
                names = list(dict.fromkeys(n for n, _ in named))
                shown = names if len(names) <= 6 else [names[round(i * (len(names) - 1) / 5)] for i in range(6)]
                raise SleepzooError(
                    f"train.trainable: {pattern!r} matches no parameter of {type(model).__name__} "
                    f"({len(names)} parameters, e.g. {', '.join(shown)}); give fnmatch globs over these "
                    f"names (model.layers.1.*) or mixer:NAME (mixer:gated_deltanet)")
        for p in hits:
            chosen.setdefault(id(p), p)
    return [(first_name[pid], p) for pid, p in {id(p): p for _, p in named}.items() if pid in chosen]


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """``[Muon, AdamW]`` for ``optimizer: muon`` (Muon left out if no hidden 2-D weight exists), or ``[AdamW]``.

    Muon decays its weights by ``train.weight_decay``. AdamW has up to two parameter groups, in this order:
    the parameters it decays by ``train.weight_decay`` (embeddings, head, conv kernels: ndim >= 2) and those
    it does not decay (weight_decay 0: :func:`no_weight_decay`); an empty group is left out. Both groups
    share the learning rate, betas and schedule.
    """
    groups = split_parameters(model)
    adamw_params = [p for _, p in groups["adamw"]]
    muon_params = [p for _, p in groups["muon"]]
    if cfg.optimizer == "adamw":
        adamw_params, muon_params = muon_params + adamw_params, []
    optimizers: list[torch.optim.Optimizer] = []
    if muon_params:
        optimizers.append(torch.optim.Muon(muon_params, lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                                           momentum=MUON_MOMENTUM, adjust_lr_fn=MUON_ADJUST_LR))
    if adamw_params:
        decayed = [p for p in adamw_params if not no_weight_decay(p)]
        plain = [p for p in adamw_params if no_weight_decay(p)]
        param_groups = [{"params": decayed, "weight_decay": cfg.weight_decay}] if decayed else []
        param_groups += [{"params": plain, "weight_decay": 0.0}] if plain else []
        optimizers.append(torch.optim.AdamW(param_groups, lr=cfg.adamw_lr, betas=tuple(cfg.betas),
                                            weight_decay=cfg.weight_decay))
    if not optimizers:
        raise SleepzooError(f"{type(model).__name__} has no trainable parameters")
    return optimizers


@dataclass
class WarmupStableDecay:
    """Learning-rate multiplier for update ``i`` (0-based): linear warmup, constant, linear decay to 0.

    Warmup: ``(i + 1) / warmup_steps`` for the first ``warmup_steps`` updates (the first update is not
    wasted at lr 0). Decay: over the last ``d = round(decay_fraction * steps)`` updates the multiplier is
    ``(steps - i) / d``, so it reaches 0 right after the last update. Where both apply, the smaller wins.
    A plain dataclass so LambdaLR's state dict (and so a checkpoint) records its fields.
    """

    steps: int
    warmup_steps: int = 0
    decay_fraction: float = 0.0

    def __call__(self, i: int) -> float:
        scale = 1.0
        if self.warmup_steps > 0 and i < self.warmup_steps:
            scale = (i + 1) / self.warmup_steps
        decay_steps = round(self.decay_fraction * self.steps)
        if decay_steps > 0 and i >= self.steps - decay_steps:
            scale = min(scale, max(0.0, (self.steps - i) / decay_steps))
        return scale


def build_schedulers(optimizers: list[torch.optim.Optimizer],
                     cfg: TrainConfig) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One LambdaLR per optimizer, all on the same warmup-stable-decay multiplier."""
    schedule = WarmupStableDecay(cfg.steps, cfg.warmup_steps, cfg.decay_fraction)
    return [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in optimizers]
