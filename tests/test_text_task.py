"""Tests of ``task: text`` (language modelling on local files), the byte tokenizer and the loss-by-position plot.

Every corpus is written here into tmp_path (no network). Expected token lists are computed by hand from the
documented rules (UTF-8 byte ``b`` is id ``b + 2``, ``<eos>`` = 1, ``<pad>`` = 0; a document is in the
test split iff the stable hash of its text's 128-bit BLAKE2b digest is 0 modulo 8).
"""

from __future__ import annotations

import hashlib
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from sleepzoo import registry
from sleepzoo.registry import SleepzooError
from sleepzoo.report import plot_loss_by_position
from sleepzoo.tasks.base import IGNORE_INDEX, stable_hash
from sleepzoo.tasks.text import TextTask, load_documents, window_chunk
from sleepzoo.tokenizer import ByteTokenizer, load_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EOS, PAD = 1, 0


def ids(text: str) -> list[int]:
    return [b + 2 for b in text.encode("utf-8")]


def in_test(text: str) -> bool:
    """The documented split rule, written out independently of the task's code."""
    digest = np.frombuffer(hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest(), dtype="<i8")
    return int(stable_hash(digest.reshape(1, 2).astype(np.int64))[0] % np.uint64(8)) == 0


def docs_of_split(split: str, n: int, prefix: str = "doc") -> list[str]:
    """The first ``n`` texts ``f"{prefix} {i}"`` that the rule puts in ``split``."""
    out, i = [], 0
    while len(out) < n:
        text = f"{prefix} {i}"
        if in_test(text) == (split == "test"):
            out.append(text)
        i += 1
    return out


def write_docs(folder, docs: list[str]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    return str(folder)


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize("text", ["", "hello world", "naïve café — 東京 🙂", "tab\tnew\nline\x00nul"])
def test_byte_tokenizer_round_trip(text):
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert tok.encode(text) == ids(text)
    assert tok.decode(tok.encode(text)) == text
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (258, 0, 1)


def test_byte_tokenizer_specials_and_vocab():
    tok = ByteTokenizer()
    assert tok.decode([ids("a")[0], EOS, ids("b")[0], PAD, 999]) == "a<eos>b<pad><unk:999>"
    vocab = tok.vocab
    assert vocab[:2] == ["<pad>", "<eos>"] and vocab[ord("A") + 2] == "A" and vocab[0x0A + 2] == "<0x0A>"
    assert len(set(vocab)) == 258
    assert tok.decode(ids("é")[:1]) == "\ufffd"  # half a character decodes to the replacement character


# ------------------------------------------------------------------------------------------ loading
def test_load_documents_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nstill first\n\n  \n\nsecond para\n")
    (tmp_path / "b.jsonl").write_text('{"body": "from json"}\n\n{"body": "line two", "x": 1}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("markdown doc")
    (tmp_path / "meta.json").write_text('{"not": "read in a directory walk"}')
    assert load_documents(str(tmp_path / "a.txt")) == ["first para\nstill first\n\n  \n\nsecond para\n"]
    assert load_documents(str(tmp_path / "a.txt"), text_documents="blank_line") == [
        "first para\nstill first", "second para\n"]
    assert load_documents(str(tmp_path / "b.jsonl"), text_field="body") == ["from json", "line two"]
    # a directory: sorted, recursive; a .json list of objects when named explicitly
    with pytest.raises(SleepzooError, match="text_field"):
        load_documents(str(tmp_path))  # b.jsonl has no "text" field
    (tmp_path / "b.jsonl").unlink()
    assert load_documents(str(tmp_path)) == ["first para\nstill first\n\n  \n\nsecond para\n", "markdown doc"]
    (tmp_path / "list.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    assert load_documents([str(tmp_path / "list.json"), str(tmp_path / "sub" / "*.md")]) == ["one", "two",
                                                                                             "markdown doc"]
    assert load_documents(str(tmp_path / "*.txt"), text_documents="blank_line", max_documents=1) == [
        "first para\nstill first"]


def test_load_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["alpha", "  ", "beta"], "n": [1, 2, 3]}), tmp_path / "c.parquet")
    assert load_documents(str(tmp_path / "c.parquet"), text_field="content") == ["alpha", "beta"]
    with pytest.raises(SleepzooError) as exc:
        load_documents(str(tmp_path / "c.parquet"))
    assert "no column 'text'" in one_line(exc) and "content, n" in str(exc.value)


