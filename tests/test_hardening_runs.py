"""Damaged and shared run directories (issue 13): one lock for every writer, taken and taken over atomically;
checkpoints checked whole (digests, parse, finite weights) with resume falling back to the newest intact one;
a torn metrics.jsonl line dropped; a damaged eval.json re-evaluated or left out; one line each, no traceback.

Runs use the stand-in plugins and tiny recipes of test_train and test_cli.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sleepzoo import runlock
from sleepzoo.checkpoint import CheckpointDamaged, latest_checkpoint, read_checkpoint
from sleepzoo.registry import SleepzooError
from sleepzoo.runlock import RunBusy, RunLock, lock_holder
from sleepzoo.train import batch_seed, evaluate_run, train
from test_cli import assert_one_line_error, invoke, plugins, recipe_file  # noqa: F401  (fixtures)
from test_train import TIMING, Killed, ToyCopy, read_lines, toy_plugins, toy_recipe  # noqa: F401  (a fixture)

C4 = "checkpoints/step_0000004"


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def write_lock(run: Path, text: str, age_s: float = 60.0) -> Path:
    """A lock file left behind ``age_s`` seconds ago."""
    run.mkdir(parents=True, exist_ok=True)
    path = run / runlock.LOCK_NAME
    path.write_text(text)
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


# ---------------------------------------------------------------------------------------------------------
# the run lock


def _race(run: str, barrier, results) -> None:
    barrier.wait()
    lock = RunLock(run)
    try:
        lock.acquire()
    except RunBusy:
        results.put("busy")
        return
    results.put("won")
    time.sleep(0.5)  # hold it while the others try
    lock.release()


@pytest.mark.parametrize("racers", [2, 4])
def test_racing_starters_over_a_stale_lock_exactly_one_wins(tmp_path, racers):
    ctx = multiprocessing.get_context("fork")
    for round_ in range(4):
        run = tmp_path / f"run{round_}"
        write_lock(run, json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
        barrier, results = ctx.Barrier(racers), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(run), barrier, results)) for _ in range(racers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        outcomes = sorted(results.get(timeout=5) for _ in procs)
        assert outcomes == ["busy"] * (racers - 1) + ["won"], outcomes
        assert lock_holder(run) is None and sorted(p.name for p in run.iterdir()) == []  # nothing left


def test_a_taker_that_looked_too_early_does_not_steal_the_winners_lock(tmp_path):
    stale = write_lock(tmp_path, json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    raw, inode, _ = runlock._read(stale)  # B judges the lock stale ...
    winner = RunLock(tmp_path).acquire()  # ... A takes it over first ...
    loser = RunLock(tmp_path)
    assert not loser._take_over(inode, raw)  # ... so B's rename finds A's lock, and puts it back
    assert lock_holder(tmp_path)["pid"] == os.getpid()
    assert json.loads(stale.read_text())["token"] == winner.token
    with pytest.raises(RunBusy, match="being trained by another process"):
        loser.acquire()
    winner.release()
    assert not stale.exists()


@pytest.mark.parametrize("text,why", [("", "it was empty"), ("\x00\x00{garb", "not a lock record"),
                                      ("[1, 2]", "not a lock record")])
def test_an_empty_or_garbage_lock_is_taken_over_with_a_note(plugins, recipe_file, tmp_path, text, why):
    run = tmp_path / "run"
    write_lock(run, text)
    assert lock_holder(run) is None
    result = invoke("train", recipe_file, "--out", run, "--no-progress")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: took over")]
    assert len(notes) == 1 and str(run / "train.lock") in notes[0] and why in notes[0]
    assert not (run / "train.lock").exists()


def test_a_lock_being_written_right_now_is_not_taken(tmp_path):
    write_lock(tmp_path, "", age_s=0)  # created a moment ago, its content not yet written
    assert lock_holder(tmp_path) is not None
    with pytest.raises(RunBusy, match="another process that is starting right now"):
        RunLock(tmp_path).acquire()


def test_train_itself_takes_the_lock(toy_plugins, tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(RunBusy, match="being trained by another process"):
            train(toy_recipe(), run, progress=False)
        assert sorted(p.name for p in run.iterdir()) == ["train.lock"]  # nothing written
    train(toy_recipe(), run, progress=False)
    assert not (run / "train.lock").exists()


def test_demo_takes_the_lock(plugins, recipe_file, tmp_path, monkeypatch):
    """A `train` into a demo's run directory before its first checkpoint used to delete the demo's log."""
    out = tmp_path / "demo"
    real_generate = ToyCopy.generate
    seen = {}

    def intruding_generate(self, num_examples, seed, split="train"):
        if split == "train" and seed == batch_seed(0, 0) and "holder" not in seen:
            seen["holder"] = lock_holder(out / "loops1")
            result = invoke("train", recipe_file, "--out", out / "loops1", "--no-progress")
            seen["intruder"] = result
        return real_generate(self, num_examples, seed, split)

    monkeypatch.setattr(ToyCopy, "generate", intruding_generate)
    result = invoke("demo", "--recipe", recipe_file, "--loops", "1", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert seen["holder"]["pid"] == os.getpid()
    assert_one_line_error(seen["intruder"], "being trained by another process", str(out / "loops1"))
    assert [r["step"] for r in read_lines(out / "loops1") if "split" not in r] == [1, 2, 3]
    assert not (out / "loops1" / "train.lock").exists()


def test_eval_of_a_run_being_trained_shows_the_result_but_writes_nothing(plugins, recipe_file, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", recipe_file, "--out", run, "--no-progress").exit_code == 0
    before = sorted(p.name for p in run.iterdir())
    with RunLock(run):  # as a `train --resume` running elsewhere would
        result = invoke("eval", run)
        assert result.exit_code == 0, result.output
        assert "exact_accuracy" in result.stdout and "shown, not saved" in result.stdout
    assert sorted(p.name for p in run.iterdir()) == before  # no eval.png, eval.json untouched
    _, path = evaluate_run(run)
    assert path == run / "eval.json"
