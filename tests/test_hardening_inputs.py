"""Issue 13: every bad input gets one clear error (plugins, the Python API's targets, recipe values and sizes).

Each kind of bad input is a parametrized test over the cases the issue found (and their neighbours); each
asserts one ``SleepzooError`` (or one ``error:`` line from the CLI, exit status 2) that names the field or the
argument. Third-party plugins are simulated without pip, as in test_registry: a ``<dist>-0.1.dist-info``
folder (METADATA, entry_points.txt) and the plugin's module written to a folder put on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import sleepzoo
from sleepzoo import registry
from sleepzoo.cli import main
from sleepzoo.config import RecipeError, load_recipe
from sleepzoo.registry import PluginConflictError, PluginImportError, SleepzooError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "rule110-tiny.yaml"
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> str:
    """The CLI failed with exit status 2 and one ``error:`` line on stderr holding every needle."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def assert_one_line(exc: BaseException, *needles: str) -> None:
    message = str(exc)
    assert "\n" not in message.strip(), message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# ----------------------------------------------------------------------------------------------------------------
# plugins

PACKAGE = "sleepzoo_hardening_plugins"
# module name -> source; each plugin's class is ``Plugin``
MODULES = {
    "exits": "import sys\nsys.exit()\n",
    "exits_3": "import sys\nsys.exit(3)\n",
    "base_exception": "class Odd(BaseException):\n    pass\n\nraise Odd('not an Exception')\n",
    "prints": "import os, sys\nprint('hello from a plugin')\nprint('to stderr', file=sys.stderr)\n"
              "os.write(1, b'native write\\n')\n\nclass Plugin:\n    carried_state = ()\n",
    "prints_then_fails": "print('about to fail')\nraise RuntimeError('boom')\n",
    "good": "class Plugin:\n    carried_state = ()\n",
}


def _install(root: Path, dist: str, entry_points: str) -> None:
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def _forget_modules() -> None:
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


@pytest.fixture
def bad_plugins(tmp_path, monkeypatch):
    """Distributions whose plugins exit, raise a BaseException, print, or register a taken name."""
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module, source in MODULES.items():
        (package / f"{module}.py").write_text(source)
    _install(tmp_path, "hardening-bad", f"""\
        [sleepzoo.mixer]
        hz_exits = {PACKAGE}.exits:Plugin
        hz_exits_3 = {PACKAGE}.exits_3:Plugin
        hz_base_exception = {PACKAGE}.base_exception:Plugin
        hz_prints = {PACKAGE}.prints:Plugin
        hz_prints_then_fails = {PACKAGE}.prints_then_fails:Plugin
        gated_deltanet = {PACKAGE}.good:Plugin
        hz_twice = {PACKAGE}.good:Plugin
        """)
    _install(tmp_path, "hardening-other", f"""\
        [sleepzoo.mixer]
        hz_twice = {PACKAGE}.good:Plugin
        """)
    _forget_modules()
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    yield tmp_path
    monkeypatch.undo()
    _forget_modules()
    registry.refresh()


@pytest.mark.parametrize("name, needles", [
    ("hz_exits", ["SystemExit", "hardening-bad", "hz_exits"]),
    ("hz_exits_3", ["SystemExit: 3", "hardening-bad"]),
    ("hz_base_exception", ["Odd: not an Exception", "hardening-bad"]),
    ("hz_prints_then_fails", ["RuntimeError: boom", "It printed: about to fail"]),
])
def test_plugin_import_failures_are_contained(bad_plugins, capfd, name, needles):
    with pytest.raises(PluginImportError) as exc_info:
        registry.get("mixer", name)
    assert_one_line(exc_info.value, *needles)
    assert capfd.readouterr().out == ""  # nothing reached stdout
    assert registry.get("mixer", "attention").__name__ == "Attention"  # the others still load