def test_load_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one doc", "two doc"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_documents(str(tmp_path / "ds")) == ["one doc", "two doc"]
    task = TextTask(paths=str(tmp_path / "ds"), seq_len=3, packing="crop")
    assert task.num_examples("train") + task.num_examples("test") == 2


# ------------------------------------------------------------------------------------------ packing
def test_pack_examples_are_exact_windows_of_the_stream(tmp_path):
    train, test = docs_of_split("train", 2), docs_of_split("test", 2)
    task = TextTask(paths=write_docs(tmp_path / "c", train + test), seq_len=3)
    stream = ids(train[0]) + [EOS] + ids(train[1]) + [EOS]
    windows = {tuple(stream[o:o + 4]) for o in range(len(stream) - 3)}
    assert task.num_examples("train") == len(stream) - 3
    data = task.generate(200, seed=0)
    got = {tuple(i) + (t[-1],) for i, t in zip(data["input_ids"].tolist(), data["targets"].tolist())}
    assert got == windows  # every offset drawn, nothing else
    assert torch.equal(data["targets"][:, :-1], data["input_ids"][:, 1:])
    test_stream = ids(test[0]) + [EOS] + ids(test[1]) + [EOS]
    n_test = (len(test_stream) - 1) // 3
    assert task.test_size == n_test
    data = task.generate(n_test, seed=5, split="test")
    rows = sorted(map(tuple, data["input_ids"].tolist()))
    assert rows == sorted(tuple(test_stream[3 * k:3 * k + 3]) for k in range(n_test))


def test_crop_pads_and_masks(tmp_path):
    short, other = docs_of_split("train", 2)  # "doc N": 5 or 6 bytes
    task = TextTask(paths=write_docs(tmp_path / "c", [short, other]), seq_len=9, packing="crop")
    data = task.generate(50, seed=1)
    got = {(tuple(i), tuple(t)) for i, t in zip(data["input_ids"].tolist(), data["targets"].tolist())}
    expected = set()
    for d in (short, other):  # written out: the bytes, <eos>, padding to 9; targets shifted, -100 on padding
        n = len(d)
        inp = ids(d) + [EOS] + [PAD] * (8 - n)
        tgt = ids(d)[1:] + [EOS] + [IGNORE_INDEX] * (9 - n)
        expected.add((tuple(inp), tuple(tgt)))
    assert got == expected
    assert int((data["targets"] != IGNORE_INDEX).sum()) == sum(
        len(short) if row[0][:len(short)] == tuple(ids(short)) else len(other) for row in
        [(tuple(i),) for i in data["input_ids"].tolist()])


def test_crop_long_document_is_cropped(tmp_path):
    doc = docs_of_split("train", 1, prefix="a long document of many bytes")[0]
    task = TextTask(paths=write_docs(tmp_path / "c", [doc]), seq_len=4, packing="crop")
    data = task.generate(1, seed=0)
    assert data["input_ids"][0].tolist() == ids(doc)[:4]
    assert data["targets"][0].tolist() == ids(doc)[1:5]


# ------------------------------------------------------------------------------------------ splits
def test_split_is_by_document_and_disjoint(tmp_path):
    docs = [f"document number {i} says {i * i}" for i in range(200)]
    task = TextTask(paths=write_docs(tmp_path / "c", docs), seq_len=40, packing="crop")
    n_test = sum(in_test(d) for d in docs)
    assert 0 < n_test < 200 and task.test_size == n_test
    tok = ByteTokenizer()

    def texts(data):
        return {tok.decode(row[row != PAD].tolist()).removesuffix("<eos>") for row in data["input_ids"]}

    test_texts = texts(task.generate(n_test, seed=0, split="test"))
    train_texts = texts(task.generate(2000, seed=0))
    assert test_texts == {d for d in docs if in_test(d)}
    assert train_texts <= {d for d in docs if not in_test(d)} and len(train_texts) > 100
    # the split does not depend on seq_len or packing: the packed test stream holds the same documents
    packed = TextTask(paths=str(tmp_path / "c"), seq_len=16)
    assert packed.describe()["documents"] == {"train": 200 - n_test, "test": n_test}


