"""``sleepzoo sweep``: grid parsing, run names, plans (new / resume / done / conflict), dry runs, and real
tiny sweeps on the stand-in plugins of test_train (in this process, and as ``--jobs 2`` subprocesses)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from sleepzoo import sweep
from sleepzoo.config import RecipeError
from sleepzoo.registry import SleepzooError
from sleepzoo.train import batch_seed
from test_cli import assert_one_line_error, invoke, plugins, recipe_file  # noqa: F401  (fixtures)
from test_report import PNG_MAGIC
from test_train import ToyCopy, toy_plugins  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


class Killed(Exception):
    """Stands in for the process being killed."""


# ---------------------------------------------------------------------------------------------------------
# grid parsing and names


@pytest.mark.parametrize("raw,values", [
    ("1,2,4", ["1", "2", "4"]),
    ("2", ["2"]),
    ("[attention,gated_deltanet]", ["[attention,gated_deltanet]"]),
    ("[a,b],[c]", ["[a,b]", "[c]"]),
    ("[[1,2],[3]],[4]", ["[[1,2],[3]]", "[4]"]),
    ("{a: 1, b: 2},{a: 3}", ["{a: 1, b: 2}", "{a: 3}"]),
    ("'x,y',z", ["'x,y'", "z"]),
    ("1e-3, 3e-3", ["1e-3", "3e-3"]),
])
def test_split_values(raw, values):
    assert sweep.split_values(raw) == values


def test_parse_grid():
    swept, plain = sweep.parse_grid(["task.steps=2", "sleep.loops=1,2,4", "model.layers=[a,b]",
                                     "train.seed=0,1,1", "model.mixers.x={p: 1, q: 2}"])
    assert swept == {"sleep.loops": ["1", "2", "4"], "train.seed": ["0", "1"]}  # duplicates dropped
    assert plain == ["task.steps=2", "model.layers=[a,b]", "model.mixers.x={p: 1, q: 2}"]
    with pytest.raises(RecipeError, match="expected key.path=value"):
        sweep.parse_grid(["sleep.loops"])
    with pytest.raises(RecipeError, match="sleep.loops is given twice"):
        sweep.parse_grid(["sleep.loops=1,2", "sleep.loops=4"])
    with pytest.raises(RecipeError, match="empty value"):
        sweep.parse_grid(["sleep.loops=1,,2"])


def test_run_names():
    assert sweep.run_name({"sleep.loops": "4", "train.seed": "1"}) == "loops4-seed1"
    assert sweep.run_name({"task.steps": "2", "train.seed": "0"}) == "steps2-seed0"
    assert sweep.run_name({"model.layers": "[attention, attention]"}) == "layersattention_attention"
    assert sweep.run_name({"train.adamw_lr": "3e-3"}) == "adamw_lr3e-3"


def test_plan_of_the_repro_recipe(tmp_path):
    recipe = REPO / "recipes" / "repro" / "rule110.yaml"
    plan = sweep.plan_sweep(recipe, ["task.steps=0,1,2,3,4", "train.seed=0,1"], tmp_path / "rule110-t")
    assert [r.name for r in plan.runs] == [f"steps{t}-seed{s}" for t in range(5) for s in (0, 1)]
    assert all(r.status == "new" for r in plan.runs)
    assert [(r.recipe.task.options["steps"], r.recipe.train.seed) for r in plan.runs] == \
        [(t, s) for t in range(5) for s in (0, 1)]
    assert plan.runs[3].out == tmp_path / "rule110-t" / "steps1-seed1"
    assert plan.compare_key() == "task.steps"

    plan = sweep.plan_sweep(recipe, ["task.steps=2", "sleep.loops=1,2,4", "train.seed=0,1,2"],
                            tmp_path / "rule110-loops")
    assert [r.name for r in plan.runs] == [f"loops{n}-seed{s}" for n in (1, 2, 4) for s in (0, 1, 2)]
    assert plan.runs[5].overrides == ["task.steps=2", "sleep.loops=2", "train.seed=2"]
    assert {r.recipe.task.options["steps"] for r in plan.runs} == {2}
    assert plan.compare_key() == "sleep.loops"
    assert sweep.plan_sweep(recipe, ["train.seed=0,1"], tmp_path / "x").compare_key() == "sleep.loops"

    with pytest.raises(RecipeError, match="nothing to sweep"):
        sweep.plan_sweep(recipe, ["task.steps=2"], tmp_path / "y")
    with pytest.raises(SleepzooError, match="would both train into"):
        sweep.plan_sweep(recipe, ["model.layers=[attention],'attention'"], tmp_path / "z")
    with pytest.raises(RecipeError, match="sleep.loops: 0 is not allowed"):  # every point is validated
        sweep.plan_sweep(recipe, ["sleep.loops=0,1"], tmp_path / "w")


# ---------------------------------------------------------------------------------------------------------
# the command


def test_dry_run(plugins, recipe_file, tmp_path):
    out = tmp_path / "sweep"
    result = invoke("sweep", recipe_file, "sleep.loops=1,2", "train.seed=0,1", "train.steps=2", "--out", out,
                    "--dry-run")
    assert result.exit_code == 0, result.output
    for n in (1, 2):
        for s in (0, 1):
            assert f"loops{n}-seed{s}" in result.stdout and f"sleep.loops={n} train.seed={s}" in result.stdout
    assert "new" in result.stdout and "every run: train.steps=2" in result.stdout
    assert not out.exists()
    assert_one_line_error(invoke("sweep", recipe_file, "sleep.loops=1,2", "model.mixers.toy_mixer.heads=2",
                                 "--out", out, "--dry-run"), "model.mixers.toy_mixer.heads: unknown key")
    assert_one_line_error(invoke("sweep", recipe_file, "sleep.loops=1,2"), "Missing option '--out'")
    assert_one_line_error(invoke("sweep", recipe_file, "sleep.loops=1,2", "--out", out, "--jobs", "0"), "--jobs")


def test_tiny_sweep_compares_and_skips_finished_runs(plugins, recipe_file, tmp_path):
    out = tmp_path / "sweep"
    result = invoke("sweep", recipe_file, "sleep.loops=1,2", "train.seed=4", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    for n in (1, 2):
        run = out / f"loops{n}"
        assert json.loads((run / "eval.json").read_text())["step"] == 3
        saved = yaml.safe_load((run / "recipe.yaml").read_text())
        assert saved["sleep"]["loops"] == n and saved["train"]["seed"] == 4
    assert "exact_accuracy by sleep.loops" in result.stdout and "[2/2] loops2: training" in result.stdout
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC
    compared = json.loads((out / "compare.json").read_text())
    assert [g["value"] for g in compared["groups"]] == [1, 2]
    assert compared["groups"][1]["runs"] == [str(out / "loops2")]
    plan = json.loads((out / "sweep.json").read_text())
    assert plan["swept"] == {"sleep.loops": ["1", "2"]} and plan["overrides"] == ["train.seed=4"]
    evals = {n: (out / f"loops{n}" / "eval.json").read_text() for n in (1, 2)}

    # Again: both are finished, so nothing trains and nothing changes.
    ToyCopy.seeds_seen = []
    again = invoke("sweep", recipe_file, "sleep.loops=1,2", "train.seed=4", "--out", out, "--no-progress")
    assert again.exit_code == 0, again.output
    assert "skip loops1: finished, step 3" in again.stdout and "skip loops2" in again.stdout
    assert not [s for s in ToyCopy.seeds_seen if s[1] == "train"]
    assert {n: (out / f"loops{n}" / "eval.json").read_text() for n in (1, 2)} == evals
    dry = invoke("sweep", recipe_file, "sleep.loops=1,2", "train.seed=4", "--out", out, "--dry-run")
    assert dry.stdout.count("done (finished, step 3)") == 2

    # The same names for another recipe: refused before anything trains.
    assert_one_line_error(invoke("sweep", recipe_file, "sleep.loops=1,2", "train.seed=5", "--out", out),
                          "holds a run of a different recipe (and 1 more)", "train.seed: saved 4, given 5")
    assert_one_line_error(invoke("sweep", recipe_file, "sleep.loops=1,2", "train.seed=5", "--out", out,
                                 "--dry-run"), "different recipe")


def test_interrupted_run_is_resumed(plugins, recipe_file, tmp_path, monkeypatch):
    real_generate = ToyCopy.generate

    def dying_generate(self, num_examples, seed, split="train"):
        if split == "train" and seed == batch_seed(0, 2):  # the third step, after the step-2 checkpoint
            raise Killed
        return real_generate(self, num_examples, seed, split)

    out = tmp_path / "sweep"
    monkeypatch.setattr(ToyCopy, "generate", dying_generate)
    plan = sweep.plan_sweep(recipe_file, ["sleep.loops=1,2"], out)
    with pytest.raises(Killed):
        sweep.run_sweep(plan, progress=False, echo=lambda line: None)
    monkeypatch.setattr(ToyCopy, "generate", real_generate)

    plan = sweep.plan_sweep(recipe_file, ["sleep.loops=1,2"], out)
    assert [(r.name, r.status, r.detail) for r in plan.runs] == [
        ("loops1", "resume", "from step 2/3"), ("loops2", "new", "")]
    # --jobs would give new runs one thread each; the interrupted run keeps its own recipe to resume.
    parallel = sweep.plan_sweep(recipe_file, ["sleep.loops=1,2"], out, jobs=2)
    assert parallel.runs[0].status == "resume" and parallel.runs[0].recipe.train.threads is None
    assert parallel.runs[1].overrides[-1] == "train.threads=1" and parallel.runs[1].recipe.train.threads == 1

    lines = []
    assert sweep.run_sweep(plan, progress=False, echo=lines.append) == {}
    assert lines[0] == f"[1/2] loops1: resuming -> {out / 'loops1'}"
    logged = [json.loads(line) for line in (out / "loops1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "split" not in r] == [1, 2, 3]  # step 3 logged once
    assert json.loads((out / "loops1" / "eval.json").read_text())["step"] == 3


def test_a_run_another_process_trains_is_left_alone(plugins, recipe_file, tmp_path):
    out = tmp_path / "sweep"
    with sweep.RunLock(out / "loops1"):  # as `sleepzoo train --out <out>/loops1` running elsewhere would
        holder = sweep.lock_holder(out / "loops1")
        assert holder["pid"] == os.getpid()
        with pytest.raises(SleepzooError, match="being trained by another process"):
            with sweep.RunLock(out / "loops1"):
                pass
        assert_one_line_error(invoke("train", recipe_file, "--out", out / "loops1"), "being trained by another")
        result = invoke("sweep", recipe_file, "sleep.loops=1,2", "--out", out, "--no-progress")
        assert result.exit_code == 0, result.output
        assert "skip loops1: being trained by pid" in result.stdout
        assert not (out / "loops1" / "recipe.yaml").exists() and (out / "loops2" / "eval.json").is_file()
    assert not (out / "loops1").exists()  # the lock's own folder is cleaned up when nothing was trained

    # A lock whose process has died is stale: ignored, and replaced.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "loops1").mkdir()
    (out / "loops1" / sweep.LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert sweep.lock_holder(out / "loops1") is None
    assert [r.status for r in sweep.plan_sweep(recipe_file, ["sleep.loops=1,2"], out).runs] == ["new", "done"]
    assert invoke("train", recipe_file, "sleep.loops=1", "--out", out / "loops1", "--no-progress").exit_code == 0
    assert not (out / "loops1" / sweep.LOCK_NAME).exists()


def test_a_failed_run_does_not_stop_the_others(plugins, recipe_file, tmp_path, monkeypatch):
    real_train = sweep.train

    def failing_train(recipe, out, **kwargs):
        if recipe.sleep.loops == 1:
            raise SleepzooError("the training loss is nan at step 2")
        return real_train(recipe, out, **kwargs)

    monkeypatch.setattr(sweep, "train", failing_train)
    out = tmp_path / "sweep"
    result = invoke("sweep", recipe_file, "sleep.loops=1,2", "--out", out, "--no-progress")
    assert_one_line_error(result, "1 of 2 runs failed: loops1: the training loss is nan at step 2")
    assert (out / "loops2" / "eval.json").is_file()
    assert "exact_accuracy by sleep.loops" in result.stdout  # the runs that did finish are compared


# ---------------------------------------------------------------------------------------------------------
# --jobs: subprocesses


FAKE_TRAIN = """
import json, os, sys, time
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
start = time.time()
time.sleep(0.4)
(out / "fake.json").write_text(json.dumps({"argv": args, "start": start, "end": time.time(),
                                           "threads": os.environ.get("OMP_NUM_THREADS")}))
