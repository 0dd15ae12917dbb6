"""The third-party example plugin ``plugins/sleepzoo-example``, installed into the running interpreter with pip.

Checks that a plugin registered only through entry points is listed without being imported, loads on first
use, reports its distribution, that its chunked Hebbian op matches a float64 loop written here (values and
every gradient, the initial state's included), and that a recipe selects its mixer and trains.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import json
import math
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sleepzoo
from sleepzoo import registry
from sleepzoo.ops.rules import FastWeightRule

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins" / "sleepzoo-example"
DIST = "sleepzoo-example"


def _activate_pth_files(dist_name: str) -> None:
    """Process the ``.pth`` files an install just wrote, as a fresh interpreter would at start-up.

    ``pip install -e`` makes the package importable through a ``.pth`` file in site-packages, and those are
    read only when Python starts; the entry points themselves are visible at once.
    """
    for file in md.distribution(dist_name).files or ():
        if file.suffix == ".pth":
            path = Path(file.locate())
            site.addpackage(str(path.parent), path.name, None)


@pytest.fixture(scope="module")
def plugin():
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not available in this interpreter")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-q", "-e", str(PLUGIN_DIR)],
        capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"pip install -e {PLUGIN_DIR} failed:\n{proc.stdout}\n{proc.stderr}")
    importlib.invalidate_caches()
    _activate_pth_files(DIST)
    registry.refresh()
    yield md.distribution(DIST)
    registry.refresh()


def _forget_plugin_modules() -> None:
    for name in [m for m in sys.modules if m == "sleepzoo_example" or m.startswith("sleepzoo_example.")]:
        del sys.modules[name]


# ----------------------------------------------------------------------------------------------------------------
# discovery


def test_listed_without_import_and_loaded_lazily(plugin):
    # Another test (here or in test_registry's registry-wide checks) may have imported it already.
    _forget_plugin_modules()
    registry.refresh()
    assert "hebbian" in registry.names("rule")
    assert "linear_attention" in registry.names("mixer")
    registry.info()  # describing without load=True imports nothing either
    assert "sleepzoo_example" not in sys.modules

    rule = registry.get("rule", "hebbian")
    assert "sleepzoo_example.hebbian" in sys.modules
    assert "sleepzoo_example.linear_attention" not in sys.modules  # one name imports one module
    assert isinstance(rule, FastWeightRule)
    assert (rule.name, rule.uses_gate, rule.uses_beta) == ("hebbian", False, True)
    assert registry.get("rule", "hebbian") is rule


def test_info_names_the_distribution(plugin):
    infos = {(i.kind, i.name): i for i in registry.info()}
    rule, mixer = infos[("rule", "hebbian")], infos[("mixer", "linear_attention")]
    assert rule.provider == mixer.provider == DIST
    assert rule.target == "sleepzoo_example.hebbian:hebbian"
    assert mixer.target == "sleepzoo_example.linear_attention:LinearAttention"
    loaded = {(i.kind, i.name): i.status for i in registry.info("mixer", load=True)}
    assert loaded[("mixer", "linear_attention")] == "loaded"


def test_cli_lists_the_plugin(plugin):
    pytest.importorskip("sleepzoo.cli")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from sleepzoo.cli import main; sys.exit(main())", "plugins", "list",
         "--json"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(proc.stdout)}
    assert rows[("rule", "hebbian")]["provider"] == DIST
    assert rows[("mixer", "linear_attention")]["provider"] == DIST
    assert rows[("rule", "hebbian")]["status"] == "loaded"


# ----------------------------------------------------------------------------------------------------------------
# the hebbian op against a float64 loop written here


def reference_hebbian(q, k, v, beta, initial_state, scale):
    """float64 loop: S_t = S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T (scale q_t). Returns (o, S)."""
    B, T, H, K = q.shape
    q, k, v = q.double(), k.double(), v.double()
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64) if initial_state is None else initial_state.double()
    outs = []
    for t in range(T):
        b = torch.ones(B, H, dtype=torch.float64) if beta is None else beta[:, t].double()
        S = S + b[..., None, None] * torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(outs, dim=1), S


CASES = [  # (T, chunk_size, with_beta, with_initial_state, dtype)
    pytest.param(13, 4, True, True, torch.float64, id="T13-C4-beta-S0-f64"),
    pytest.param(13, 4, False, True, torch.float64, id="T13-C4-nobeta-S0-f64"),
    pytest.param(17, 5, True, False, torch.float64, id="T17-C5-beta-f64"),
    pytest.param(7, 64, True, True, torch.float64, id="T7-C64-one-short-chunk-f64"),
    pytest.param(1, 3, True, True, torch.float64, id="T1-C3-f64"),
    pytest.param(21, 8, True, True, torch.float32, id="T21-C8-beta-S0-f32"),
]


@pytest.mark.parametrize("T, chunk_size, with_beta, with_s0, dtype", CASES)
def test_hebbian_chunk_matches_loop(plugin, T, chunk_size, with_beta, with_s0, dtype):
    rule = registry.get("rule", "hebbian")
    B, H, K, V = 2, 3, 5, 4
    gen = torch.Generator().manual_seed(T * 100 + chunk_size)
    inputs = {
        "q": torch.randn(B, T, H, K, generator=gen, dtype=dtype),
        "k": torch.randn(B, T, H, K, generator=gen, dtype=dtype),
        "v": torch.randn(B, T, H, V, generator=gen, dtype=dtype),
        "beta": torch.rand(B, T, H, generator=gen, dtype=dtype) if with_beta else None,
        "initial_state": torch.randn(B, H, K, V, generator=gen, dtype=dtype) if with_s0 else None,
    }
    names = [n for n, x in inputs.items() if x is not None]
    ours = {n: inputs[n].clone().requires_grad_() for n in names}
    ref = {n: inputs[n].double().requires_grad_() for n in names}
    w_o = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    w_s = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)

    o, S = rule.chunk(ours["q"], ours["k"], ours["v"], None, ours.get("beta"),
                      initial_state=ours.get("initial_state"), output_final_state=True, chunk_size=chunk_size)
    o_ref, S_ref = reference_hebbian(ref["q"], ref["k"], ref["v"], ref.get("beta"), ref.get("initial_state"),
                                     scale=K ** -0.5)
    assert o.dtype == dtype and S.dtype == dtype and o.shape == (B, T, H, V) and S.shape == (B, H, K, V)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(o.double(), o_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(S.double(), S_ref, atol=tol, rtol=tol)

    grads = torch.autograd.grad((o.double() * w_o).sum() + (S.double() * w_s).sum(), [ours[n] for n in names])
    grads_ref = torch.autograd.grad((o_ref * w_o).sum() + (S_ref * w_s).sum(), [ref[n] for n in names])
    for name, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, atol=tol, rtol=tol, msg=lambda m, n=name: f"d{n}: {m}")


def test_hebbian_recurrent_and_step_match_loop(plugin):
    rule = registry.get("rule", "hebbian")
    B, T, H, K, V = 2, 6, 2, 4, 3
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    S0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    o_ref, S_ref = reference_hebbian(q, k, v, beta, S0, scale=0.3)
    o, S = rule.recurrent(q, k, v, None, beta, scale=0.3, initial_state=S0, output_final_state=True)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(S, S_ref)
    o_1, S_1 = rule.step(q[:, 0], k[:, 0], v[:, 0], None, beta[:, 0], S0, scale=0.3)
    o_ref1, S_ref1 = reference_hebbian(q[:, :1], k[:, :1], v[:, :1], beta[:, :1], S0, scale=0.3)
    torch.testing.assert_close(o_1, o_ref1[:, 0])
    torch.testing.assert_close(S_1, S_ref1)


# ----------------------------------------------------------------------------------------------------------------
# the mixer in a recipe

TINY_RULE110 = {
    "model": {"d_model": 32, "d_ff": 64,
              "mixers": {"attention": {"num_heads": 2},
                         "linear_attention": {"num_heads": 2, "head_dim": 8, "chunk_size": 4}}},
    "sleep": {"window": 6, "loops": 2},
    "task": {"name": "rule110", "steps": 1, "states": 2, "bits": 6},
    "train": {"steps": 1, "batch_size": 4},
}


def test_recipe_selects_the_mixer_and_trains(plugin):
    recipe = sleepzoo.load_recipe(TINY_RULE110, overrides=["model.layers=[attention, linear_attention]"])
    assert recipe.model.layers == ["attention", "linear_attention"]
    torch.manual_seed(0)
    task, model = sleepzoo.build_task(recipe), sleepzoo.build_model(recipe)
    mixer = model.layers[1].self_attn
    assert type(mixer).__module__ == "sleepzoo_example.linear_attention"
    assert type(mixer) is registry.get("mixer", "linear_attention")
    assert mixer.carried_state == ("fast_weights",)
    assert (mixer.num_heads, mixer.head_dim, mixer.chunk_size) == (2, 8, 4)

    batch = task.generate(recipe.train.batch_size, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in mixer.named_parameters()}
    out = model(batch["input_ids"], batch["targets"])
    assert math.isfinite(out.loss.item())
    # the fast weights crossed the windows: the last state is the plugin's, (B, H, K, K)
    assert out.states[1]["fast_weights"].shape == (4, 2, 8, 8)
    out.loss.backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    optimizer.step()
    for name, p in mixer.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
