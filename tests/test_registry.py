"""The plugin registry: lazy discovery through entry points, registration, its three errors, and the contract
of every registered mixer, rule and eviction policy (parametrized over the registry itself, so a plugin is
tested the day it is installed).

Third-party plugins are simulated without pip: a ``fake_dist-0.1.dist-info`` folder (METADATA and
entry_points.txt) and the plugin modules are written to a temporary directory put on ``sys.path``.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from sleepzoo import registry
from sleepzoo.mixers import evict_state
from sleepzoo.ops.rules import FastWeightRule
from sleepzoo.registry import MissingDependencyError, PluginImportError, UnknownPluginError

FAKE_PACKAGE = "sleepzoo_fake_dist_plugins"
MISSING_DEPENDENCY = "sleepzoo_absent_dependency_xyz"
ENTRY_POINTS = f"""\
[sleepzoo.mixer]
fake_good = {FAKE_PACKAGE}.good:FakeMixer
fake_needs_dep = {FAKE_PACKAGE}.needs_dep:FakeMixer
fake_broken = {FAKE_PACKAGE}.broken:FakeMixer

[sleepzoo.eviction]
fake_keep_all = {FAKE_PACKAGE}.good:KeepAll
"""
MODULES = {
    "__init__.py": "",
    "good.py": """\
        class FakeMixer:
            carried_state = ()

        class KeepAll:
            def evict(self, states, mixers):
                return list(states)
        """,
    "needs_dep.py": f"""\
        import {MISSING_DEPENDENCY}

        class FakeMixer:
            pass
        """,
    "broken.py": """\
        raise RuntimeError("boom: the fake plugin is broken")
        """,
}


def _forget_fake_modules() -> None:
    for name in [m for m in sys.modules if m == FAKE_PACKAGE or m.startswith(FAKE_PACKAGE + ".")]:
        del sys.modules[name]


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Install the distribution ``fake-dist`` (one good, one needing a missing package, one broken plugin)
    by putting its dist-info and modules on sys.path; removed again after the test."""
    dist_info = tmp_path / "fake_dist-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-dist\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(ENTRY_POINTS)
    package = tmp_path / FAKE_PACKAGE
    package.mkdir()
    for name, source in MODULES.items():
        (package / name).write_text(textwrap.dedent(source))
    _forget_fake_modules()
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    yield tmp_path
    monkeypatch.undo()
    _forget_fake_modules()
    registry.refresh()


# ----------------------------------------------------------------------------------------------------------------
# listing


def test_names_are_sorted_and_hold_the_builtins():
    for kind in registry.KINDS:
        listed = registry.names(kind)
        assert listed == sorted(set(listed))
    assert {"attention", "gated_deltanet"} <= set(registry.names("mixer"))
    assert {"delta", "gated_delta"} <= set(registry.names("rule"))
    assert "full_flush" in registry.names("eviction")
    assert "rule110" in registry.names("task")


def test_names_glob_filter():
    assert registry.names("rule", "gated_*") == ["gated_delta", "gated_linear"]
    assert registry.names("rule", "*delta") == [n for n in registry.names("rule") if n.endswith("delta")]
    assert registry.names("mixer", "att?ntion") == ["attention"]
    assert registry.names("mixer", "no_such_*") == []


def test_unknown_kind():
    with pytest.raises(UnknownPluginError, match="unknown plugin kind 'mixers'.*mixer"):
        registry.names("mixers")
    with pytest.raises(UnknownPluginError, match="kinds are"):
        registry.get("layer", "attention")


def test_listing_imports_nothing(fake_dist):
    assert {"fake_good", "fake_needs_dep", "fake_broken"} <= set(registry.names("mixer"))
    assert registry.names("mixer", "fake_*") == ["fake_broken", "fake_good", "fake_needs_dep"]
    infos = {i.name: i for i in registry.info("mixer")}  # without load=True: metadata only
    assert FAKE_PACKAGE not in sys.modules
    assert infos["fake_good"].provider == "fake-dist"
    assert infos["fake_good"].target == f"{FAKE_PACKAGE}.good:FakeMixer"
    assert infos["fake_good"].status == infos["fake_broken"].status == "available"


def test_refresh_forgets_an_uninstalled_distribution(fake_dist, monkeypatch):
    assert "fake_good" in registry.names("mixer")
    monkeypatch.undo()  # take it off sys.path again
    registry.refresh()
    assert registry.names("mixer", "fake_*") == []


# ----------------------------------------------------------------------------------------------------------------
# loading


