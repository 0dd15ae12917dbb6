"""``model: ouro``: ByteDance's Ouro looped transformer (Ouro-1.4B), native PyTorch, sleep-enabled (SPEC 3).

Paper: Zhu et al., *Scaling Latent Reasoning via Looped Language Models* (ByteDance Seed, 2025,
arXiv 2510.25741); weights ByteDance/Ouro-1.4B (Apache-2.0). The published model does not load in
transformers 5.x (its remote code pins < 4.56), so sleepzoo implements it with the checkpoint's exact names::

    model.embed_tokens                                       (vocab, d)
    model.layers.{i}.self_attn.{q,k,v,o}_proj                no biases
    model.layers.{i}.mlp.{gate,up,down}_proj                 SwiGLU
    model.layers.{i}.{input_layernorm, input_layernorm_2,
                      post_attention_layernorm, post_attention_layernorm_2}   RMSNorm
    model.norm                                               RMSNorm, applied after every loop step
    model.early_exit_gate                                    Linear(d, 1) with bias
    lm_head                                                  (vocab, d), untied

Published forward (facts read from the published ``modeling_ouro.py``; no code copied): ``h = embed(ids)``;
for each of ``total_ut_steps`` steps ``t``: every shared layer in order (sandwich norms, see
:class:`OuroBlock`), then ``h = model.norm(h)``, which both feeds the next step and is step t's output
``h_t``. Each step has its own KV cache (the published cache is indexed ``step * num_layers + layer``).
Logits of step t are ``lm_head(h_t)`` (no further norm). Early exit reads the *normed* ``h_t``:

    lambda_t = sigmoid(early_exit_gate(h_t))                 (B, T) per-step exit probability
    p_t      = lambda_t * prod_{s<t} (1 - lambda_s)          for t < S - 1
    p_{S-1}  = prod_{s<S-1} (1 - lambda_s)                   the last step takes the remaining mass
    cdf_t    = p_0 + ... + p_t

Modes (:meth:`OuroLM.exit_logits`): ``"last"`` the last step's logits (the default forward); ``"expected"``
``sum_t p_t * logits_t`` (the published training loss is taken on these); ``"threshold"`` per token the
first step whose ``cdf_t >= threshold`` (the last step if none), its logits; ``"step"`` a fixed step. As
published, every step is computed for every token (a per-token exit selects, it saves no compute; the
K/V of later steps stay consistent). The published config sets ``early_exit_threshold: 1.0``, which its
inference path uses by default: ``cdf`` reaches 1 only at the last step unless a gate saturates in
floating point, so it is the last step in practice; we make ``"last"`` the default explicitly.

Sleep (SPEC 1 and 3). One engine *layer* is one whole Ouro step (:class:`OuroStep`: the loop body, i.e.
the shared layers with any inserted sleep layers, then ``model.norm``). ``model.layers`` lists the same
step ``wake_passes`` times (default ``total_ut_steps``) and ``loop_range`` is the last entry, so

* the wake pass runs steps 1..wake_passes (steps before the last form the engine's prelude), exactly the
  published forward when ``wake_passes == total_ut_steps`` and the window covers the sequence, and
* every sleep pass is one more Ouro step over the window, continuing the loop from the wake output.

The engine keeps one state per entry of ``model.layers``, so each occurrence of the step, i.e. each loop
step, has its own attention caches and fast weights, as in the published cache. A step's state is one
flat dict, each sub-layer's keys prefixed by its position in the body (``"7.fast_weights"``), and
:class:`OuroStep` is its own "mixer" for the engine (``carried_state``, ``evict``), so the engine's
``with_fast_weights`` and eviction policies work on it unchanged.

Retrofit (:func:`insert_jet_layers`): MLP-free JetBlock layers, stored as ``model.sleep_layers.{j}``
(pretrained names untouched), run after the chosen loop-body layers; their ``o_proj`` starts at zero so the
pretrained function is unchanged until training moves it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .. import engine
from ..config import RecipeError, SleepConfig, check_mixer_options
from ..mixers import MixerState, evict_state
from ..mixers.attention import Attention
from ..registry import SleepzooError
from .base import Block, SleepModel, SwiGLU, read_config_json

# Fields of the published config.json that sleepzoo reads, with the values it supports (None: any).
ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
               "total_ut_steps", "early_exit_threshold", "initializer_range")
SLEEPZOO_FIELDS = ("wake_passes",)  # ours: loop steps of the wake pass (default total_ut_steps)
# Published fields that must hold a value this implementation supports (else a SleepzooError says so).
CHECKED_FIELDS = ("model_type", "hidden_act", "rope_scaling", "attention_bias", "mlp_bias", "use_sliding_window",
                  "layer_types", "early_exit_step")
# Harmless Hugging Face fields: bookkeeping, generation defaults, or settings moot without sliding windows.
IGNORED_FIELDS = ("architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
                  "sleepzoo",  # sleepzoo's own settings (sleep, wake_passes, sleep layers): sleepzoo.pretrained
                  "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "max_position_embeddings",
                  "sliding_window", "max_window_layers", "attention_dropout", "chunk_size", "output_attentions",
                  "output_hidden_states", "return_dict", "id2label", "label2id", "use_return_dict")

EXIT_MODES = ("last", "expected", "threshold", "step")

# Default JetBlock size for the retrofit: 16 heads x 64 (values 128) keeps six layers at ~8 % of Ouro-1.4B
# (SPEC 3 asks for < 10 % more parameters).
OURO_JET_DEFAULTS = {"num_heads": 16, "head_dim": 64, "expand_v": 2.0}


class OuroBlock(nn.Module):
    """Ouro's sandwich-norm decoder layer, with sleepzoo's block call contract.

    ``h = x + input_layernorm_2(Attn(input_layernorm x))``;
    ``y = h + post_attention_layernorm_2(MLP(post_attention_layernorm h))``. The second norm of each pair
    bounds what a sub-layer adds to the residual stream, which keeps the stream stable across loop steps.
    """

    def __init__(self, d_model: int, attention: Attention, d_ff: int, norm_eps: float):
        super().__init__()
        self.self_attn = attention
        self.mlp = SwiGLU(d_model, d_ff)
        self.input_layernorm = nn.RMSNorm(d_model, eps=norm_eps)
        self.input_layernorm_2 = nn.RMSNorm(d_model, eps=norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(d_model, eps=norm_eps)
        self.post_attention_layernorm_2 = nn.RMSNorm(d_model, eps=norm_eps)

    def forward(self, x: Tensor, state: MixerState = None, *, span: int | None = None) -> tuple[Tensor, MixerState]:
        mixed, state = self.self_attn(self.input_layernorm(x), state, span=span)  # (B, T, d)
        h = x + self.input_layernorm_2(mixed)
        y = h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h)))  # (B, T, d)
        return y, state


class OuroStep(nn.Module):
    """One Ouro loop step as one engine layer: the loop body in order, then the final norm.

    It owns no parameters of its own: ``body`` and ``norm`` are the model's modules, and the step is not
    registered under the model, so the state dict keeps the published names. Its state is a flat dict,
    each sub-layer's entries under ``"{position in body}.{key}"`` (None when no sub-layer has state).
    """

    def __init__(self, body: Sequence[nn.Module], norm: nn.Module):
        super().__init__()
        self.body = nn.ModuleList(body)
        self.norm = norm
        # Fast weights of the sub-layers, namespaced: the engine's with_fast_weights and eviction read this.
        self.carried_state: tuple[str, ...] = tuple(
            f"{i}.{key}" for i, block in enumerate(self.body)
            for key in getattr(block.self_attn, "carried_state", ()))

    @staticmethod
    def _split(state: MixerState, n: int) -> list[MixerState]:
        """The flat step state as one state per sub-layer (None where a sub-layer has none)."""
        parts: list[dict] = [{} for _ in range(n)]
        for key, value in (state or {}).items():
            i, sub = key.split(".", 1)
            parts[int(i)][sub] = value
        return [p or None for p in parts]

    @staticmethod
    def _join(parts: Sequence[MixerState]) -> MixerState:
        flat = {f"{i}.{k}": v for i, part in enumerate(parts) for k, v in (part or {}).items()}
        return flat or None

    def forward(self, h: Tensor, state: MixerState = None, *, span: int | None = None) -> tuple[Tensor, MixerState]:
        """h (B, T, d) -> (model.norm(body(h)) (B, T, d), the step's new state)."""
        new_states = []
        for block, sub in zip(self.body, self._split(state, len(self.body))):
            h, sub = block(h, sub, span=span)
            new_states.append(sub)
        return self.norm(h), self._join(new_states)

    def evict(self, state: MixerState, retain: int) -> MixerState:
        """Each sub-layer's own eviction (fast weights kept; caches of the last ``retain`` tokens kept)."""
        parts = self._split(state, len(self.body))
        return self._join([evict_state(block.self_attn, sub, retain) for block, sub in zip(self.body, parts)])


def exit_distribution(gate_logits: Tensor) -> Tensor:
    """Ouro's exit distribution over steps from the per-step gate logits (..., S) -> p (..., S).

    ``lambda_t = sigmoid(gate_t)`` is the probability of exiting at step t given the loop reached it; the
    last step takes all the mass that is left, so ``p`` sums to one over the steps.
    """
    lam = torch.sigmoid(gate_logits.float())  # (..., S)
    survive = torch.cumprod(1 - lam, dim=-1)  # (..., S): prob. of not exiting at steps 0..t
    reach = torch.cat([torch.ones_like(survive[..., :1]), survive[..., :-1]], dim=-1)  # prob. of reaching t
    return torch.cat([lam[..., :-1] * reach[..., :-1], reach[..., -1:]], dim=-1)


def _as_config(config: dict | str | Path) -> dict:
    return read_config_json(config, what="Ouro config")[0]


def _check_config(cfg: dict) -> None:
    """Every field is known, and the published ones we do not implement hold their supported value."""
    known = set(ARCH_FIELDS) | set(SLEEPZOO_FIELDS) | set(CHECKED_FIELDS) | set(IGNORED_FIELDS)
    unknown = sorted(k for k in cfg if k not in known)
    if unknown:
        raise SleepzooError(f"Ouro config: unsupported field(s) {', '.join(unknown)}; sleepzoo's Ouro reads "
                            f"{', '.join(ARCH_FIELDS + SLEEPZOO_FIELDS)} (and ignores bookkeeping fields such as "
                            f"architectures, torch_dtype)")
    bad = []
    if cfg.get("model_type", "ouro") != "ouro":
        bad.append(f"model_type={cfg['model_type']!r} (expected 'ouro')")
    if cfg.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act={cfg['hidden_act']!r} (only 'silu': SwiGLU)")
    if cfg.get("rope_scaling") is not None:
        bad.append(f"rope_scaling={cfg['rope_scaling']!r} (only null: plain RoPE)")
    for name in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if cfg.get(name, False):
            bad.append(f"{name}={cfg[name]!r} (only false)")
    layer_types = cfg.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        bad.append(f"layer_types={layer_types!r} (only 'full_attention' layers)")
    if cfg.get("early_exit_step") is not None:
        bad.append(f"early_exit_step={cfg['early_exit_step']!r} (use OuroLM.exit_logits(mode='step') instead)")
    if bad:
        raise SleepzooError("Ouro config: unsupported value(s): " + "; ".join(bad))


def _number(value: Any) -> float:
    """``value`` as a finite float (a config may write "1e-6" as a string); NaN for anything else."""
    try:
        number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError, OverflowError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def _positive_int(cfg: dict, name: str) -> int:
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SleepzooError(f"Ouro config: {name}={value!r} must be an integer >= 1")
    return value


class OuroLM(SleepModel):
    """Ouro: ``num_hidden_layers`` shared sandwich-norm layers looped ``total_ut_steps`` times.

    Build it with :meth:`from_config` (the published config.json, a dict or a path). ``forward`` is the
    sleep engine's (see the module docstring for how passes map to Ouro steps); :meth:`exit_logits` is the
    published full-attention forward with its early-exit modes.

    Parameters: ``2*V*d`` (embedding, head) ``+ n*(d*D*(2H + 2Hkv) + 3*d*F + 4*d)`` (layers) ``+ d``
    (norm) ``+ d + 1`` (gate). Ouro-1.4B (V 49152, d 2048, n 24, H = Hkv = 16, D 128, F 5632):
    1,434,652,673.
    """

    def __init__(self, *, vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                 num_attention_heads: int, num_key_value_heads: int | None = None, head_dim: int | None = None,
                 rope_theta: float = 1e6, rms_norm_eps: float = 1e-6, tie_word_embeddings: bool = False,
                 total_ut_steps: int = 4, early_exit_threshold: float | None = 1.0,
                 initializer_range: float = 0.02, wake_passes: int | None = None, backend: str = "sdpa",
                 sleep: SleepConfig | None = None):
        super().__init__(sleep)
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size), ("num_hidden_layers", num_hidden_layers),
                            ("total_ut_steps", total_ut_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SleepzooError(f"Ouro: {name}={value!r} must be an integer >= 1")
        for name, value in (("rope_theta", rope_theta), ("rms_norm_eps", rms_norm_eps),
                            ("initializer_range", initializer_range)):
            if not _number(value) > 0:  # a NaN compares false too
                raise SleepzooError(f"Ouro: {name}={value!r} must be a positive number")
        if early_exit_threshold is not None and not 0 <= _number(early_exit_threshold) <= 1:
            raise SleepzooError(f"Ouro: early_exit_threshold={early_exit_threshold!r} must be a number in [0, 1] "
                                f"or null")
        d = hidden_size
        self.vocab_size = vocab_size
        self.hidden_size = d
        self.num_hidden_layers = num_hidden_layers
        self.tie_word_embeddings = bool(tie_word_embeddings)
        # The Hugging Face config this model is (from_config replaces it by the file's own, bookkeeping kept),
        # so sleepzoo.pretrained.save_pretrained can write it back.
        self.hf_config: dict[str, Any] = {
            "architectures": ["OuroForCausalLM"], "model_type": "ouro", "vocab_size": vocab_size,
            "hidden_size": d, "intermediate_size": intermediate_size, "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_attention_heads if num_key_value_heads is None else num_key_value_heads,
            "head_dim": d // num_attention_heads if head_dim is None else head_dim, "hidden_act": "silu",
            "rope_theta": float(rope_theta), "rope_scaling": None, "rms_norm_eps": float(rms_norm_eps),
            "tie_word_embeddings": bool(tie_word_embeddings), "total_ut_steps": total_ut_steps,
            "early_exit_threshold": early_exit_threshold, "initializer_range": initializer_range}
        self.sleep_layer_options: dict[str, Any] = {}  # JetBlock options of the inserted sleep layers
        self.norm_eps = float(rms_norm_eps)
        self.total_ut_steps = total_ut_steps
        self.early_exit_threshold = early_exit_threshold
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab_size, d)
        self.model.layers = nn.ModuleList(
            OuroBlock(d, Attention(d, num_heads=num_attention_heads, num_kv_heads=num_key_value_heads,
                                   head_dim=head_dim, rope_theta=float(rope_theta), backend=backend, layer_idx=i),
                      intermediate_size, self.norm_eps)
            for i in range(num_hidden_layers))
        self.model.norm = nn.RMSNorm(d, eps=self.norm_eps)
        self.model.early_exit_gate = nn.Linear(d, 1, bias=True)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.sleep_after: tuple[int, ...] = ()  # loop-body layers followed by an inserted sleep layer
        self._step_cache: list[OuroStep | None] = [None]  # a list, so nn.Module does not register the step
        self.wake_passes = total_ut_steps if wake_passes is None else wake_passes
        self._init_weights(initializer_range)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the head when the config ties them (also after ``to_empty``, which can
        give each module its own copy)."""
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict | str | Path, *, wake_passes: int | None = None,
                    sleep: SleepConfig | None = None, backend: str = "sdpa") -> "OuroLM":
        """An Ouro model from its published config (a dict, a config.json path or its folder), weights
        randomly initialised (load a checkpoint over them). ``wake_passes`` (here or as a config field)
        defaults to ``total_ut_steps``. Unknown fields, and published fields set to values this
        implementation does not support, raise a :class:`SleepzooError` naming them."""
        cfg = _as_config(config)
        _check_config(cfg)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in cfg]
        if missing:
            raise SleepzooError(f"Ouro config: missing required field(s) {', '.join(missing)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            _positive_int(cfg, name)
        kwargs = {k: cfg[k] for k in ARCH_FIELDS if k in cfg}
        if wake_passes is None:
            wake_passes = cfg.get("wake_passes")
        model = cls(**kwargs, wake_passes=wake_passes, backend=backend, sleep=sleep)
        model.hf_config = {"model_type": "ouro",  # a dict without it still saves as a loadable folder
                           **{k: v for k, v in cfg.items() if k not in ("sleepzoo", "wake_passes")}}
        return model

    def sleepzoo_settings(self) -> dict[str, Any]:
        """This model's sleepzoo settings that differ from the published model's, by their override names
        (:func:`sleepzoo.pretrained.save_pretrained` writes them under config.json's ``sleepzoo`` key)."""
        out: dict[str, Any] = {}
        if self.wake_passes != self.total_ut_steps:
            out["wake_passes"] = self.wake_passes
        if self.sleep_after:
            out["sleep_layers"] = list(self.sleep_after)
            out["sleep_layer_options"] = dict(self.sleep_layer_options)
        return out

    def configure(self, *, wake_passes: int | None = None, sleep_layers: Sequence[int] | None = None,
                  sleep_layer_options: dict[str, Any] | None = None) -> "OuroLM":
        """Apply sleepzoo settings in place (None leaves a setting as it is); returns the model.

        ``wake_passes``: loop steps of the wake pass. ``sleep_layers``: insert the retrofit's Jet layers after
        these loop-body layers (:func:`insert_jet_layers`; ``[]`` inserts none); a model that already has them
        accepts only the same positions. ``sleep_layer_options``: their JetBlock options."""
        if sleep_layers is not None:
            after = list(sleep_layers)
            if self.sleep_after:
                if after != list(self.sleep_after) or (sleep_layer_options is not None and
                                                       {**OURO_JET_DEFAULTS, **sleep_layer_options}
                                                       != self.sleep_layer_options):
                    raise SleepzooError(f"Ouro: sleep_layers={after} (options {sleep_layer_options}): this model "
                                        f"already has sleep layers after {list(self.sleep_after)} (options "
                                        f"{self.sleep_layer_options}); they can not be changed")
            elif after:
                insert_jet_layers(self, after, **(sleep_layer_options or {}))
        elif sleep_layer_options is not None and not self.sleep_after:
            raise SleepzooError("Ouro: sleep_layer_options without sleep_layers: give the positions too "
                                "(e.g. sleep_layers=[3, 7, 11, 15, 19, 23])")
        if wake_passes is not None:
            self.wake_passes = wake_passes
        return self

    def _init_weights(self, std: float) -> None:
        """As the published model's initialiser: N(0, std) for linear and embedding weights, zero biases,
        RMSNorm weights at one (nn.RMSNorm's default)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    # -- the engine contract -----------------------------------------------------------------------------

    @property
    def wake_passes(self) -> int:
        return self._wake_passes

    @wake_passes.setter
    def wake_passes(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SleepzooError(f"Ouro: wake_passes={value!r} must be an integer >= 1 (loop steps per wake pass; "
                                f"the published model uses total_ut_steps={self.total_ut_steps})")
        self._wake_passes = value

    def loop_body(self) -> list[nn.Module]:
        """The layers of one loop step in order: the shared layers, each inserted sleep layer right after
        the layer it follows."""
        sleep_layers = getattr(self.model, "sleep_layers", None)
        after = {i: j for j, i in enumerate(self.sleep_after)}
        body: list[nn.Module] = []
        for i, layer in enumerate(self.model.layers):
            body.append(layer)
            if i in after:
                body.append(sleep_layers[after[i]])
        return body

    @property
    def step(self) -> OuroStep:
        """One Ouro loop step (body + model.norm) as one module; rebuilt when sleep layers are inserted."""
        if self._step_cache[0] is None:
            self._step_cache[0] = OuroStep(self.loop_body(), self.model.norm)
        return self._step_cache[0]

    @property
    def layers(self) -> nn.ModuleList:  # type: ignore[override]
        """The engine's layers: the same step ``wake_passes`` times (one state slot per occurrence)."""
        return nn.ModuleList([self.step] * self.wake_passes)

    @property
    def loop_range(self) -> tuple[int, int]:  # type: ignore[override]
        """The last wake step is the looped one: each sleep pass is one more Ouro step."""
        return (self.wake_passes - 1, self.wake_passes)

    #: every Ouro step ends with model.norm, so the norm between passes (sleep.pass_norm) is already there
    pass_norm_builtin = True

    # The engine's contract: the wake pass is ``wake_passes`` Ouro steps; the last is the looped one, so the
    # steps before it are the prelude, and there is no coda (the head follows the step's own norm).
    @property
    def prelude(self) -> list[nn.Module]:  # type: ignore[override]
        return [self.step] * (self.wake_passes - 1)

    @property
    def loop(self) -> list[nn.Module]:  # type: ignore[override]
        return [self.step]

    @property
    def coda(self) -> list[nn.Module]:  # type: ignore[override]
        return []

    def shard_units(self) -> list[nn.Module]:
        """FSDP's units: each block of the loop body once (the original layers, then the inserted Jet
        layers). The step itself is a view over them, not registered under the model, and is never sharded."""
        return list(self.loop_body())

    def mixers(self) -> list[nn.Module]:
        """Each engine state slot is a step: it carries and evicts its sub-layers' state."""
        return [self.step] * self.wake_passes

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)  # (B, T, d)

    def head(self, h: Tensor) -> Tensor:
        # h already passed model.norm at the end of its step: the published head applies no other norm.
        return self.lm_head(h)  # (B, T, vocab)

    # -- the published forward with early exit --------------------------------------------------------------

    def step_outputs(self, input_ids: Tensor, steps: int | None = None) -> tuple[list[Tensor], Tensor]:
        """The published full-attention forward over ``input_ids`` (B, T), no sleep, no window.

        Returns (``h_t`` (B, T, d) for every step t, the normed output of the step; the exit gate's logits
        (B, T, S) with S = ``steps``, default ``total_ut_steps``).
        """
        steps = self.total_ut_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise SleepzooError(f"Ouro: steps={steps!r} must be an integer >= 1")
        engine.check_inputs(self, input_ids, None)
        h = self.embed(input_ids)  # (B, T, d)
        hiddens, gates = [], []
        for _ in range(steps):
            h, _ = self.step(h)  # a fresh state: each step attends over its own K/V of the whole input
            hiddens.append(h)
            gates.append(self.model.early_exit_gate(h).squeeze(-1))  # (B, T)
        return hiddens, torch.stack(gates, dim=-1)  # (B, T, S)

    def exit_logits(self, input_ids: Tensor, mode: str = "last", *, threshold: float | None = None,
                    step: int | None = None, steps: int | None = None) -> Tensor:
        """Logits (B, T, vocab) of the published forward under an exit mode (module docstring):

        ``"last"`` the last step's; ``"expected"`` the exit-probability-weighted sum over steps;
        ``"threshold"`` per token the first step whose cumulative exit probability reaches ``threshold``
        (default the config's ``early_exit_threshold``), the last step if none does; ``"step"`` step
        ``step`` (0-indexed) for every token. ``steps`` defaults to ``total_ut_steps``.
        """
        if mode not in EXIT_MODES:
            raise SleepzooError(f"Ouro: exit mode {mode!r} is not one of {', '.join(EXIT_MODES)}")
        hiddens, gate_logits = self.step_outputs(input_ids, steps)
        S = len(hiddens)
        if mode == "last":
            return self.head(hiddens[-1])
        if mode == "step":
            if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < S:
                raise SleepzooError(f"Ouro: step={step!r} must be an integer in [0, {S})")
            return self.head(hiddens[step])
        pdf = exit_distribution(gate_logits)  # (B, T, S)
        if mode == "expected":
            logits = torch.stack([self.head(h) for h in hiddens], dim=-2)  # (B, T, S, vocab)
            return (pdf.to(logits.dtype).unsqueeze(-1) * logits).sum(dim=-2)
        threshold = self.early_exit_threshold if threshold is None else threshold
        if threshold is None:
            raise SleepzooError("Ouro: mode 'threshold' needs a threshold (the config has no early_exit_threshold)")
        return self.head(self.select_exit(hiddens, pdf, threshold))

    @staticmethod
    def exit_steps(pdf: Tensor, threshold: float) -> Tensor:
        """Per token (B, T) the first step whose cumulative exit probability is >= ``threshold``; the last
        step where none is."""
        reached = pdf.cumsum(dim=-1) >= threshold  # (B, T, S)
        first = reached.float().argmax(dim=-1)  # first True; 0 when none
        return torch.where(reached.any(dim=-1), first, torch.full_like(first, pdf.shape[-1] - 1))

    @classmethod
    def select_exit(cls, hiddens: Sequence[Tensor], pdf: Tensor, threshold: float) -> Tensor:
        """Each token's hidden state (B, T, d) at its threshold exit step."""
        stacked = torch.stack(list(hiddens), dim=2)  # (B, T, S, d)
        idx = cls.exit_steps(pdf, threshold)[..., None, None].expand(-1, -1, 1, stacked.shape[-1])
        return stacked.gather(2, idx).squeeze(2)  # (B, T, d)