def test_plugin_output_at_import_goes_to_stderr(bad_plugins, capfd):
    assert registry.get("mixer", "hz_prints").__name__ == "Plugin"
    out, err = capfd.readouterr()
    assert out == ""
    assert "hello from a plugin" in err and "to stderr" in err and "native write" in err


@pytest.mark.parametrize("name, needles", [
    ("gated_deltanet", ["'sleepzoo' (sleepzoo.mixers.gated_deltanet:GatedDeltaNet)",
                        f"'hardening-bad' ({PACKAGE}.good:Plugin)", "never replaced", "pip uninstall hardening-bad"]),
    ("hz_twice", ["'hardening-bad'", "'hardening-other'", "uninstall all but one"]),
])
def test_a_name_registered_twice_is_an_error_naming_both(bad_plugins, name, needles):
    with pytest.raises(PluginConflictError) as exc_info:
        registry.get("mixer", name)
    assert_one_line(exc_info.value, f"mixer {name!r}", *needles)
    assert f"registry.register('mixer', {name!r})" in str(exc_info.value)  # the other way to choose
    info = {i.name: i for i in registry.info("mixer", load=True)}[name]
    assert info.status == "conflict" and "hardening-bad" in info.provider


def test_a_builtin_name_taken_by_a_plugin_fails_the_stock_recipe(bad_plugins):
    recipe = load_recipe(TINY)
    with pytest.raises(SleepzooError) as exc_info:
        with torch.device("meta"):
            sleepzoo.build_model(recipe)
    assert_one_line(exc_info.value, "gated_deltanet", "hardening-bad", "sleepzoo")


def test_plugins_list_reports_one_line_per_failed_plugin(bad_plugins):
    result = invoke("plugins", "list", "--kind", "mixer", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}  # stdout is JSON, whatever the plugins print
    failed = {"hz_exits", "hz_exits_3", "hz_base_exception", "hz_prints_then_fails", "gated_deltanet", "hz_twice"}
    assert {n for n, r in rows.items() if r["error"]} == failed
    assert rows["hz_prints"]["status"] == "loaded" and rows["attention"]["error"] is None
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == len(failed)
    assert all(any(f"'{name}'" in line for line in warnings) for name in failed)


