"""The contract every model gives the sleep engine, and the pre-norm block they share."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import engine
from ..config import SleepConfig
from ..mixers import MixerState


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

    def forward(self, x: Tensor, state: MixerState = None) -> tuple[Tensor, MixerState]:
        mixed, state = self.self_attn(self.input_layernorm(x), state)
        x = x + mixed
        if self.mlp is not None:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, state


class SleepModel(nn.Module):
    """Base class of sleep-enabled language models.

    Subclasses provide ``embed(ids) -> h``, ``layers`` (an ``nn.ModuleList`` of blocks called as
    ``h, state = block(h, state)``), ``head(h) -> logits``, ``vocab_size`` and ``loop_range`` (the
    [start, end) of the looped blocks; the rest form the prelude and the coda). The forward is the engine's.
    """

    vocab_size: int
    loop_range: tuple[int, int]
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

    def mixers(self) -> list[nn.Module]:
        return [block.self_attn for block in self.layers]

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, *, window: int | None = None,
                loops: int | None = None, eviction: Any = None, checkpoint: bool | None = None,
                return_logits: bool = True) -> engine.SleepOutput:
        """Run the sleep engine. ``window``, ``loops``, ``eviction`` and ``checkpoint`` default to the
        recipe's ``sleep`` section; ``targets`` (B, T) hold -100 where no loss is taken."""
        s = self.sleep
        return engine.run(self, input_ids, targets,
                          window=s.window if window is None else window,
                          loops=s.loops if loops is None else loops,
                          eviction=s.eviction if eviction is None else eviction,
                          checkpoint=s.checkpoint if checkpoint is None else checkpoint,
                          return_logits=return_logits)

    def num_parameters(self) -> int:
        seen, total = set(), 0
        for p in self.parameters():  # tied weights count once
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total
