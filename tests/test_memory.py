"""Persistent memory (issue 15): a stream saved after n tokens and loaded elsewhere continues exactly."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from sleepzoo import SleepzooError
from sleepzoo.memory import describe, load_stream, save_stream
from tests.test_streaming import SETTINGS, tiny_model


def _continue(stream, ids):
    return torch.cat([stream.feed(ids[:, i:i + 1]) for i in range(ids.shape[1])], dim=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("eviction, sleep_every", SETTINGS)
@pytest.mark.parametrize("cut", [3, 5, 12], ids=["first-window", "window-full", "mid-window"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_saved_and_loaded_stream_continues_exactly(tmp_path, dtype, eviction, sleep_every, cut, grad):
    """Feed ``cut`` tokens, save, load into the same weights, feed the rest: the logits of the rest equal those of
    a stream fed the same pieces without the round trip, bit for bit (the same ops on the same values). Under
    no_grad the attention caches are in-place K/V buffers (their capacity is kept); with grad, plain tensors."""
    model = tiny_model(dtype=dtype, loop=(1, 3))
    ids = torch.randint(0, 13, (2, 23), generator=torch.Generator().manual_seed(1))
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        whole = model.start_stream(window=5, loops=3, eviction=eviction, sleep_every=sleep_every)
        whole.feed(ids[:, :cut])
        expected = torch.cat([torch.zeros(2, cut, 13, dtype=dtype), _continue(whole, ids[:, cut:])], dim=1)
        first = model.start_stream(window=5, loops=3, eviction=eviction, sleep_every=sleep_every)
        first.feed(ids[:, :cut])
        first.save(tmp_path / "memory.safetensors")
        again = type(first).load(model, tmp_path / "memory.safetensors")
        assert (again.tokens, again.filled, again.sleeps) == (first.tokens, first.filled, first.sleeps)
        rest = _continue(again, ids[:, cut:])
    torch.testing.assert_close(rest, expected[:, cut:], rtol=0, atol=0)


def test_a_new_process_continues_the_conversation(tmp_path):
    """Save in this process, load in another one (same seed, so the same weights), continue: same logits."""
    model = tiny_model(dtype=torch.float64)
    ids = torch.randint(0, 13, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = model.start_stream(window=5, loops=2)
        whole.feed(ids[:, :8])
        expected = torch.cat([torch.zeros(1, 8, 13, dtype=torch.float64), _continue(whole, ids[:, 8:])], dim=1)
        first = model.start_stream(window=5, loops=2)
        first.feed(ids[:, :8])
    save_stream(first, tmp_path / "m.safetensors")
    torch.save(ids[:, 8:], tmp_path / "rest.pt")
    script = textwrap.dedent(f"""
        import torch
        from sleepzoo.memory import load_stream
        from tests.test_streaming import tiny_model
        torch.set_num_threads({torch.get_num_threads()})  # the same reduction order as this process
        model = tiny_model(dtype=torch.float64)
        ids = torch.load({str(tmp_path / 'rest.pt')!r})
        with torch.no_grad():
            s = load_stream(model, {str(tmp_path / 'm.safetensors')!r})
            out = torch.cat([s.feed(ids[:, i:i + 1]) for i in range(ids.shape[1])], dim=1)
        torch.save(out, {str(tmp_path / 'out.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(pytest.importorskip("pathlib").Path(
        __file__).resolve().parent.parent))
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected[:, 8:], rtol=0, atol=0)


def _saved(tmp_path, **kw):
    model = tiny_model()
    with torch.no_grad():
        stream = model.start_stream(window=5, loops=2, **kw)
        stream.feed(torch.randint(0, 13, (2, 7)))
    return save_stream(stream, tmp_path / "m.safetensors")


def test_loading_into_other_weights_config_or_settings_names_what_differs(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(SleepzooError, match="model.weights: saved"):
        load_stream(tiny_model(seed=1), path)
    other = tiny_model(loop=(1, 3))
    with pytest.raises(SleepzooError, match="model.config"):
        load_stream(other, path)
    with pytest.raises(SleepzooError, match="settings.loops: saved 2, asked for 4"):
        load_stream(tiny_model(), path, loops=4)
    with pytest.raises(SleepzooError, match="unknown setting"):
        load_stream(tiny_model(), path, windoe=5)
    assert load_stream(tiny_model(), path, loops=2, window=5).loops == 2


def test_damaged_or_foreign_files_are_one_clear_error(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]), ("garbage", b"not a memory"), ("empty", b"")):
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(SleepzooError, match="not a readable sleepzoo memory"):
            load_stream(tiny_model(), bad)
    with pytest.raises(SleepzooError, match="does not exist"):
        load_stream(tiny_model(), tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))  # a safetensors file, not a memory
    with pytest.raises(SleepzooError, match="not a readable sleepzoo memory"):
        load_stream(tiny_model(), tmp_path / "weights.safetensors")


