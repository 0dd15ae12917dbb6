"""report.py: comparing runs (grouping, seed aggregation, buckets, unfinished runs), tables and plots.

Every run here is hand-written (recipe.yaml + eval.json / metrics.jsonl in a tmp dir): no training.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from sleepzoo import report
from sleepzoo.registry import SleepzooError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, *, loops: int = 1, seed: int = 0, task_steps: int = 2, steps: int = 10,
             metrics: dict | None = None, buckets: dict | None = None, finished: bool = True,
             threads: int | None = 1, log_evals: list[tuple[int, dict]] = ()) -> Path:
    """A run directory as the trainer leaves it (only the files report.py reads)."""
    run = root / name
    run.mkdir(parents=True)
    recipe = {"model": {"name": "toy_lm", "d_model": 16, "layers": ["a", "b"]},
              "sleep": {"window": 6, "loops": loops},
              "task": {"name": "toy", "steps": task_steps},
              "train": {"steps": steps, "seed": seed, "threads": threads},
              "eval": {"num_examples": 16, "seed": 1234}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    metrics = {"loss": 1.0, "token_accuracy": 0.5, "exact_accuracy": 0.25, **(metrics or {})}
    if buckets is not None:
        metrics["buckets"] = buckets
    lines = [{"step": s, "split": "test", **m} for s, m in log_evals]
    if finished:
        (run / "eval.json").write_text(json.dumps({"step": steps, "loops": loops, "window": 6,
                                                   "num_examples": 16, "train_time_s": 1.5, **metrics}))
        lines.append({"step": steps, "split": "test", **metrics})
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": 1, "loss": 2.0, "lr": 0.1}) + "\n" +
                                               json.dumps(line) + "\n" for line in lines))
    return run


def bucket_scores(accs: dict[int, float]) -> dict:
    return {"k": {str(k): {"loss": 1.0 - a, "token_accuracy": a, "exact_accuracy": a, "num_examples": 4,
                           "num_targets": 4} for k, a in accs.items()}}


def render(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


# ---------------------------------------------------------------------------------------------------------
# grouping and aggregation


ACC = {(1, 0): 0.2, (1, 1): 0.3, (1, 2): 0.7, (2, 0): 0.5, (2, 1): 0.55, (4, 0): 0.9}


@pytest.fixture
def grid(tmp_path) -> list[Path]:
    return [make_run(tmp_path, f"loops{n}-seed{s}", loops=n, seed=s, metrics={"exact_accuracy": a, "loss": 1 - a})
            for (n, s), a in ACC.items()]


def test_compare_groups_by_key_and_aggregates_seeds(grid):
    results = [report.load_result(r) for r in grid]
    comparison = report.compare_runs(results, key="sleep.loops")
    assert comparison["key"] == "sleep.loops" and comparison["seed_keys"] == ["train.seed"]
    assert comparison["settings"] == [] and comparison["bucket"] is None
    groups = comparison["groups"]
    assert [g["value"] for g in groups] == [1, 2, 4]
    assert [g["seeds"] for g in groups] == [[0, 1, 2], [0, 1], [0]]
    for g in groups:
        values = [a for (n, _), a in ACC.items() if n == g["value"]]
        stats = g["metrics"]["exact_accuracy"]
        assert stats["mean"] == pytest.approx(statistics.mean(values))
        assert stats["std"] == pytest.approx(statistics.stdev(values) if len(values) > 1 else 0.0)
        assert (stats["min"], stats["max"], stats["n"]) == (min(values), max(values), len(values))
        assert g["metrics"]["loss"]["mean"] == pytest.approx(1 - statistics.mean(values))
        assert g["unfinished"] == []
    assert all(r["finished"] and r["source"] == "eval.json" for r in comparison["runs"])
    assert "step" not in groups[0]["metrics"] and "train_time_s" not in groups[0]["metrics"]
    json.dumps(comparison)  # JSON-ready as it is


def test_comparison_table_and_plot_without_buckets(grid, tmp_path):
    comparison = report.compare_runs([report.load_result(r) for r in grid])
    text = render(report.comparison_table(comparison))
    assert "sleep.loops" in text and "exact acc" in text
    mean1, std1 = statistics.mean([0.2, 0.3, 0.7]), statistics.stdev([0.2, 0.3, 0.7])
    assert f"{mean1:.3f} ±{std1:.3f}" in text
    assert "0.200..0.700" in text and "0,1,2" in text
    png = report.plot_comparison(comparison, tmp_path / "plots" / "cmp.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_key_shorthand_and_errors(grid):
    results = [report.load_result(r) for r in grid]
    assert report.compare_runs(results, key="loops")["key"] == "sleep.loops"
    with pytest.raises(SleepzooError, match="ambiguous: task.steps, train.steps"):
        report.compare_runs(results, key="steps")
    with pytest.raises(SleepzooError, match="no run's recipe has that setting"):
        report.compare_runs(results, key="sleep.lops")
    with pytest.raises(SleepzooError, match="--metric 'bogus'.*exact_accuracy"):
        report.compare_runs(results, metric="bogus")
    with pytest.raises(SleepzooError, match="--bucket 'k': the task reports no buckets"):
        report.compare_runs(results, bucket="k")
    with pytest.raises(SleepzooError, match="no runs"):
        report.compare_runs([])


def test_other_settings_split_groups_and_bookkeeping_does_not(tmp_path):
    runs = [make_run(tmp_path, f"s{t}-l{n}-seed{s}", loops=n, task_steps=t, seed=s, threads=None if s else 1,
                     metrics={"exact_accuracy": 0.1 * t + 0.01 * n + 0.001 * s})
            for t in (1, 3) for n in (1, 2) for s in (0, 1)]
    comparison = report.compare_runs([report.load_result(r) for r in runs], key="sleep.loops")
    assert comparison["settings"] == ["task.steps"]  # train.threads differs too, but is bookkeeping
    assert [(g["value"], g["settings"]["task.steps"], len(g["runs"])) for g in comparison["groups"]] == \
        [(1, 1, 2), (1, 3, 2), (2, 1, 2), (2, 3, 2)]
    assert comparison["groups"][1]["metrics"]["exact_accuracy"]["mean"] == pytest.approx(0.3105)
    assert "task.steps" in render(report.comparison_table(comparison))
    assert report.plot_comparison(comparison, tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC


def test_choose_key_takes_the_one_setting_that_varies(tmp_path):
    runs = [make_run(tmp_path, f"steps{t}-seed{s}", task_steps=t, seed=s) for t in (0, 1, 2) for s in (0, 1)]
    results = [report.load_result(r) for r in runs]
    assert report.choose_key(results) == "task.steps"
    loops = [make_run(tmp_path / "b", f"l{n}", loops=n, task_steps=n) for n in (1, 2)]
    assert report.choose_key([report.load_result(r) for r in loops]) == "sleep.loops"  # it varies: kept


# ---------------------------------------------------------------------------------------------------------
# buckets


def test_compare_with_buckets(tmp_path):
    accs = {(1, 0): {1: 1.0, 2: 0.5, 4: 0.0}, (1, 1): {1: 0.8, 2: 0.3, 4: 0.1},
            (4, 0): {1: 1.0, 2: 0.9, 4: 0.7}, (4, 1): {1: 1.0, 2: 1.0, 4: 0.5}}
    runs = [make_run(tmp_path, f"loops{n}-seed{s}", loops=n, seed=s, buckets=bucket_scores(a))
            for (n, s), a in accs.items()]
    comparison = report.compare_runs([report.load_result(r) for r in runs], key="sleep.loops")
    assert comparison["bucket"] == "k"
    for g in comparison["groups"]:
        for k in ("1", "2", "4"):
            values = [a[int(k)] for (n, _), a in accs.items() if n == g["value"]]
            stats = g["buckets"]["k"][k]["exact_accuracy"]
            assert stats["mean"] == pytest.approx(statistics.mean(values))
            assert stats["std"] == pytest.approx(statistics.stdev(values))
            assert g["buckets"]["k"][k]["loss"]["mean"] == pytest.approx(1 - statistics.mean(values))
    assert list(comparison["groups"][0]["buckets"]["k"]) == ["1", "2", "4"]  # numeric order

    text = render(report.comparison_table(comparison))
    assert all(f"k={k}" in text for k in (1, 2, 4))
    assert f"{statistics.mean([0.0, 0.1]):.3f} ±{statistics.stdev([0.0, 0.1]):.3f}" in text
    png = report.plot_comparison(comparison, tmp_path / "buckets.png")
    assert png.read_bytes()[:8] == PNG_MAGIC

    with pytest.raises(SleepzooError, match="--bucket 'op': the runs have k"):
        report.compare_runs([report.load_result(r) for r in runs], bucket="op")
    labelled = make_run(tmp_path, "labelled", buckets=bucket_scores({1: 1.0}), metrics={"label_accuracy_1": 1.0})
    with pytest.raises(SleepzooError, match="not reported per bucket"):
        report.compare_runs([report.load_result(labelled)], metric="label_accuracy_1")


def test_eval_buckets_table_and_plots(tmp_path):
    result = {"step": 5, "loss": 0.4, "exact_accuracy": 0.5, "token_accuracy": 0.75, "num_targets": 8,
              **{"buckets": {**bucket_scores({10: 0.25, 2: 0.75}), "op": {"0": {"loss": 0.1, "exact_accuracy": 1.0,
                                                                          "token_accuracy": 1.0, "num_examples": 2,
                                                                          "num_targets": 2}}}}}
    text = render(report.buckets_table(result))
    assert text.index("k=2") < text.index("k=10") and "op=0" in text and "0.7500" in text
    assert "buckets" not in render(report.metrics_table(result))  # shown in its own table, not as a dict
    assert report.buckets_table({"loss": 1.0}) is None
    assert report.plot_eval(result, tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
    plain = {"loss": 0.4, "exact_accuracy": 0.5, "label_accuracy": [0.5, 1.0]}
    assert report.plot_eval(plain, tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------------------
# runs still training, run discovery


def test_unfinished_run_uses_its_newest_eval_line(tmp_path):
    done = make_run(tmp_path, "loops1-seed0", loops=1, metrics={"exact_accuracy": 0.4})
    running = make_run(tmp_path, "loops2-seed0", loops=2, finished=False, steps=600,
                       log_evals=[(100, {"exact_accuracy": 0.1, "loss": 2.0}),
                                  (200, {"exact_accuracy": 0.6, "loss": 1.0})])
    with open(running / "metrics.jsonl", "a") as f:
        f.write('{"step": 210, "loss"')  # a line being written right now
    r = report.load_result(running)
    assert (r.step, r.steps, r.finished, r.source) == (200, 600, False, "metrics.jsonl")
    assert r.metrics["exact_accuracy"] == 0.6 and "split" not in r.metrics
    comparison = report.compare_runs([report.load_result(done), r])
    assert comparison["groups"][1]["unfinished"] == [str(running)]
    table = report.comparison_table(comparison)
    assert "1*" in render(table) and "not finished" in table.caption

    # `sleepzoo eval` on a running run writes an eval.json of an older step: the newest evaluation wins.
    (running / "eval.json").write_text(json.dumps({"step": 100, "exact_accuracy": 0.05, "loss": 3.0}))
    assert report.load_result(running).metrics["exact_accuracy"] == 0.6
    (running / "eval.json").write_text(json.dumps({"step": 200, "exact_accuracy": 0.7, "loss": 3.0}))
    assert report.load_result(running).source == "eval.json"  # same step: eval.json

    empty = tmp_path / "fresh"
    empty.mkdir()
    (empty / "recipe.yaml").write_text(yaml.safe_dump({"train": {"steps": 5}}))
    with pytest.raises(report.NoEvaluation, match="no evaluation yet"):
        report.load_result(empty)


def test_find_runs(tmp_path):
    a = make_run(tmp_path / "sweep", "loops1-seed0")
    b = make_run(tmp_path / "sweep", "loops2-seed0")
    (tmp_path / "sweep" / "compare.png").write_bytes(PNG_MAGIC)
    assert report.find_runs([tmp_path / "sweep"]) == [a, b]  # a folder of runs stands for its runs
    assert report.find_runs([b, a, tmp_path / "sweep" / "compare.png", b]) == [b, a]  # files skipped
    with pytest.raises(SleepzooError, match="does not exist"):
        report.find_runs([tmp_path / "nope"])
    with pytest.raises(SleepzooError, match="not a run directory"):
        report.find_runs([tmp_path])  # holds a folder of runs, but no run itself


def test_a_field_added_after_a_run_was_saved_does_not_split_groups(tmp_path):
    """A recipe.yaml written before a field existed compares equal to one that spells out its default."""
    old, new = make_run(tmp_path, "old", seed=0), make_run(tmp_path, "new", seed=1)
    recipe = yaml.safe_load((new / "recipe.yaml").read_text())
    recipe["sleep"]["sleep_every"] = None  # the default, written out as newer versions do
    (new / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    comparison = report.compare_runs([report.load_result(r) for r in (old, new)], key="sleep.loops")
    assert comparison["settings"] == [] and len(comparison["groups"]) == 1
