"""Jet-Nemotron (native, SPEC 3): the published names and shapes on the meta device, loading from a local folder
(single file and sharded, strict checks, save -> load), the published forward, and the sleep loop range."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sleepzoo.pretrained
from sleepzoo import SleepzooError
from sleepzoo.config import ModelConfig
from sleepzoo.models.jet_nemotron import JetNemotronLM, build_jet_nemotron, default_loop_range
from sleepzoo.pretrained import from_config, from_pretrained, model_class, save_pretrained

# the published config.json, shipped with sleepzoo (sleepzoo/models/configs/)
REFERENCE = Path(sleepzoo.pretrained.published_config("jet-nemotron-2b"))

# Same structure as the published config (jet / attn / swa layers, GQA, tied embeddings), tiny sizes.
TINY = {
    "architectures": ["JetNemotronForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 1,
    "efficient_attention_config": {
        "jet": {"conv_size": 4, "dconv_generator_reduction": 4, "dconv_implementation": "triton",
                "expand_v": 2.0, "head_dim": 16, "mode": "chunk", "norm_eps": "1e-5", "num_heads": 2},
        "swa": {"window_size": 5},
    },
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 96,
    "layer_types": ["jet", "attn", "jet", "swa", "jet", "attn"],
    "max_position_embeddings": 64,
    "max_window_layers": 6,
    "model_type": "jet_nemotron",
    "num_attention_heads": 4,
    "num_hidden_layers": 6,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "transformers_version": "4.51.3",
    "use_cache": True,
    "use_mrope": False,
    "vocab_size": 97,
}

ATTN_KEYS = {"q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
             "o_proj.weight"}
JET_KEYS = {"q_proj.weight", "k_proj.weight", "v_proj.weight", "b_proj.weight", "a_proj.weight", "A_log", "dt_bias",
            "dynamic_conv1d.kernel_generator.w1.weight", "dynamic_conv1d.kernel_generator.w2.weight",
            "dynamic_conv1d.kernel_generator.w2.bias", "g_proj.weight", "o_norm.weight", "o_proj.weight"}
BLOCK_KEYS = {"input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
              "mlp.up_proj.weight", "mlp.down_proj.weight"}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def checkpoint_keys(layer_types: list[str], tied: bool = True) -> set[str]:
    """The published checkpoint's tensor names for these layer types."""
    keys = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    for i, kind in enumerate(layer_types):
        mixer = JET_KEYS if kind == "jet" else ATTN_KEYS
        keys |= {f"model.layers.{i}.{k}" for k in BLOCK_KEYS}
        keys |= {f"model.layers.{i}.self_attn.{k}" for k in mixer}
    return keys


