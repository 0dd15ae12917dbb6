"""``model: hybrid``: the from-scratch attention / fast-weight hybrids of the paper's synthetic tasks.

State-dict names follow the Hugging Face layout (``model.embed_tokens``, ``model.layers.{i}.self_attn``,
``model.norm``, ``lm_head``), the same as the pretrained models sleepzoo loads.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .. import registry
from ..config import ModelConfig, RecipeError, SleepConfig, check_mixer_options
from ..rules import RuleError, check_loop_range
from .base import Block, SleepModel


def default_d_ff(d_model: int) -> int:
    """SwiGLU width 8/3 * d (same parameters as a 4d GELU MLP), rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


def build_mixer(name: str, d_model: int, layer_idx: int, options: dict, where: str) -> nn.Module:
    """Build mixer ``name`` (kind ``mixer``) with its recipe options checked against its signature."""
    cls = registry.get("mixer", name)
    return cls(d_model, layer_idx=layer_idx, **check_mixer_options(cls, options, where))


class HybridLM(SleepModel):
    """Embedding, pre-norm blocks with the recipe's mixers, final RMSNorm, linear head (tied optional)."""

    def __init__(self, config: ModelConfig, *, vocab_size: int, sleep: SleepConfig | None = None):
        super().__init__(sleep)
        self.config = config
        self.vocab_size = vocab_size
        d = config.d_model
        d_ff = default_d_ff(d) if config.d_ff is None else config.d_ff
        n = len(config.layers)
        for name in config.mixers:  # settings of an unused mixer are fine; of an unknown one, a typo
            registry.get("mixer", name)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab_size, d)
        self.model.layers = nn.ModuleList(
            Block(d, build_mixer(name, d, i, config.mixers.get(name, {}), f"model.mixers.{name}"), d_ff,
                  config.norm_eps)
            for i, name in enumerate(config.layers))
        self.model.norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        lo = 0 if config.loop_start is None else config.loop_start
        hi = n if config.loop_end is None else config.loop_end
        try:
            self.loop_range = check_loop_range(lo, hi, n)
        except RuleError as exc:
            raise RecipeError(f"model.{exc}") from None
        self._init_weights(config.init_std, n)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def layers(self) -> nn.ModuleList:  # type: ignore[override]
        return self.model.layers

    def _init_weights(self, std: float, n_layers: int) -> None:
        for name, module in self.named_modules():
            # A mixer marks a module whose own initialisation matters (e.g. Jet's kernel generator) as custom.
            if getattr(module, "_sleepzoo_custom_init", False):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                # Output projections into the residual stream are scaled down by depth (GPT-2).
                scale = 1 / math.sqrt(2 * n_layers) if name.endswith(("o_proj", "down_proj")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def head(self, h: Tensor) -> Tensor:
        return self.lm_head(self.model.norm(h))


def build_hybrid(*, d_model: int, layers: list[str], d_ff: int | None, norm_eps: float, tie_embeddings: bool,
                 init_std: float, loop_start: int | None, loop_end: int | None, mixers: dict[str, dict],
                 vocab_size: int, sleep: SleepConfig | None = None) -> HybridLM:
    """Model builder registered as ``hybrid``: the model section's fields it takes (every one but pretrained,
    hf_config and Ouro's wake_passes / sleep_layers; see :class:`sleepzoo.config.ModelConfig`)."""
    config = ModelConfig(name="hybrid", d_model=d_model, layers=layers, d_ff=d_ff, norm_eps=norm_eps,
                         tie_embeddings=tie_embeddings, init_std=init_std, loop_start=loop_start, loop_end=loop_end,
                         mixers=mixers)
    return HybridLM(config, vocab_size=vocab_size, sleep=sleep)
