"""Tests of the task protocol (sleepzoo.tasks.base) and of the Rule 110 task (SPEC 2).

Answers are checked against an independent solver written here in plain Python, from the rule table in the
SPEC, so that a bug shared by the numpy automaton and its packed fast path cannot hide.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sleepzoo.registry import SleepzooError
from sleepzoo.tasks import Task, stable_hash
from sleepzoo.tasks.rule110 import Rule110, _evolve_packed, rule110_evolve, rule110_step

# (left, centre, right) -> new centre, exactly as written in SPEC 2.
TABLE = {"111": "0", "110": "1", "101": "1", "100": "0", "011": "1", "010": "1", "001": "1", "000": "0"}


def ref_step(state: str) -> str:
    """One periodic Rule-110 step on a string of '0'/'1' (s[i - 1] wraps to the last cell for i = 0)."""
    n = len(state)
    return "".join(TABLE[state[i - 1] + state[i] + state[(i + 1) % n]] for i in range(n))


def ref_evolve(state: str, steps: int) -> str:
    for _ in range(steps):
        state = ref_step(state)
    return state


def split_example(task: Rule110, ids: torch.Tensor) -> list[str]:
    """The states of one example as '0'/'1' strings, read back from token ids through the vocabulary."""
    vocab = task.vocab
    tokens = [vocab[i] for i in ids.tolist()]
    return ["".join(tokens[s * task.bits:(s + 1) * task.bits]) for s in range(task.states)]


# ------------------------------------------------------------------------------------ the automaton
def test_reference_solver_hand_computed_step():
    # 00010011, periodic: cell 0 sees (1,0,0)->0, cell 2 (0,0,1)->1, cell 7 sees (1,1,0)->1 via wrap-around.
    assert ref_step("00010011") == "00110111"


def test_single_cell_grows_to_the_left():
    # The classic Rule 110 triangle from one live cell: 1, 11, 111, 1101 (growing leftwards).
    rows = ["0000000010000000", "0000000110000000", "0000001110000000", "0000011010000000"]
    for a, b in zip(rows, rows[1:]):
        assert ref_step(a) == b
        got = rule110_step(np.array([int(c) for c in a]))
        assert "".join(map(str, got)) == b


def test_rule_table_is_wolfram_110():
    for neigh, new in TABLE.items():
        cells = np.array([int(c) for c in neigh])  # 3 cells, periodic: cell 1's neighbours are cells 0, 2
        assert rule110_step(cells)[1] == int(new), neigh


@pytest.mark.parametrize("width", [3, 5, 8, 24, 63, 64, 70])
@pytest.mark.parametrize("steps", [0, 1, 7, 32])
def test_numpy_automaton_matches_reference(width, steps):
    rng = np.random.default_rng(width * 100 + steps)
    cells = rng.integers(0, 2, size=(20, width), dtype=np.uint8)
    want = np.array([[int(c) for c in ref_evolve("".join(map(str, row)), steps)] for row in cells])
    np.testing.assert_array_equal(rule110_evolve(cells, steps), want)
    if width <= 64:
        words = (cells.astype(np.uint64) << np.arange(width, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
        packed = _evolve_packed(words, width, steps)
        bits = (packed[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)
        np.testing.assert_array_equal(bits.astype(np.uint8), want)


@pytest.mark.parametrize("bits", [3, 24, 64, 65])
def test_answers_method_matches_reference(bits):
    task = Rule110(steps=11, states=3, bits=bits)
    cells = np.random.default_rng(bits).integers(0, 2, size=(10, 3, bits), dtype=np.uint8)
    want = [[int(ref_evolve("".join(map(str, s)), 11)[0]) for s in row] for row in cells]
    np.testing.assert_array_equal(task.answers(cells), want)


# --------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("steps,states,bits,n", [
    (0, 4, 24, 300), (1, 4, 24, 300), (2, 4, 24, 300), (32, 4, 24, 300), (16, 3, 8, 300),
    (5, 2, 64, 200), (9, 2, 70, 100), (33, 1, 5, 200),
])
@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_match_reference_solver(steps, states, bits, n, split):
    task = Rule110(steps=steps, states=states, bits=bits)
    data = task.generate(n, seed=7, split=split)
    body = states * bits
    for ids, tg in zip(data["input_ids"], data["targets"]):
        want = [ref_evolve(s, steps)[0] for s in split_example(task, ids)]
        got = [task.vocab[int(t)] for t in tg[body:]]
        assert got == want


def test_steps_zero_answers_first_bit():
    task = Rule110(steps=0)
    data = task.generate(50, seed=3)
    firsts = data["input_ids"][:, 0:96:24]
    assert torch.equal(data["targets"][:, 96:], firsts)


def test_layout_vocab_and_targets():
    task = Rule110()
    assert task.vocab == ["<pad>", "0", "1", "Q1", "Q2", "Q3", "Q4"]
    assert (task.vocab_size, task.seq_len, task.pad_id, task.window) == (7, 100, 0, 24)
    assert task.query_positions == [96, 97, 98, 99]
    data = task.generate(1000, seed=0)
    ids, tg = data["input_ids"], data["targets"]
    assert ids.dtype == torch.long and tg.dtype == torch.long
    assert ids.shape == tg.shape == (1000, 100)
    assert ids.min() >= 0 and ids.max() < task.vocab_size
    assert set(ids[:, :96].unique().tolist()) == {1, 2}  # bits only, no pad, no queries
    assert torch.equal(ids[:, 96:], torch.tensor([3, 4, 5, 6]).expand(1000, 4))
    assert (tg[:, :96] == -100).all()
    assert set(tg[:, 96:].unique().tolist()) == {1, 2}  # both answers occur
    other = Rule110(states=6, bits=10)
    assert other.vocab[-1] == "Q6" and other.seq_len == 66 and other.window == 10
    assert other.generate(3, 0)["input_ids"].shape == (3, 66)


def test_generate_zero_examples():
    data = Rule110().generate(0, seed=0, split="test")
    assert data["input_ids"].shape == data["targets"].shape == (0, 100)


def test_deterministic_by_seed_and_split():
    task = Rule110()
    a, b = task.generate(200, seed=5), task.generate(200, seed=5)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["targets"], b["targets"])
    assert not torch.equal(a["input_ids"], task.generate(200, seed=6)["input_ids"])
    assert not torch.equal(a["input_ids"], task.generate(200, seed=5, split="test")["input_ids"])
    # A fresh, identically configured task gives the same data; global RNG state plays no part.
    np.random.seed(123)
    torch.manual_seed(123)
    c = Rule110().generate(200, seed=5)
    assert torch.equal(a["input_ids"], c["input_ids"])


def test_smaller_request_is_a_prefix():
    task = Rule110()
    for split in ("train", "test"):
        big = task.generate(9000, seed=2, split=split)["input_ids"]
        small = task.generate(100, seed=2, split=split)["input_ids"]
        assert torch.equal(big[:100], small)


def test_train_and_test_never_overlap():
    # 256 possible examples: 20k training draws would hit every one of them without a structural split.
    task = Rule110(steps=3, states=1, bits=8)
    train = {tuple(r) for r in task.generate(20_000, seed=0, split="train")["input_ids"].tolist()}
    test = {tuple(r) for r in task.generate(2_000, seed=0, split="test")["input_ids"].tolist()}
    assert train and test
    assert not train & test
    assert len(train | test) == 256  # nothing is lost either: the splits partition the example space
    assert 0.05 < len(test) / 256 < 0.25  # about 1 in 8
    # And for the default task, with different seeds on each side.
    task = Rule110()
    train = {tuple(r) for r in task.generate(5000, seed=1, split="train")["input_ids"].tolist()}
    test = {tuple(r) for r in task.generate(5000, seed=2, split="test")["input_ids"].tolist()}
    assert not train & test


def test_too_small_to_split_is_an_error():
    # 8 examples in all, none of which hashes into the test bucket: say so instead of looping forever.
    with pytest.raises(SleepzooError, match="test"):
        Rule110(states=1, bits=3).generate(4, seed=0, split="test")
    assert Rule110(states=1, bits=3).generate(4, seed=0)["input_ids"].shape == (4, 4)


def test_stable_hash_is_pinned():
    # Changing the hash silently reshuffles every train/test split: this must fail if it ever changes.
    got = stable_hash(np.array([[0, 1, 2], [3, 4, 5]]))
    assert got.dtype == np.uint64
    assert [int(x) for x in got] == [6649647087660120651, 7944451492199260868]
    assert stable_hash(np.array([[2, 1, 0]]))[0] != got[0]  # order matters


def test_docstring_examples_are_real():
    task = Rule110(steps=1, states=2, bits=8)
    data = task.generate(1, seed=0)
    assert task.decode(data["input_ids"][0], data["targets"][0]) == "11111010 01000001 | Q1=>1 Q2=>1"
    assert data["input_ids"][0].tolist() == [2, 2, 2, 2, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 2, 3, 4]
    task = Rule110()
    data = task.generate(1, seed=0, split="test")
    assert task.decode(data["input_ids"][0], data["targets"][0]) == (
        "110111100000111000000011 110010001101011111100101 111001010000010010111101 "
        "110110110110100101101110 | Q1=>0 Q2=>1 Q3=>1 Q4=>0")


def test_decode_forms():
    task = Rule110(steps=1, states=2, bits=8)
    ids = task.generate(2, seed=0)["input_ids"]
    assert task.decode(ids[0]) == "11111010 01000001 | Q1 Q2"
    assert task.decode(ids[0].tolist()) == task.decode(ids[0])
    assert task.decode(ids).count("\n") == 1
    assert task.decode([0, 3, 99]) == "<pad> Q1 <unk:99>"  # not a full example: generic form


def test_generation_is_fast():
    task = Rule110()
    start = time.perf_counter()
    task.generate(100_000, seed=0)
    task.generate(100_000, seed=0, split="test")
    assert time.perf_counter() - start < 5.0  # ~0.2 s each on a laptop core; generous for busy CI


# ----------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("kwargs,arg", [
    ({"steps": -1}, "steps"), ({"states": 0}, "states"), ({"bits": 2}, "bits"),
    ({"steps": 1.5}, "steps"), ({"steps": True}, "steps"), ({"bits": "24"}, "bits"),
])
def test_bad_config_names_the_argument(kwargs, arg):
    with pytest.raises(SleepzooError) as info:
        Rule110(**kwargs)
    msg = str(info.value)
    assert arg in msg and repr(kwargs[arg]) in msg and ">=" in msg


@pytest.mark.parametrize("kwargs,arg", [
    ({"num_examples": -1, "seed": 0}, "num_examples"), ({"num_examples": 3, "seed": -2}, "seed"),
    ({"num_examples": 3, "seed": 0, "split": "valid"}, "split"), ({"num_examples": 2.0, "seed": 0}, "num_examples"),
])
def test_bad_generate_arguments(kwargs, arg):
    with pytest.raises(SleepzooError, match=arg):
        Rule110().generate(**kwargs)


def test_describe_round_trips():
    task = Rule110(steps=8, states=2, bits=12)
    d = task.describe()
    assert d["name"] == "rule110" and d["class"] == "sleepzoo.tasks.rule110:Rule110"
    assert d["config"] == {"steps": 8, "states": 2, "bits": 12}
    assert (d["seq_len"], d["vocab_size"], d["window"]) == (26, 5, 12)
    assert Rule110(**d["config"]).generate(5, 1)["input_ids"].equal(task.generate(5, 1)["input_ids"])
    assert repr(task) == "Rule110(steps=8, states=2, bits=12)"
    assert issubclass(Rule110, Task)


def test_constructor_is_recipe_friendly():
    # Recipes check options against the signature: every argument annotated and defaulted.
    import inspect
    for name, p in inspect.signature(Rule110).parameters.items():
        assert p.annotation is not inspect.Parameter.empty, name
        assert p.default is not inspect.Parameter.empty, name


# ---------------------------------------------------------------------------------------- evaluate
class FakeModel(torch.nn.Module):
    """Predicts from the targets it is handed: ``policy(targets, position) -> token id`` at target positions.

    It records the keyword arguments and the mode it was called in.
    """

    def __init__(self, task: Rule110, wrong_at: set[int] = frozenset()):
        super().__init__()
        self.task, self.wrong_at = task, wrong_at
        self.calls: list[dict] = []

    def forward(self, input_ids, targets, *, window=None, loops=None):
        self.calls.append({"window": window, "loops": loops, "training": self.training, "batch": len(input_ids)})
        b, t = input_ids.shape
        answer = targets.clone()
        for i in self.wrong_at:  # query i (0-based) gets the other bit: "0" (1) <-> "1" (2)
            pos = self.task.query_positions[i]
            answer[:, pos] = 3 - targets[:, pos]
        logits = torch.zeros(b, t, self.task.vocab_size)
        mask = answer != -100
        logits[mask] = F.one_hot(answer[mask], self.task.vocab_size).float() * 20.0
        return SimpleNamespace(logits=logits, loss=torch.tensor(0.0))


class SolverModel(torch.nn.Module):
    """Cheats without looking at the targets: solves each example with the reference solver."""

    def __init__(self, task: Rule110):
        super().__init__()
        self.task = task

    def forward(self, input_ids, targets, *, window=None, loops=None):
        logits = torch.zeros(*input_ids.shape, self.task.vocab_size)
        for b, ids in enumerate(input_ids):
            for i, state in enumerate(split_example(self.task, ids)):
                answer = self.task.vocab.index(ref_evolve(state, self.task.steps)[0])
                logits[b, self.task.query_positions[i], answer] = 1
        return SimpleNamespace(logits=logits, loss=None)


class RandomModel(torch.nn.Module):
    """Fixed, input-dependent logits (an embedding of token and position) for checking the loss."""

    def __init__(self, task: Rule110):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tok = torch.nn.Parameter(torch.randn(task.vocab_size, task.vocab_size, generator=g))
        self.pos = torch.nn.Parameter(torch.randn(task.seq_len, task.vocab_size, generator=g))

    def forward(self, input_ids, targets, *, window=None, loops=None):
        logits = self.tok[input_ids] * self.tok[input_ids.roll(1, dims=1)] + self.pos
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return SimpleNamespace(logits=logits, loss=loss)


def test_evaluate_perfect_and_wrong_models():
    task = Rule110(steps=4)
    perfect = task.evaluate(FakeModel(task), num_examples=300, batch_size=64)
    assert perfect["exact_accuracy"] == perfect["token_accuracy"] == 1.0
    assert perfect["label_accuracy"] == [1.0] * 4
    assert perfect["num_examples"] == 300 and perfect["num_targets"] == 1200
    assert perfect["loss"] < 1e-6
    wrong = task.evaluate(FakeModel(task, wrong_at={0, 1, 2, 3}), num_examples=300, batch_size=64)
    assert wrong["exact_accuracy"] == wrong["token_accuracy"] == 0.0
    assert wrong["label_accuracy"] == [0.0] * 4 and wrong["label_accuracy_3"] == 0.0
    assert wrong["loss"] > 10


def test_evaluate_per_label_accuracy():
    task = Rule110(steps=2)
    res = task.evaluate(FakeModel(task, wrong_at={1, 3}), num_examples=100, batch_size=30)
    assert res["label_accuracy"] == [1.0, 0.0, 1.0, 0.0]
    assert [res[f"label_accuracy_{i}"] for i in range(1, 5)] == [1.0, 0.0, 1.0, 0.0]
    assert res["token_accuracy"] == 0.5 and res["exact_accuracy"] == 0.0


def test_evaluate_with_an_independent_solver():
    task = Rule110(steps=32)
    res = task.evaluate(SolverModel(task), num_examples=64, batch_size=16)
    assert res["exact_accuracy"] == 1.0 and res["label_accuracy"] == [1.0] * 4


def test_evaluate_loss_is_weighted_over_batches():
    task = Rule110(steps=5, states=3, bits=10)
    model = RandomModel(task)
    res = task.evaluate(model, num_examples=100, batch_size=32, seed=4)  # batches of 32, 32, 32, 4
    data = task.generate(100, seed=4, split="test")
    with torch.no_grad():
        out = model(data["input_ids"], data["targets"])
    assert res["loss"] == pytest.approx(out.loss.item(), rel=1e-6)
    whole = task.evaluate(model, num_examples=100, batch_size=100, seed=4)
    assert whole.pop("label_accuracy") == res["label_accuracy"]
    assert {k: v for k, v in res.items() if k != "label_accuracy"} == pytest.approx(whole, rel=1e-6)
    pred = out.logits.argmax(-1)
    mask = data["targets"] != -100
    correct = (pred == data["targets"]) & mask
    assert res["token_accuracy"] == pytest.approx(correct.sum().item() / mask.sum().item())
    assert res["exact_accuracy"] == pytest.approx((correct.sum(1) == 3).float().mean().item())
    q = task.query_positions
    assert res["label_accuracy"] == pytest.approx(correct[:, q].float().mean(0).tolist())


def test_evaluate_passes_options_and_restores_mode():
    task = Rule110(steps=1, states=2, bits=8)
    model = FakeModel(task)
    model.train()
    task.evaluate(model, num_examples=10, batch_size=4, window=8, loops=3)
    assert model.training  # restored
    assert [c["batch"] for c in model.calls] == [4, 4, 2]
    assert all(c == {**c, "window": 8, "loops": 3, "training": False} for c in model.calls)
    model.eval()
    task.evaluate(model, num_examples=4)
    assert not model.training
    with pytest.raises(SleepzooError, match="batch_size"):
        task.evaluate(model, batch_size=0)


def test_evaluate_uses_the_test_split():
    task = Rule110(steps=1, states=1, bits=8)
    seen: list[torch.Tensor] = []

    class Spy(FakeModel):
        def forward(self, input_ids, targets, **kw):
            seen.append(input_ids)
            return super().forward(input_ids, targets, **kw)

    task.evaluate(Spy(task), num_examples=500, batch_size=500, seed=9)
    assert torch.equal(seen[0], task.generate(500, seed=9, split="test")["input_ids"])


def test_evaluate_reports_metrics_per_bucket():
    """A task naming a per-example bucket gets every metric per bucket value, computed over those examples."""
    import torch

    class Bucketed(Rule110):
        buckets = ("first_bit",)

        def _build(self, content, split):
            data = super()._build(content, split)
            data["first_bit"] = data["input_ids"][:, 0].clone()
            return data

    task = Bucketed(steps=0, states=2, bits=8)

    class RightOnlyWhenFirstBitIsOne(torch.nn.Module):
        def forward(self, input_ids, targets, window=None, loops=None):
            logits = torch.zeros(*input_ids.shape, task.vocab_size)
            good = targets.clamp(min=0)
            wrong = torch.where(good == task.vocab.index("0"), task.vocab.index("1"), task.vocab.index("0"))
            use = torch.where(input_ids[:, :1] == task.vocab.index("1"), good, wrong)
            logits.scatter_(-1, use[..., None], 5.0)
            return type("Out", (), {"logits": logits})()

    result = task.evaluate(RightOnlyWhenFirstBitIsOne(), num_examples=200, batch_size=64)
    by_bit = result["buckets"]["first_bit"]
    one, zero = str(task.vocab.index("1")), str(task.vocab.index("0"))
    assert by_bit[one]["exact_accuracy"] == 1.0 and by_bit[zero]["exact_accuracy"] == 0.0
    assert by_bit[one]["num_examples"] + by_bit[zero]["num_examples"] == 200
    share = by_bit[one]["num_examples"] / 200
    assert abs(result["exact_accuracy"] - share) < 1e-12
    weighted = (by_bit[one]["loss"] * by_bit[one]["num_targets"] + by_bit[zero]["loss"] * by_bit[zero]["num_targets"])
    assert abs(weighted / result["num_targets"] - result["loss"]) < 1e-9