def tiny_model(seed: int = 0, **overrides) -> JetNemotronLM:
    torch.manual_seed(seed)
    model = JetNemotronLM.from_config({**TINY, **overrides})
    with torch.no_grad():  # non-trivial norms, biases and kernels, so a wrong load can not hide behind defaults
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def write_folder(folder: Path, model: JetNemotronLM, config: dict | None = None) -> dict[str, torch.Tensor]:
    """config.json + model.safetensors with the published names (no lm_head when tied), as a user's folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or model.hf_config))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and model.settings["tie_word_embeddings"])}
    save_file(tensors, str(folder / "model.safetensors"))
    return tensors


def ids(T: int = 12, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------
# the published architecture, on the meta device


def test_reference_config_names_and_shapes_on_meta():
    with torch.device("meta"):
        model = JetNemotronLM.from_config(REFERENCE)
    config = json.loads(REFERENCE.read_text())
    sd = model.state_dict()
    # The tied head is the embedding itself; the checkpoint (and save_pretrained) has no lm_head key.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert set(sd) - {"lm_head.weight"} == checkpoint_keys(config["layer_types"])
    assert [i for i, t in enumerate(config["layer_types"]) if t != "jet"] == [14, 19, 20, 21]
    shapes = {
        "model.embed_tokens.weight": (151936, 1536),
        "model.layers.14.self_attn.q_proj.weight": (1536, 1536),
        "model.layers.14.self_attn.q_proj.bias": (1536,),
        "model.layers.14.self_attn.k_proj.weight": (256, 1536),
        "model.layers.20.self_attn.v_proj.bias": (256,),
        "model.layers.14.self_attn.o_proj.weight": (1536, 1536),
        "model.layers.0.self_attn.v_proj.weight": (3072, 1536),
        "model.layers.0.self_attn.q_proj.weight": (1152, 1536),
        "model.layers.0.self_attn.dynamic_conv1d.kernel_generator.w1.weight": (384, 1536),
        "model.layers.0.self_attn.dynamic_conv1d.kernel_generator.w2.weight": (12288, 384),
        "model.layers.0.self_attn.o_norm.weight": (256,),
        "model.layers.3.mlp.gate_proj.weight": (8960, 1536),
        "model.layers.3.mlp.down_proj.weight": (1536, 8960),
        "model.norm.weight": (1536,),
    }
    for name, shape in shapes.items():
        assert tuple(sd[name].shape) == shape, name
    # 1,964,806,208 with tied embeddings = 24 JetBlocks x 23,052,568 + 4 attention x 5,507,072
    # + 28 SwiGLU x 41,287,680 + 57 norms x 1536 + embedding 151936 x 1536.
    assert model.num_parameters() == 1_964_806_208
    assert model.loop_range == (7, 21)  # SPEC 3: the middle 14 of 28 blocks, 0-indexed 7..20
    assert model.sleep.window == 131072 and model.sleep.loops == 1  # published behaviour without sleep settings
    swa = model.layers[20].self_attn
    assert swa.window == 1152 and model.layers[14].self_attn.window is None


def test_default_loop_range():
    assert default_loop_range(28) == (7, 21)
    assert default_loop_range(6) == (1, 5)
    assert default_loop_range(2) == (0, 2)


# --------------------------------------------------------------------------------------------------------------
# config checks


@pytest.mark.parametrize("change, named", [
    ({"my_new_field": 1}, "my_new_field"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"use_mrope": True}, "use_mrope"),
    ({"layer_types": ["jet", "attn", "mamba", "swa", "jet", "attn"]}, "mamba"),
    ({"layer_types": ["jet", "attn"]}, "layer_types"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_config_errors_name_the_field(change, named):
    with pytest.raises(SleepzooError, match=named):
        JetNemotronLM.from_config({**TINY, **change})


def test_config_missing_and_nested_fields():
    cfg = {k: v for k, v in TINY.items() if k not in ("hidden_size", "vocab_size")}
    with pytest.raises(SleepzooError, match="hidden_size, vocab_size"):
        JetNemotronLM.from_config(cfg)
    cfg = copy.deepcopy(TINY)
    cfg["efficient_attention_config"]["jet"]["use_short_conv"] = True
    with pytest.raises(SleepzooError, match="use_short_conv"):
        JetNemotronLM.from_config(cfg)
    cfg = copy.deepcopy(TINY)
    del cfg["efficient_attention_config"]["swa"]
    with pytest.raises(SleepzooError, match="swa.window_size"):
        JetNemotronLM.from_config(cfg)


def test_dispatch_on_model_type(tmp_path):
    with pytest.raises(SleepzooError, match="unknown model_type 'llama'.*jet_nemotron"):
        from_config({**TINY, "model_type": "llama"})
    with torch.device("meta"):
        assert isinstance(from_config(TINY), JetNemotronLM)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with torch.device("meta"):
        assert isinstance(from_config(tmp_path), JetNemotronLM)
    # Ouro is dispatched lazily: its class when sleepzoo.models.ouro is installed, else a clear error.
    if importlib.util.find_spec("sleepzoo.models.ouro") is None:
        with pytest.raises(SleepzooError, match="'ouro' is known but its module sleepzoo.models.ouro"):
            model_class("ouro")
    else:
        assert model_class("ouro").__name__ == "OuroLM"


# --------------------------------------------------------------------------------------------------------------
# loading a local folder


def test_load_save_load_same_logits(tmp_path):
    source = tiny_model()
    tensors = write_folder(tmp_path / "published", source)
    assert "lm_head.weight" not in tensors
    x = ids()
    want = source(x).logits
    loaded = from_pretrained(tmp_path / "published")  # strict: every name and shape checked
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.model.embed_tokens.weight.device.type == "cpu"
    assert torch.equal(loaded(x).logits, want)
    save_pretrained(loaded, tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert set(saved) == set(tensors)  # the tied head once, under the embedding's name
    again = from_pretrained(tmp_path / "saved")
    assert torch.equal(again(x).logits, want)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["layer_types"] == TINY["layer_types"]


def test_untied_head_and_dtype(tmp_path):
    source = tiny_model(tie_word_embeddings=False)
    assert "lm_head.weight" in write_folder(tmp_path, source)
    loaded = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.lm_head.weight, source.lm_head.weight.bfloat16())
    assert from_pretrained(tmp_path).model.norm.weight.dtype == torch.float32  # the config's torch_dtype


def test_renamed_and_misshaped_tensors_are_named(tmp_path):
    source = tiny_model()
    tensors = write_folder(tmp_path, source)
    renamed = dict(tensors)
    renamed["model.layers.2.self_attn.q_proj.weights"] = renamed.pop("model.layers.2.self_attn.q_proj.weight")
    save_file(renamed, str(tmp_path / "model.safetensors"))
    with pytest.raises(SleepzooError, match=r"missing.*model\.layers\.2\.self_attn\.q_proj\.weight\b") as err:
        from_pretrained(tmp_path)
    assert "unexpected in the files: model.layers.2.self_attn.q_proj.weights" in str(err.value)
    # strict=False allows the rename: the missing tensor keeps its initialisation, the rest load.
    partial = from_pretrained(tmp_path, strict=False)
    assert torch.equal(partial.model.layers[0].self_attn.v_proj.weight, tensors["model.layers.0.self_attn.v_proj.weight"])

    misshaped = dict(tensors)
    misshaped["model.layers.3.self_attn.k_proj.bias"] = torch.zeros(7)
    save_file(misshaped, str(tmp_path / "model.safetensors"))
    for strict in (True, False):  # mis-shaped is never allowed
        with pytest.raises(SleepzooError, match=r"mis-shaped: model\.layers\.3\.self_attn\.k_proj\.bias \(file \[7\], model \[32\]\)"):
            from_pretrained(tmp_path, strict=strict)


def test_sharded_index(tmp_path):
    source = tiny_model()
    tensors = {k: v.contiguous() for k, v in source.state_dict().items() if k != "lm_head.weight"}
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(tmp_path / file))
        weight_map.update({n: file for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    x = ids()
    assert torch.equal(from_pretrained(tmp_path)(x).logits, source(x).logits)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SleepzooError, match="model-00002-of-00002.safetensors"):
        from_pretrained(tmp_path)


def test_missing_folder_pieces(tmp_path):
    with pytest.raises(SleepzooError, match="config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(SleepzooError, match="neither model.safetensors nor model.safetensors.index.json"):
        from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# forward: published behaviour and the sleep loop range


def test_one_pass_equals_plain_forward():
    model = tiny_model()
    x = ids(T=12)
    with torch.no_grad():
        h = model.model.embed_tokens(x)
        for block in model.model.layers:  # every block once, fresh state: the published forward
            h, _ = block(h, None)
        want = model.lm_head(model.model.norm(h))
        got = model(x).logits  # default sleep: window = max_position_embeddings (64) >= T, loops = 1
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        assert torch.allclose(model(x, window=12, loops=1).logits, want, atol=1e-5, rtol=1e-5)
        # loops only act on windows that are consolidated: one window, any loops, same logits
        assert torch.allclose(model(x, window=12, loops=3).logits, want, atol=1e-5, rtol=1e-5)


def test_loops_repeat_only_the_loop_range():
    model = JetNemotronLM.from_config(TINY, loop_range=(2, 5))
    assert model.loop_range == (2, 5)
    calls = [0] * len(model.layers)
    hooks = [block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, block in enumerate(model.layers)]
    try:
        with torch.no_grad():
            model(ids(T=12), window=4, loops=3)  # 3 windows; the first 2 are consolidated (slept on)
    finally:
        for hook in hooks:
            hook.remove()
    windows, consolidated, loops = 3, 2, 3
    prelude, looped, coda = [0, 1], [2, 3, 4], [5]
    assert [calls[i] for i in prelude] == [windows] * 2  # once per window
    # wake pass of every window + (loops - 1) sleep passes per consolidated window = loops per consolidated one
    assert [calls[i] for i in looped] == [consolidated * loops + (windows - consolidated)] * 3
    # once per window on the wake pass, and once more after the sleep passes of a consolidated window (SPEC 1)
    assert [calls[i] for i in coda] == [windows + consolidated]
    calls[:] = [0] * len(model.layers)
    hooks = [block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, block in enumerate(model.layers)]
    try:
        with torch.no_grad():
            model(ids(T=12), window=4, loops=3, coda="wake")
    finally:
        for hook in hooks:
            hook.remove()
    assert [calls[i] for i in coda] == [windows]  # sleep.coda: wake, the ablation: the wake pass only


def build_model_of(cfg: ModelConfig) -> torch.nn.Module:
    """``cfg`` through the builder it names, as sleepzoo.build_model calls it (fields checked by signature)."""
    from sleepzoo import registry
    from sleepzoo.build import call_builder

    return call_builder(registry.get("model", cfg.name), cfg, vocab_size=50, sleep=None, where="recipe.yaml")


def test_bad_loop_range_and_builder():
    with pytest.raises(SleepzooError, match="loop_range"):
        JetNemotronLM.from_config(TINY, loop_range=(4, 9))
    # hf_config: the recipe field for a config without weights (see build_jet_nemotron)
    model = build_jet_nemotron(hf_config=TINY, loop_start=1, loop_end=3, vocab_size=50)
    assert isinstance(model, JetNemotronLM) and model.loop_range == (1, 3)
    with pytest.raises(SleepzooError, match="vocab_size"):
        build_jet_nemotron(hf_config=TINY, vocab_size=1000)
    # through a recipe's model section: the fields the builder's signature takes, and no others
    cfg = ModelConfig(name="jet_nemotron", hf_config=TINY, loop_start=1, loop_end=3)
    assert build_model_of(cfg).loop_range == (1, 3)
    with pytest.raises(SleepzooError, match=r"model.d_model: 64 is not allowed; model 'jet_nemotron' does not take "
                                            r"d_model \(it takes pretrained, hf_config, loop_start, loop_end"):
        build_model_of(ModelConfig(name="jet_nemotron", hf_config=TINY, d_model=64))


def test_configure_loop_range_and_saved_settings(tmp_path):
    model = tiny_model()
    assert model.sleepzoo_settings() == {}  # defaults are not recorded
    model.configure(loop_start=2)
    assert model.loop_range == (2, 5) and model.sleepzoo_settings() == {"loop_start": 2, "loop_end": 5}
    with pytest.raises(SleepzooError, match=r"loop_start/loop_end=\[2, 9\] is not allowed; need integers "
                                            r"0 <= loop_start < loop_end <= 6 \(the number of layers\)"):
        model.configure(loop_end=9)
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {**TINY, "model_type": "jet_nemotron",
                                                                   "torch_dtype": "float32"}  # as published
    assert json.loads((tmp_path / "sleepzoo.json").read_text()) == {"loop_start": 2, "loop_end": 5}
    assert JetNemotronLM.from_config(tmp_path).loop_range == (1, 5)  # the class reads config.json only ...
    assert from_pretrained(tmp_path).loop_range == (2, 5)  # ... sleepzoo.from_pretrained applies sleepzoo.json
