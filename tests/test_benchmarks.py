"""The benchmark machinery (not the timings): cases, peak memory, FLOP counts, JSON, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

import sleepzoo
from sleepzoo import benchmarks
from sleepzoo.config import load_recipe
from sleepzoo.benchmarks import core, output, suites
from sleepzoo.cli import main
from sleepzoo.ops import gated_delta_rule


def test_peak_memory_counts_live_tensors_by_storage():
    def fn():
        a = torch.empty(1000, 250)  # 1,000,000 bytes
        b = torch.empty(2000, 250)  # 2,000,000 bytes
        view = b[:10]  # a view: no new storage
        del a
        c = torch.empty(500, 250)  # 500,000 bytes, after a is freed
        return view, c

    tracker = core.PeakMemory()
    with tracker:
        kept = fn()
    assert tracker.peak == 3_000_000
    assert tracker.current == 2_500_000  # b (held by the view) and c are alive
    del kept
    assert tracker.current == 0


def test_peak_memory_sees_the_backward_pass():
    x = torch.randn(1000, 250, requires_grad=True)  # created before: not counted

    def step():
        y = x.exp()  # saved for backward: 1,000,000 bytes
        y.sum().backward()  # the gradient of y (an expanded scalar) and x.grad (1,000,000 bytes)

    peak = core.peak_bytes(step)
    assert 2_000_000 <= peak <= 2_000_100
    assert x.grad is not None


def test_chunked_flops_matches_torch_flop_counter():
    """The formula against torch's own count of the op's matmuls (which leaves out the triangular solve)."""
    B, T, H, K, V = 1, 192, 2, 16, 8
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v, g, beta = torch.randn(B, T, H, V, generator=gen), -torch.rand(B, T, H, generator=gen), torch.rand(B, T, H)
    with FlopCounterMode(display=False) as counter:
        gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    C, n = 64, 3
    solve = B * H * n * C * C * (V + K)  # 2 * C^2 (V+K) / 2: not counted by torch
    assert counter.get_total_flops() == suites.chunked_flops(B, T, H, K, V) - solve


def test_every_suite_has_cases_with_unique_names_and_baselines_in_their_group():
    for suite in benchmarks.SUITES:
        for size in ("default", "tiny"):
            found = benchmarks.cases(suite, size)
            names = [c.name for c in found]
            assert len(names) == len(set(names)), suite
            for c in found:
                assert (c.make is None) != (c.measure is None), c.fullname
                if c.baseline:
                    base = next(b for b in found if b.name == c.baseline)
                    assert base.group == c.group, c.fullname
    with pytest.raises(Exception, match="unknown benchmark suite 'nope'"):
        benchmarks.cases("nope")


def test_checks_from_synthetic_results():
    def timed(suite, name, params, seconds):
        case = core.Case(suite, name, "g", params, make=lambda: (lambda: None))
        return core.Result(case, [seconds], {})

    results = [timed("loops", f"window[N={n}]", {"N": n}, 0.1 * n * f) for n, f in ((1, 1), (2, 1.0), (4, 1.2))]
    results += [timed("wake", f"wake[N=1,ctx={c}]", {"method": "sleep", "N": 1, "context": c}, 0.003)
                for c in (1024, 65536)]
    results.append(timed("wake", "full_attention[ctx=65536]", {"method": "full_attention", "N": 1,
                                                                "context": 65536}, 0.05))
    found = {c["check"]: c for c in suites.checks(results)}
    assert found["loops: window time N=2 / N=1"]["ok"] is True
    assert found["loops: window time N=4 / N=1"]["ok"] is False  # 4.8 > 4.4
    assert found["wake: ms/token at 65536 / at 1024 tokens, N=1"]["ok"] is True
    assert found["wake: full attention / sleep ms/token at 65536"]["value"] == pytest.approx(50 / 3, rel=1e-3)


def test_wake_position_cases_and_their_check():
    """The first tokens of a 2,000-token window against its last ones (buffer and concatenated cache) and the
    attention read alone at both ends: one group, one baseline."""
    found = [c for c in benchmarks.cases("wake") if c.params["method"] in ("position", "attention_read")]
    assert [c.name for c in found] == ["position[pos=1,kv_cache=buffer]", "position[pos=1999,kv_cache=buffer]",
                                       "position[pos=1,kv_cache=concat]", "position[pos=1999,kv_cache=concat]",
                                       "attention_read[pos=1]", "attention_read[pos=1999]"]
    assert len({c.group for c in found}) == 1 and {c.baseline for c in found} == {"position[pos=1,kv_cache=buffer]"}
    last, read = found[1].params, found[5].params
    assert last["L"] == 2000 and last["last_position"] == 1999 and last["first_position"] == 2000 - found[1].rounds
    assert last["first_position"] < read["first_position"] == read["last_position"] < 1999  # the middle one

    def timed(name, method, pos, cache, seconds):
        params = {"method": method, "N": 1, "L": 2000, "position": pos, "first_position": pos, "last_position": pos}
        if cache:
            params["kv_cache"] = cache
        return core.Result(core.Case("wake", name, "g", params, make=lambda: (lambda: None)), list(seconds), {})

    results = [timed("a", "position", 1, "buffer", [0.010, 0.011]), timed("b", "position", 1999, "buffer",
                                                                        [0.0105, 0.0121]),
               timed("c", "position", 1, "concat", [0.010, 0.010]), timed("d", "position", 1999, "concat",
                                                                        [0.013, 0.014]),
               timed("e", "attention_read", 1, None, [0.0001, 0.0001]),
               timed("f", "attention_read", 1999, None, [0.0011, 0.0011]),
               core.Result(core.Case("wake", "wake[N=1,ctx=1024]", "g", {"method": "sleep", "N": 1, "context": 1024},
                                     make=lambda: (lambda: None)), [0.003], {})]
    checks = {c["check"]: c for c in suites.checks(results)}
    buffer = checks["wake: ms/token at window position 1999 / at position 1, kv_cache=buffer"]
    assert buffer["value"] == pytest.approx(1.075) and buffer["ok"] is True  # median of 1.05 and 1.1, per round
    assert "grows by 1.000 ms" in buffer["detail"]
    concat = checks["wake: ms/token at window position 1999 / at position 1, kv_cache=concat"]
    assert concat["value"] == pytest.approx(1.35) and concat["ok"] is None  # reported
    # growth of the medians (10.5 -> 11.3 ms: 0.8) less the read's (1 ms), over 10.5 ms
    excess = checks["wake: (growth from position 1 to 1999 - the attention read's) / ms at position 1, kv_cache=buffer"]
    assert excess["value"] == pytest.approx(-0.2 / 10.5, abs=1e-4) and excess["ok"] is True
    excess = checks["wake: (growth from position 1 to 1999 - the attention read's) / ms at position 1, kv_cache=concat"]
    assert excess["value"] == pytest.approx(2.5 / 10, abs=1e-4) and excess["ok"] is None
    assert [name for name in checks if "tokens, N=" in name] == ["wake: ms/token at 1024 / at 1024 tokens, N=1"]


def test_wake_position_cases_run_at_the_tiny_size():
    found = [c for c in benchmarks.cases("wake", "tiny") if c.params["method"] in ("position", "attention_read")]
    results = benchmarks.run_group(found, {})
    assert [r.case.params.get("kv_cache") for r in results] == ["buffer", "buffer", "concat", "concat", None, None]
    assert all(len(r.times) == r.case.rounds for r in results)
    assert results[1].extra_info["ratio_to_baseline"] > 0
    names = [c["check"] for c in suites.checks(results)]
    assert names == ["wake: ms/token at window position 15 / at position 1, kv_cache=buffer",
                     "wake: (growth from position 1 to 15 - the attention read's) / ms at position 1, kv_cache=buffer",
                     "wake: ms/token at window position 15 / at position 1, kv_cache=concat",
                     "wake: (growth from position 1 to 15 - the attention read's) / ms at position 1, kv_cache=concat"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(main, ["bench", "--size", "tiny", "--threads", "1", "--json", str(out / "b.json"),
                                       "--plot", str(out / "b.png")])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_cli_runs_every_suite_and_writes_pytest_benchmark_json(tiny_run):
    out, text = tiny_run
    assert "acceptance checks" in text and "cases in" in text
    data = json.loads((out / "b.json").read_text())
    assert {"machine_info", "commit_info", "benchmarks", "datetime", "version"} <= set(data)
    suites_run = {b["fullname"].split("::")[0] for b in data["benchmarks"]}
    assert suites_run == set(benchmarks.SUITES)
    for b in data["benchmarks"]:
        assert {"group", "name", "fullname", "params", "extra_info", "options"} <= set(b)
        if "stats" in b:
            stats = b["stats"]
            assert stats["rounds"] == len(stats["data"]) and stats["min"] <= stats["median"] <= stats["max"]
    memory = [b for b in data["benchmarks"] if b["fullname"].startswith("memory::")]
    assert all(b["extra_info"]["peak_bytes"] > 0 for b in memory)
    assert data["sleepzoo"]["checks"] and data["sleepzoo"]["devices"] == ["cpu"]
    assert (out / "b.png").stat().st_size > 10_000


def test_pytest_benchmark_reads_the_json(tiny_run):
    pytest.importorskip("pytest_benchmark")
    out, _ = tiny_run
    data = json.loads((out / "b.json").read_text())
    from pytest_benchmark.stats import Stats

    for b in data["benchmarks"]:
        if "stats" in b:
            stats = Stats()
            for t in b["stats"]["data"]:
                stats.update(t)
            assert stats.median == pytest.approx(b["stats"]["median"])
            for key in ("iqr", "q1", "q3", "ld15iqr", "hd15iqr", "iqr_outliers", "stddev_outliers", "outliers"):
                assert getattr(stats, key) == pytest.approx(b["stats"][key]), key


def test_cli_compare_shows_the_saved_run(tiny_run):
    out, _ = tiny_run
    result = CliRunner().invoke(main, ["bench", "memory", "--size", "tiny", "--compare", str(out / "b.json")])
    assert result.exit_code == 0, result.output
    assert "now / saved" in result.output and "1.000x" in result.output  # peak memory is deterministic


def test_cli_errors_name_the_problem(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["bench", "loop"])
    assert result.exit_code == 2 and "unknown benchmark suite 'loop'" in result.output and "loops" in result.output
    result = runner.invoke(main, ["bench", "--compare", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "no such file" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": 1}')
    result = runner.invoke(main, ["bench", "--compare", str(bad)])
    assert result.exit_code == 2 and "no 'benchmarks' list" in result.output


def test_cli_device_errors_are_clear():
    runner = CliRunner()
    result = runner.invoke(main, ["bench", "ops", "--device", "gpu0"])
    assert result.exit_code == 2 and "--device 'gpu0' is not a torch device" in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(main, ["bench", "ops", "--device", "cuda"])
        assert result.exit_code == 2 and "sees no CUDA device" in result.output
    assert {c.device for c in benchmarks.cases("wake", "tiny", "cpu")} == {"cpu"}


def test_cli_lists_cases():
    result = CliRunner().invoke(main, ["bench", "wake", "--list"])
    assert result.exit_code == 0
    assert "wake::wake[N=4,ctx=65536]" in result.output and "wake::full_attention[ctx=65536]" in result.output


def test_tables_have_a_row_per_case_with_names_intact():
    from rich.console import Console

    case = core.Case("wake", "full_attention[ctx=1024]", "grp", {"N": 1}, make=lambda: (lambda: None), tokens=10)
    result = core.Result(case, [0.01, 0.02, 0.03], core.case_info(case, 0.02, 0.02))
    tables = output.results_tables([result], saved={"wake::full_attention[ctx=1024]": {"median": 0.01,
                                                                                      "extra_info": {}}})
    assert len(tables) == 1 and tables[0].row_count == 1
    console = Console(record=True, width=200)
    console.print(tables[0])
    text = console.export_text()
    assert "full_attention[ctx=1024]" in text and "2.000x" in text  # not eaten as markup; now / saved
    assert result.extra_info["tokens_per_s"] == 500 and result.extra_info["ratio_to_baseline"] == 1.0


def test_study_suite_is_the_study_recipe():
    """`sleepzoo bench study` times the sleep study's model and task: its settings are the recipe's, and a
    case's tokens per call are those of the task's batches."""
    import yaml

    from sleepzoo.benchmarks.suites import STUDY

    recipe = yaml.safe_load((Path(__file__).resolve().parent.parent / "recipes/study/rule110-depth.yaml").read_text())
    assert STUDY["model"] == recipe["model"]
    assert STUDY["task"] == recipe["task"]
    assert {**recipe["sleep"], "loops": 1} == STUDY["sleep"]
    for key, value in STUDY["train"].items():
        assert recipe["train"][key] == value, key
    case = benchmarks.cases("study", "tiny")[0]
    batch = sleepzoo.build_task(load_recipe(STUDY)).generate(case.params["B"], seed=0)
    assert batch["input_ids"].numel() == case.tokens
