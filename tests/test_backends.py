"""Accelerated back ends and their fallbacks.

* The Attention mixer runs ``sdpa`` when its back end's ``unsupported`` gives a reason, with sdpa's values,
  announcing it once per (back end, reason) with a ``BackendFallbackWarning``.
* Every registered attention back end (parametrized over the registry) matches a float64 softmax with a mask
  written out element by element: causal, sliding window, KV cache (S > T), GQA / MQA, one-token decoding;
  values, gradients and the mixer's streaming through its cache. A back end that can not run here is skipped
  with its own reason.
* ``flex``: parity where it runs, and a truthful ``unsupported`` (on this torch's CPU: no backward).
* The fla plugin (installed with pip into this interpreter) falls back on a CPU to sleepzoo's torch ops, whose
  values and gradients it then gives exactly.
* The flash-attn and xformers plugins, whose libraries are absent here, are a ``MissingDependencyError`` naming
  the library at model build; their layout and window mapping are checked against stand-ins that implement the
  libraries' documented semantics (the real kernels are checked by ``bench/gpu_check.py`` on a GPU).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import math
import site
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sleepzoo import backends, registry
from sleepzoo.backends import BackendFallbackWarning
from sleepzoo.mixers.attention import Attention, attend, flex_attention
from sleepzoo.mixers.gated_deltanet import GatedDeltaNet
from sleepzoo.ops import rules as torch_rules
from sleepzoo.registry import MissingDependencyError

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
F64 = torch.float64


@pytest.fixture(autouse=True)
def fresh_announcements(monkeypatch):
    """Every test sees fallbacks announced afresh: the once-per-process memory is module state."""
    monkeypatch.setattr(backends, "_announced", set())


def fallback_warnings(caught) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, BackendFallbackWarning)]


# ----------------------------------------------------------------------------------------------------------------
# reference: softmax attention with the mask written out element by element


def explicit_mask(T: int, S: int, window: int | None) -> torch.Tensor:
    """Query i sits at position S - T + i; it sees key j when j <= its position and, with a window, when
    fewer than ``window`` positions separate them (itself included)."""
    mask = torch.zeros(T, S, dtype=torch.bool)
    for i in range(T):
        position = S - T + i
        for j in range(S):
            mask[i, j] = j <= position and (window is None or position - j < window)
    return mask


def reference_attention(q, k, v, window, scale):
    """float64 softmax attention; query head h reads K/V head h // (H / Hkv)."""
    H, T, S = q.shape[1], q.shape[2], k.shape[2]
    kv_head = torch.arange(H) // (H // k.shape[1])
    k, v = k[:, kv_head], v[:, kv_head]  # (B, H, S, D)
    scores = torch.einsum("bhtd,bhsd->bhts", q.double(), k.double()) * scale
    scores = scores.masked_fill(~explicit_mask(T, S, window), -math.inf)
    return torch.einsum("bhts,bhsd->bhtd", scores.softmax(-1), v.double())


CASES = [  # (T, S, window, H, Hkv)
    pytest.param(5, 5, None, 4, 4, id="causal"),
    pytest.param(6, 6, 3, 4, 4, id="window"),
    pytest.param(4, 9, None, 4, 2, id="cache-gqa"),
    pytest.param(3, 10, 4, 6, 2, id="cache-window-gqa"),
    pytest.param(1, 7, 3, 4, 1, id="decode-mqa"),
    pytest.param(5, 5, 9, 2, 1, id="window-wider-than-cache"),
]


