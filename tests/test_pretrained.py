"""Pretrained models from recipes, the Python API and the CLI (docs/pretrained.md): sleepzoo.from_pretrained /
from_config with overrides, recipe fields (pretrained, hf_config, loop range, wake_passes, sleep_layers), the
tokenizer wiring, validation without the weights, `sleepzoo convert` round trips, and training only the
inserted sleep layers."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import sleepzoo
from sleepzoo import RecipeError, SleepzooError
from sleepzoo.checkpoint import save_weights
from sleepzoo.models.jet_nemotron import JetNemotronLM
from sleepzoo.models.ouro import OuroLM
from sleepzoo.convert import convert
from sleepzoo.pretrained import allowed_overrides, from_config, from_pretrained, parse_size, save_pretrained

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "sleepzoo" / "models" / "configs"  # the published config.json files, shipped
RECIPES = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes").glob("*/*.yaml"))

JET = {
    "architectures": ["JetNemotronForCausalLM"], "model_type": "jet_nemotron", "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2,
    "layer_types": ["jet", "attn", "jet", "swa", "jet"], "vocab_size": 41, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
    "efficient_attention_config": {
        "jet": {"conv_size": 4, "dconv_generator_reduction": 4, "expand_v": 2.0, "head_dim": 8, "num_heads": 2,
                "norm_eps": "1e-5", "mode": "chunk", "dconv_implementation": "triton"},
        "swa": {"window_size": 5}},
}
OURO = {
    "architectures": ["OuroForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"},
    "model_type": "ouro", "vocab_size": 41, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 5,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "total_ut_steps": 3, "early_exit_threshold": 1.0,
    "max_position_embeddings": 64, "torch_dtype": "float32",
}
SMALL_JET = {"num_heads": 2, "head_dim": 4, "expand_v": 2.0, "dconv_generator_reduction": 2}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight non-trivial (zero o_proj and unit norms would hide a weight that did not load)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def write_folder(folder: Path, config: dict, seed: int = 0, tokenizer: bool = False) -> torch.nn.Module:
    """A user's folder: config.json + model.safetensors with the published names, written by the test."""
    torch.manual_seed(seed)
    model = randomize(from_config(config), seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and config.get("tie_word_embeddings"))}
    save_file(tensors, str(folder / "model.safetensors"))
    if tokenizer:
        write_tokenizer(folder / "tokenizer.json")
    return model