def test_plugins_list_json_is_json_in_a_real_process(bad_plugins):
    """Native writes to file descriptor 1 are only visible outside CliRunner: run the command for real."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(bad_plugins), *sys.path])}
    proc = subprocess.run([sys.executable, "-m", "sleepzoo.cli", "plugins", "list", "--kind", "mixer", "--json"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=bad_plugins)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["hz_exits"]["status"] == "import-error" and rows["hz_prints"]["status"] == "loaded"
    assert "native write" in proc.stderr and "hello from a plugin" in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# the Python API: input_ids and targets


@pytest.fixture(scope="module")
def tiny_model():
    recipe = load_recipe(TINY)
    torch.manual_seed(0)
    return sleepzoo.build_model(recipe)  # vocabulary 4: <pad> 0 1 Q1


def _ids(shape=(2, 8)):
    return torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(0))


BAD_TARGETS = [
    pytest.param(lambda: _ids().float(), ["targets", "torch.float32", "LongTensor (int64)"], id="float"),
    pytest.param(lambda: _ids().int(), ["targets", "torch.int32", ".long()"], id="int32"),
    pytest.param(lambda: _ids().to(torch.uint8), ["targets", "torch.uint8", ".long()"], id="uint8"),
    pytest.param(lambda: _ids() > 1, ["targets", "torch.bool"], id="bool"),
    pytest.param(lambda: _ids().tolist(), ["targets", "got list", "torch.tensor"], id="list"),
    pytest.param(lambda: _ids().numpy(), ["targets", "ndarray of int64"], id="numpy"),
    pytest.param(lambda: torch.full((2, 8), 4), ["targets", "outside [0, 4) or -100", "e.g. 4"], id="out-of-vocab"),
    pytest.param(lambda: torch.full((2, 8), -5), ["targets", "e.g. -5"], id="negative"),
    pytest.param(lambda: _ids((2, 4)), ["targets", "input_ids' shape (2, 8)", "got (2, 4)"], id="shape"),
    pytest.param(lambda: _ids((8,)), ["targets", "shape (8,)", "targets[None]"], id="one-dimensional"),
    pytest.param(lambda: _ids((1, 2, 8)), ["targets", "shape (1, 2, 8)"], id="three-dimensional"),
    pytest.param(lambda: torch.zeros(2, 8, dtype=torch.long, device="meta"), ["targets", "device cpu", "meta"],
                 id="other-device"),
    pytest.param(lambda: torch.full((2, 8), -100), ["targets", "no position != -100"], id="all-ignored"),
]


@pytest.mark.parametrize("targets, needles", BAD_TARGETS)
def test_bad_targets_give_one_line(tiny_model, targets, needles):
    with pytest.raises(SleepzooError) as exc_info:
        tiny_model(_ids(), targets())
    assert_one_line(exc_info.value, *needles)


@pytest.mark.parametrize("input_ids, targets, needles", [
    pytest.param(lambda: torch.zeros(0, 8, dtype=torch.long), lambda: torch.zeros(0, 8, dtype=torch.long),
                 ["input_ids has no rows", "(0, 8)"], id="empty-batch"),
    pytest.param(lambda: torch.zeros(0, 8, dtype=torch.long), lambda: None, ["no rows"], id="empty-batch-no-targets"),
    pytest.param(lambda: torch.zeros(2, 0, dtype=torch.long), lambda: None, ["input_ids is empty", "(2, 0)"],
                 id="empty-sequences"),
    pytest.param(lambda: _ids().float(), lambda: None, ["input_ids", "torch.float32"], id="float-ids"),
    pytest.param(lambda: _ids().int(), lambda: None, ["input_ids", ".long()"], id="int32-ids"),
    pytest.param(lambda: _ids().tolist(), lambda: None, ["input_ids", "got list"], id="list-ids"),
    pytest.param(lambda: torch.full((2, 8), 9), lambda: None, ["input_ids", "outside [0, 4)"], id="ids-out-of-vocab"),
    pytest.param(lambda: torch.full((2, 8), -100), lambda: None, ["input_ids", "outside [0, 4)"], id="ids-ignore"),
])
def test_bad_input_ids_give_one_line(tiny_model, input_ids, targets, needles):
    with pytest.raises(SleepzooError) as exc_info:
        tiny_model(input_ids(), targets())
    assert_one_line(exc_info.value, *needles)


def test_good_targets_still_work(tiny_model):
    targets = torch.full((2, 8), -100)
    targets[:, -1] = 2
    out = tiny_model(_ids(), targets)
    assert out.num_targets == 2 and torch.isfinite(out.loss)


def test_stream_and_ouro_check_their_inputs_too(tiny_model):
    with pytest.raises(SleepzooError, match="input_ids must be a LongTensor"):
        next(tiny_model.stream(_ids().float()))
    from sleepzoo.models.ouro import OuroLM

    ouro = OuroLM(vocab_size=11, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  total_ut_steps=2)
    with pytest.raises(SleepzooError, match=r"input_ids hold 1 value\(s\) outside \[0, 11\)"):
        ouro.exit_logits(torch.tensor([[1, 2, 11]]))


# ----------------------------------------------------------------------------------------------------------------
# recipe values: `recipe validate` and `train` refuse what the trainer, the optimizers or the model would

BIG = "1" + "0" * 400  # an integer no float holds
BAD_VALUES = [
    # learning rates, betas, weight decay, clipping, schedule: the optimizers' and the trainer's ranges
    ("train.adamw_lr=-1", ["train.adamw_lr", "-1.0 is not allowed", ">= 0"]),
    ("train.adamw_lr=.nan", ["train.adamw_lr", "nan", "finite"]),
    ("train.adamw_lr=1e400", ["train.adamw_lr", "finite"]),
    (f"train.adamw_lr={BIG}", ["train.adamw_lr", "characters)", "finite"]),
    ("train.muon_lr=-1e-3", ["train.muon_lr", ">= 0"]),
    ("train.muon_lr=.inf", ["train.muon_lr", "inf", "finite"]),
    ("train.betas=[0.9,1.0]", ["train.betas[1]", "1.0 is not allowed", "[0, 1)"]),
    ("train.betas=[-0.1,0.9]", ["train.betas[0]", "[0, 1)"]),
    ("train.betas=[.nan,0.9]", ["train.betas[0]", "finite"]),
    ("train.weight_decay=-1", ["train.weight_decay", ">= 0"]),
    ("train.grad_clip=.nan", ["train.grad_clip", "finite"]),
    ("train.decay_fraction=1.5", ["train.decay_fraction", "[0, 1]"]),
    ("train.warmup_steps=-1", ["train.warmup_steps", ">= 0"]),
    # threads, seeds, device
    ("train.threads=0", ["train.threads", ">= 1"]),
    ("train.threads=-1", ["train.threads", ">= 1"]),
    ("train.seed=-1", ["train.seed", "[0, 18446744073709551615]", "64 bits"]),
    ("train.seed=18446744073709551616", ["train.seed", "64 bits"]),
    ("train.seed=99999999999999999999999", ["train.seed", "64 bits"]),
    ("eval.seed=-1", ["eval.seed", "64 bits"]),
    ("train.device=foo", ["train.device", "'foo'", "cuda:N"]),
    # the model's own fields
    ("model.init_std=-1", ["model.init_std", "> 0"]),
    ("model.init_std=0", ["model.init_std", "> 0"]),
    ("model.d_ff=-1", ["model.d_ff", ">= 0", "0: no MLP"]),
    ("model.norm_eps=-1", ["model.norm_eps", "> 0"]),
    ("model.norm_eps=0", ["model.norm_eps", "> 0"]),
    ("model.vocab_size=0", ["model.vocab_size", ">= 1"]),
    ("model.d_model=0", ["model.d_model", ">= 1"]),
    ("model.loop_start=-1", ["model.loop_start", ">= 0"]),
    # a mixer's options: a mapping, typed, in range
    ("model.mixers.attention=5", ["model.mixers.attention", "expected a mapping", "int 5"]),
    ("model.mixers={attention: [1]}", ["model.mixers.attention", "expected a mapping"]),
    ("model.mixers.attention.rope_theta=0", ["model.mixers.attention.rope_theta", "> 0"]),
    ("model.mixers.attention.rope_theta=-1", ["model.mixers.attention.rope_theta", "> 0"]),
    ("model.mixers.attention.rope_theta=.nan", ["model.mixers.attention.rope_theta", "finite"]),
    ("model.mixers.attention.num_heads=0", ["model.mixers.attention.num_heads", ">= 1"]),
    ("model.mixers.gated_deltanet.norm_eps=-1", ["model.mixers.gated_deltanet.norm_eps", "> 0"]),
    ("model.mixers.gated_deltanet.expand_v=0", ["model.mixers.gated_deltanet.expand_v", "> 0"]),
    # sizes the machine can not hold, refused before anything is allocated
    ("train.batch_size=1000000000000", ["train.batch_size", "GiB", "limit", "fewer examples"]),
    ("eval.num_examples=1000000000000", ["eval.num_examples", "GiB", "limit"]),
    ("task.bits=100000000", ["Rule110's 100,000,001 tokens", "GiB", "limit"]),
    ("model.d_model=1000000", ["model:", "parameters", "GiB", "make the model smaller"]),
    # a stage's settings are checked as the top level's
    ("stages=[{name: a, steps: 300, train: {adamw_lr: -1}}]", ["stages[0] (a)", "train.adamw_lr", ">= 0"]),
    ("stages=[{name: a, steps: 300, train: {batch_size: 1000000000000}}]", ["train.batch_size", "GiB"]),
]


@pytest.mark.parametrize("override, needles", BAD_VALUES, ids=[o[:48] for o, _ in BAD_VALUES])
def test_validate_and_train_refuse_the_same_values(override, needles, tmp_path):
    line = assert_one_line_error(invoke("recipe", "validate", TINY, override), str(TINY), *needles)
    run = tmp_path / "run"
    assert assert_one_line_error(invoke("train", TINY, override, "--out", run, "--no-progress")) == line
    assert not (run / "checkpoints").exists()


def test_every_numeric_setting_has_a_bound():
    import dataclasses
    import typing

    from sleepzoo.config import BOUNDS, SECTIONS

    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            arms = {tp, *typing.get_args(tp)} | {a for arm in typing.get_args(tp) for a in typing.get_args(arm)}
            if arms & {int, float}:
                assert f"{section}.{f.name}" in BOUNDS, f"{section}.{f.name} has no entry in config.BOUNDS"


@pytest.mark.parametrize("content, needles", [
    pytest.param(b"model:\n  d_model: 64\n\xff\xfe binary", ["not a text file", "byte 21", "UTF-8"], id="not-utf8"),
    pytest.param(b"\x00\x01\x02\x03", ["not valid YAML", "#x0000"], id="nul-bytes"),
    pytest.param(b"model: {d_model: [unclosed\n", ["not valid YAML", "line 1"], id="broken-yaml"),
])
def test_a_file_that_is_not_a_recipe_gives_one_line(tmp_path, content, needles):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    assert_one_line_error(invoke("recipe", "validate", path), str(path), *needles)
    with pytest.raises(RecipeError) as exc_info:
        load_recipe(path)
    assert_one_line(exc_info.value, *needles)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO / "recipes")) for p in RECIPES])
def test_every_shipped_recipe_still_validates(path):
    result = invoke("recipe", "validate", path)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok")


def test_a_model_config_built_in_python_has_its_mixer_options_checked():
    from sleepzoo.config import ModelConfig
    from sleepzoo.models.hybrid import HybridLM

    with pytest.raises(RecipeError, match=r"model.mixers.attention: expected a mapping of settings, got int 5"):
        HybridLM(ModelConfig(d_model=16, layers=["attention"], mixers={"attention": 5}), vocab_size=8)


# ----------------------------------------------------------------------------------------------------------------
# sizes: a task refuses a batch the machine can not hold, before drawing it


def test_task_show_of_a_huge_task_gives_one_line():
    assert_one_line_error(invoke("task", "show", "rule110", "bits=100000000"), "Rule110.generate", "3 examples",
                          "400,000,004 tokens", "GiB", "bytes", "limit")
    assert_one_line_error(invoke("task", "export", "rule110", "-n", "1000000000000", "--out", "/dev/null"),
                          "1,000,000,000,000 examples", "GiB")


def test_the_memory_limit_is_a_share_of_the_machine(monkeypatch):
    from sleepzoo.tasks import base
    from sleepzoo.tasks.rule110 import Rule110

    monkeypatch.setattr(base, "machine_memory", lambda: 2**30)  # a 1 GiB machine: 512 MiB for a batch
    task = Rule110(steps=1, states=1, bits=1000)
    assert task.nbytes(1000) < 2**29 < task.nbytes(40_000)
    assert task.generate(1000, seed=0)["input_ids"].shape == (1000, 1001)
    with pytest.raises(SleepzooError) as exc_info:
        task.generate(40_000, seed=0)
    assert_one_line(exc_info.value, "40,000 examples", "0.5 GiB", "50% of this machine's 1.0 GiB")
    monkeypatch.setattr(base, "machine_memory", lambda: None)  # unknown: nothing is refused
    assert base.memory_limit() is None


# ----------------------------------------------------------------------------------------------------------------
# pretrained configs: the fields a model would turn into NaN logits

OURO = {"model_type": "ouro", "vocab_size": 41, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6, "total_ut_steps": 2, "early_exit_threshold": 1.0}
JET = {"model_type": "jet_nemotron", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "layer_types": ["jet", "attn"], "vocab_size": 41,
       "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
       "efficient_attention_config": {"jet": {"conv_size": 4, "dconv_generator_reduction": 4, "expand_v": 2.0,
                                              "head_dim": 8, "num_heads": 2, "norm_eps": 1e-5}}}


@pytest.mark.parametrize("base, field, value", [
    (OURO, "rms_norm_eps", -1), (OURO, "rms_norm_eps", 0), (OURO, "rope_theta", 0), (OURO, "rope_theta", "nan"),
    (OURO, "initializer_range", -0.02), (OURO, "early_exit_threshold", 2.0),
    (JET, "rms_norm_eps", -1), (JET, "rope_theta", 0), (JET, "initializer_range", -1),
], ids=lambda v: v["model_type"] if isinstance(v, dict) else str(v))
def test_a_pretrained_config_with_a_bad_value_gives_one_line(tmp_path, base, field, value):
    from sleepzoo.pretrained import from_config, from_pretrained, save_pretrained

    bad = tmp_path / "bad"
    save_pretrained(from_config(base), bad)  # a folder that loads, until its config.json is edited
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, field: value}))
    for build in (from_config, from_pretrained):
        with pytest.raises(SleepzooError) as exc_info:
            build(bad)
        assert_one_line(exc_info.value, str(bad / "config.json"), f"{field}={value!r}")


def test_validate_takes_a_pretrained_folder_without_the_sleep_gate_as_train_does(tmp_path):
    """sleep.gate adds a parameter the pretrained files do not hold; from_pretrained adds it at zero after
    loading, so `recipe validate` (the meta-device build) must not call it missing."""
    from sleepzoo.pretrained import from_config, save_pretrained

    folder = tmp_path / "ouro"
    save_pretrained(from_config(OURO), folder)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": "ouro", "pretrained": str(folder), "sleep_layers": [], "wake_passes": 1},
        "sleep": {"window": 9, "loops": 2, "gate": True},
        "task": {"name": "rule110", "steps": 1, "states": 1, "bits": 8},
        "train": {"steps": 1, "batch_size": 2}, "eval": {"num_examples": 2, "batch_size": 2}}))
    result = invoke("recipe", "validate", recipe)
    assert result.exit_code == 0, result.output


def test_the_meta_size_probe_never_refuses_a_run_the_real_build_accepts(tmp_path):
    """A pretrained folder that holds a sleep gate, used by a recipe without sleep.gate: from_pretrained loads
    it (the files' gate is built), so build_model must too; the meta-device size probe only counts weights."""
    import yaml

    import sleepzoo
    from sleepzoo.config import SleepConfig, load_recipe
    from sleepzoo.pretrained import from_config, save_pretrained

    ouro = {"model_type": "ouro", "vocab_size": 41, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "total_ut_steps": 2, "early_exit_threshold": 1.0}
    save_pretrained(from_config(ouro, sleep=SleepConfig(window=9, loops=2, gate=True)), tmp_path / "ouro")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "model": {"name": "ouro", "pretrained": str(tmp_path / "ouro"), "sleep_layers": [], "wake_passes": 1},
        "sleep": {"window": 9, "loops": 2}, "task": {"name": "rule110", "steps": 1, "states": 1, "bits": 8},
        "train": {"steps": 1, "batch_size": 2}, "eval": {"num_examples": 2, "batch_size": 2}}))
    model = sleepzoo.build_model(load_recipe(tmp_path / "r.yaml"), vocab_size=41)
    assert model.sleep_gate is not None