def qkv(T, S, H, Hkv, D=8, *, dtype=F64, device="cpu", requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((2, H, T, D), (2, Hkv, S, D), (2, Hkv, S, D))
    return [torch.randn(*s, generator=gen).to(device, dtype).requires_grad_(requires_grad) for s in shapes]


# float64 on the CPU; on a GPU (``-m gpu``) bfloat16 with head_dim 64, where the accelerated back ends run
DEVICES = [
    pytest.param("cpu", F64, 8, id="cpu-f64"),
    pytest.param("cuda", torch.bfloat16, 64, id="cuda-bf16", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
]


def assert_close(got, want):
    """Exact to float64 rounding, or within bfloat16 rounding (relative to the values' scale)."""
    if got.dtype == F64:
        torch.testing.assert_close(got, want)
    else:
        torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=2e-2 * want.abs().max().item())


def load_attention_or_skip(name: str):
    try:
        return registry.get("attention", name)
    except MissingDependencyError as exc:
        pytest.skip(str(exc))


def skip_if_unsupported(backend, q, k, v, window):
    reason = getattr(backend, "unsupported", lambda *a, **kw: None)(q, k, v, window=window)
    if reason is not None:
        pytest.skip(reason)


# ----------------------------------------------------------------------------------------------------------------
# the fallback


def test_warn_fallback_once_per_backend_and_reason():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backends.warn_fallback("alpha", "needs CUDA tensors, got cpu", "sdpa")
        backends.warn_fallback("alpha", "needs CUDA tensors, got cpu", "sdpa")
        backends.warn_fallback("alpha", "needs float16, got float64", "sdpa")
        backends.warn_fallback("beta", "needs CUDA tensors, got cpu", "sdpa")
    messages = [str(w.message) for w in fallback_warnings(caught)]
    assert len(messages) == 3
    assert messages[0].startswith("alpha: needs CUDA tensors, got cpu; falling back to sdpa")
    assert "needs float16, got float64" in messages[1] and messages[2].startswith("beta:")


def test_attention_falls_back_to_sdpa_once_with_the_reason():
    calls = []

    def fake_accelerated(q, k, v, *, causal=True, window=None, scale=None):
        calls.append(q.dtype)
        return torch.zeros_like(q)  # wrong on purpose: a fallback must not return this

    fake_accelerated.unsupported = lambda q, k, v, *, window=None: (
        f"fake_accelerated needs float32, got {q.dtype}" if q.dtype != torch.float32 else None)
    registry.register("attention", "fake_accelerated")(fake_accelerated)
    try:
        torch.manual_seed(0)
        fast = Attention(32, num_heads=4, num_kv_heads=2, window=3, backend="fake_accelerated").double()
        reference = Attention(32, num_heads=4, num_kv_heads=2, window=3).double()
        reference.load_state_dict(fast.state_dict())
        x = torch.randn(2, 7, 32, dtype=F64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, state = fast(x[:, :4])
            rest, _ = fast(x[:, 4:], state)  # a second call (through the cache): no second announcement
        announced = fallback_warnings(caught)
        assert len(announced) == 1
        message = str(announced[0].message)
        assert "'fake_accelerated'" in message
        assert "fake_accelerated needs float32, got torch.float64" in message
        assert "falling back to 'sdpa'" in message
        assert calls == []
        want_first, want_state = reference(x[:, :4])
        want_rest, _ = reference(x[:, 4:], want_state)
        assert torch.equal(first, want_first) and torch.equal(rest, want_rest)

        # where it can run, the back end itself is called (its zeros come through o_proj as zeros), silently
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y, _ = fast.float()(x[:, :4].float())
        assert calls == [torch.float32] and not fallback_warnings(caught)
        assert torch.equal(y, torch.zeros_like(y))
    finally:
        registry.unregister("attention", "fake_accelerated")


def test_attend_without_unsupported_always_calls_the_backend():
    q, k, v = qkv(3, 5, 2, 1)
    marker = torch.full_like(q, 7.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = attend(lambda q, k, v, **kw: marker, "plain", q, k, v, window=2)
    assert out is marker and not fallback_warnings(caught)


def test_import_problem_and_needs_grad():
    assert backends.import_problem("torch.nn.functional") is None
    reason = backends.import_problem("sleepzoo_no_such_module_xyz")
    assert "sleepzoo_no_such_module_xyz" in reason and "ModuleNotFoundError" in reason
    x, w = torch.ones(2), torch.ones(2, requires_grad=True)
    assert not backends.needs_grad(x, None) and backends.needs_grad(x, w)
    with torch.no_grad():
        assert not backends.needs_grad(w)


# ----------------------------------------------------------------------------------------------------------------
# every registered attention back end against the explicit mask


@pytest.mark.parametrize("device, dtype, D", DEVICES)
@pytest.mark.parametrize("T, S, window, H, Hkv", CASES)
@pytest.mark.parametrize("name", registry.names("attention"))
def test_attention_backend_matches_the_explicit_mask(name, T, S, window, H, Hkv, device, dtype, D):
    backend = load_attention_or_skip(name)
    q, k, v = qkv(T, S, H, Hkv, D, dtype=dtype, device=device)
    with torch.no_grad():
        skip_if_unsupported(backend, q, k, v, window)
        got = backend(q, k, v, causal=True, window=window, scale=0.3)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert_close(got.cpu(), reference_attention(q.cpu(), k.cpu(), v.cpu(), window, 0.3))


@pytest.mark.parametrize("device, dtype, D", DEVICES)
@pytest.mark.parametrize("T, S, window, H, Hkv", CASES[1:4])
@pytest.mark.parametrize("name", registry.names("attention"))
def test_attention_backend_gradients_match_the_explicit_mask(name, T, S, window, H, Hkv, device, dtype, D):
    backend = load_attention_or_skip(name)
    q, k, v = qkv(T, S, H, Hkv, D, dtype=dtype, device=device, requires_grad=True)
    skip_if_unsupported(backend, q, k, v, window)
    cotangent = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    got = torch.autograd.grad((backend(q, k, v, causal=True, window=window, scale=0.3) * cotangent).sum(), (q, k, v))
    leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad((reference_attention(*leaves, window, 0.3) * cotangent.cpu().double()).sum(), leaves)
    for g, w in zip(got, want):
        assert_close(g.cpu(), w)


@pytest.mark.parametrize("name", registry.names("attention"))
def test_attention_mixer_streams_through_its_cache_with_every_backend(name):
    backend = load_attention_or_skip(name)
    with torch.no_grad():
        skip_if_unsupported(backend, *qkv(3, 7, 4, 2), 3)
        torch.manual_seed(0)
        mixer = Attention(32, num_heads=4, num_kv_heads=2, window=3, backend=name).double()
        reference = Attention(32, num_heads=4, num_kv_heads=2, window=3).double()
        reference.load_state_dict(mixer.state_dict())
        x = torch.randn(2, 9, 32, dtype=F64)
        whole, _ = mixer(x)
        pieces, state = [], None
        for start, end in ((0, 4), (4, 5), (5, 9)):  # a prefill, one decoded token, a chunk over the cache
            y, state = mixer(x[:, start:end], state)
            pieces.append(y)
        want, _ = reference(x)
    torch.testing.assert_close(whole, want)
    torch.testing.assert_close(torch.cat(pieces, dim=1), want)


# ----------------------------------------------------------------------------------------------------------------
# flex attention (tested directly too: its registration is an entry point of sleepzoo's own metadata)


@pytest.mark.parametrize("T, S, window, H, Hkv", CASES)
def test_flex_matches_the_explicit_mask_where_it_runs(T, S, window, H, Hkv):
    q, k, v = qkv(T, S, H, Hkv)
    with torch.no_grad():
        skip_if_unsupported(flex_attention, q, k, v, window)
        got = flex_attention(q, k, v, causal=True, window=window, scale=0.3)
    torch.testing.assert_close(got, reference_attention(q, k, v, window, 0.3))


def test_flex_unsupported_tells_the_truth_about_gradients():
    """Whatever this torch supports: a reason means the call fails; no reason means gradients are right."""
    q, k, v = qkv(4, 6, 4, 2, requires_grad=True)
    reason = flex_attention.unsupported(q, k, v, window=3)
    if reason is None:
        out = flex_attention(q, k, v, window=3, scale=0.3)
        want = reference_attention(q, k, v, 3, 0.3)
        torch.testing.assert_close(torch.autograd.grad(out.sum(), q)[0], torch.autograd.grad(want.sum(), q)[0])
    else:
        assert "flex attention does not run on cpu" in reason and "with gradients" in reason
        with pytest.raises(Exception):
            flex_attention(q, k, v, window=3, scale=0.3).sum().backward()


def test_flex_training_on_this_machine_falls_back_or_runs_with_the_same_values():
    registry.register("attention", "flex_under_test")(flex_attention)
    try:
        torch.manual_seed(0)
        mixer = Attention(32, num_heads=4, num_kv_heads=2, window=3, backend="flex_under_test").double()
        reference = Attention(32, num_heads=4, num_kv_heads=2, window=3).double()
        reference.load_state_dict(mixer.state_dict())
        x = torch.randn(2, 6, 32, dtype=F64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y, _ = mixer(x)  # parameters require grad: a training forward
        y.sum().backward()
        want, _ = reference(x)
        want.sum().backward()
        torch.testing.assert_close(y, want)
        torch.testing.assert_close(mixer.q_proj.weight.grad, reference.q_proj.weight.grad)
        probe = [t.requires_grad_() for t in qkv(6, 6, 4, 2)]
        reason = flex_attention.unsupported(*probe, window=3)
        announced = fallback_warnings(caught)
        assert len(announced) == (0 if reason is None else 1)
        if reason is not None:
            assert reason in str(announced[0].message) and "'flex_under_test'" in str(announced[0].message)
    finally:
        registry.unregister("attention", "flex_under_test")


# ----------------------------------------------------------------------------------------------------------------
# the fla plugin, installed into this interpreter

FLA_DIR = PLUGINS / "sleepzoo-fla"
FLA_RULES = {"fla_gated_delta": "gated_delta", "fla_delta": "delta", "fla_gated_linear": "gated_linear",
             "fla_linear": "linear"}


def _activate_pth_files(dist_name: str) -> None:
    """Read the ``.pth`` files an editable install just wrote, as a fresh interpreter would at start-up."""
    for file in md.distribution(dist_name).files or ():
        if file.suffix == ".pth":
            path = Path(file.locate())
            site.addpackage(str(path.parent), path.name, None)


@pytest.fixture(scope="module")
def fla_plugin():
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not available in this interpreter")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-q", "-e", str(FLA_DIR)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"pip install -e {FLA_DIR} failed:\n{proc.stdout}\n{proc.stderr}")
    importlib.invalidate_caches()
    _activate_pth_files("sleepzoo-fla")
    registry.refresh()
    yield md.distribution("sleepzoo-fla")
    registry.refresh()


def rule_inputs(rule, B=2, T=11, H=2, K=8, V=6, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return {"q": randn(B, T, H, K), "k": F.normalize(randn(B, T, H, K), dim=-1), "v": randn(B, T, H, V),
            "g": F.logsigmoid(randn(B, T, H)) if rule.uses_gate else None,
            "beta": torch.sigmoid(randn(B, T, H)) if rule.uses_beta else None, "S0": randn(B, H, K, V)}


def run_rule(rule, form, x):
    if form == "step":
        return rule.step(x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], None if x["g"] is None else x["g"][:, 0],
                         None if x["beta"] is None else x["beta"][:, 0], x["S0"])
    fn = rule.chunk if form == "chunk" else rule.recurrent
    kwargs = {"chunk_size": 4} if form == "chunk" else {}
    return fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["S0"], output_final_state=True, **kwargs)


def test_fla_rules_are_listed_and_load_without_fla_kernels(fla_plugin):
    assert set(FLA_RULES) <= set(registry.names("rule"))
    providers = {i.name: i.provider for i in registry.info("rule")}
    assert all(providers[name] == "sleepzoo-fla" for name in FLA_RULES)
    for name, twin_name in FLA_RULES.items():
        rule, twin = registry.get("rule", name), getattr(torch_rules, twin_name)
        assert rule.name == name and (rule.uses_gate, rule.uses_beta) == (twin.uses_gate, twin.uses_beta)
    # fla's kernels (and Triton) are imported on CUDA only: loading the plugin imports no fla module
    proc = subprocess.run([sys.executable, "-c", "import sys, sleepzoo_fla.rules; "
                           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fla', 'triton')))"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("form", ["chunk", "recurrent", "step"])
@pytest.mark.parametrize("name", sorted(FLA_RULES))
def test_fla_rule_on_cpu_falls_back_to_the_torch_op_exactly(fla_plugin, name, form):
    rule, twin = registry.get("rule", name), getattr(torch_rules, FLA_RULES[name])
    x = {n: (None if t is None else t.requires_grad_()) for n, t in rule_inputs(rule).items()}
    x_twin = {n: (None if t is None else t.detach().clone().requires_grad_()) for n, t in x.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o, S = run_rule(rule, form, x)
        run_rule(rule, form, x)  # announced once
    o_want, S_want = run_rule(twin, form, x_twin)
    assert torch.equal(o, o_want) and torch.equal(S, S_want)
    announced = fallback_warnings(caught)
    assert len(announced) == 1
    message = str(announced[0].message)
    assert f"'{name}'" in message and "fla kernels need CUDA tensors, got cpu" in message
    assert f"sleepzoo's torch rule '{FLA_RULES[name]}'" in message
    (o.sum() + S.sum()).backward()
    (o_want.sum() + S_want.sum()).backward()
    for n in x:
        if x[n] is not None:
            assert torch.equal(x[n].grad, x_twin[n].grad), n


def test_fla_rule_falls_back_for_float64_with_its_own_reason(fla_plugin):
    rule = registry.get("rule", "fla_gated_delta")
    x = rule_inputs(rule, dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o, S = run_rule(rule, "chunk", x)
    o_want, S_want = run_rule(torch_rules.gated_delta, "chunk", x)
    assert torch.equal(o, o_want) and torch.equal(S, S_want)
    assert "got cpu" in str(fallback_warnings(caught)[0].message)  # the device is checked first


def test_gated_deltanet_with_the_fla_rule_equals_the_torch_rule_on_cpu(fla_plugin):
    torch.manual_seed(0)
    fla_mixer = GatedDeltaNet(32, num_heads=2, head_dim=8, chunk_size=4, rule="fla_gated_delta")
    torch_mixer = GatedDeltaNet(32, num_heads=2, head_dim=8, chunk_size=4)
    torch_mixer.load_state_dict(fla_mixer.state_dict())
    x = torch.randn(2, 9, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackendFallbackWarning)
        y, state = fla_mixer(x)
        y2, state2 = fla_mixer(x[:, :3], state)
    want, want_state = torch_mixer(x)
    want2, want_state2 = torch_mixer(x[:, :3], want_state)
    assert torch.equal(y, want) and torch.equal(y2, want2)
    assert torch.equal(state2["fast_weights"], want_state2["fast_weights"])


def test_fla_parity_script_exits_cleanly_without_cuda(fla_plugin):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run the real comparison")
    proc = subprocess.run([sys.executable, str(FLA_DIR / "parity.py")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout


# ----------------------------------------------------------------------------------------------------------------
# flash-attn and xformers plugins: missing libraries, and the mapping onto the libraries' conventions

ACCELERATED = [
    pytest.param("sleepzoo-flash-attn", "sleepzoo_flash_attn", "flash_attn", "flash_attn", id="flash_attn"),
    pytest.param("sleepzoo-xformers", "sleepzoo_xformers", "xformers", "xformers", id="xformers"),
]


def _forget(package: str) -> None:
    for module in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[module]


def _entry_points_txt(dist: str) -> str:
    """The ``[project.entry-points]`` tables of the plugin's own pyproject, as an ``entry_points.txt``."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((PLUGINS / dist / "pyproject.toml").read_text())["project"]
    return "".join(f"[{group}]\n" + "".join(f"{n} = {target}\n" for n, target in eps.items()) + "\n"
                   for group, eps in project["entry-points"].items())


@pytest.mark.parametrize("dist, package, name, library", ACCELERATED)
def test_missing_library_is_a_missing_dependency_at_model_build(dist, package, name, library, tmp_path,
                                                                monkeypatch):
    if importlib.util.find_spec(library) is not None:
        pytest.skip(f"{library} is installed here")
    dist_info = tmp_path / f"{package}-0.1.0.dist-info"  # the plugin "installed": its metadata, its source
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    (dist_info / "entry_points.txt").write_text(_entry_points_txt(dist))
    monkeypatch.syspath_prepend(str(PLUGINS / dist))
    monkeypatch.syspath_prepend(str(tmp_path))
    _forget(package)
    registry.refresh()
    try:
        assert name in registry.names("attention")
        assert {i.name: i.status for i in registry.info("attention")}[name] == "available"  # listing: no import
        assert package not in sys.modules
        with pytest.raises(MissingDependencyError) as exc_info:
            Attention(32, num_heads=4, backend=name)
        message = str(exc_info.value)
        assert f"needs the package '{library}'" in message and f"'{dist}'" in message and "sdpa" in message
        info = {i.name: i for i in registry.info("attention", load=True)}[name]
        assert (info.status, info.provider) == ("missing-dependency", dist)
    finally:
        monkeypatch.undo()
        _forget(package)
        registry.refresh()


def _fake_flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1)):
    """flash-attn's documented semantics, written out: (B, T, H, D) layout; query i sees keys in
    [i + S - T - window_size[0], i + S - T + window_size[1]] (-1: unbounded), causal meaning right = 0
    (bottom-right aligned); query head h reads K/V head h // (H / Hkv)."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(T)[:, None] + S - T
    j = torch.arange(S)[None, :]
    allowed = torch.ones(T, S, dtype=torch.bool)
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    heads = torch.arange(H) // (H // Hkv)
    scores = torch.einsum("bthd,bshd->bhts", q, k[:, :, heads]) * (softmax_scale or D ** -0.5)
    probs = scores.masked_fill(~allowed, -math.inf).softmax(-1)
    return torch.einsum("bhts,bshd->bthd", probs, v[:, :, heads])


class _FakeBottomRightMask:
    window = None


class _FakeBottomRightLocalMask(_FakeBottomRightMask):
    def __init__(self, window_size):
        self.window = window_size


def _fake_memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
    """xformers' documented semantics: (B, M, H, K) or, for grouped heads, (B, M, G, H, K); the bottom-right
    masks let a query at distance X from the last query see keys at distance d from the last key with
    X <= d (< X + window with the local mask)."""
    grouped = query.dim() == 5
    if grouped:
        B, T, G, R, D = query.shape
        query, key, value = (x.reshape(B, x.shape[1], G * R, x.shape[-1]) for x in (query, key, value))
    T, S, D = query.shape[1], key.shape[1], query.shape[-1]
    scores = torch.einsum("bthd,bshd->bhts", query, key) * (scale or D ** -0.5)
    if attn_bias is not None:
        X = (T - 1 - torch.arange(T))[:, None]
        d = (S - 1 - torch.arange(S))[None, :]
        allowed = d >= X
        if attn_bias.window is not None:
            allowed &= d < X + attn_bias.window
        scores = scores.masked_fill(~allowed, -math.inf)
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), value)
    return out.reshape(*out.shape[:2], G, R, out.shape[-1]) if grouped else out


def _fake_library(monkeypatch, library: str) -> None:
    if library == "flash_attn":
        module = types.ModuleType("flash_attn")
        module.flash_attn_func = _fake_flash_attn_func
        monkeypatch.setitem(sys.modules, "flash_attn", module)
        return
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = _fake_memory_efficient_attention
    attn_bias = types.ModuleType("xformers.ops.fmha.attn_bias")
    attn_bias.LowerTriangularFromBottomRightMask = _FakeBottomRightMask
    attn_bias.LowerTriangularFromBottomRightLocalAttentionMask = _FakeBottomRightLocalMask
    for module_name, module in (("xformers", types.ModuleType("xformers")), ("xformers.ops", ops),
                                ("xformers.ops.fmha", types.ModuleType("xformers.ops.fmha")),
                                ("xformers.ops.fmha.attn_bias", attn_bias)):
        monkeypatch.setitem(sys.modules, module_name, module)


@pytest.mark.parametrize("T, S, window, H, Hkv", CASES)
@pytest.mark.parametrize("dist, package, name, library", ACCELERATED)
def test_plugin_maps_onto_the_library_conventions(dist, package, name, library, T, S, window, H, Hkv,
                                                  monkeypatch):
    """Layout, window and GQA mapping against a stand-in library (the real kernels: bench/gpu_check.py)."""
    if importlib.util.find_spec(library) is not None:
        pytest.skip(f"the real {library} is installed: bench/gpu_check.py checks it")
    _fake_library(monkeypatch, library)
    monkeypatch.syspath_prepend(str(PLUGINS / dist))
    _forget(package)
    try:
        backend = getattr(importlib.import_module(f"{package}.attention"), name)
        q, k, v = qkv(T, S, H, Hkv)
        got = backend(q, k, v, causal=True, window=window, scale=0.3)
        torch.testing.assert_close(got, reference_attention(q, k, v, window, 0.3))
        assert backend.unsupported(q, k, v, window=window) == f"{name} needs CUDA tensors, got cpu"
    finally:
        _forget(package)
