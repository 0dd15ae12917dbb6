"""The contract every model gives the sleep engine, and the pre-norm block they share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import engine
from ..config import SleepConfig
from ..mixers import MixerState
from ..registry import SleepzooError
from ..rules import merge_schedule


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj x) * up_proj x)``; names as in Llama / Qwen / Jet-Nemotron / Ouro."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm block: ``x + Mixer(Norm x)`` then ``x + SwiGLU(Norm x)`` (no MLP when ``d_ff`` is 0).

    The mixer sits under the name ``self_attn`` whatever it is, as in Jet-Nemotron's checkpoints, so the
    pretrained loaders map state dicts without renaming.
    """

    def __init__(self, d_model: int, mixer: nn.Module, d_ff: int, norm_eps: float = 1e-6):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(d_model, eps=norm_eps)
        self.self_attn = mixer
        self.mlp = None
        if d_ff > 0:
            self.post_attention_layernorm = nn.RMSNorm(d_model, eps=norm_eps)
            self.mlp = SwiGLU(d_model, d_ff)

    def forward(self, x: Tensor, state: MixerState = None, *, span: int | None = None) -> tuple[Tensor, MixerState]:
        mixed, state = self.self_attn(self.input_layernorm(x), state, span=span)
        x = x + mixed
        if self.mlp is not None:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, state


