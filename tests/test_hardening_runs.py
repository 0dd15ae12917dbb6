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
from test_train import TIMING, ToyCopy, read_lines, toy_plugins, toy_recipe, train_until_killed  # noqa: F401

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
    assert not loser._take_over(inode, raw)  # ... so B finds A's lock, not the stale one, and leaves it
    assert lock_holder(tmp_path)["pid"] == os.getpid()
    assert json.loads(stale.read_text())["token"] == winner.token
    with pytest.raises(RunBusy, match="being trained by another process"):
        loser.acquire()
    winner.release()
    assert not stale.exists()


def test_a_takeover_in_progress_is_never_interleaved_and_an_abandoned_one_expires(tmp_path, monkeypatch):
    """Takeovers are serialised by train.lock.takeover: while one is in progress another starter waits (the
    stale lock stays until the first has removed it, so there is never a moment without a lock to a live
    holder); a takeover file left by a starter that died expires."""
    stale = write_lock(tmp_path, json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    raw, inode, _ = runlock._read(stale)
    guard = tmp_path / "train.lock.takeover"
    guard.write_text("")  # another starter is inside its takeover
    assert not RunLock(tmp_path)._take_over(inode, raw)
    assert stale.exists() and runlock._read(stale)[0] == raw  # the stale lock is untouched
    old = time.time() - 60
    os.utime(guard, (old, old))  # ... and that starter died there
    lock = RunLock(tmp_path).acquire()
    assert lock_holder(tmp_path)["pid"] == os.getpid() and not guard.exists()
    lock.release()


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


# ---------------------------------------------------------------------------------------------------------
# checkpoints: digests, fallback, non-finite weights


def killed_after_step_4(run: Path, monkeypatch) -> None:
    """Train until the batch of step 5 is asked for: checkpoints of steps 2 and 4 are on disk."""
    train_until_killed(toy_recipe(), run, monkeypatch, 4)
    assert latest_checkpoint(run / "checkpoints").name == "step_0000004"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def nan_into(path: Path) -> None:
    tensors = load_file(str(path))
    tensors[sorted(tensors)[0]].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x10  # a weight's bits: the file still parses, only the digest tells
    path.write_bytes(bytes(data))


def old_format(ckpt: Path) -> Path:
    """As sleepzoo wrote checkpoints before manifests: no manifest.json, and no mention of one in state.json."""
    (ckpt / "manifest.json").unlink()
    state = json.loads((ckpt / "state.json").read_text())
    state.pop("manifest")
    (ckpt / "state.json").write_text(json.dumps(state))
    return ckpt


DAMAGE = {
    "garbage state.json": (lambda c: (c / "state.json").write_text("{not json"), "state.json is 9 bytes"),
    "truncated optimizer.safetensors": (lambda c: truncate(c / "optimizer.safetensors"),
                                        "optimizer.safetensors is"),
    "missing rng.safetensors": (lambda c: (c / "rng.safetensors").unlink(), "rng.safetensors is missing"),
    "truncated model.safetensors": (lambda c: truncate(c / "model.safetensors"), "model.safetensors is"),
    "digest mismatch": (lambda c: flip_a_byte(c / "model.safetensors"),
                        "model.safetensors does not match its sha256 digest"),
    "garbage manifest.json": (lambda c: (c / "manifest.json").write_text("\x00"), "manifest.json is not a valid"),
    "deleted manifest.json": (lambda c: (c / "manifest.json").unlink(), "manifest.json is missing"),
    # checkpoints without a manifest are checked by everything else
    "old format, garbage state.json": (lambda c: (old_format(c) / "state.json").write_text("[]"),
                                       "state.json holds no checkpoint state"),
    "old format, truncated optimizer.safetensors": (lambda c: truncate(old_format(c) / "optimizer.safetensors"),
                                                    "optimizer.safetensors is not a readable safetensors file"),
    "old format, missing rng.safetensors": (lambda c: (old_format(c) / "rng.safetensors").unlink(),
                                            "rng.safetensors is missing"),
    "old format, NaN weights": (lambda c: nan_into(old_format(c) / "model.safetensors"),
                                "model.safetensors holds non-finite values (NaN or inf) in 1 of"),
    "old format, NaN in optimizer state": (lambda c: nan_into(old_format(c) / "optimizer.safetensors"),
                                           "optimizer.safetensors holds non-finite values"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_resume_falls_back_to_the_newest_intact_checkpoint_exactly(toy_plugins, tmp_path, monkeypatch, capsys,
                                                                    kind):
    straight = tmp_path / "straight"
    expected = train(toy_recipe(), straight, progress=False)
    run = tmp_path / "run"
    killed_after_step_4(run, monkeypatch)
    damage, why = DAMAGE[kind]
    damage(run / C4)
    capsys.readouterr()

    resumed = train(toy_recipe(), run, resume=True, progress=False)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 2, notes
    assert notes[0].startswith(f"note: skipping damaged checkpoint {str(run / C4)!r}: ") and why in notes[0]
    assert notes[1] == f"note: resuming from the newest intact checkpoint, step 2 ({run / 'checkpoints/step_0000002'})"
    # ... and the run goes on as if nothing had happened: steps 3 and 4 trained again, bit for bit
    assert read_lines(run) == read_lines(straight)
    a, b = (load_file(str(r / "final" / "model.safetensors")) for r in (straight, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {k: v for k, v in resumed.items() if k not in TIMING} == \
        {k: v for k, v in expected.items() if k not in TIMING}


def test_an_old_checkpoint_without_a_manifest_still_resumes_exactly(toy_plugins, tmp_path, monkeypatch, capsys):
    straight = tmp_path / "straight"
    train(toy_recipe(), straight, progress=False)
    run = tmp_path / "run"
    killed_after_step_4(run, monkeypatch)
    old_format(run / C4)
    capsys.readouterr()
    train(toy_recipe(), run, resume=True, progress=False)
    assert "note:" not in capsys.readouterr().out  # nothing skipped
    assert read_lines(run) == read_lines(straight)


def test_every_checkpoint_written_has_a_manifest(toy_plugins, tmp_path):
    run = tmp_path / "run"
    train(toy_recipe(), run, progress=False)
    ckpt = latest_checkpoint(run / "checkpoints")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                         "state.json"]
    assert all(len(e["sha256"]) == 64 and e["bytes"] == (ckpt / n).stat().st_size
               for n, e in manifest["files"].items())
    assert read_checkpoint(ckpt).step == 6


def test_no_intact_checkpoint_is_one_line_with_the_way_on(plugins, recipe_file, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", recipe_file, "--out", run, "--no-progress").exit_code == 0
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "state.json").write_text("")
    result = invoke("train", recipe_file, "--out", run, "--resume", "--no-progress")
    assert_one_line_error(result, "cannot resume", "none of its 2 checkpoint(s) is intact", "state.json is 0 bytes",
                          "without --resume")
    assert result.stdout.count("note: skipping damaged checkpoint") == 2


def test_nan_weights_are_refused(plugins, recipe_file, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", recipe_file, "--out", run, "--no-progress").exit_code == 0
    nan_into(run / "final" / "model.safetensors")
    assert_one_line_error(invoke("eval", run), "final/model.safetensors", "non-finite values (NaN or inf)",
                          "refusing to use them", "--resume")
    ckpt = run / "checkpoints" / "step_0000003"
    nan_into(old_format(ckpt) / "model.safetensors")
    with pytest.raises(CheckpointDamaged, match="non-finite"):  # a checkpoint is refused on load as well
        read_checkpoint(ckpt)


def test_eval_skips_a_damaged_newest_checkpoint(plugins, recipe_file, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", recipe_file, "--out", run, "--no-progress").exit_code == 0
    shutil.rmtree(run / "final")
    (run / "eval.json").unlink()
    truncate(run / "checkpoints" / "step_0000003" / "model.safetensors")
    result = invoke("eval", run)
    assert result.exit_code == 0, result.output
    assert "note: skipping damaged checkpoint" in result.stdout and "step_0000003" in result.stdout
    assert json.loads((run / "eval.json").read_text())["step"] == 2


# ---------------------------------------------------------------------------------------------------------
# metrics.jsonl and eval.json


def test_a_torn_last_metrics_line_is_dropped_on_resume(toy_plugins, tmp_path, monkeypatch, capsys):
    straight = tmp_path / "straight"
    train(toy_recipe(), straight, progress=False)
    run = tmp_path / "run"
    killed_after_step_4(run, monkeypatch)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.12')  # what a full disk or a power cut leaves
    capsys.readouterr()
    train(toy_recipe(), run, resume=True, progress=False)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "metrics.jsonl: dropped its last line" in notes[0]
    assert read_lines(run) == read_lines(straight)


def test_garbage_inside_metrics_is_one_line_naming_file_and_line(plugins, recipe_file, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", recipe_file, "--out", run, "--no-progress").exit_code == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "\x00\x07 garbage", *lines[1:]]) + "\n")
    assert_one_line_error(invoke("train", recipe_file, "--out", run, "--resume", "--no-progress"),
                          str(run / "metrics.jsonl"), "line 2 is not a JSON record", "delete that line")


@pytest.mark.parametrize("garbage", ["", "{\"step\": 3, \"loss", "[1, 2]"])
def test_a_damaged_eval_json_is_evaluated_again_on_resume(toy_plugins, tmp_path, capsys, garbage):
    run = tmp_path / "run"
    first = train(toy_recipe(), run, progress=False)
    log = read_lines(run)
    (run / "eval.json").write_text(garbage)
    capsys.readouterr()
    again = train(toy_recipe(), run, resume=True, progress=False)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and f"{run / 'eval.json'} is damaged" in notes[0] and "evaluating" in notes[0]
    assert {k: v for k, v in again.items() if k not in TIMING} == {k: v for k, v in first.items() if k not in TIMING}
    assert json.loads((run / "eval.json").read_text())["step"] == 6
    assert read_lines(run) == log  # the final evaluation logged once, not twice


def test_compare_notes_a_damaged_eval_json_and_goes_on(plugins, recipe_file, tmp_path):
    runs = tmp_path / "runs"
    for n in (1, 2):
        assert invoke("train", recipe_file, f"sleep.loops={n}", "--out", runs / f"loops{n}",
                      "--no-progress").exit_code == 0
    (runs / "loops1" / "eval.json").write_text("{garbage")
    (runs / "loops2" / "recipe.yaml").write_text("{[: not yaml")
    (runs / "loops3").mkdir()
    (runs / "loops3" / "recipe.yaml").write_text((runs / "loops1" / "recipe.yaml").read_text())
    (runs / "loops3" / "metrics.jsonl").write_text('3\n{"split": "test", "step": "x"}\n')
    result = invoke("compare", runs, "--out", tmp_path / "c.png")
    assert result.exit_code == 0, result.output
    notes = result.stderr.strip().splitlines()
    assert any(str(runs / "loops1" / "eval.json") in n and "is damaged" in n for n in notes), notes
    assert any(str(runs / "loops2" / "recipe.yaml") in n and "left out" in n for n in notes), notes
    assert any("without an evaluation yet" in n and "loops3" in n for n in notes), notes
    assert "Traceback" not in result.output
    assert "not finished" not in result.stdout  # loops1 counts with the final evaluation in its metrics.jsonl