def test_generate_is_deterministic_and_test_prefixes(tmp_path):
    docs = [f"line {i} " * 5 for i in range(120)]
    task = TextTask(paths=write_docs(tmp_path / "c", docs), seq_len=16)
    a, b = task.generate(8, seed=3), task.generate(8, seed=3)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["input_ids"], task.generate(8, seed=4)["input_ids"])
    small, big = task.generate(3, seed=2, split="test"), task.generate(6, seed=2, split="test")
    assert torch.equal(small["input_ids"], big["input_ids"][:3])
    again = TextTask(paths=str(tmp_path / "c"), seq_len=16)
    assert torch.equal(again.generate(8, seed=3)["input_ids"], a["input_ids"])


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("options,needles", [
    ({"paths": "nowhere/*.txt"}, ["paths: 'nowhere/*.txt' names no file"]),
    ({"paths": "missing.txt"}, ["paths: 'missing.txt' does not exist"]),
    ({}, ["paths is required"]),
    ({"paths": "EMPTY"}, ["the corpus is empty"]),
    ({"paths": "CORPUS", "packing": "stack"}, ["packing must be one of pack, crop, got 'stack'"]),
    ({"paths": "CORPUS", "seq_len": 0}, ["seq_len must be an integer >= 1, got 0"]),
    ({"paths": "CORPUS", "tokenizer": "builtin"}, ["tokenizer: 'builtin'", "'byte'"]),
    ({"paths": "CORPUS", "tokenizer": "no/tok.json"}, ["does not exist"]),
    ({"paths": "CORPUS", "text_documents": "para"}, ["text_documents must be one of file, blank_line"]),
    ({"paths": "CORPUS", "max_documents": -1}, ["max_documents must be an integer >= 0"]),
    ({"paths": "BADJSON"}, ["bad.jsonl:2 is not a JSON line"]),
    ({"paths": "NOFIELD"}, ["text_field", "nofield.jsonl:1 has no string field 'text'"]),
], ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None)
def test_bad_options_one_line(tmp_path, monkeypatch, options, needles):
    monkeypatch.chdir(tmp_path)
    write_docs(tmp_path / "corpus", ["some text"])
    write_docs(tmp_path / "empty", ["", "  \n\n "])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    place = {"CORPUS": "corpus", "EMPTY": "empty", "BADJSON": "bad.jsonl", "NOFIELD": "nofield.jsonl"}
    if "paths" in options:
        options = {**options, "paths": place.get(options["paths"], options["paths"])}
    with pytest.raises(SleepzooError) as exc:
        TextTask(**options)
    message = one_line(exc)
    for needle in needles:
        assert needle in message


def test_split_too_small_is_one_line(tmp_path):
    train = docs_of_split("train", 2)
    task = TextTask(paths=write_docs(tmp_path / "c", train), seq_len=64)
    with pytest.raises(SleepzooError) as exc:
        task.generate(2, seed=0)
    assert "train split" in one_line(exc) and "lower seq_len" in str(exc.value)
    with pytest.raises(SleepzooError) as exc:
        task.generate(2, seed=0, split="test")
    assert "test split has 0 of the corpus's 2 documents" in one_line(exc)
    with pytest.raises(SleepzooError) as exc:
        task.evaluate(nn.Identity())
    assert "test split" in one_line(exc)


