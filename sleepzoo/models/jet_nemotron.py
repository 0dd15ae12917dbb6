"""Jet-Nemotron (NVIDIA; Qwen2.5-1.5B base) in native PyTorch, sleep-enabled (SPEC 3).

Built from a Hugging Face-style ``config.json`` (the published file's fields), with the published checkpoint's
state-dict names, so a user's local weights load without renaming::

    model.embed_tokens.weight                          (vocab, d)
    model.layers.{i}.input_layernorm.weight            (d,)
    model.layers.{i}.self_attn.*                       attn / swa: q/k/v_proj (+bias), o_proj
                                                       jet: sleepzoo.mixers.jet.JetBlock's names
    model.layers.{i}.post_attention_layernorm.weight   (d,)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    SwiGLU
    model.norm.weight                                  (d,)
    lm_head.weight                                     only when tie_word_embeddings is false

Sleep (*ours*, SPEC 3): blocks [7, 21) of the 28 are looped; in general the middle half,
``[n // 4, n - n // 4)``. Without sleep settings the model is the published one: one pass over a window
of ``max_position_embeddings`` tokens (so no eviction for any input it was trained for), ``loops = 1``.

The weights are under a non-commercial licence: sleepzoo never ships them; :func:`sleepzoo.pretrained.
from_pretrained` loads a user's local folder (config.json + *.safetensors).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..config import RecipeError, SleepConfig
from ..mixers.attention import Attention
from ..mixers.jet import JetBlock
from ..mixers.parts import RMSNorm
from ..registry import SleepzooError
from ..rules import RuleError, check_loop_range
from .base import Block, SleepModel, read_config_json

MODEL_TYPE = "jet_nemotron"
LAYER_TYPES = ("attn", "swa", "jet")

# Jet-Nemotron-2B's architecture: the published config.json's content (facts, no weights). The recipe
# builder uses it when no local folder is given, e.g. to count parameters or check names on the meta device.
JET_NEMOTRON_2B_CONFIG: dict[str, Any] = {
    "architectures": ["JetNemotronForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "efficient_attention_config": {
        "jet": {"conv_size": 4, "dconv_generator_reduction": 8, "dconv_implementation": "triton",
                "expand_v": 2.6666666667, "head_dim": 96, "mode": "chunk", "norm_eps": "1e-5", "num_heads": 12},
        "swa": {"window_size": 1152},
    },
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "layer_types": ["jet"] * 14 + ["attn"] + ["jet"] * 4 + ["attn", "swa", "swa"] + ["jet"] * 6,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "jet_nemotron",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_mrope": False,
    "vocab_size": 151936,
}

# Fields the model needs.
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "layer_types")
# Fields the model reads, with the value used when a file leaves them out (Qwen2's defaults).
OPTIONAL = {"model_type": MODEL_TYPE, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "efficient_attention_config": None, "head_dim": None, "max_position_embeddings": 32768,
            "hidden_act": "silu", "rope_scaling": None, "use_mrope": False, "use_sliding_window": False,
            "torch_dtype": None, "dtype": None, "initializer_range": 0.02}
# Fields that change nothing in a forward pass: bookkeeping, generation and kernel choices. attention_dropout
# only acts in training under Hugging Face; sleepzoo has no attention dropout. max_window_layers is a Qwen2
# field that only matters with use_sliding_window, which must be false (Jet's windows are its swa layers).
HARMLESS = ("architectures", "auto_map", "transformers_version", "use_cache", "bos_token_id", "eos_token_id",
            "pad_token_id", "attention_dropout", "max_window_layers", "sliding_window", "_name_or_path",
            "output_attentions", "output_hidden_states", "return_dict",
            "sleepzoo")  # sleepzoo's own settings (sleep, loop range), applied by sleepzoo.pretrained
JET_FIELDS = {"num_heads", "head_dim", "expand_v", "conv_size", "dconv_generator_reduction", "norm_eps"}
JET_HARMLESS = {"dconv_implementation", "mode"}  # kernel choices (triton / chunk) of the published code
SWA_FIELDS = {"window_size"}


def _fail(where: str, msg: str) -> SleepzooError:
    return SleepzooError(f"{where}: {msg}")


def _int(cfg: dict, key: str, where: str, minimum: int = 1) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(where, f"{key}={value!r} must be an integer >= {minimum}")
    return value


def _float(cfg: dict, key: str, where: str) -> float:
    value = cfg[key]
    try:  # the published file writes some floats as strings ("1e-5")
        out = float(value)
    except (TypeError, ValueError):
        raise _fail(where, f"{key}={value!r} must be a number") from None
    if isinstance(value, bool) or not math.isfinite(out) or out <= 0:
        raise _fail(where, f"{key}={value!r} must be a positive number")
    return out


def _check_keys(given: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise _fail(where, f"unknown field(s) {', '.join(unknown)}; sleepzoo's Jet-Nemotron does not know what "
                    f"they change, so it refuses to guess (known: {', '.join(sorted(allowed))})")


def read_config(config: dict | str | Path) -> tuple[dict, str]:
    """The config as a dict (a path may name config.json or the folder holding it) and where it came from."""
    data, path = read_config_json(config)
    return data, "config" if path is None else str(path)


def parse_config(cfg: dict, where: str = "config") -> dict:
    """Check a Jet-Nemotron config and return the settings the model is built from.

    Every field must be known: needed (:data:`REQUIRED`), read with a default (:data:`OPTIONAL`) or harmless
    (:data:`HARMLESS`); anything else, a missing required field, or a setting sleepzoo does not implement
    (rope_scaling, mrope, a non-silu activation, Qwen2's use_sliding_window) raises a SleepzooError naming it.
    """
    _check_keys(cfg, set(REQUIRED) | set(OPTIONAL) | set(HARMLESS), where)
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise _fail(where, f"missing required field(s) {', '.join(missing)}")
    c = {**OPTIONAL, **cfg}
    if c["model_type"] != MODEL_TYPE:
        raise _fail(where, f"model_type={c['model_type']!r}; this builder reads {MODEL_TYPE!r} configs")
    if c["hidden_act"] != "silu":
        raise _fail(where, f"hidden_act={c['hidden_act']!r} is not supported: Jet-Nemotron's MLP is SwiGLU (silu)")
    if c["rope_scaling"] is not None:
        raise _fail(where, f"rope_scaling={c['rope_scaling']!r} is not supported: only plain RoPE "
                    f"(rope_scaling null) is implemented")
    if c["use_mrope"]:
        raise _fail(where, "use_mrope=true is not supported (multimodal RoPE); only plain RoPE is implemented")
    if c["use_sliding_window"]:
        raise _fail(where, "use_sliding_window=true is not supported: Jet-Nemotron's sliding windows are its "
                    "'swa' layer_types (efficient_attention_config.swa.window_size)")
    s: dict[str, Any] = {k: _int(c, k, where) for k in
                         ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads", "vocab_size", "max_position_embeddings")}
    s["rms_norm_eps"] = _float(c, "rms_norm_eps", where)
    s["rope_theta"] = _float(c, "rope_theta", where)
    s["initializer_range"] = _float(c, "initializer_range", where)
    if not isinstance(c["tie_word_embeddings"], bool):
        raise _fail(where, f"tie_word_embeddings={c['tie_word_embeddings']!r} must be true or false")
    s["tie_word_embeddings"] = c["tie_word_embeddings"]
    s["head_dim"] = (s["hidden_size"] // s["num_attention_heads"] if c["head_dim"] is None
                     else _int(c, "head_dim", where))
    if s["num_attention_heads"] % s["num_key_value_heads"]:
        raise _fail(where, f"num_key_value_heads={s['num_key_value_heads']} must divide "
                    f"num_attention_heads={s['num_attention_heads']}")
    types = c["layer_types"]
    if not isinstance(types, list) or len(types) != s["num_hidden_layers"]:
        raise _fail(where, f"layer_types must be a list of num_hidden_layers={s['num_hidden_layers']} entries, "
                    f"got {types!r}")
    bad = sorted({t for t in types if t not in LAYER_TYPES}, key=str)
    if bad:
        raise _fail(where, f"layer_types holds unknown type(s) {bad}; known: {', '.join(LAYER_TYPES)}")
    s["layer_types"] = list(types)
    eff = c["efficient_attention_config"] or {}
    if not isinstance(eff, dict):
        raise _fail(where, f"efficient_attention_config must be a mapping, got {eff!r}")
    _check_keys(eff, {"jet", "swa"}, f"{where}: efficient_attention_config")
    s["jet"] = s["swa_window"] = None
    if "jet" in types:
        jw = f"{where}: efficient_attention_config.jet"
        jet = eff.get("jet")
        if not isinstance(jet, dict):
            raise _fail(where, "efficient_attention_config.jet is missing: layer_types has 'jet' layers")
        _check_keys(jet, JET_FIELDS | JET_HARMLESS, jw)
        missing = sorted(JET_FIELDS - set(jet))
        if missing:
            raise _fail(jw, f"missing required field(s) {', '.join(missing)}")
        s["jet"] = {"num_heads": _int(jet, "num_heads", jw), "head_dim": _int(jet, "head_dim", jw),
                    "expand_v": _float(jet, "expand_v", jw), "conv_size": _int(jet, "conv_size", jw),
                    "dconv_generator_reduction": _int(jet, "dconv_generator_reduction", jw),
                    "norm_eps": _float(jet, "norm_eps", jw)}
    if "swa" in types:
        sw = f"{where}: efficient_attention_config.swa"
        swa = eff.get("swa")
        if not isinstance(swa, dict) or "window_size" not in swa:
            raise _fail(where, "efficient_attention_config.swa.window_size is missing: layer_types has 'swa' layers")
        _check_keys(swa, SWA_FIELDS, sw)
        s["swa_window"] = _int(swa, "window_size", sw)
    return s


def default_loop_range(n_layers: int) -> tuple[int, int]:
    """The middle half of the blocks, [n // 4, n - n // 4): Jet-Nemotron-2B's 28 blocks give (7, 21), i.e. the
    middle 14 (SPEC 3, *ours*: 0-indexed 7..20). Fewer than 4 blocks: all of them."""
    q = n_layers // 4
    return (q, n_layers - q) if q > 0 else (0, n_layers)


class JetNemotronLM(SleepModel):
    """Jet-Nemotron with the published state-dict names, driven by the sleep engine.

    Build it with :meth:`from_config` (a config dict or a path to config.json) or, with weights,
    :func:`sleepzoo.pretrained.from_pretrained`. ``hf_config`` keeps the config it was built from, so
    :func:`sleepzoo.pretrained.save_pretrained` writes it back.

    Args:
        config: the Hugging Face-style config (see :func:`parse_config` for what is accepted).
        sleep: window / loops / eviction; default: the published model (a window of
            ``max_position_embeddings`` tokens, one pass).
        loop_range: [start, end) of the looped blocks; default :func:`default_loop_range` ((7, 21) for 2B).
    """

    def __init__(self, config: dict, *, sleep: SleepConfig | None = None,
                 loop_range: tuple[int, int] | None = None, where: str = "config"):
        s = parse_config(config, where)
        super().__init__(sleep or SleepConfig(window=s["max_position_embeddings"], loops=1))
        self.hf_config = {"model_type": MODEL_TYPE, **config}  # saved as a folder that from_pretrained dispatches
        self.settings = s
        self.vocab_size = s["vocab_size"]
        d, n = s["hidden_size"], s["num_hidden_layers"]
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(s["vocab_size"], d)
        blocks = []
        for i, kind in enumerate(s["layer_types"]):
            block = Block(d, self._mixer(kind, i), s["intermediate_size"], s["rms_norm_eps"])
            # Qwen2's norms, in float32 as published (same parameter names and shapes as nn.RMSNorm)
            block.input_layernorm = RMSNorm(d, eps=s["rms_norm_eps"], float32=True)
            block.post_attention_layernorm = RMSNorm(d, eps=s["rms_norm_eps"], float32=True)
            blocks.append(block)
        self.model.layers = nn.ModuleList(blocks)
        self.model.norm = RMSNorm(d, eps=s["rms_norm_eps"], float32=True)
        self.lm_head = nn.Linear(d, s["vocab_size"], bias=False)
        lo, hi = default_loop_range(n) if loop_range is None else tuple(loop_range)
        try:
            self.loop_range = check_loop_range(lo, hi, n)
        except RuleError as exc:
            raise SleepzooError(f"loop_range={loop_range!r}: {exc.allowed}") from None
        self._init_weights(s["initializer_range"])
        self.tie_weights()

    def _mixer(self, kind: str, i: int) -> nn.Module:
        s = self.settings
        if kind == "jet":
            return JetBlock(s["hidden_size"], layer_idx=i, **s["jet"])
        # attn and swa: Qwen2 GQA attention, q/k/v with bias, o without; swa adds a window (itself included)
        return Attention(s["hidden_size"], num_heads=s["num_attention_heads"],
                         num_kv_heads=s["num_key_value_heads"], head_dim=s["head_dim"], rope_theta=s["rope_theta"],
                         qkv_bias=True, window=s["swa_window"] if kind == "swa" else None, layer_idx=i)

    @classmethod
    def from_config(cls, config: dict | str | Path, *, sleep: SleepConfig | None = None,
                    loop_range: tuple[int, int] | None = None) -> "JetNemotronLM":
        """Build (randomly initialised) from a config dict, a config.json path or the folder holding it."""
        data, where = read_config(config)
        return cls(data, sleep=sleep, loop_range=loop_range, where=where)

    def sleepzoo_settings(self) -> dict[str, Any]:
        """This model's sleepzoo settings that differ from the defaults, by their override names
        (:func:`sleepzoo.pretrained.save_pretrained` writes them under config.json's ``sleepzoo`` key)."""
        if self.loop_range == default_loop_range(len(self.model.layers)):
            return {}
        return {"loop_start": self.loop_range[0], "loop_end": self.loop_range[1]}

    def configure(self, *, loop_start: int | None = None, loop_end: int | None = None) -> "JetNemotronLM":
        """Set the looped blocks [loop_start, loop_end) in place (None keeps that end); returns the model."""
        n = len(self.model.layers)
        rng = (self.loop_range[0] if loop_start is None else loop_start,
               self.loop_range[1] if loop_end is None else loop_end)
        try:
            self.loop_range = check_loop_range(*rng, n)
        except RuleError as exc:
            raise SleepzooError(f"{exc} (default {list(default_loop_range(n))})") from None
        return self

    def tie_weights(self) -> None:
        """Share the embedding with the head when the config ties them (also after ``to_empty``, which can
        give each module its own copy)."""
        if self.settings["tie_word_embeddings"]:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, std: float) -> None:
        # A pretrained checkpoint overwrites all of this; it makes a random model (tests, from scratch) sane.
        for module in self.modules():
            if getattr(module, "_sleepzoo_custom_init", False):  # e.g. JetBlock's kernel generator w2
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    @property
    def layers(self) -> nn.ModuleList:  # type: ignore[override]
        return self.model.layers

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)  # (B, T, d)

    def head(self, h: Tensor) -> Tensor:
        return self.lm_head(self.model.norm(h))  # (B, T, vocab)


def build_jet_nemotron(*, pretrained: str | None = None, hf_config: dict[str, Any] | str | None = None,
                       loop_start: int | None = None, loop_end: int | None = None, vocab_size: int | None = None,
                       sleep: SleepConfig | None = None) -> JetNemotronLM:
    """Model builder registered as ``jet_nemotron`` (recipe ``model: {name: jet_nemotron, ...}``).

    Takes from the model section: ``pretrained`` (a local folder: config.json + weights, loaded in float32
    with :func:`sleepzoo.pretrained.from_pretrained`) or ``hf_config`` (a config dict or path; random weights);
    with neither, Jet-Nemotron-2B's architecture with random weights. ``loop_start`` / ``loop_end`` override
    the looped blocks (default (7, 21) for 2B). On the meta device (``sleepzoo recipe validate``) a
    ``pretrained`` folder that is not there yet stands for Jet-Nemotron-2B's published architecture. The
    architecture is the config's, so no other field of the section applies (its signature says which).
    """
    from ..pretrained import build_pretrained  # pretrained imports this module
    model = build_pretrained("jet_nemotron", pretrained, hf_config, sleep=sleep, reference=JET_NEMOTRON_2B_CONFIG)
    if not isinstance(model, JetNemotronLM):
        raise RecipeError(f"model: the config holds a {type(model).__name__}, not Jet-Nemotron (model.name: "
                          f"jet_nemotron)")
    try:
        model.configure(loop_start=loop_start, loop_end=loop_end)
    except SleepzooError as exc:
        raise RecipeError(f"model.{exc}") from None
    if vocab_size is not None and vocab_size > model.vocab_size:
        raise RecipeError(f"vocab_size={vocab_size} is larger than Jet-Nemotron's vocabulary ({model.vocab_size})")
    return model
