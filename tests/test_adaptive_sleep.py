"""Adaptive sleep (``sleep.loops: auto``): each sequence stops sleeping when its fast weights stop changing.

The engine is checked against the rule written out by hand (SPEC 1's passes plus the stopping rule, one
sequence at a time), against fixed loop counts, and on a toy mixer whose convergence is known exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from sleepzoo import SleepzooError, registry
from sleepzoo.engine import fast_weight_change, pass_summary
from sleepzoo.rules import check_schedule as sleep_schedule

from test_engine import manual_block, tiny_model, tiny_recipe

REPO = Path(__file__).resolve().parents[1]


def rel_change(S_new: dict, S_old: dict) -> float:
    """max over layers of ||S_new - S_old||_F / ||S_old||_F, for one sequence (written out for the test)."""
    worst = 0.0
    for i, new in S_new.items():
        old = S_old.get(i)
        old = torch.zeros_like(new) if old is None else old
        num, den = float((new - old).detach().norm()), float(old.detach().norm())
        worst = max(worst, 0.0 if num == 0 else (num / den if den else float("inf")))
    return worst


def manual_adaptive_forward(model, ids, window, max_loops, tol):
    """One sequence (1, T): per window the wake pass, then sleep passes over all blocks while the fast
    weights change by at least ``tol`` (a pass whose change is under it is dropped), at most ``max_loops``
    passes in all. Returns (wake logits (1, T, V), passes used per consolidated window)."""
    S: dict = {}
    logits, used = [], []
    chunks = list(torch.split(ids, window, dim=1))
    for c, chunk in enumerate(chunks):
        h = model.model.embed_tokens(chunk)
        for i, block in enumerate(model.model.layers):
            h = manual_block(block, i, h, S)
        logits.append(model.lm_head(model.model.norm(h)))
        if c + 1 == len(chunks):
            break
        n = 1
        while n < max_loops:
            S_try, h_try = dict(S), h
            for i, block in enumerate(model.model.layers):
                h_try = manual_block(block, i, h_try, S_try)
            if rel_change(S_try, S) < tol:
                break
            S, h, n = S_try, h_try, n + 1
        used.append(n)
    return torch.cat(logits, dim=1), used


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 11, (4, 18))


def test_engine_matches_the_rule_written_out_by_hand(model, ids):
    seen = set()
    for tol in (0.0, 0.02, 0.05, 0.1, 0.3, 1.0, 10.0):
        out = model(ids, window=6, loops="auto", max_loops=5, tolerance=tol)
        assert out.passes.shape == (4, 2)
        for b in range(ids.shape[0]):
            ref_logits, ref_used = manual_adaptive_forward(model, ids[b:b + 1], 6, 5, tol)
            assert out.passes[b].tolist() == ref_used, (tol, b)
            torch.testing.assert_close(out.logits[b:b + 1], ref_logits, rtol=0, atol=1e-12)
        seen.update(out.passes.flatten().tolist())
    assert {1, 5} <= seen and len(seen) >= 3, f"the tolerances should spread the passes used, got {seen}"


def test_tolerance_zero_equals_fixed_max_loops(model, ids):
    targets = ids.roll(-1, 1)
    for kw in ({}, {"eviction": "sliding_window", "sleep_every": 3}, {"checkpoint": True}):
        fixed = model(ids, targets, window=6, loops=4, **kw)
        auto = model(ids, targets, window=6, loops="auto", max_loops=4, tolerance=0.0, **kw)
        assert torch.equal(auto.logits, fixed.logits)
        assert torch.equal(auto.loss, fixed.loss)
        assert (auto.passes == 4).all() and (fixed.passes == 4).all()
        g_fixed = torch.autograd.grad(fixed.loss, list(model.parameters()), allow_unused=True)
        g_auto = torch.autograd.grad(auto.loss, list(model.parameters()), allow_unused=True)
        for a, b in zip(g_auto, g_fixed):
            assert (a is None and b is None) or torch.equal(a, b)


def test_a_sequence_that_stops_equals_a_fixed_run_at_its_passes(model, ids):
    """Batch rows stop at different passes; each row's loss and gradients are those of that row alone at a
    fixed loop count equal to its passes used (the stop decision itself passes no gradient)."""
    tol = 0.2
    out = model(ids[:, :12], window=6, loops="auto", max_loops=5, tolerance=tol)
    used = out.passes[:, 0].tolist()
    assert len(set(used)) >= 2, used
    targets = ids.roll(-1, 1)[:, :12]
    params = [p for p in model.parameters()]
    for b, n in enumerate(used):
        row, tgt = ids[b:b + 1, :12], targets[b:b + 1]
        auto = model(row, tgt, window=6, loops="auto", max_loops=5, tolerance=tol)
        fixed = model(row, tgt, window=6, loops=n)
        assert auto.passes.tolist() == [[n]]
        torch.testing.assert_close(auto.loss, fixed.loss, rtol=0, atol=1e-12)
        for a, f in zip(torch.autograd.grad(auto.loss, params, allow_unused=True),
                        torch.autograd.grad(fixed.loss, params, allow_unused=True)):
            if a is None or f is None:
                assert a is None and f is None
            else:
                torch.testing.assert_close(a, f, rtol=0, atol=1e-10)


def test_checkpointing_and_the_stream_agree_with_the_plain_run(model, ids):
    kw = dict(window=6, loops="auto", max_loops=5, tolerance=0.2)
    targets = ids.roll(-1, 1)
    plain = model(ids, targets, **kw)
    ckpt = model(ids, targets, checkpoint=True, **kw)
    torch.testing.assert_close(ckpt.loss, plain.loss, rtol=0, atol=1e-12)
    assert torch.equal(ckpt.passes, plain.passes)
    stream = model.start_stream(**kw)
    with torch.no_grad():
        logits = torch.cat([stream.feed(ids[:, t:t + 1]) for t in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(logits, plain.logits, rtol=0, atol=1e-12)
    assert stream.pass_summary() == pass_summary(plain.passes)
    counts = {int(n): c for n, c in pass_summary(plain.passes)["passes_hist"].items()}
    assert stream.pass_counts == counts  # a histogram: bounded however long the stream
    fork = stream.fork()
    with torch.no_grad():
        fork.feed(ids[:, :6])  # one more sleep in the fork only (the last chunk was full)
    assert stream.pass_counts == counts and sum(fork.pass_counts.values()) == sum(counts.values()) + 4


class Capped(nn.Module):
    """A toy fast-weight mixer: each pass over a window adds 1 to S up to a cap per sequence (``caps``), so
    a sequence with cap c changes on passes 2..c and not after: it converges after c passes."""

    carried_state = ("fast_weights",)
    caps = torch.tensor([1.0, 2.0, 3.0, 6.0])

    def __init__(self, d_model: int, layer_idx: int = 0):
        super().__init__()
        self.proj = nn.Linear(1, d_model)

    def forward(self, x, state=None, *, span=None):
        S = torch.zeros(x.shape[0], 1, dtype=x.dtype) if not state or "fast_weights" not in state \
            else state["fast_weights"]
        S = torch.minimum(S + 1, self.caps[:x.shape[0], None].to(x.dtype))
        return self.proj(S)[:, None, :].expand_as(x) * 0.01, {"fast_weights": S}


@pytest.fixture
def capped_model():
    registry.register("mixer", "test_capped")(Capped)
    try:
        import sleepzoo

        recipe = tiny_recipe(layers=("attention", "test_capped"))
        yield sleepzoo.build_model(recipe).double()
    finally:
        registry.unregister("mixer", "test_capped")


def test_a_sequence_that_converges_after_c_passes_uses_c(capped_model):
    ids = torch.randint(0, 11, (4, 18))
    out = capped_model(ids, window=6, loops="auto", max_loops=4, tolerance=1e-9)
    # Window 1: caps 1, 2, 3, 6 -> passes 1, 2, 3 and max_loops = 4 (S = 1, 2, 3, 4). Fast weights carry
    # over, so in window 2 the wake pass reaches the cap of rows 1-3 (1 pass) and row 4 goes 5 -> 6 (2 passes).
    assert out.passes.tolist() == [[1, 1], [2, 1], [3, 1], [4, 2]]
    summary = pass_summary(out.passes)
    assert summary == {"passes_mean": 15 / 8, "passes_hist": {"1": 4, "2": 2, "3": 1, "4": 1}}
    S = out.states[1]["fast_weights"][:, 0]
    assert S.tolist() == [1.0, 2.0, 3.0, 6.0]  # frozen at the cap
    assert out.passes.dtype == torch.long


def test_fast_weight_change_per_sequence():
    class M:
        carried_state = ("fast_weights",)

    old = [{"fast_weights": torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]]), "cache": torch.ones(3)}]
    new = [{"fast_weights": torch.tensor([[3.0, 4.5], [0.0, 0.0], [1.0, 0.0]]), "cache": torch.zeros(3)}]
    change = fast_weight_change([M()], old, new)
    assert change[0].item() == pytest.approx(0.5 / 5.0)
    assert change[1].item() == 0.0 and change[2].item() == float("inf")
    with pytest.raises(SleepzooError, match="no looped layer has any"):
        fast_weight_change([nn.Identity()], [None], [None])


@pytest.mark.parametrize("args, match", [
    ((4, 8, None), "max_loops=8 is not allowed; max_loops goes with loops: auto"),
    ((2, None, 0.1), "tolerance=0.1 is not allowed; tolerance goes with loops: auto"),
    (("auto", 0, None), "max_loops=0 is not allowed; must be an integer >= 1"),
    (("auto", 4, -0.5), "tolerance=-0.5 is not allowed; must be a number >= 0"),
    (("auto", 4, float("nan")), "tolerance=nan is not allowed"),
    (("auto", True, None), "max_loops=True is not allowed"),
    (("sometimes", None, None), "loops='sometimes' is not allowed; must be an integer >= 1 .* or auto"),
])
def test_bad_schedules_are_one_clear_error(args, match):
    with pytest.raises(SleepzooError, match=match):
        sleep_schedule(*args)


def test_schedule_defaults():
    assert sleep_schedule(3) == (3, None)
    assert sleep_schedule("auto") == (8, 0.01)
    assert sleep_schedule("auto", 2, 0) == (2, 0.0)


def test_an_adaptive_stream_saves_its_bounds_and_passes_and_continues_exactly(tmp_path, model, ids):
    from sleepzoo.engine import Stream
    from sleepzoo.memory import describe

    kw = dict(window=6, loops="auto", max_loops=5, tolerance=0.2)
    with torch.no_grad():
        whole = model.start_stream(**kw)
        whole.feed(ids[:, :8])
        expected = whole.feed(ids[:, 8:])
        first = model.start_stream(**kw)
        first.feed(ids[:, :8])
        first.save(tmp_path / "m.safetensors")
        again = Stream.load(model, tmp_path / "m.safetensors")
        assert (again.loops, again.max_loops, again.tolerance) == ("auto", 5, 0.2)
        assert again.pass_counts == first.pass_counts and sum(again.pass_counts.values()) == 4  # 1 sleep x 4 rows
        torch.testing.assert_close(again.feed(ids[:, 8:]), expected, rtol=0, atol=0)
    assert again.pass_counts == whole.pass_counts
    info = describe(tmp_path / "m.safetensors")
    assert info["settings"]["max_loops"] == 5 and info["settings"]["tolerance"] == 0.2
    assert info["passes"] == first.pass_summary() and info["passes"]["passes_mean"] is not None
    with pytest.raises(SleepzooError, match="settings.tolerance: saved 0.2, asked for 0.1"):
        Stream.load(model, tmp_path / "m.safetensors", tolerance=0.1)


# ---------------------------------------------------------------------------------------------------------
# training and the command line


def _auto_recipe(*overrides):
    from test_train import tiny_rule110

    return tiny_rule110("sleep.loops=auto", "sleep.max_loops=3", "sleep.tolerance=0.2", *overrides)


def test_training_logs_passes_and_resumes_exactly(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from sleepzoo.train import train
    from test_train import read_lines, train_until_killed

    recipe = _auto_recipe("train.log_every=3", "train.checkpoint_every=2", "train.steps=6")
    straight = train(recipe, tmp_path / "a", progress=False)
    lines = read_lines(tmp_path / "a")
    logged = [r for r in lines if "loss" in r and r.get("split") != "test"]
    assert [r["step"] for r in logged] == [3, 6]
    assert all(1.0 <= r["passes"] <= 3.0 for r in logged)
    assert 1.0 <= straight["passes_mean"] <= 3.0 and set(straight["passes_hist"]) <= {"1", "2", "3"}
    assert (straight["loops"], straight["max_loops"], straight["tolerance"]) == ("auto", 3, 0.2)
    # killed in step 5 (after the checkpoint of step 4, in the middle of the log interval 4-6)
    train_until_killed(recipe, tmp_path / "b", monkeypatch, 4)
    train(recipe, tmp_path / "b", resume=True, progress=False)
    assert read_lines(tmp_path / "b") == lines
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_sweep_prints_one_table_and_writes_one_plot(tmp_path):
    from click.testing import CliRunner

    from sleepzoo.cli import main
    from sleepzoo.train import train
    from test_report import PNG_MAGIC

    from test_train import tiny_rule110

    run = tmp_path / "run"
    train(tiny_rule110("train.steps=2"), run, progress=False)
    result = CliRunner().invoke(main, ["eval", str(run), "--loops", "1,2,auto", "--tolerance", "0.3,0"])
    assert result.exit_code == 0, result.output
    sweep = json.loads((run / "eval-sweep.json").read_text())
    labels = [r["label"] for r in sweep["rows"]]
    assert labels == ["1", "2", "auto 0.3", "auto 0"]
    by = {r["label"]: r for r in sweep["rows"]}
    assert by["1"]["passes_mean"] == 1.0 and by["2"]["passes_mean"] == 2.0
    assert by["auto 0"]["passes_mean"] == 8.0  # tolerance 0: every pass, up to the default max_loops
    assert 1.0 <= by["auto 0.3"]["passes_mean"] <= 8.0
    assert (run / "eval-sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert (run / "eval-loopsauto-max8-tol0.3-window8.json").is_file()
    assert (run / "eval.json").is_file()  # loops 2: the run's own, written where training wrote it
    for row in ("1", "2", "auto 0.3"):
        assert any(line.split()[:2] == row.split()[:2] or line.strip().startswith(row) for line in
                   result.output.splitlines()), row
    own = json.loads((run / "eval.json").read_text())
    assert own["loops"] == 2 and "max_loops" not in own
    # --max-loops bounds the auto settings only, not the fixed counts beside them
    result = CliRunner().invoke(main, ["eval", str(run), "--loops", "1,auto", "--max-loops", "3"])
    assert result.exit_code == 0, result.output
    rows = {r["label"]: r for r in json.loads((run / "eval-sweep.json").read_text())["rows"]}
    assert rows["1"]["passes_mean"] == 1.0 and rows["auto 0.01"]["max_loops"] == 3
    assert 1.0 <= rows["auto 0.01"]["passes_mean"] <= 3.0


@pytest.mark.parametrize("args, match", [
    (["--loops", "0"], "'0' is not a loop count"),
    (["--loops", "2,x"], "'x' is not a loop count"),
    (["--loops", "2", "--tolerance", "0.1"], "--tolerance goes with --loops auto"),
    (["--loops", "2", "--max-loops", "4"], "--max-loops goes with --loops auto"),
    (["--loops", "²"], "'²' is not a loop count"),
    (["--loops", "auto", "--tolerance", "-1"], "give numbers >= 0"),
    (["--loops", "auto", "--max-loops", "0"], "--max-loops: 0 is not allowed"),
])
def test_eval_bad_loop_settings_are_one_line(tmp_path, args, match):
    from click.testing import CliRunner

    from sleepzoo.cli import main
    from sleepzoo.train import train

    from test_train import tiny_rule110

    run = tmp_path / "run"
    train(tiny_rule110("train.steps=1"), run, progress=False)
    result = CliRunner().invoke(main, ["eval", str(run), *args])
    assert result.exit_code != 0
    assert match in result.output, result.output
    assert "Traceback" not in result.output


def test_a_pretrained_folder_sleeps_adaptively_and_keeps_its_bounds(tmp_path):
    from sleepzoo.pretrained import from_pretrained, save_pretrained
    from test_pretrained import JET, ids as jet_ids, write_folder

    write_folder(tmp_path / "jet", JET)
    model = from_pretrained(tmp_path / "jet", window=4, loops="auto", max_loops=3, tolerance=0.25)
    assert (model.sleep.loops, model.sleep.max_loops, model.sleep.tolerance) == ("auto", 3, 0.25)
    x = jet_ids(T=12)
    with torch.no_grad():
        out = model(x)
        fixed = model(x, loops=3)
        zero = model(x, tolerance=0.0)
    assert out.passes.shape == (2, 2) and ((out.passes >= 1) & (out.passes <= 3)).all()
    assert torch.equal(zero.logits, fixed.logits) and (zero.passes == 3).all()
    save_pretrained(model, tmp_path / "saved")
    again = from_pretrained(tmp_path / "saved")
    assert (again.sleep.loops, again.sleep.max_loops, again.sleep.tolerance) == ("auto", 3, 0.25)
    with torch.no_grad():
        assert torch.equal(again(x).logits, out.logits)
    with pytest.raises(SleepzooError, match="tolerance"):
        from_pretrained(tmp_path / "jet", window=4, loops=2, tolerance=0.25)
    fixed_again = from_pretrained(tmp_path / "saved", loops=3)  # a fixed count given: the saved bounds go
    assert (fixed_again.sleep.loops, fixed_again.sleep.max_loops, fixed_again.sleep.tolerance) == (3, None, None)
    with torch.no_grad():
        assert torch.equal(fixed_again(x).logits, fixed.logits)


def test_a_stage_or_grid_point_with_a_fixed_count_drops_the_bounds_of_auto(tmp_path):
    from sleepzoo import load_recipe
    from sleepzoo.sweep import plan_sweep

    recipe = load_recipe({"model": {"layers": ["attention", "gated_deltanet"]}, "task": {"name": "rule110"},
                          "sleep": {"loops": "auto", "tolerance": 0.3},
                          "stages": [{"name": "warm", "steps": 2, "sleep": {"loops": 1}}, {"name": "main", "steps": 2}]})
    sleeps = {name: (r.sleep.loops, r.sleep.max_loops, r.sleep.tolerance) for name, r in recipe.stage_recipes()}
    assert sleeps == {"warm": (1, None, None), "main": ("auto", None, 0.3)}
    plan = plan_sweep(REPO / "recipes" / "rule110-tiny.yaml", ["sleep.loops=1,auto", "sleep.tolerance=0.3"],
                      tmp_path / "grid")
    by = {run.name: run.recipe.sleep for run in plan.runs}
    assert (by["loops1"].loops, by["loops1"].tolerance) == (1, None)
    assert (by["loopsauto"].loops, by["loopsauto"].tolerance) == ("auto", 0.3)


def test_a_models_config_is_the_recipes_section_as_given():
    """What a saved memory's fingerprint is taken of: the recipe's model section, vocab_size as written."""
    import sleepzoo

    recipe = tiny_recipe()
    model = sleepzoo.build_model(recipe)
    assert model.config == recipe.model and model.config.vocab_size == 11


def test_a_jsonl_line_that_is_not_unicode_text_is_one_clear_error(tmp_path):
    from sleepzoo import build_task, load_recipe

    (tmp_path / "a.jsonl").write_text('{"text": "fine text here"}\n{"text": "a \\ud800 b"}\n')
    recipe = load_recipe(REPO / "recipes" / "text-tiny.yaml", overrides=[f"task.paths=[{tmp_path / 'a.jsonl'}]"])
    with pytest.raises(SleepzooError, match=r"a.jsonl:2: field 'text' is not valid Unicode text"):
        build_task(recipe)


def test_eval_of_a_text_run_plots_loss_by_position_one_line_per_setting(tmp_path):
    from click.testing import CliRunner

    from sleepzoo.cli import main
    from test_report import PNG_MAGIC

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(24):
        (corpus / f"d{i}.txt").write_text(" ".join(f"word{(i * j) % 17} and more text" for j in range(60)))
    run = tmp_path / "run"
    overrides = [f"task.paths=[{corpus}]", "train.steps=1", "eval.num_examples=4"]
    result = CliRunner().invoke(main, ["train", str(REPO / "recipes" / "text-tiny.yaml"), *overrides,
                                       "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["eval", str(run), "--loops", "1,3", "--num-examples", "4"])
    assert result.exit_code == 0, result.output
    assert "loss by position" in result.output
    assert (run / "eval-position.png").read_bytes()[:8] == PNG_MAGIC
    row = json.loads((run / "eval-loops3-window64.json").read_text())
    assert row["buckets"]["window"] and row["buckets"]["position"]


def test_generate_sleeps_adaptively_and_its_memory_keeps_the_bounds(tmp_path):
    from click.testing import CliRunner

    from sleepzoo.cli import main
    from sleepzoo.memory import describe
    from sleepzoo.train import train
    from test_train import tiny_rule110

    run = tmp_path / "run"
    train(tiny_rule110("train.steps=1"), run, progress=False)
    memory = tmp_path / "m.safetensors"
    args = ["generate", str(run), "-n", "1", "--max-new-tokens", "4", "--loops", "auto", "--max-loops", "3",
            "--tolerance", "0.25", "--memory", str(memory)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    info = describe(memory)
    assert (info["settings"]["loops"], info["settings"]["max_loops"], info["settings"]["tolerance"]) == ("auto", 3, 0.25)
    assert 1 <= info["passes"]["passes_mean"] <= 3
    again = CliRunner().invoke(main, args)  # the same bounds continue the saved conversation
    assert again.exit_code == 0, again.output
    other = CliRunner().invoke(main, [*args[:-3], "0.5", "--memory", str(memory)])
    assert other.exit_code != 0 and "settings.tolerance: saved 0.25, asked for 0.5" in other.output
    fixed = CliRunner().invoke(main, ["generate", str(run), "-n", "1", "--loops", "2", "--tolerance", "0.3"])
    assert fixed.exit_code != 0 and "tolerance goes with loops: auto" in fixed.output
