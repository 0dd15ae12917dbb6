"""Loggers besides metrics.jsonl (``train.loggers``): tensorboard and Weights & Biases.

The trainer's wiring is tested with fake ``torch.utils.tensorboard`` and ``wandb`` modules put in
``sys.modules``: values at the right steps, rank 0 only, a resumed run continuing its loggers, a failing
logger switched off while training goes on, a missing package refused before anything is written. When the
real packages are installed, a run is read back from tensorboard's event files (EventAccumulator) and from
wandb's offline run files, and a two-process run shows that only rank 0 logs.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from test_distributed import tiny_recipe, torchrun
from test_train import read_lines, toy_plugins, toy_recipe, train_until_killed  # noqa: F401

from sleepzoo import distributed, loggers
from sleepzoo.config import RecipeError, load_recipe
from sleepzoo.train import train

ALL = "train.loggers=[jsonl,tensorboard,wandb]"
TIMING = ("tokens_per_s", "elapsed_s", "train_time_s")


# ---------------------------------------------------------------------------------------------------------
# fakes of the two packages


class FakeWriter:
    """torch.utils.tensorboard.SummaryWriter as the trainer uses it; ``fail_at`` makes add_scalar raise."""

    instances: list[FakeWriter] = []
    fail_at: int | None = None

    def __init__(self, log_dir=None, purge_step=None):
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        FakeWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        if step == FakeWriter.fail_at:
            raise OSError("No space left on device")
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


class FakeRun:
    """What wandb.init returns, as the trainer uses it."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.logged: list[dict] = []
        self.metrics: list[tuple[str, str | None]] = []
        self.exit_code: int | None = None

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def log(self, values):
        self.logged.append(dict(values))

    def finish(self, exit_code=0):
        self.exit_code = exit_code


@pytest.fixture
def fakes(monkeypatch, toy_plugins):
    FakeWriter.instances, FakeWriter.fail_at = [], None
    board = types.ModuleType("torch.utils.tensorboard")
    board.SummaryWriter = FakeWriter
    runs: list[FakeRun] = []
    wandb = types.ModuleType("wandb")

    def init(**kwargs):
        runs.append(FakeRun(**kwargs))
        return runs[-1]

    wandb.init = init
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", board)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return types.SimpleNamespace(writers=FakeWriter.instances, runs=runs)  # what each opened, in order


