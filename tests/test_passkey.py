"""Tests of ``task: passkey``: layout in tokens, targets only on the digits, splits, buckets, errors.

Positions are found in the generated ids by searching for the needle's and the question's bytes (written
here, not taken from the task), so a bug in the task's own bookkeeping cannot hide.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from sleepzoo import registry
from sleepzoo.registry import SleepzooError
from sleepzoo.tasks.base import IGNORE_INDEX
from sleepzoo.tasks.passkey import FILLER_SENTENCES, Passkey

QUESTION = " What is the pass key? The pass key is"


def ids(text: str) -> list[int]:
    return [b + 2 for b in text.encode("utf-8")]


def find(seq: list[int], part: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(part) + 1) if seq[i:i + len(part)] == part]


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def task():
    return Passkey(length=[120, 160], depth=[0.0, 0.3, 1.0], digits=5)


@pytest.fixture(scope="module")
def batch(task):
    return task.generate(300, seed=0)


def test_targets_are_exactly_the_digits(task, batch):
    for row, tgt, key, length in zip(batch["input_ids"].tolist(), batch["targets"].tolist(),
                                     batch["key"].tolist(), batch["length"].tolist()):
        digits = f"{key:05d}"
        where = [t for t, v in enumerate(tgt) if v != IGNORE_INDEX]
        assert [tgt[t] for t in where] == ids(digits)
        # the target at t is the token at t + 1: the digits are the last 5 tokens of the example
        assert where == list(range(length - 6, length - 1))
        assert row[length - 5:length] == ids(digits)
        q = find(row, ids(QUESTION + " "))
        assert q == [length - 5 - len(ids(QUESTION + " "))]
        assert row[length:] == [0] * (len(row) - length)  # right padding, no targets
        assert task.decode(row, tgt).endswith(f"The pass key is {digits} => {digits}")


def test_depth_is_measured_in_tokens(task, batch):
    fixed = len(ids(" The pass key is 00000. Remember it. ")) + len(ids(QUESTION + " ")) + 5
    assert fixed == 81
    seen = set()
    for row, key, length, pct, start in zip(batch["input_ids"].tolist(), batch["key"].tolist(),
                                            batch["length"].tolist(), batch["depth_pct"].tolist(),
                                            batch["needle_start"].tolist()):
        needle = ids(f" The pass key is {key:05d}. Remember it. ")
        found = find(row, needle)
        assert len(found) == 1
        haystack = length - fixed
        assert found[0] == start == round(pct / 100 * haystack)
        seen.add((pct, length))
    assert seen == {(p, n) for p in (0, 30, 100) for n in (120, 160)}
    # depth 1: the needle ends right where the question starts; depth 0: it opens the example
    needle_len = len(ids(" The pass key is 00000. Remember it. "))
    i = batch["depth_pct"].tolist().index(100)
    row = batch["input_ids"][i].tolist()
    assert find(row, ids(QUESTION))[0] == int(batch["needle_start"][i]) + needle_len
    i = batch["depth_pct"].tolist().index(0)
    key = int(batch["key"][i])
    assert batch["input_ids"][i, :needle_len].tolist() == ids(f" The pass key is {key:05d}. Remember it. ")


def test_builtin_filler_is_the_repeated_sentences(task, batch):
    cycle = (" " + " ".join(FILLER_SENTENCES)) * 4
    for row, key, length in zip(batch["input_ids"][:20].tolist(), batch["key"].tolist(), batch["length"].tolist()):
        text = bytes(v - 2 for v in row[:length]).decode()
        before, rest = text.split(f" The pass key is {key:05d}. Remember it. ")
        after = rest.split(QUESTION)[0]
        assert before + after in cycle  # one contiguous window of the filler stream, cut by the needle


def test_split_by_key_depth_and_length(task):
    def combos(split: str) -> set:
        d = task.generate(2000, seed=1, split=split)
        return set(zip(d["key"].tolist(), d["depth_pct"].tolist(), d["length"].tolist()))

    train, test = combos("train"), combos("test")
    assert len(train) > 1500 and len(test) > 1500
    assert not train & test


def test_determinism(task):
    a, b = task.generate(16, seed=9), task.generate(16, seed=9)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], task.generate(16, seed=10)["input_ids"])
    assert torch.equal(task.generate(5, seed=9)["input_ids"], a["input_ids"][:5])


def test_filler_from_files_and_a_tokenizer_json(tmp_path):
    (tmp_path / "f.txt").write_text("zebra crossing at the quiet junction. " * 4)
    t = Passkey(length=200, depth=0.5, digits=4, filler=str(tmp_path / "*.txt"))
    d = t.generate(4, seed=0)
    text = t.tokenizer_object.decode(d["input_ids"][0].tolist())
    assert "zebra" in text and "The pass key is" in text
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The pass key is 1234. Remember it. What is the pass key?"] * 50, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    t = Passkey(length=[90, 140], depth=[0.0, 1.0], digits=4, tokenizer=str(tmp_path / "tokenizer.json"))
    d = t.generate(20, seed=0)
    lengths = (d["input_ids"] != t.pad_id).sum(dim=1)
    assert torch.equal(lengths, d["length"])  # every example exactly its length in this tokenizer's tokens
    for row, tgt, key in zip(d["input_ids"], d["targets"], d["key"].tolist()):
        answer = t.tokenizer_object.decode([v for v in tgt.tolist() if v != IGNORE_INDEX])
        assert answer.strip() == f"{key:04d}"


@pytest.mark.parametrize("options,needles", [
    ({"length": 60}, ["length: 60 tokens is too short", "use length >= 82"]),
    ({"length": [200, 50]}, ["length: 50 tokens is too short"]),
    ({"depth": 1.5}, ["depth must be a fraction in [0, 1]", "1.5"]),
    ({"depth": [0.2, -0.1]}, ["depth must be a fraction in [0, 1]", "-0.1"]),
    ({"depth": []}, ["depth must not be an empty list"]),
    ({"depth": [0.5, 0.501]}, ["share a depth_pct bucket"]),
    ({"digits": 0}, ["digits must be an integer in [1, 18], got 0"]),
    ({"filler": "no/such/*.txt"}, ["filler", "names no file"]),
    ({"filler": "EMPTY"}, ["filler", "the corpus is empty"]),
    ({"tokenizer": "missing/tokenizer.json"}, ["does not exist"]),
], ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None)
def test_bad_options_one_line(tmp_path, options, needles):
    (tmp_path / "empty.txt").write_text("   \n")
    if options.get("filler") == "EMPTY":
        options = {**options, "filler": str(tmp_path / "empty.txt")}
    with pytest.raises(SleepzooError) as exc:
        Passkey(**options)
    message = one_line(exc)
    for needle in needles:
        assert needle in message


class DepthOracle(nn.Module):
    """Gets the digits right only when the needle sits at depth 1 (read from the batch it is given)."""

    def __init__(self, vocab: int, lookup: dict):
        super().__init__()
        self.vocab, self.lookup = vocab, lookup

    def forward(self, input_ids, targets, window=None, loops=None):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            right = self.lookup[tuple(input_ids[b].tolist())]
            for t in range(T):
                if targets[b, t] != IGNORE_INDEX:
                    logits[b, t, targets[b, t] if right else ids("x")[0]] = 10.0
        return SimpleNamespace(logits=logits)


def test_accuracy_per_depth_and_length_bucket():
    task = Passkey(length=[100, 130], depth=[0.0, 0.5, 1.0], digits=3)
    data = task.generate(90, seed=0, split="test")
    lookup = {tuple(r.tolist()): int(p) == 100 for r, p in zip(data["input_ids"], data["depth_pct"])}
    result = task.evaluate(DepthOracle(task.vocab_size, lookup), num_examples=90, batch_size=32)
    depth = result["buckets"]["depth_pct"]
    assert set(depth) == {"0", "50", "100"}
    assert depth["100"]["exact_accuracy"] == 1.0 and depth["0"]["exact_accuracy"] == 0.0
    assert depth["50"]["exact_accuracy"] == 0.0
    share = float((data["depth_pct"] == 100).double().mean())
    assert result["exact_accuracy"] == pytest.approx(share)
    lengths = result["buckets"]["length"]
    assert set(lengths) == {"100", "130"}
    assert sum(v["num_examples"] for v in lengths.values()) == 90
    assert result["num_targets"] == 90 * 3


def test_registered_and_task_show():
    from sleepzoo.cli import main

    assert registry.get("task", "passkey") is Passkey
    result = CliRunner().invoke(main, ["task", "show", "passkey", "length=[100,140]", "depth=0.5", "digits=4",
                                       "-n", "2"])
    assert result.exit_code == 0, result.output
    data = Passkey(length=[100, 140], depth=0.5, digits=4).generate(2, seed=0)
    assert "buckets        depth_pct, length" in result.stdout
    for i in range(2):
        assert f"depth_pct=50  length={int(data['length'][i])}" in result.stdout
        assert f"=> {int(data['key'][i]):04d}" in result.stdout
    bad = CliRunner().invoke(main, ["task", "show", "passkey", "depth=2"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "depth must be a fraction in [0, 1]" in lines[0]


def test_config_rebuilds(task):
    again = Passkey(**task.config())
    assert torch.equal(again.generate(6, seed=2)["input_ids"], task.generate(6, seed=2)["input_ids"])
    assert np.isclose(task.describe()["depths"], [0.0, 0.3, 1.0]).all()