def write_tokenizer(path: Path) -> None:
    """A word-level tokenizer.json (the `tokenizers` library's format) over a few words, unknowns -> [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "[PAD]", "Question", ":", "Answer", ".", ",", "?"] + [str(i) for i in range(25)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def ids(vocab: int = 41, T: int = 12, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


# ---------------------------------------------------------------------------------------------------------
# the Python API


def test_api_is_exported_lazily_and_builds_the_reference_configs_on_meta():
    assert sleepzoo.from_pretrained is from_pretrained and sleepzoo.from_config is from_config
    assert sleepzoo.pretrained.convert is convert  # where it lived before sleepzoo.convert
    with torch.device("meta"):
        jet = sleepzoo.from_config(REFERENCE / "jet-nemotron-2b.json", window=2000, loops=4,
                                   loop_start=6, loop_end=22)
        ouro = sleepzoo.from_config(REFERENCE / "ouro-1.4b.json", wake_passes=1,
                                    sleep_layers=[3, 7, 11, 15, 19, 23], loops=2)
        plain = sleepzoo.from_config(REFERENCE / "ouro-1.4b.json")
    assert jet.num_parameters() == 1_964_806_208 and jet.loop_range == (6, 22)
    assert (jet.sleep.window, jet.sleep.loops) == (2000, 4)
    assert plain.num_parameters() == 1_434_652_673
    assert plain.sleep.window == 65536 and plain.sleep.loops == 1 and plain.wake_passes == 4  # as published
    assert 0 < ouro.num_parameters() - plain.num_parameters() < 0.1 * plain.num_parameters()
    assert ouro.wake_passes == 1 and ouro.sleep_after == (3, 7, 11, 15, 19, 23) and ouro.sleep.loops == 2
    assert next(ouro.parameters()).device.type == "meta"


def test_unknown_overrides_list_the_allowed_names():
    with pytest.raises(SleepzooError, match=r"unknown override\(s\) windw .*did you mean 'window'.*allowed: window, "
                                            r"loops, max_loops, tolerance, eviction, sleep_every, checkpoint, "
                                            r"loop_start, loop_end"):
        from_config(JET, windw=4)
    with pytest.raises(SleepzooError, match=r"wake_passes is ouro's"):
        from_config(JET, wake_passes=1)
    assert "sleep_layers" in allowed_overrides("ouro") and "loop_start" not in allowed_overrides("ouro")
    with pytest.raises(SleepzooError, match="sleep_every=3 is not allowed; full_flush sleeps on whole windows"):
        from_config(JET, window=6, sleep_every=3)
    with pytest.raises(SleepzooError, match="unknown eviction|sliding_windo"):
        from_config(JET, eviction="sliding_windo")
    with pytest.raises(SleepzooError, match="loop_start/loop_end"):
        from_config(JET, loop_end=9)


def test_from_pretrained_overrides(tmp_path):
    source = write_folder(tmp_path / "jet", JET)
    x = ids(T=12)
    model = from_pretrained(tmp_path / "jet", window=4, loops=3, loop_start=1, loop_end=4)
    assert model.loop_range == (1, 4) and (model.sleep.window, model.sleep.loops) == (4, 3)
    source.loop_range = (1, 4)
    with torch.no_grad():
        assert torch.equal(model(x).logits, source(x, window=4, loops=3).logits)
    # no overrides: the published behaviour (one pass over max_position_embeddings tokens)
    plain = from_pretrained(tmp_path / "jet")
    assert plain.sleep.window == 64 and plain.sleep.loops == 1 and plain.loop_range == (1, 4)


def test_ouro_retrofit_on_load_keeps_the_pretrained_function(tmp_path):
    write_folder(tmp_path / "ouro", OURO)
    x = ids(T=10)
    published = from_pretrained(tmp_path / "ouro", wake_passes=1, window=5, loops=2)
    retro = from_pretrained(tmp_path / "ouro", wake_passes=1, window=5, loops=2, sleep_layers=[1, 3],
                            sleep_layer_options=SMALL_JET)
    assert retro.sleep_after == (1, 3) and len(retro.model.sleep_layers) == 2
    # o_proj of the inserted layers is zero: same function, bit for bit
    assert torch.equal(logits(retro, x), logits(published, x))
    with pytest.raises(SleepzooError, match="sleep_layer_options without sleep_layers"):
        from_pretrained(tmp_path / "ouro", sleep_layer_options=SMALL_JET)


# ---------------------------------------------------------------------------------------------------------
# recipes


def recipe_dict(model: dict, **sections) -> dict:
    base = {"model": model, "sleep": {"window": 6, "loops": 2},
            "task": {"name": "rule110", "steps": 1, "states": 2, "bits": 6},
            "train": {"steps": 3, "batch_size": 4, "optimizer": "muon", "muon_lr": 1e-3, "log_every": 1,
                      "checkpoint_every": 0, "warmup_steps": 0},
            "eval": {"every": 0, "num_examples": 4, "batch_size": 4}}
    base.update(sections)
    return base


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in RECIPES])
def test_every_shipped_recipe_validates_without_weights(path, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/models/... does not exist: no weights anywhere
    from sleepzoo.cli import main

    result = CliRunner().invoke(main, ["recipe", "validate", str(path)])
    assert result.exit_code == 0, result.output
    if path.name.startswith("gsm-infinite-") and path.stem != "gsm-infinite-tiny":
        expected = "1,964,806,208" if "jet2b" in path.name else "1,551,500,225"  # published shapes (+ retrofit)
        assert expected in result.output


def test_missing_folder_is_an_error_at_build_time_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = sleepzoo.load_recipe(REPO / "recipes" / "gsm-infinite-ouro.yaml")
    with pytest.raises(RecipeError, match=r"model.pretrained: '~/models/Ouro-1.4B' does not exist; download .*"
                                          r"huggingface-cli download ByteDance/Ouro-1.4B"):
        sleepzoo.build_model(recipe, vocab_size=100)


def test_recipe_builds_from_a_folder_with_its_tokenizer(tmp_path):
    source = write_folder(tmp_path / "jet", JET, tokenizer=True)
    data = recipe_dict({"name": "jet_nemotron", "pretrained": str(tmp_path / "jet"), "loop_start": 1, "loop_end": 4},
                       task={"name": "gsm_infinite", "min_op": 1, "max_op": 2, "min_tokens": 60, "max_tokens": 80,
                             "test_per_op": 4})
    recipe = sleepzoo.load_recipe(data)
    task = sleepzoo.build_task(recipe)
    assert task.tokenizer == str(tmp_path / "jet") and task.vocab_size == 33  # the folder's tokenizer.json
    model = sleepzoo.build_model(recipe)
    assert model.loop_range == (1, 4) and model.model.norm.weight.dtype == torch.float32
    assert torch.equal(model.model.embed_tokens.weight, source.model.embed_tokens.weight)
    with torch.device("meta"):  # validation: the folder's config (and its weights' headers), nothing read
        meta = sleepzoo.build_model(recipe)
    assert meta.num_parameters() == source.num_parameters()
    # a task.tokenizer in the recipe wins; a folder without tokenizer.json is an error
    explicit = sleepzoo.load_recipe(data, overrides=["task.tokenizer=builtin"])
    assert sleepzoo.build_task(explicit).tokenizer == "builtin"
    (tmp_path / "jet" / "tokenizer.json").unlink()
    with pytest.raises(RecipeError, match="has no tokenizer.json.*task.tokenizer"):
        sleepzoo.build_task(recipe)


def test_ouro_recipe_fields(tmp_path):
    data = recipe_dict({"name": "ouro", "hf_config": dict(OURO, num_hidden_layers=8), "wake_passes": 1,
                        "mixers": {"jet": SMALL_JET}})
    model = sleepzoo.build_model(sleepzoo.load_recipe(data))
    assert model.sleep_after == (3, 7) and model.wake_passes == 1  # default retrofit positions: 3, 7, ...
    assert model.model.sleep_layers[0].self_attn.num_heads == 2
    none = sleepzoo.build_model(sleepzoo.load_recipe(data, overrides=["model.sleep_layers=[]"]))
    assert none.sleep_after == () and not hasattr(none.model, "sleep_layers")
    with pytest.raises(RecipeError, match="model.sleep_layers"):
        sleepzoo.load_recipe(data, overrides=["model.sleep_layers=[3, 1]"])
    with pytest.raises(RecipeError, match="model.wake_passes"):
        sleepzoo.load_recipe(data, overrides=["model.wake_passes=0"])
    with pytest.raises(RecipeError, match="loop_start"):
        sleepzoo.build_model(sleepzoo.load_recipe(data, overrides=["model.loop_start=1"]))
    with pytest.raises(RecipeError, match=r"model.wake_passes: 1 is not allowed; model 'jet_nemotron' does not "
                                          r"take wake_passes \(it takes pretrained, hf_config, loop_start, loop_end"):
        sleepzoo.build_model(sleepzoo.load_recipe(recipe_dict({"name": "jet_nemotron", "hf_config": JET,
                                                               "wake_passes": 1})))


@pytest.mark.parametrize("pattern", ["model.sleep_layers.*", "mixer:jet"])
def test_training_only_the_sleep_layers_leaves_everything_else_bit_for_bit(tmp_path, pattern):
    from sleepzoo.train import build, train

    data = recipe_dict({"name": "ouro", "hf_config": OURO, "sleep_layers": [1, 3], "wake_passes": 1,
                        "mixers": {"jet": SMALL_JET}},
                       train={"steps": 3, "batch_size": 4, "optimizer": "muon", "muon_lr": 1e-2, "adamw_lr": 1e-2,
                              "log_every": 1, "checkpoint_every": 0, "warmup_steps": 0,
                              "trainable": [pattern]})
    recipe = sleepzoo.load_recipe(data)
    before, _ = build(recipe)  # the trainer seeds and builds the same way
    before = {k: v.clone() for k, v in before.state_dict().items()}
    train(recipe, tmp_path / "run", progress=False)
    after = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert set(after) == set(before)
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and all(k.startswith("model.sleep_layers.") for k in moved)
    assert any(k.endswith("o_proj.weight") for k in moved)  # the zero-initialised output moved off zero


# ---------------------------------------------------------------------------------------------------------
# save_pretrained and convert


def test_convert_folder_round_trip_dtype_and_shards(tmp_path):
    source = write_folder(tmp_path / "src", OURO, tokenizer=True)
    x = ids()
    summary = convert(tmp_path / "src", tmp_path / "f32")
    assert summary["copied"] == ["tokenizer.json"] and summary["dtype"] == "float32"
    assert torch.equal(logits(from_pretrained(tmp_path / "f32"), x), logits(source, x))
    config = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert "sleepzoo" not in config and config["auto_map"] == OURO["auto_map"]  # still the published format
    assert not (tmp_path / "f32" / "sleepzoo.json").exists()  # as published: no settings to record
    # sharded: several files and an index, which load again
    convert(tmp_path / "src", tmp_path / "sharded", max_shard_size=4000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    assert torch.equal(logits(from_pretrained(tmp_path / "sharded"), x), logits(source, x))
    # dtype conversion
    convert(tmp_path / "src", tmp_path / "bf16", dtype="bfloat16")
    half = from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def make_run(run: Path, data: dict, seed: int = 3) -> torch.nn.Module:
    """A run directory as `sleepzoo train` leaves it: recipe.yaml and final/model.safetensors."""
    recipe = sleepzoo.load_recipe(data)
    torch.manual_seed(seed)
    model = randomize(sleepzoo.build_model(recipe), seed)
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    save_weights(model, run / "final" / "model.safetensors", metadata={"step": "7"})
    return model


def test_convert_run_of_a_retrofitted_ouro(tmp_path):
    write_folder(tmp_path / "ouro", OURO, tokenizer=True)
    data = recipe_dict({"name": "ouro", "pretrained": str(tmp_path / "ouro"), "sleep_layers": [1, 3],
                        "wake_passes": 1, "mixers": {"jet": SMALL_JET}},
                       sleep={"window": 5, "loops": 3, "eviction": "sliding_window", "sleep_every": 2})
    trained = make_run(tmp_path / "run", data)
    x = ids(T=12)
    want = logits(trained, x)
    summary = convert(tmp_path / "run", tmp_path / "out")
    assert summary["source"] == "run" and summary["step"] == 7 and "tokenizer.json" in summary["copied"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "sleepzoo" not in config  # config.json is Hugging Face's; sleepzoo's settings have their own file
    assert json.loads((tmp_path / "out" / "sleepzoo.json").read_text()) == {
        "window": 5, "loops": 3, "eviction": "sliding_window", "sleep_every": 2, "wake_passes": 1,
        "sleep_layers": [1, 3], "sleep_layer_options": trained.sleep_layer_options}
    assert summary["sleepzoo"] == json.loads((tmp_path / "out" / "sleepzoo.json").read_text())
    assert "auto_map" not in config  # the published Ouro code can not load the inserted layers
    loaded = from_pretrained(tmp_path / "out")
    assert loaded.sleep_after == (1, 3) and loaded.wake_passes == 1 and loaded.sleep == trained.sleep
    assert torch.equal(logits(loaded, x), want)  # float32: identical
    # the converted folder serves as a recipe's pretrained folder too (its sleep layers kept, not doubled)
    again = sleepzoo.build_model(sleepzoo.load_recipe(
        data, overrides=[f"model.pretrained={tmp_path / 'out'}", "model.sleep_layers=null"]))
    assert again.sleep_after == (1, 3) and torch.equal(logits(again, x), want)


def test_convert_run_of_jet_nemotron_without_the_original_weights(tmp_path):
    data = recipe_dict({"name": "jet_nemotron", "hf_config": JET, "loop_start": 1, "loop_end": 3},
                       sleep={"window": 4, "loops": 2})
    trained = make_run(tmp_path / "run", data)
    x = ids(T=12)
    from sleepzoo.cli import main

    result = CliRunner().invoke(main, ["convert", str(tmp_path / "run"), str(tmp_path / "out"),
                                       "--max-shard-size", "20KB"])
    assert result.exit_code == 0, result.output
    assert "step 7" in result.output and "no tokenizer files copied" in result.output
    loaded = from_pretrained(tmp_path / "out")
    assert loaded.loop_range == (1, 3) and (loaded.sleep.window, loaded.sleep.loops) == (4, 2)
    assert torch.equal(logits(loaded, x), logits(trained, x))
    names = set()
    for shard in (tmp_path / "out").glob("model-*.safetensors"):
        names |= set(load_file(str(shard)))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied: stored once


def test_convert_errors(tmp_path):
    from sleepzoo.cli import main

    def run(*args: str) -> str:
        result = CliRunner().invoke(main, ["convert", *args])
        assert result.exit_code == 2, result.output
        return result.output

    assert "does not exist" in run(str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    assert "neither a sleepzoo run directory (recipe.yaml) nor a Hugging Face folder" in run(
        str(tmp_path / "empty"), str(tmp_path / "out"))
    hybrid = tmp_path / "hybrid"
    make_run(hybrid, recipe_dict({"name": "hybrid", "d_model": 16, "layers": ["attention"],
                                  "mixers": {"attention": {"num_heads": 2}}}))
    assert "convert writes Hugging Face folders of jet_nemotron, ouro models only" in run(str(hybrid), str(tmp_path / "o"))
    write_folder(tmp_path / "src", JET)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert "--force" in run(str(tmp_path / "src"), str(tmp_path / "busy"))
    assert "max_shard_size 'lots'" in run(str(tmp_path / "src"), str(tmp_path / "o2"), "--max-shard-size", "lots")
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size(123) == 123


def test_save_pretrained_needs_an_hf_config():
    recipe = sleepzoo.load_recipe(recipe_dict({"name": "hybrid", "d_model": 16, "layers": ["attention"],
                                               "mixers": {"attention": {"num_heads": 2}}}))
    with pytest.raises(SleepzooError, match="only jet_nemotron and ouro"):
        save_pretrained(sleepzoo.build_model(recipe), "/tmp/never-written")


def test_resaving_replaces_stale_weight_files(tmp_path):
    model = randomize(from_config(JET))
    save_pretrained(model, tmp_path, max_shard_size=5000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    save_pretrained(model, tmp_path)  # one file now: the old index and shards must go
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))
    x = ids()
    loaded = from_pretrained(tmp_path)
    assert isinstance(loaded, JetNemotronLM) and torch.equal(logits(loaded, x), logits(model, x))
    assert isinstance(from_config(OURO), OuroLM)


def test_published_configs_ship_and_build_by_name():
    from sleepzoo.pretrained import PUBLISHED_CONFIGS

    counts = {"jet-nemotron-2b": 1_964_806_208, "ouro-1.4b": 1_434_652_673}
    assert set(PUBLISHED_CONFIGS) == set(counts)
    for name, count in counts.items():
        with torch.device("meta"):
            model = sleepzoo.from_config(name)
        seen = {id(p): p.numel() for p in model.parameters()}  # tied weights once
        assert sum(seen.values()) == count, name


# ---------------------------------------------------------------------------------------------------------
# atomic folder writes, and runs that need nothing but their own directory


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: file bytes, link targets, folders (byte-level snapshot)."""
    out: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        out[key] = (f"-> {os.readlink(path)}" if path.is_symlink() else "<dir>" if path.is_dir()
                    else path.read_bytes())
    return out