def expected_scalars(run: Path) -> list[tuple[str, float, int]]:
    """(tag, value, step) for every number of every metrics.jsonl line, read from the file itself: train
    lines under train/, evaluation lines under test/, a list's items under key/i."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        section = "test" if record.get("split") == "test" else "train"
        for key, value in record.items():
            if key in ("step", "split", "stage"):
                continue
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for i, v in items:
                out.append((f"{section}/{key}" + ("" if i is None else f"/{i}"), float(v), record["step"]))
    return out


# ---------------------------------------------------------------------------------------------------------
# recipe field


def test_the_default_is_jsonl_and_names_are_checked():
    assert load_recipe({}).train.loggers == ["jsonl"]
    with pytest.raises(RecipeError, match=r"train.loggers: 'tensorbord' is not allowed; did you mean "
                                          r"'tensorboard'\? allowed: jsonl, tensorboard, wandb"):
        load_recipe({}, ["train.loggers=[jsonl,tensorbord]"])
    with pytest.raises(RecipeError, match="train.loggers: .* list each logger once"):
        load_recipe({}, ["train.loggers=[wandb,wandb]"])
    with pytest.raises(RecipeError, match=r"stages\[0\] \(a\).train.loggers: a stage may not set it"):
        load_recipe({"stages": [{"name": "a", "steps": 2, "train": {"loggers": ["wandb"]}}]})


def test_scalars_of_a_record():
    record = {"step": 7, "stage": "main", "split": "test", "loss": 1.5, "label_accuracy": [0.25, 1],
              "by_k": {"1": 0.5, "16": None}, "done": True, "note": "text", "bad": float("nan")}
    assert loggers.scalars(record) == {"test/loss": 1.5, "test/label_accuracy/0": 0.25,
                                       "test/label_accuracy/1": 1.0, "test/by_k/1": 0.5}
    assert loggers.scalars({"step": 1, "loss": 2, "lr": 0.01}) == {"train/loss": 2.0, "train/lr": 0.01}


# ---------------------------------------------------------------------------------------------------------
# the trainer's wiring, with fakes


def test_every_record_reaches_both_loggers_at_its_step(fakes, tmp_path):
    run = tmp_path / "run"
    recipe = toy_recipe("train.loggers=[tensorboard,wandb]")  # jsonl left out: metrics.jsonl is written anyway
    train(recipe, run, progress=False)
    expected = expected_scalars(run)
    assert [r["step"] for r in read_lines(run)] == [1, 2, 3, 3, 4, 5, 6, 6]  # train lines, evals at 3 and 6
    assert ("train/loss", read_lines(run)[0]["loss"], 1) in expected
    assert ("test/label_accuracy/1", read_lines(run)[3]["label_accuracy"][1], 3) in expected

    [writer] = fakes.writers
    assert writer.scalars == expected
    assert writer.log_dir == str(run / "tensorboard") and writer.purge_step == 1 and writer.closed

    [wandb_run] = fakes.runs
    logged = [(entry["step"], {k: v for k, v in entry.items() if k != "step"}) for entry in wandb_run.logged]
    assert [(tag, value, step) for step, values in logged for tag, value in values.items()] == expected
    run_id = (run / "wandb" / "run_id").read_text().strip()
    assert wandb_run.kwargs == {"project": "sleepzoo", "name": "run", "id": run_id, "resume": "allow",
                                "dir": str(run), "config": recipe.to_dict(), "mode": None}
    assert ("*", "step") in wandb_run.metrics and wandb_run.exit_code == 0


def test_only_rank_0_opens_loggers(fakes, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    train(toy_recipe(ALL), tmp_path / "run", progress=False)
    assert fakes.writers == [] and fakes.runs == []
    assert not (tmp_path / "run" / "wandb").exists()


def test_a_resumed_run_continues_its_loggers(fakes, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train(toy_recipe(ALL), straight, progress=False)
    expected = expected_scalars(straight)
    fakes.writers.clear()
    fakes.runs.clear()

    killed = tmp_path / "killed"  # dies generating step index 3: steps 1-3 logged, newest checkpoint step 2
    train_until_killed(toy_recipe(ALL), killed, monkeypatch, 3)
    train(toy_recipe(ALL), killed, resume=True, progress=False)

    first, second = fakes.writers
    assert (first.purge_step, second.purge_step) == (1, 3)  # events after the checkpoint's step 2 are purged
    assert first.closed and second.closed
    assert {s for _, _, s in first.scalars} == {1, 2, 3} and {s for _, _, s in second.scalars} == {3, 4, 5, 6}
    kept = [s for s in first.scalars if s[2] < second.purge_step] + second.scalars
    assert [(t, s) for t, _, s in kept] == [(t, s) for t, _, s in expected]
    values = dict(((t, s), v) for t, v, s in expected)
    assert all(v == values[(t, s)] for t, v, s in kept if t.split("/")[1] not in TIMING)  # bit for bit

    killed_run, resumed_run = fakes.runs
    assert killed_run.kwargs["id"] == resumed_run.kwargs["id"] == (killed / "wandb" / "run_id").read_text().strip()
    assert resumed_run.kwargs["resume"] == "allow"
    assert (killed_run.exit_code, resumed_run.exit_code) == (1, 0)  # the killed one is marked failed
    assert [e["step"] for e in resumed_run.logged] == [3, 3, 4, 5, 6, 6]


def test_a_new_run_in_an_old_directory_starts_a_new_wandb_run(fakes, tmp_path):
    run = tmp_path / "run"
    (run / "wandb").mkdir(parents=True)
    (run / "wandb" / "run_id").write_text("oldrun\n")
    train(toy_recipe("train.loggers=[wandb]"), run, progress=False)
    assert fakes.runs[0].kwargs["id"] != "oldrun"


def test_a_failing_logger_is_switched_off_and_training_goes_on(fakes, tmp_path, capsys):
    plain = tmp_path / "plain"
    train(toy_recipe(), plain, progress=False)
    FakeWriter.fail_at = 4
    run = tmp_path / "run"
    result = train(toy_recipe(ALL), run, progress=False)
    assert read_lines(run) == read_lines(plain)  # metrics.jsonl as without loggers, bit for bit
    assert result["step"] == 6
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: the tensorboard logger failed at step 4 (OSError: No space left on device); it "
                        "is off for the rest of this run, training goes on and metrics.jsonl is complete"]
    [writer] = fakes.writers
    assert {s for _, _, s in writer.scalars} == {1, 2, 3} and writer.closed
    assert [e["step"] for e in fakes.runs[0].logged][-1] == 6  # wandb kept logging


def test_a_logger_that_can_not_start_is_left_out(fakes, tmp_path, capsys):
    def broken_init(**kwargs):
        raise ConnectionError("wandb server unreachable")

    sys.modules["wandb"].init = broken_init
    run = tmp_path / "run"
    train(toy_recipe(ALL), run, progress=False)
    assert "warning: the wandb logger failed to start (ConnectionError: wandb server unreachable)" in \
        capsys.readouterr().err
    assert fakes.writers[0].scalars == expected_scalars(run)


@pytest.mark.parametrize("name,extra", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_is_refused_before_anything_is_written(toy_plugins, tmp_path, monkeypatch, name, extra):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard" if name == "tensorboard" else "wandb", None)
    with pytest.raises(RecipeError) as err:
        train(toy_recipe(f"train.loggers=[{name}]"), tmp_path / "run", progress=False)
    message = str(err.value)
    assert f"train.loggers: {name!r} needs the {extra} package, which is not installed" in message
    assert f"pip install -e '.[{extra}]'" in message and "\n" not in message
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# the real packages


def kill_and_resume(run: Path, monkeypatch, *overrides: str) -> None:
    train_until_killed(toy_recipe(*overrides), run, monkeypatch, 3)
    train(toy_recipe(*overrides), run, resume=True, progress=False)


def test_tensorboard_event_files_hold_the_log_once(toy_plugins, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    kill_and_resume(run, monkeypatch, "train.loggers=[tensorboard]")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    lines = read_lines(run)
    for key, split in (("loss", None), ("lr", None), ("grad_norm", None), ("exact_accuracy", "test")):
        tag = f"{split or 'train'}/{key}"
        want = [(r["step"], r[key]) for r in lines if r.get("split") == split]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag  # steps 3 of the killed run purged
        assert all(math.isclose(g, w, rel_tol=1e-6) for (_, g), (_, w) in zip(got, want)), tag  # float32


WANDB_BLOCK = 32768


def wandb_records(path: Path):
    """The protobuf records of a wandb offline run file (``run-ID.wandb``): a 7-byte header, then LevelDB-log
    style chunks (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last) that never cross 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def test_wandb_offline_run_files_hold_the_log_and_the_resume_keeps_the_id(toy_plugins, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_NAME", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no API key, so offline
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    kill_and_resume(run, monkeypatch, "train.loggers=[wandb]", "train.wandb_project=sleepzoo-test")
    run_id = (run / "wandb" / "run_id").read_text().strip()
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    history: list[dict] = []
    for path in files:  # the killed run's, then the resumed one's
        records = list(wandb_records(path))
        [info] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (info.run_id, info.project, info.display_name) == (run_id, "sleepzoo-test", "run")
        history.append([{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in r.history.item}
                        for r in records if r.WhichOneof("record_type") == "history"])
    killed, resumed = history
    assert [h["step"] for h in killed] == [1, 2, 3, 3] and [h["step"] for h in resumed] == [3, 3, 4, 5, 6, 6]
    lines = read_lines(run)
    assert [h["step"] for h in resumed] == [r["step"] for r in lines[2:]]
    for h, r in zip(resumed, lines[2:]):
        key = "test/exact_accuracy" if r.get("split") else "train/loss"
        assert h[key] == r[key.split("/")[1]]


def test_two_processes_log_once(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe_yaml = tmp_path / "tiny.yaml"
    recipe_yaml.write_text(tiny_recipe("train.loggers=[tensorboard]").to_yaml())
    torchrun(recipe_yaml, tmp_path / "two")
    files = list((tmp_path / "two" / "tensorboard").iterdir())
    assert len(files) == 1  # one writer: rank 0's
    events = EventAccumulator(str(tmp_path / "two" / "tensorboard"))
    events.Reload()
    want = [(r["step"], r["loss"]) for r in read_lines(tmp_path / "two") if "split" not in r]
    got = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
    assert all(math.isclose(g, w, rel_tol=1e-6) for (_, g), (_, w) in zip(got, want))


def test_the_cli_says_which_package_is_missing_in_one_line(tmp_path):
    recipe_yaml = tmp_path / "tiny.yaml"
    recipe_yaml.write_text(tiny_recipe().to_yaml())
    code = ("import sys; sys.modules['wandb'] = None; from sleepzoo.cli import main; "
            f"main(['train', {str(recipe_yaml)!r}, 'train.loggers=[wandb]', '--out', {str(tmp_path / 'run')!r}])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "train.loggers: 'wandb' needs the wandb package" in lines[0] and "pip install -e '.[wandb]'" in lines[0]


def test_runs_that_differ_only_in_loggers_are_one_experiment(tmp_path):
    from test_report import make_run

    from sleepzoo import report

    runs = [make_run(tmp_path, f"loops{n}", loops=n) for n in (1, 2)]
    saved = yaml.safe_load((runs[1] / "recipe.yaml").read_text())
    saved["train"].update(loggers=["jsonl", "tensorboard"], wandb_project="elsewhere")
    (runs[1] / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    comparison = report.compare_runs([report.load_result(r) for r in runs], key="sleep.loops")
    assert comparison["settings"] == []  # how metrics are shown, not what was trained