def test_get_loads_lazily_and_caches(fake_dist):
    assert f"{FAKE_PACKAGE}.good" not in sys.modules
    cls = registry.get("mixer", "fake_good")
    assert cls.__name__ == "FakeMixer" and cls.__module__ == f"{FAKE_PACKAGE}.good"
    assert f"{FAKE_PACKAGE}.good" in sys.modules
    assert f"{FAKE_PACKAGE}.broken" not in sys.modules  # neighbours in the same distribution stay unimported
    _forget_fake_modules()  # a second load would import the module again and give a new class
    assert registry.get("mixer", "fake_good") is cls
    assert {i.name: i.status for i in registry.info("mixer")}["fake_good"] == "loaded"


def test_register_decorator():
    try:
        @registry.register("rule")
        def my_test_rule(q, k, v, g, beta, **kwargs):
            return None

        @registry.register("rule", "renamed_test_rule")
        def another(q, k, v, g, beta, **kwargs):
            return None

        assert "my_test_rule" in registry.names("rule")
        assert registry.names("rule", "renamed_*") == ["renamed_test_rule"]
        assert registry.get("rule", "my_test_rule") is my_test_rule
        assert registry.get("rule", "renamed_test_rule") is another
        info = {i.name: i for i in registry.info("rule")}["my_test_rule"]
        assert (info.provider, info.status) == ("<runtime>", "loaded")
        registry.refresh()  # runtime registrations survive a refresh
        assert registry.get("rule", "my_test_rule") is my_test_rule
    finally:
        registry.unregister("rule", "my_test_rule")
        registry.unregister("rule", "renamed_test_rule")
    assert "my_test_rule" not in registry.names("rule")
    with pytest.raises(UnknownPluginError):
        registry.get("rule", "my_test_rule")
    with pytest.raises(UnknownPluginError, match="kinds are"):
        registry.register("rules")


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownPluginError) as exc_info:
        registry.get("mixer", "gated_deltnet")
    message = str(exc_info.value)
    assert "'gated_deltnet'" in message
    assert "Did you mean 'gated_deltanet'" in message
    for known in registry.names("mixer"):
        assert known in message
    assert "sleepzoo.mixer" in message  # where a plugin would register the name
    assert isinstance(exc_info.value, KeyError)  # dict-like lookups can catch it
    assert not isinstance(exc_info.value, ImportError)
    with pytest.raises(UnknownPluginError, match="must be a string"):
        registry.get("mixer", None)


def test_missing_dependency_names_the_package(fake_dist):
    with pytest.raises(MissingDependencyError) as exc_info:
        registry.get("mixer", "fake_needs_dep")
    message = str(exc_info.value)
    assert MISSING_DEPENDENCY in message and "fake-dist" in message and "fake_needs_dep" in message
    assert "fake_good" in message  # the alternatives
    assert not isinstance(exc_info.value, PluginImportError)
    assert isinstance(exc_info.value.__cause__, ModuleNotFoundError)
    with pytest.raises(MissingDependencyError):  # the failure is remembered, not retried silently
        registry.get("mixer", "fake_needs_dep")


def test_plugin_raising_on_import(fake_dist):
    with pytest.raises(PluginImportError) as exc_info:
        registry.get("mixer", "fake_broken")
    message = str(exc_info.value)
    assert "fake-dist" in message and "fake_broken" in message
    assert "RuntimeError" in message and "boom: the fake plugin is broken" in message
    assert not isinstance(exc_info.value, MissingDependencyError)
    assert isinstance(exc_info.value.__cause__, RuntimeError)


def test_one_broken_plugin_does_not_hide_the_others(fake_dist):
    for bad in ("fake_broken", "fake_needs_dep"):
        with pytest.raises((PluginImportError, MissingDependencyError)):
            registry.get("mixer", bad)
    assert {"attention", "gated_deltanet", "fake_good", "fake_needs_dep", "fake_broken"} <= set(registry.names("mixer"))
    assert registry.get("mixer", "fake_good").__name__ == "FakeMixer"
    assert registry.get("mixer", "attention").__name__ == "Attention"
    assert registry.get("eviction", "fake_keep_all").__name__ == "KeepAll"
    statuses = {(i.kind, i.name): i.status for i in registry.info(load=True)}
    assert statuses[("mixer", "fake_good")] == "loaded"
    assert statuses[("mixer", "fake_needs_dep")] == "missing-dependency"
    assert statuses[("mixer", "fake_broken")] == "import-error"
    assert statuses[("mixer", "attention")] == "loaded"
    assert statuses[("rule", "gated_delta")] == "loaded"


# ----------------------------------------------------------------------------------------------------------------
# every registered plugin keeps its kind's contract