def user_files(folder: Path) -> None:
    """What a user keeps next to the weights: a tokenizer, a README, a folder of notes, a link."""
    write_tokenizer(folder / "tokenizer.json")
    (folder / "README.md").write_text("# my model\n")
    (folder / "notes").mkdir()
    (folder / "notes" / "eval.txt").write_text("op6 0.81\n")
    (folder / "latest").symlink_to("README.md")


class DiskFull(OSError):
    pass


@pytest.mark.parametrize("shards", [None, 4000], ids=["single", "sharded"])
@pytest.mark.parametrize("error", [DiskFull(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["oserror", "interrupt"])
def test_a_save_that_fails_mid_write_leaves_the_old_folder_byte_identical(tmp_path, monkeypatch, shards, error):
    from safetensors.torch import save_file as real_save

    from sleepzoo import checkpoint

    old = randomize(from_config(JET), seed=1)
    folder = tmp_path / "jet"
    save_pretrained(old, folder, max_shard_size=4000)
    user_files(folder)
    os.chmod(folder, 0o750)
    before, mode = tree(folder), folder.stat().st_mode
    calls = []

    def failing(tensors, path, metadata=None):  # writes a partial file, the second time fails
        calls.append(path)
        if len(calls) == 2 or shards is None:
            Path(path).write_bytes(b"partial")
            raise error
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing)
    new = randomize(from_config(JET), seed=2)
    expected = SleepzooError if isinstance(error, OSError) else type(error)
    with pytest.raises(expected) as info:
        save_pretrained(new, folder, max_shard_size=shards)
    if expected is SleepzooError:
        assert "No space left on device" in str(info.value) and "left as it was" in str(info.value)
        assert "\n" not in str(info.value)
    assert all(str(p).startswith(str(tmp_path / ".jet.tmp-")) for p in calls)  # written beside, not in place
    assert tree(folder) == before and folder.stat().st_mode == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jet"]  # no temporary folder left
    monkeypatch.undo()
    x = ids()
    assert torch.equal(logits(from_pretrained(folder), x), logits(old, x))


def test_a_successful_save_replaces_the_weights_and_keeps_the_users_files(tmp_path):
    old = randomize(from_config(JET), seed=1)
    target = tmp_path / "real" / "jet"
    save_pretrained(old, target, max_shard_size=4000)
    user_files(target)
    os.chmod(target, 0o750)
    (tmp_path / "link").symlink_to(target)
    mine = {k: v for k, v in tree(target).items() if not k.startswith("model") and k != "config.json"}
    new = randomize(from_config(JET), seed=2)
    written = save_pretrained(new, tmp_path / "link")  # through a link: the folder it points to is replaced
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link").resolve() == target
    assert sorted(p.name for p in written) == ["config.json", "model.safetensors"]
    after = tree(target)
    assert {k: v for k, v in after.items() if k in mine} == mine  # tokenizer, README, notes/, the link
    assert set(after) == set(mine) | {"config.json", "model.safetensors"}  # stale shards and index gone
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert sorted(p.name for p in target.parent.iterdir()) == ["jet"]
    x = ids()
    assert torch.equal(logits(from_pretrained(target), x), logits(new, x))
    assert not torch.equal(logits(new, x), logits(old, x))
    # carried files are hard links of the old ones where possible: no bytes copied, same contents
    assert (target / "README.md").stat().st_nlink == 1  # the old folder is gone, its links with it


def test_convert_force_keeps_the_users_files_and_their_tokenizer(tmp_path):
    write_folder(tmp_path / "src", OURO, seed=4, tokenizer=True)
    (tmp_path / "src" / "generation_config.json").write_text('{"max_new_tokens": 5}')
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "tokenizer.json").write_text("the user's own")
    (dst / "README.md").write_text("mine")
    from sleepzoo.cli import main

    result = CliRunner().invoke(main, ["convert", str(tmp_path / "src"), str(dst), "--force", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert (dst / "tokenizer.json").read_text() == "the user's own" and (dst / "README.md").read_text() == "mine"
    assert (dst / "generation_config.json").read_text() == '{"max_new_tokens": 5}'  # copied: DST had none
    assert "copied: generation_config.json" in result.output
    assert {p.dtype for p in from_pretrained(dst).parameters()} == {torch.bfloat16}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def gsm_recipe(kind: str, folder: Path) -> dict:
    task = {"name": "gsm_infinite", "min_op": 1, "max_op": 2, "min_tokens": 60, "max_tokens": 80, "test_per_op": 2}
    if kind == "jet":
        model = {"name": "jet_nemotron", "pretrained": str(folder), "loop_start": 1, "loop_end": 4}
    else:  # a retrofitted Ouro with the sleep gate: parameters the pretrained folder does not have
        model = {"name": "ouro", "pretrained": str(folder), "sleep_layers": [1, 3], "wake_passes": 1,
                 "mixers": {"jet": SMALL_JET}}
    return recipe_dict(model, task=task, sleep={"window": 32, "loops": 2, "gate": kind == "ouro"},
                       train={"steps": 2, "batch_size": 2, "optimizer": "muon", "muon_lr": 1e-2, "adamw_lr": 1e-2,
                              "log_every": 1, "checkpoint_every": 0, "warmup_steps": 0},
                       eval={"every": 0, "num_examples": 4, "batch_size": 4})


@pytest.mark.parametrize("kind", ["jet", "ouro"])
def test_eval_and_generate_of_a_pretrained_run_need_only_the_run_directory(tmp_path, kind):
    from sleepzoo.cli import main
    from sleepzoo.train import load_run, train

    folder = tmp_path / "base"
    write_folder(folder, JET if kind == "jet" else OURO, tokenizer=True)
    recipe = sleepzoo.load_recipe(gsm_recipe(kind, folder))
    run = tmp_path / "run"
    trained = train(recipe, run, progress=False)
    assert sorted(p.name for p in (run / "pretrained").iterdir()) == ["config.json", "tokenizer.json"]  # no weights
    assert (run / "pretrained" / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    _, with_folder, task_before, _ = load_run(run)
    folder.rename(tmp_path / "elsewhere")  # the pretrained folder is gone

    _, model, task, step = load_run(run)
    assert step == 2 and task.vocab == task_before.vocab and task.vocab_size == 33  # the folder's tokenizer
    final = load_file(str(run / "final" / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in final.items())
    x = ids(vocab=33, T=40)
    assert torch.equal(logits(model, x), logits(with_folder, x))
    result = CliRunner().invoke(main, ["eval", str(run)])
    assert result.exit_code == 0, result.output
    again = json.loads((run / "eval.json").read_text())
    assert again["exact_accuracy"] == trained["exact_accuracy"] and again["loss"] == pytest.approx(trained["loss"],
                                                                                                 rel=1e-6)
    result = CliRunner().invoke(main, ["generate", str(run), "-n", "1", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "Question" in result.output and "->" in result.output
    summary = convert(run, tmp_path / "hf")  # convert, too, from the run alone
    assert "tokenizer.json" in summary["copied"]
    assert json.loads((tmp_path / "hf" / "sleepzoo.json").read_text()).get("gate") is (
        True if kind == "ouro" else None)  # the sleep gate is recorded, and its parameter saved
    assert torch.equal(logits(from_pretrained(tmp_path / "hf"), x), logits(model, x))

    # a run from before runs kept their copies: one clear line, not the builtin tokenizer standing in
    shutil.rmtree(run / "pretrained")
    result = CliRunner().invoke(main, ["eval", str(run)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "model.pretrained folder" in result.output and "put the folder back" in result.output


def test_generate_shows_ids_past_the_tokenizers_vocabulary():
    """A pretrained embedding is padded past its tokenizer (Jet: 151,936 rows, 151,665 tokens)."""
    from sleepzoo.cli import _token

    assert [_token(["a", "b"], i) for i in (0, 1, 2, 151_000)] == ["a", "b", "<id 2>", "<id 151000>"]


# ---------------------------------------------------------------------------------------------------------
# sleepzoo.json, and folders written before it (settings under config.json's "sleepzoo" key)


def old_folder(folder: Path, config: dict, settings: dict, model: torch.nn.Module) -> None:
    """A folder as save_pretrained wrote it before sleepzoo.json: the published config with torch_dtype, the
    settings under its "sleepzoo" key (no auto_map once sleep layers were inserted), one safetensors file."""
    folder.mkdir(parents=True)
    written = {k: v for k, v in config.items() if not (k == "auto_map" and settings.get("sleep_layers"))}
    (folder / "config.json").write_text(json.dumps({**written, "torch_dtype": "float32", "sleepzoo": settings}))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and config.get("tie_word_embeddings"))}
    save_file(tensors, str(folder / "model.safetensors"))


OLD_OURO_SETTINGS = {"window": 5, "loops": 3, "eviction": "sliding_window", "sleep_every": 2, "gate": True,
                     "wake_passes": 1, "sleep_layers": [1, 3], "sleep_layer_options": SMALL_JET}


def test_a_folder_written_before_sleepzoo_json_loads_as_it_did(tmp_path):
    torch.manual_seed(0)
    want = randomize(from_config(OURO, window=5, loops=3, eviction="sliding_window", sleep_every=2, gate=True,
                                 wake_passes=1, sleep_layers=[1, 3], sleep_layer_options=SMALL_JET))
    with torch.no_grad():
        want.sleep_gate.fill_(0.25)  # a trained gate: loading must not reset it
    old_folder(tmp_path / "old", OURO, OLD_OURO_SETTINGS, want)
    x = ids(T=12)
    loaded = from_pretrained(tmp_path / "old")  # strict: every tensor of the files has its place
    assert loaded.sleep == want.sleep and loaded.sleep_after == (1, 3) and loaded.wake_passes == 1
    assert loaded.sleep_layer_options == want.sleep_layer_options
    assert torch.equal(loaded.sleep_gate, want.sleep_gate) and torch.equal(logits(loaded, x), logits(want, x))
    shapes = from_config(tmp_path / "old")  # random weights, the same architecture and settings
    assert shapes.sleep == want.sleep and shapes.sleep_after == (1, 3) and shapes.num_parameters() == \
        want.num_parameters()
    # as a recipe's pretrained folder: its inserted layers kept
    data = recipe_dict({"name": "ouro", "pretrained": str(tmp_path / "old"), "wake_passes": 1,
                        "mixers": {"jet": SMALL_JET}}, sleep={"window": 5, "loops": 3})
    built = sleepzoo.build_model(sleepzoo.load_recipe(data))
    assert built.sleep_after == (1, 3) and torch.equal(built.model.sleep_layers[0].self_attn.o_proj.weight,
                                                       want.model.sleep_layers[0].self_attn.o_proj.weight)
    # saved again: the new layout, the same model
    save_pretrained(from_pretrained(tmp_path / "old"), tmp_path / "new")
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert "sleepzoo" not in config and "auto_map" not in config
    assert json.loads((tmp_path / "new" / "sleepzoo.json").read_text()) == OLD_OURO_SETTINGS
    assert torch.equal(logits(from_pretrained(tmp_path / "new"), x), logits(want, x))


def test_sleepzoo_json_wins_over_the_old_key_and_a_resave_drops_a_stale_one(tmp_path):
    model = randomize(from_config(JET))
    old_folder(tmp_path / "both", JET, {"loop_start": 2, "loop_end": 4, "loops": 7, "window": 9}, model)
    (tmp_path / "both" / "sleepzoo.json").write_text(json.dumps({"loop_start": 1, "loop_end": 3}))
    for loaded in (from_pretrained(tmp_path / "both"), from_config(tmp_path / "both")):
        assert loaded.loop_range == (1, 3)  # the file's
        assert (loaded.sleep.window, loaded.sleep.loops) == (64, 1)  # the key is ignored whole: published sleep
    # overrides still win over the file
    assert from_pretrained(tmp_path / "both", loop_end=4).loop_range == (1, 4)
    # a model with nothing to record saved over the folder: the stale sleepzoo.json goes with the old key
    save_pretrained(model, tmp_path / "both")
    assert not (tmp_path / "both" / "sleepzoo.json").exists()
    assert "sleepzoo" not in json.loads((tmp_path / "both" / "config.json").read_text())
    assert from_pretrained(tmp_path / "both").loop_range == (1, 4)  # Jet's default for 5 blocks


@pytest.mark.parametrize("text, says", [
    ("{not json", "not readable JSON"),
    ("[1, 2]", "must be a JSON object of sleepzoo settings"),
    ('{"loopz": 2}', "unknown override(s) loopz"),
    ('{"loops": 0}', "loops=0 is not allowed; must be an integer >= 1"),
    ('{"window": 4, "sleep_every": 3}', "full_flush sleeps on whole windows"),
], ids=["json", "list", "name", "loops", "rule"])
def test_a_damaged_sleepzoo_json_is_one_line_naming_it(tmp_path, text, says):
    save_pretrained(randomize(from_config(JET)), tmp_path / "jet")
    (tmp_path / "jet" / "sleepzoo.json").write_text(text)
    for load in (from_pretrained, from_config):
        with pytest.raises(SleepzooError) as info:
            load(tmp_path / "jet")
        message = str(info.value)
        assert "\n" not in message and message.startswith(str(tmp_path / "jet" / "sleepzoo.json")), message
        assert says in message, message


def test_a_run_keeps_the_sleepzoo_json_of_its_pretrained_folder(tmp_path):
    """A converted folder (with sleepzoo.json) as a recipe's pretrained folder: the run's copy holds the file,
    so the run loads the same architecture once the folder is gone."""
    from sleepzoo.convert import keep_model_files, load_run_model

    torch.manual_seed(1)
    source = randomize(from_config(OURO, wake_passes=1, sleep_layers=[1, 3], sleep_layer_options=SMALL_JET))
    save_pretrained(source, tmp_path / "retro")
    write_tokenizer(tmp_path / "retro" / "tokenizer.json")
    data = recipe_dict({"name": "ouro", "pretrained": str(tmp_path / "retro"), "wake_passes": 1,
                        "mixers": {"jet": SMALL_JET}}, sleep={"window": 5, "loops": 2})
    recipe = sleepzoo.load_recipe(data)
    run = tmp_path / "run"
    assert sorted(keep_model_files(run, recipe)) == ["pretrained/config.json", "pretrained/sleepzoo.json",
                                                     "pretrained/tokenizer.json"]
    save_weights(source, run / "final" / "model.safetensors")
    shutil.rmtree(tmp_path / "retro")
    model = load_run_model(run, recipe, run / "final" / "model.safetensors", vocab_size=41)
    assert model.sleep_after == (1, 3)
    x = ids(T=10)
    with torch.no_grad():
        assert torch.equal(model(x, window=5, loops=2).logits, source(x, window=5, loops=2).logits)