def test_writes_are_atomic_and_describe_reports_the_contents(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    before = path.read_bytes()
    model = tiny_model()
    stream = load_stream(model, path)
    with torch.no_grad():
        stream.feed(torch.randint(0, 13, (2, 4)))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("sleepzoo.checkpoint.os.fsync", fail)
    with pytest.raises(OSError):
        save_stream(stream, path)
    assert path.read_bytes() == before  # the old memory is intact, no temporary left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    info = describe(path)
    assert (info["tokens"], info["filled"], info["sleeps"], info["batch"]) == (7, 2, 1, 2)
    assert info["settings"]["window"] == 5 and info["settings"]["eviction"] == "full_flush"
    assert info["tensor_bytes"]["states.fast_weights"] > 0


def test_cli_generate_with_memory_continues_one_conversation(tmp_path):
    """Two `generate --memory` calls equal one stream that reads both prompts and both continuations; `memory
    show` prints what the file holds; a memory with other settings is refused in one line."""
    import yaml
    from click.testing import CliRunner

    from sleepzoo.cli import load_run, main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"d_model": 16, "layers": ["attention", "gated_deltanet"],
                  "mixers": {"attention": {"num_heads": 2}, "gated_deltanet": {"num_heads": 2, "head_dim": 8}}},
        "sleep": {"window": 5, "loops": 2},
        "task": {"name": "rule110", "bits": 4, "steps": 1, "states": 2},
        "train": {"steps": 2, "batch_size": 4, "checkpoint_every": 2},
        "eval": {"every": 0, "num_examples": 8, "batch_size": 8}}))
    run, mem = tmp_path / "run", tmp_path / "chat.safetensors"
    runner = CliRunner()
    assert runner.invoke(main, ["train", str(recipe), "--out", str(run), "--no-progress"]).exit_code == 0
    _, model, task, _ = load_run(str(run))
    p1, p2 = " ".join(task.vocab[:3]), " ".join(task.vocab[2:6])
    outs = []
    for p in (p1, p2):
        result = runner.invoke(main, ["generate", str(run), "--prompt", p, "--max-new-tokens", "3", "--memory", str(mem)])
        assert result.exit_code == 0, result.output
        outs.append(result.output.split("->")[1].split()[:3])
    assert "6 tokens so far" in result.output  # the first call's 3 prompt tokens and 3 generated ones
    index = {t: i for i, t in enumerate(task.vocab)}
    model.eval()
    with torch.no_grad():
        stream = model.start_stream()
        expected = []
        for p in (p1, p2):
            ids = torch.tensor([[index[t] for t in p.split()]])
            out = model.generate(ids, 3, stream=stream)
            expected.append([task.vocab[i] if i < len(task.vocab) else str(i) for i in out[0, ids.shape[1]:].tolist()])
    assert outs == expected
    shown = runner.invoke(main, ["memory", "show", str(mem)])
    assert shown.exit_code == 0 and f"{6 + len(p2.split()) + 3} tokens seen" in shown.output and "loops 2" in shown.output
    refused = runner.invoke(main, ["generate", str(run), "--prompt", p1, "--loops", "3", "--memory", str(mem)])
    assert refused.exit_code != 0 and "settings.loops: saved 2, asked for 3" in refused.output
    assert "Traceback" not in refused.output


def test_a_loaded_stream_keeps_its_batch_and_a_header_without_its_keys_is_damaged(tmp_path):
    path = _saved(tmp_path)  # a batch of 2
    stream = load_stream(tiny_model(), path)
    with torch.no_grad(), pytest.raises(SleepzooError, match="ids have 1 rows but this stream holds the memory of 2"):
        stream.feed(torch.randint(0, 13, (1, 3)))
    import json

    from safetensors.torch import load_file, save_file

    header = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["sleepzoo_memory"])
    del header["states"]
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata={"sleepzoo_memory": json.dumps(header)})
    with pytest.raises(SleepzooError, match="lacks states"):
        describe(tmp_path / "bad.safetensors")


def test_the_file_holds_only_the_chunk_start_a_sleep_reads(tmp_path):
    """The fast weights of the prelude and looped blocks at the chunk's start are never read (the passes continue
    the wake pass's): they are not saved; the coda's are (its run after sleep starts there). The continuation
    stays exact (the tests above), and a file saved mid-window is smaller for it."""
    from sleepzoo.memory import read_memory

    model = tiny_model(dtype=torch.float64, loop=(1, 3))
    ids = torch.randint(0, 13, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stream = model.start_stream(window=5, loops=2)
        stream.feed(ids)  # two sleeps, then 2 tokens of the third window: chunk_start is not the states
    save_stream(stream, tmp_path / "m.safetensors")
    _, tensors = read_memory(tmp_path / "m.safetensors")
    hi = len(model.prelude) + len(model.loop)
    saved = {name.split(".")[1] for name in tensors if name.startswith("chunk_start.") and "fast_weights" in name}
    fast = {str(i) for i, m in enumerate(model.mixers()) if m.carried_state and i >= hi}
    assert saved == fast and fast, (saved, fast)
    again = load_stream(model, tmp_path / "m.safetensors")
    rest = torch.randint(0, 13, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(_continue(again, rest), _continue(stream, rest), rtol=0, atol=0)