def read_config_json(config: dict | str | Path, what: str = "config") -> tuple[dict, Path | None]:
    """A Hugging Face-style config as a dict, and the file it came from (None for a dict). A path may name
    config.json or the folder holding it; a missing or unreadable file is a SleepzooError naming it."""
    if isinstance(config, dict):
        return dict(config), None
    if not isinstance(config, (str, Path)):
        raise SleepzooError(f"{what} must be a dict or a path to config.json, got {type(config).__name__}")
    path = Path(config).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SleepzooError(f"{what} {str(path)!r} does not exist (a pretrained folder holds config.json and "
                            f"its safetensors weights)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SleepzooError(f"{what} {str(path)!r} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SleepzooError(f"{what} {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data, path


def sample_next(logits: Tensor, do_sample: bool, temperature: float, top_k: int | None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token ids (B, 1) from logits (B, vocab): argmax, or a sample at ``temperature`` from the
    ``top_k`` most likely tokens."""
    if not do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)


class SleepModel(nn.Module):
    """Base class of sleep-enabled language models.

    Subclasses provide ``embed(ids) -> h``, ``layers`` (an ``nn.ModuleList`` of blocks called as
    ``h, state = block(h, state)``), ``head(h) -> logits``, ``vocab_size`` and ``loop_range`` (the
    [start, end) of the looped blocks; the rest form the prelude and the coda). The forward is the engine's.
    """

    vocab_size: int
    loop_range: tuple[int, int]
    #: forward(..., return_logits="targets") is understood (Task.evaluate then never builds (B, T, vocab))
    supports_target_logits = True
    layers: nn.ModuleList
    lm_head: nn.Module

    def __init__(self, sleep: SleepConfig | None = None):
        super().__init__()
        self.sleep = sleep or SleepConfig()
        self.recipe: Any = None  # set by sleepzoo.build_model

    def embed(self, input_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def get_output_embeddings(self) -> nn.Module:
        """The vocabulary projection (Hugging Face's name), so optimizers can tell it from hidden weights."""
        return self.lm_head

    # -- the engine's contract: the blocks before the loop, the looped blocks, the blocks after it ------------
    @property
    def prelude(self) -> Sequence[nn.Module]:
        """Blocks run once per chunk before the loop (default: ``layers[:loop_range[0]]``)."""
        return self.layers[: self.loop_range[0]]

    @property
    def loop(self) -> Sequence[nn.Module]:
        """Blocks run once per pass: the wake pass, then each sleep pass (default: ``layers[lo:hi]``)."""
        lo, hi = self.loop_range
        return self.layers[lo:hi]

    @property
    def coda(self) -> Sequence[nn.Module]:
        """Blocks after the loop: once on the wake pass (for the logits) and once after sleep (for their
        fast weights). Default: ``layers[loop_range[1]:]``."""
        return self.layers[self.loop_range[1]:]

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP shards one by one (then the model as the root): each distinct block once."""
        seen: dict[int, nn.Module] = {}
        for block in [*self.prelude, *self.loop, *self.coda]:
            seen.setdefault(id(block), block)
        return list(seen.values())

    def mixers(self) -> list[nn.Module]:
        """One mixer per engine state slot, in the order of ``prelude + loop + coda``."""
        return [block.self_attn for block in [*self.prelude, *self.loop, *self.coda]]

    def final_norm(self) -> nn.Module | None:
        """The norm before the head (``model.norm``), applied between passes under ``sleep.pass_norm``."""
        inner = getattr(self, "model", None)
        return getattr(inner, "norm", None)

    def add_sleep_gate(self) -> nn.Parameter:
        """Register ``sleep_gate``: one scalar per looped layer, zero (``sleep.gate``; see engine.consolidate).
        Called by :func:`sleepzoo.build_model` when the recipe (or one of its stages) turns the gate on."""
        if getattr(self, "sleep_gate", None) is None:
            param = next(self.parameters())
            n = len(self.loop) + len(self.coda)  # one per looped and coda layer
            self.sleep_gate = nn.Parameter(torch.zeros(n, dtype=torch.float32, device=param.device))
        return self.sleep_gate

    def _sleep_settings(self, window: int | None, loops: int | str | None, eviction: Any,
                        sleep_every: int | None, coda: str | None = None, max_loops: int | None = None,
                        tolerance: float | None = None) -> dict:
        s = self.sleep
        settings = {"window": s.window if window is None else window, "loops": s.loops if loops is None else loops,
                    "eviction": s.eviction if eviction is None else eviction,
                    "sleep_every": s.sleep_every if sleep_every is None else sleep_every,
                    "gate": s.gate, "pass_norm": s.pass_norm, "coda": s.coda if coda is None else coda}
        settings["loops"], settings["max_loops"], settings["tolerance"] = merge_schedule(s, loops, max_loops,
                                                                                        tolerance)
        return settings

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, *, window: int | None = None,
                loops: int | None = None, eviction: Any = None, sleep_every: int | None = None,
                checkpoint: bool | None = None, return_logits: bool | str = True,
                coda: str | None = None, max_loops: int | None = None,
                tolerance: float | None = None) -> engine.SleepOutput:
        """Run the sleep engine over (B, T) tokens. ``window``, ``loops``, ``eviction``, ``sleep_every`` and
        ``checkpoint`` default to the recipe's ``sleep`` section; ``targets`` (B, T) hold -100 where no loss
        is taken. ``.logits`` are every position's wake-pass logits; ``return_logits=False`` computes the head at
        the target positions only (training), ``"targets"`` returns those positions' logits (evaluation).
        ``loops="auto"`` sleeps adaptively, up to ``max_loops`` passes until the fast weights change by less
        than ``tolerance`` (the recipe's ``sleep.max_loops`` / ``sleep.tolerance`` unless given)."""
        settings = self._sleep_settings(window, loops, eviction, sleep_every, coda, max_loops, tolerance)
        return engine.run(self, input_ids, targets, **settings,
                          checkpoint=self.sleep.checkpoint if checkpoint is None else checkpoint,
                          return_logits=return_logits, truncate=self.sleep.truncate)

    def start_stream(self, *, window: int | None = None, loops: int | str | None = None, eviction: Any = None,
                     sleep_every: int | None = None, max_loops: int | None = None,
                     tolerance: float | None = None) -> engine.Stream:
        """A :class:`sleepzoo.engine.Stream` over this model: ``stream.feed(ids)`` returns wake logits."""
        settings = self._sleep_settings(window, loops, eviction, sleep_every, None, max_loops, tolerance)
        return engine.Stream(self, **settings)

    @torch.no_grad()
    def stream(self, input_ids: Tensor, *, window: int | None = None, loops: int | None = None,
               eviction: Any = None, sleep_every: int | None = None) -> Iterator[Tensor]:
        """Feed ``input_ids`` (B, T) one token at a time; yield each position's logits (B, vocab)."""
        stream = self.start_stream(window=window, loops=loops, eviction=eviction, sleep_every=sleep_every)
        for t in range(input_ids.shape[1]):
            yield stream.feed(input_ids[:, t:t + 1])[:, 0]

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, window: int | None = None,
                 loops: int | str | None = None, eviction: Any = None, sleep_every: int | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, stream: Any = None, max_loops: int | None = None,
                 tolerance: float | None = None) -> Tensor:
        """Continue ``input_ids`` (B, T) by ``max_new_tokens`` tokens: the prompt is prefilled chunk by
        chunk, then tokens are decoded one at a time; the model sleeps whenever its window fills. Greedy
        unless ``do_sample`` (softmax at ``temperature``, optionally restricted to the ``top_k`` most
        likely tokens). Returns (B, T + max_new_tokens).

        ``stream``: continue an existing :class:`~sleepzoo.engine.Stream` (e.g. one loaded with
        ``Stream.load``) instead of starting one; its settings hold (``window``, ``loops``, ``eviction``,
        ``sleep_every`` must then be None), and it is left holding the prompt and every generated token, so a
        later call continues the same conversation."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise SleepzooError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
        if do_sample and not temperature > 0:
            raise SleepzooError(f"temperature={temperature!r} must be > 0 when sampling")
        if top_k is not None and top_k < 1:
            raise SleepzooError(f"top_k={top_k!r} must be >= 1 (or None for the whole vocabulary)")
        was_training = self.training
        self.eval()
        try:
            keep = stream is not None
            if keep:
                given = {k: v for k, v in (("window", window), ("loops", loops), ("eviction", eviction),
                                           ("sleep_every", sleep_every), ("max_loops", max_loops),
                                           ("tolerance", tolerance)) if v is not None}
                if given:
                    raise SleepzooError(f"generate(stream=...): the stream's own settings hold; leave "
                                        f"{', '.join(given)} unset")
                if stream.model is not self:
                    raise SleepzooError("generate(stream=...): the stream belongs to another model")
            else:
                stream = self.start_stream(window=window, loops=loops, eviction=eviction, sleep_every=sleep_every,
                                           max_loops=max_loops, tolerance=tolerance)
            logits = stream.feed(input_ids)[:, -1]  # (B, vocab)
            out = [input_ids]
            for i in range(max_new_tokens):
                nxt = sample_next(logits, do_sample, temperature, top_k, generator)  # (B, 1)
                out.append(nxt)
                if i + 1 < max_new_tokens or keep:  # a kept stream also reads the last token
                    logits = stream.feed(nxt)[:, -1]
        finally:
            self.train(was_training)
        return torch.cat(out, dim=1)

    def num_parameters(self) -> int:
        seen, total = set(), 0
        for p in self.parameters():  # tied weights count once
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total