@pytest.mark.parametrize("name", registry.names("mixer"))
def test_every_mixer_keeps_the_contract(name):
    cls = registry.get("mixer", name)
    torch.manual_seed(0)
    mixer = cls(64, layer_idx=0)
    assert isinstance(mixer, nn.Module)
    carried = mixer.carried_state
    assert isinstance(carried, tuple) and all(isinstance(key, str) for key in carried)
    x = torch.randn(2, 5, 64)
    y, state = mixer(x)
    assert y.shape == (2, 5, 64) and y.dtype == x.dtype and torch.isfinite(y).all()
    assert state is None or isinstance(state, dict)
    assert set(carried) <= set(state or {}), f"{name}: carried keys {carried} missing from state"
    y2, state2 = mixer(x[:, :3], state, span=4)  # continuing a sequence with the state it returned
    assert y2.shape == (2, 3, 64) and torch.isfinite(y2).all()
    for key in carried:
        assert state2[key].shape == state[key].shape
    # Streaming contract: a sequence fed in two pieces gives what it gives in one.
    x = torch.randn(2, 9, 64)
    whole, _ = mixer(x)
    first, state = mixer(x[:, :4])
    rest, _ = mixer(x[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole, rtol=1e-4, atol=1e-5)
    flushed = evict_state(mixer, state, 0)  # hard eviction keeps the fast weights only
    assert set(flushed or {}) == set(carried)


# On a CPU the accelerated rules (e.g. the fla plugin's) announce their fallback: expected here.
@pytest.mark.filterwarnings("ignore::sleepzoo.backends.BackendFallbackWarning")
@pytest.mark.parametrize("name", registry.names("rule"))
def test_every_rule_chunk_equals_recurrent(name):
    rule = registry.get("rule", name)
    assert isinstance(rule, FastWeightRule) and rule.name == name
    B, T, H, K, V = 2, 7, 2, 4, 3
    gen = torch.Generator().manual_seed(0)
    f64 = dict(generator=gen, dtype=torch.float64)
    q = torch.randn(B, T, H, K, **f64)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, **f64), dim=-1)  # as the mixers make them
    v = torch.randn(B, T, H, V, **f64)
    g = -torch.rand(B, T, H, **f64) if rule.uses_gate else None
    beta = torch.rand(B, T, H, **f64) if rule.uses_beta else None
    S0 = torch.randn(B, H, K, V, **f64)
    o_c, S_c = rule.chunk(q, k, v, g, beta, initial_state=S0, output_final_state=True, chunk_size=3)
    o_r, S_r = rule.recurrent(q, k, v, g, beta, initial_state=S0, output_final_state=True)
    assert o_c.shape == (B, T, H, V) and S_c.shape == (B, H, K, V)
    torch.testing.assert_close(o_c, o_r)
    torch.testing.assert_close(S_c, S_r)
    o_1, S_1 = rule.step(q[:, 0], k[:, 0], v[:, 0], None if g is None else g[:, 0],
                         None if beta is None else beta[:, 0], S0)
    o_r1, S_r1 = rule.recurrent(q[:, :1], k[:, :1], v[:, :1], None if g is None else g[:, :1],
                                None if beta is None else beta[:, :1], initial_state=S0, output_final_state=True)
    torch.testing.assert_close(o_1, o_r1[:, 0])
    torch.testing.assert_close(S_1, S_r1)


class _StubMixer(nn.Module):
    def __init__(self, carried: tuple[str, ...]):
        super().__init__()
        self.carried_state = carried


@pytest.mark.parametrize("name", registry.names("eviction"))
def test_every_eviction_keeps_the_fast_weights(name):
    policy = registry.get("eviction", name)(window=6)
    assert 1 <= policy.chunk <= 6 and policy.span in (None, 6)
    fast, kv, conv = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 6, 8), torch.randn(2, 3, 8)
    mixers = [_StubMixer(("fast_weights",)), _StubMixer(()), _StubMixer(("fast_weights",))]
    states = [{"fast_weights": fast, "conv_cache": conv}, {"kv_cache": kv}, None]
    evicted = policy.evict(states, mixers)
    assert len(evicted) == len(mixers)
    assert evicted[0]["fast_weights"] is fast  # fast weights cross the boundary untouched
    assert evicted[2] is None or "fast_weights" not in evicted[2]  # no state is invented
    if policy.retain == 0:  # hard eviction: nothing but the carried keys survives
        for state, mixer in zip(evicted, mixers):
            assert set(state or {}) <= set(mixer.carried_state)
        assert evicted[0] == {"fast_weights": fast} and not evicted[1] and not evicted[2]