if "sleep.loops=3" in args:
    print("error: boom")
    sys.exit(2)
(out / "eval.json").write_text(json.dumps({"step": 2}))
"""


def test_parallel_jobs_run_at_most_n_at_once(toy_plugins, recipe_file, tmp_path):
    fake = tmp_path / "fake_train.py"  # stands in for `sleepzoo train`: no torch, starts in milliseconds
    fake.write_text(FAKE_TRAIN)
    out = tmp_path / "sweep"
    plan = sweep.plan_sweep(recipe_file, ["sleep.loops=1,2,3", "train.steps=2"], out, jobs=2)
    lines = []
    failures = sweep.run_sweep(plan, jobs=2, echo=lines.append, launcher=[sys.executable, str(fake)], poll_s=0.02)
    assert list(failures) == ["loops3"] and failures["loops3"].startswith("boom (exit status 2, log ")
    seen = {n: json.loads((out / f"loops{n}" / "fake.json").read_text()) for n in (1, 2, 3)}
    assert seen[1]["argv"] == ["train", str(recipe_file), "train.steps=2", "sleep.loops=1", "train.threads=1",
                               "--out", str(out / "loops1"), "--no-progress"]
    assert all(s["threads"] == "1" for s in seen.values())
    assert seen[2]["start"] < seen[1]["end"]  # two at once ...
    assert seen[3]["start"] >= min(seen[1]["end"], seen[2]["end"])  # ... but never three
    assert (out / "loops1" / "train.log").read_text().startswith(f"$ {sys.executable} {fake} train ")
    assert "[1/3] loops1: done" in lines and any(line.startswith("[3/3] loops3 failed: boom") for line in lines)

    # The command line a job gets is one the real CLI accepts: replay it in this process.
    (out / "loops1" / "eval.json").unlink()
    result = invoke(*seen[1]["argv"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "loops1" / "recipe.yaml").read_text())["train"]["threads"] == 1
    assert json.loads((out / "loops1" / "eval.json").read_text())["step"] == 2

    # Exit status 0 without a finished run (not the `train` it should have been) is a failure too.
    plan = sweep.plan_sweep(recipe_file, ["sleep.loops=1,2", "train.steps=2"], tmp_path / "other", jobs=2)
    failures = sweep.run_sweep(plan, jobs=2, echo=lines.append, launcher=[sys.executable, "-c", "pass"], poll_s=0.02)
    assert sorted(failures) == ["loops1", "loops2"] and "exited without finishing the run" in failures["loops1"]


@pytest.mark.slow  # each subprocess imports torch: seconds; the test above covers the rest in-process
def test_parallel_jobs_real_subprocess(toy_plugins, recipe_file, tmp_path):
    # The subprocess needs the stand-in plugins too: a launcher registers them, then runs the real CLI.
    launcher = tmp_path / "launch.py"
    launcher.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from sleepzoo import registry
        from test_train import ToyCopy, ToyLM
        registry.register("model", "toy_lm")(ToyLM)
        registry.register("task", "toy_copy")(ToyCopy)
        from sleepzoo.cli import main
        main()
    """))
    out = tmp_path / "sweep"
    plan = sweep.plan_sweep(recipe_file, ["sleep.loops=1,2", "train.steps=2"], out, jobs=2)
    plan.runs = plan.runs[1:]  # one real subprocess is enough (each pays for importing torch)
    failures = sweep.run_sweep(plan, jobs=2, echo=lambda line: None, launcher=[sys.executable, str(launcher)],
                               poll_s=0.05)
    assert failures == {}, (out / "loops2" / "train.log").read_text()
    assert json.loads((out / "loops2" / "eval.json").read_text())["step"] == 2
    assert yaml.safe_load((out / "loops2" / "recipe.yaml").read_text())["train"]["threads"] == 1
    again = sweep.plan_sweep(recipe_file, ["sleep.loops=1,2", "train.steps=2"], out, jobs=2)
    assert [r.status for r in again.runs] == ["new", "done"]