def insert_jet_layers(model: OuroLM, after: Sequence[int] = (3, 7, 11, 15, 19, 23), **jet_options: Any) -> OuroLM:
    """Retrofit ``model`` for sleep (SPEC 3): an MLP-free layer (input RMSNorm + JetBlock, residual) after
    each loop-body layer in ``after``, in place; returns the model.

    The new layers are ``model.sleep_layers.{j}`` (j in the order of ``after``): pretrained names are
    untouched, so a pretrained checkpoint loads into the retrofitted model with ``strict=False`` or before
    the insertion. Each JetBlock's ``o_proj`` is zero, so every inserted layer adds exactly zero and the
    pretrained function is unchanged until training moves it (gradients still reach o_proj). ``jet_options``
    go to :class:`sleepzoo.mixers.jet.JetBlock` (defaults: 16 heads x 64, values 128).
    """
    from ..mixers.jet import JetBlock

    if getattr(model.model, "sleep_layers", None) is not None:
        raise SleepzooError(f"Ouro: sleep layers are already inserted (after layers {list(model.sleep_after)})")
    after = list(after)
    n = model.num_hidden_layers
    if not after or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in after) \
            or len(set(after)) != len(after) or after != sorted(after):
        raise SleepzooError(f"Ouro: after={after!r} must list distinct loop-body layer indices in [0, {n}), "
                            f"increasing")
    options = {**OURO_JET_DEFAULTS, **jet_options}
    device = model.model.norm.weight.device
    dtype = model.model.norm.weight.dtype
    layers = []
    for j, i in enumerate(after):
        jet = JetBlock(model.hidden_size, layer_idx=i, **options)
        nn.init.zeros_(jet.o_proj.weight)  # the pretrained function is unchanged at step 0
        layers.append(Block(model.hidden_size, jet, d_ff=0, norm_eps=model.norm_eps))
    model.model.sleep_layers = nn.ModuleList(layers).to(device=device, dtype=dtype)
    model.sleep_after = tuple(after)
    model.sleep_layer_options = dict(options)
    model._step_cache[0] = None
    return model