# ------------------------------------------------------------------------------------------ metrics
class WindowOracle(nn.Module):
    """Logits 0 everywhere except ``w`` at the target token, ``w`` = the position's window index (of
    ``self.chunk`` tokens): so the loss at a position in window ``w`` is ``log(V - 1 + e^w) - w``."""

    def __init__(self, vocab: int, chunk: int, sleep=None):
        super().__init__()
        self.vocab, self.chunk, self.seen = vocab, chunk, []
        if sleep is not None:
            self.sleep = sleep

    def forward(self, input_ids, targets, window=None, loops=None):
        self.seen.append((window, loops))
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        w = (torch.arange(T) // self.chunk).float().expand(B, T)
        safe = targets.clamp(min=0)
        logits.scatter_(2, safe.unsqueeze(-1), w.unsqueeze(-1))
        return SimpleNamespace(logits=logits)


def expected_loss(vocab: int, w: int) -> float:
    return math.log(vocab - 1 + math.exp(w)) - w


@pytest.fixture
def corpus(tmp_path):
    return write_docs(tmp_path / "c", [f"sentence {i} is about the number {i}." for i in range(400)])


def test_loss_per_window_and_position(corpus):
    task = TextTask(paths=corpus, seq_len=32, position_bucket=4)
    model = WindowOracle(task.vocab_size, chunk=8)
    result = task.evaluate(model, num_examples=40, batch_size=16, window=8, loops=3)
    assert model.seen[0] == (8, 3)
    assert result["num_examples"] == 40
    windows = result["buckets"]["window"]
    assert list(windows) == ["0", "1", "2", "3"]
    for w in range(4):
        assert windows[str(w)]["loss"] == pytest.approx(expected_loss(258, w), rel=1e-5)
        assert (windows[str(w)]["start"], windows[str(w)]["end"], windows[str(w)]["num_targets"]) == (
            8 * w, 8 * w + 8, 40 * 8)
    positions = result["buckets"]["position"]
    assert list(positions) == [str(p) for p in range(0, 32, 4)]
    for p, scores in positions.items():
        assert scores["loss"] == pytest.approx(expected_loss(258, int(p) // 8), rel=1e-5)
    overall = sum(expected_loss(258, w) for w in range(4)) / 4
    assert result["loss"] == pytest.approx(overall, rel=1e-5)
    # argmax is the target from window 1 on (logit w > 0), a tie broken to id 0 (= never a target) in window 0
    assert windows["0"]["token_accuracy"] == 0.0 and windows["3"]["token_accuracy"] == 1.0


def test_window_comes_from_the_model_when_not_given(corpus):
    task = TextTask(paths=corpus, seq_len=24)  # position_bucket 0: a quarter of the window
    sleep = SimpleNamespace(window=12, eviction="full_flush", sleep_every=None)
    result = task.evaluate(WindowOracle(task.vocab_size, chunk=12, sleep=sleep), num_examples=8)
    assert list(result["buckets"]["window"]) == ["0", "1"]
    assert list(result["buckets"]["position"]) == [str(p) for p in range(0, 24, 3)]
    sliding = SimpleNamespace(window=12, eviction="sliding_window", sleep_every=6)
    assert window_chunk(WindowOracle(258, 6, sleep=sliding), None) == 6
    assert window_chunk(WindowOracle(258, 6, sleep=sliding), 10) == 6
    # no sleep settings and no window: positions only, T // 16 (at least 1) per bucket
    plain = task.evaluate(WindowOracle(task.vocab_size, chunk=24), num_examples=4)
    assert "window" not in plain["buckets"] and len(plain["buckets"]["position"]) == 24
    longer = TextTask(paths=corpus, seq_len=64)
    plain = longer.evaluate(WindowOracle(longer.vocab_size, chunk=64), num_examples=4)
    assert list(plain["buckets"]["position"]) == [str(p) for p in range(0, 64, 4)]


def test_evaluate_caps_at_the_test_split(corpus):
    task = TextTask(paths=corpus, seq_len=64)
    result = task.evaluate(WindowOracle(task.vocab_size, chunk=64), num_examples=10_000, window=64)
    assert result["num_examples"] == task.test_size > 0


def test_plot_loss_by_position(corpus, tmp_path):
    task = TextTask(paths=corpus, seq_len=32, position_bucket=4)
    rows = {f"N={n}": task.evaluate(WindowOracle(task.vocab_size, chunk=8), num_examples=8, window=8, loops=n)
            for n in (1, 4)}
    path = plot_loss_by_position(rows, tmp_path / "plots" / "loss.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(SleepzooError, match="'N=2' has no loss by position"):
        plot_loss_by_position({"N=2": {"loss": 1.0}}, tmp_path / "x.png")
    with pytest.raises(SleepzooError, match="no curves"):
        plot_loss_by_position({}, tmp_path / "x.png")


# ------------------------------------------------------------------------------------------ plugin, CLI
def test_registered_and_rebuilds_from_config(corpus):
    assert registry.get("task", "text") is TextTask
    task = TextTask(paths=[corpus], seq_len=20, packing="crop")
    again = TextTask(**task.config())
    assert torch.equal(again.generate(4, seed=0)["input_ids"], task.generate(4, seed=0)["input_ids"])


def test_task_show_text(corpus):
    from sleepzoo.cli import main

    result = CliRunner().invoke(main, ["task", "show", "text", f"paths={corpus}", "seq_len=48", "-n", "2"])
    assert result.exit_code == 0, result.output
    task = TextTask(paths=corpus, seq_len=48)
    data = task.generate(2, seed=0)
    assert "seq_len" in result.stdout and "258 tokens" in result.stdout
    assert task.decode(data["input_ids"][1]) in result.stdout
    bad = CliRunner().invoke(main, ["task", "show", "text", "paths=nowhere.txt"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "paths: 'nowhere.txt' does not exist" in lines[0]