def default_sleep_layers(num_hidden_layers: int) -> list[int]:
    """The retrofit's positions (SPEC 3, *ours*): after every 4th loop-body layer, ``3, 7, ..., n - 1``;
    Ouro-1.4B's 24 layers give ``[3, 7, 11, 15, 19, 23]``. Fewer than 4 layers: after the last one."""
    return list(range(3, num_hidden_layers, 4)) or [num_hidden_layers - 1]


# Ouro-1.4B's architecture (the fields the published loaders agree on; no weights). The recipe builder
# uses it to validate a recipe whose ``model.pretrained`` folder is not downloaded yet (on the meta device).
OURO_1_4B_CONFIG: dict[str, Any] = {
    "architectures": ["OuroForCausalLM"], "model_type": "ouro", "vocab_size": 49152, "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
    "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 65536, "rope_theta": 1000000.0,
    "rope_scaling": None, "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "total_ut_steps": 4,
    "early_exit_threshold": 1.0, "eos_token_id": 0, "torch_dtype": "bfloat16",
}


def build_ouro(*, pretrained: str | None = None, hf_config: dict[str, Any] | str | None = None,
               wake_passes: int | None = None, sleep_layers: list[int] | None = None,
               mixers: dict[str, dict] | None = None, d_model: int, layers: Sequence[str], d_ff: int | None,
               norm_eps: float, tie_embeddings: bool, init_std: float, vocab_size: int | None = None,
               sleep: SleepConfig | None = None) -> OuroLM:
    """Model builder registered as ``ouro`` (recipe ``model: {name: ouro, ...}``).

    Pretrained: ``pretrained`` (a local folder, config.json + safetensors, loaded in float32 by
    :func:`sleepzoo.pretrained.from_pretrained`) or ``hf_config`` (a config dict or path; random weights).
    These get the sleep retrofit: MLP-free Jet layers after the loop-body layers ``sleep_layers`` (default
    :func:`default_sleep_layers`: 3, 7, 11, 15, 19, 23 for Ouro-1.4B; ``[]`` for none), sized by
    ``mixers.jet`` (default 16 heads x 64, values 128), ``o_proj`` zero so the pretrained function is
    unchanged at step 0. ``wake_passes``: loop steps of the wake pass (default the config's
    ``total_ut_steps``; the sleep recipes use 1, the paper's single prediction pass).

    From scratch (neither), from the model section's other fields (defaults: those of
    :class:`sleepzoo.config.ModelConfig`): ``d_model`` -> hidden_size, ``d_ff`` -> intermediate_size (default
    8/3 d rounded to 64), one shared layer per ``layers`` entry (each must be ``attention``), ``norm_eps``,
    ``tie_embeddings``, ``init_std``, ``mixers.attention`` (num_heads, num_kv_heads, head_dim, rope_theta);
    the loop has the published 4 steps; ``sleep_layers`` defaults to none there.

    ``loop_start``/``loop_end`` are not taken: a sleep pass is a whole Ouro step (``wake_passes`` sets the
    steps of the wake pass).
    """
    mixers = mixers or {}
    unused = sorted(set(mixers) - {"attention", "jet"})
    if unused:
        raise RecipeError(f"model.mixers: {', '.join(unused)} not used by the ouro model (attention: its layers "
                          f"when built from scratch; jet: the inserted sleep layers)")
    from ..mixers.jet import JetBlock

    jet = check_mixer_options(JetBlock, mixers.get("jet", {}), "model.mixers.jet")
    if pretrained is not None or hf_config is not None:
        if "attention" in mixers:
            raise RecipeError("model.mixers.attention: a pretrained Ouro's attention comes from its config.json; "
                              "remove it")
        from ..pretrained import build_pretrained  # pretrained imports this module
        model = build_pretrained("ouro", pretrained, hf_config, sleep=sleep, reference=OURO_1_4B_CONFIG)
        if not isinstance(model, OuroLM):
            raise RecipeError(f"model: the config holds a {type(model).__name__}, not Ouro (model.name: ouro)")
        after = default_sleep_layers(model.num_hidden_layers) if sleep_layers is None else sleep_layers
        if sleep_layers is not None or not model.sleep_after:  # a retrofitted folder keeps its own
            model.configure(sleep_layers=after, sleep_layer_options=jet if jet else None)
        model.configure(wake_passes=wake_passes)
    else:
        model = _scratch_ouro(list(layers), mixers.get("attention", {}), d_model=d_model, d_ff=d_ff,
                              norm_eps=norm_eps, tie_embeddings=tie_embeddings, init_std=init_std,
                              wake_passes=wake_passes, vocab_size=vocab_size, sleep=sleep)
        if sleep_layers:
            model.configure(sleep_layers=sleep_layers, sleep_layer_options=jet or None)
        elif jet:
            raise RecipeError("model.mixers.jet: sizes the inserted sleep layers; set model.sleep_layers too")
    if vocab_size is not None and vocab_size > model.vocab_size:
        raise RecipeError(f"vocab_size={vocab_size} is larger than Ouro's vocabulary ({model.vocab_size})")
    return model


def _scratch_ouro(layers: list[str], attention: dict, *, d_model: int, d_ff: int | None, norm_eps: float,
                  tie_embeddings: bool, init_std: float, wake_passes: int | None, vocab_size: int | None,
                  sleep: SleepConfig | None) -> OuroLM:
    """An Ouro built from a recipe's hybrid-style fields (see :func:`build_ouro`), random weights."""
    from .hybrid import default_d_ff

    if any(name != "attention" for name in layers):
        raise RecipeError(f"model.layers: {layers!r}: the ouro model's shared layers are all "
                          f"'attention' (sleep layers are model.sleep_layers)")
    allowed = {"num_heads", "num_kv_heads", "head_dim", "rope_theta"}
    extra = sorted(set(attention) - allowed)
    if extra:
        raise RecipeError(f"model.mixers.attention: {', '.join(extra)} not supported by the ouro model "
                          f"(allowed: {', '.join(sorted(allowed))})")
    attn = check_mixer_options(Attention, dict(attention), "model.mixers.attention")
    if vocab_size is None:
        raise RecipeError("model: an ouro model built from scratch takes its vocabulary from the task "
                          "(vocab_size)")
    return OuroLM(vocab_size=vocab_size, hidden_size=d_model,
                  intermediate_size=default_d_ff(d_model) if d_ff is None else d_ff,
                  num_hidden_layers=len(layers), num_attention_heads=attn.get("num_heads", 4),
                  num_key_value_heads=attn.get("num_kv_heads"), head_dim=attn.get("head_dim"),
                  rope_theta=float(attn.get("rope_theta", 1e6)), rms_norm_eps=norm_eps,
                  tie_word_embeddings=tie_embeddings, initializer_range=init_std, wake_passes=wake_passes,
                  sleep=sleep)
