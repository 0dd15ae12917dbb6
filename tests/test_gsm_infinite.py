"""Tests of the clean-room GSM-Infinite task (SPEC 2) and of sleepzoo.tokenizer.

Answers are checked against independent solvers written here: the decoded text of every example is parsed
back into statements (symbolic) or sentences (realistic) and evaluated, so a bug in the generator's own
bookkeeping cannot hide. Lengths are checked in the builtin tokenizer and in a small BPE ``tokenizer.json``
trained here with the `tokenizers` library (no network).
"""

from __future__ import annotations

import inspect
import re
import time
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sleepzoo import registry
from sleepzoo.registry import SleepzooError
from sleepzoo.tasks.base import IGNORE_INDEX, Task
from sleepzoo.tasks.gsm_infinite import MAX_OP, GSMInfinite, auc_over_op
from sleepzoo.tokenizer import JsonTokenizer, WordTokenizer, load_tokenizer

REALISTIC = dict(family="realistic", min_tokens=260, max_tokens=340)  # op 8 needs ~300 builtin tokens


# ------------------------------------------------------------------------------------------ helpers
def split_text(text: str) -> tuple[str, list[str], str]:
    """``Question: ...? <statements> Answer: <answer>`` -> question, statements (without their final
    '.'), answer (e.g. 'v9, v12.')."""
    m = re.fullmatch(r"(Question: [^?]*\?) (.*) Answer: (.*)", text)
    assert m, text
    body = m.group(2)
    assert body.endswith(".")
    return m.group(1), body[:-1].split(". "), m.group(3)


def solve_symbolic(text: str) -> tuple[str, int]:
    """The answer ('v9, v12.') and the number of operations of the assigned tree, from the text alone."""
    question, statements, _ = split_text(text)
    asked = int(re.fullmatch(r"Question: which variables equal (\d+)\?", question).group(1))
    values: dict[str, int] = {}
    edges: dict[str, tuple[str, int]] = {}
    for s in statements:
        if m := re.fullmatch(r"assign (v\d+) = (\d+)", s):
            assert m.group(1) not in values
            values[m.group(1)] = int(m.group(2))
        elif m := re.fullmatch(r"(v\d+) = (v\d+)(?: ([+-]) 1)?", s):
            delta = {None: 0, "+": 1, "-": -1}[m.group(3)]
            assert m.group(1) not in edges, f"{m.group(1)} defined twice"
            edges[m.group(1)] = (m.group(2), delta)
        else:
            raise AssertionError(f"unparsed statement {s!r}")
    assert len(values) == 1
    changed = True
    while changed:  # propagate values along the edges until nothing changes
        changed = False
        for x, (y, d) in edges.items():
            if x not in values and y in values:
                values[x] = values[y] + d
                changed = True
    ops = len(values) - 1  # edges of the assigned tree; everything else is the unassigned distractor tree
    assert len(edges) - ops >= 0
    answer = sorted((x for x, v in values.items() if v == asked), key=lambda x: int(x[1:]))
    assert answer, "the asked value must be held by some variable"
    return ", ".join(answer) + ".", ops


_ENT = r"(\w+ \w+)"
_REF = r"(the number of \w+ in \w+ \w+|the total number of \w+ in \w+ \w+)"


def _ref(s: str) -> tuple:
    if m := re.fullmatch(r"the total number of (\w+) in (\w+ \w+)", s):
        return ("total", m.group(2))
    m = re.fullmatch(r"the number of (\w+) in (\w+ \w+)", s)
    return (m.group(1), m.group(2))


def solve_realistic(text: str) -> tuple[str, int]:
    """The answer ('7.') and the number of operations the question depends on, from the sentences alone.

    "The total number of <category> in E" is the sum of every quantity stated for E.
    """
    question, sentences, _ = split_text(text)
    defs: dict[tuple, tuple] = {}  # (item, entity) -> (op, const, [refs])
    for s in sentences:
        if m := (re.fullmatch(rf"{_ENT} has (\d+) (\w+)", s)):
            key, d = (m.group(3), m.group(1)), ("leaf", int(m.group(2)), [])
        elif m := re.fullmatch(rf"There are (\d+) (\w+) in {_ENT}", s):
            key, d = (m.group(2), m.group(3)), ("leaf", int(m.group(1)), [])
        elif m := re.fullmatch(rf"The number of (\w+) in {_ENT} is (\d+)", s):
            key, d = (m.group(1), m.group(2)), ("leaf", int(m.group(3)), [])
        elif m := re.fullmatch(rf"The number of (\w+) in {_ENT} is (\d+) (more than|fewer than|times) {_REF}", s):
            op = {"more than": "add", "fewer than": "sub", "times": "mul"}[m.group(4)]
            key, d = (m.group(1), m.group(2)), (op, int(m.group(3)), [_ref(m.group(5))])
        elif m := re.fullmatch(rf"The number of (\w+) in {_ENT} equals the sum of {_REF} and {_REF}", s):
            key, d = (m.group(1), m.group(2)), ("sum", 0, [_ref(m.group(3)), _ref(m.group(4))])
        elif m := re.fullmatch(rf"The number of (\w+) in {_ENT} equals {_REF} minus {_REF}", s):
            key, d = (m.group(1), m.group(2)), ("diff", 0, [_ref(m.group(3)), _ref(m.group(4))])
        else:
            raise AssertionError(f"unparsed sentence {s!r}")
        assert key not in defs, f"{key} stated twice"
        defs[key] = d

    memo: dict[tuple, int] = {}
    used_ops: set[tuple] = set()

    def value(ref: tuple) -> int:
        if ref in memo:
            return memo[ref]
        if ref[0] == "total":
            parts = [k for k in defs if k[1] == ref[1]]
            assert len(parts) >= 2
            v = sum(value(k) for k in parts)
            used_ops.add(ref)  # a total of two quantities is one operation
            assert len(parts) == 2
        else:
            op, c, args = defs[ref]
            xs = [value(a) for a in args]
            v = {"leaf": lambda: c, "add": lambda: xs[0] + c, "sub": lambda: xs[0] - c, "mul": lambda: xs[0] * c,
                 "sum": lambda: xs[0] + xs[1], "diff": lambda: xs[0] - xs[1]}[op]()
            if op != "leaf":
                used_ops.add(ref)
        assert v >= 0, (ref, v)
        memo[ref] = v
        return v

    if m := re.fullmatch(rf"Question: how many (\w+) are in {_ENT} in total\?", question):
        target = ("total", m.group(2))
    else:
        m = re.fullmatch(rf"Question: how many (\w+) are in {_ENT}\?", question)
        assert m, question
        target = (m.group(1), m.group(2))
    return f"{value(target)}.", len(used_ops)


def eval_graph(graph: dict) -> int:
    """Evaluate the generator's machine-readable side channel (realistic) independently."""
    nodes = graph["nodes"]

    def value(name: str) -> int:
        n = nodes[name]
        xs = [value(a) for a in n["args"]]
        return {"leaf": lambda: n["value"], "add": lambda: xs[0] + n["const"], "sub": lambda: xs[0] - n["const"],
                "mul": lambda: xs[0] * n["const"], "sum": lambda: sum(xs), "total": lambda: sum(xs),
                "diff": lambda: xs[0] - xs[1]}[n["op"]]()

    return value(graph["root"])


def check_layout(task: GSMInfinite, data: dict) -> list[tuple[str, str]]:
    """Every example: inside the token range, right-padded, targets = the answer tokens (shifted) only.

    Returns (full text, answer text) per example, decoded with the task's tokenizer."""
    tok = task.tokenizer_object
    ids, tg, lengths = data["input_ids"], data["targets"], data["length"]
    assert ids.shape == tg.shape == (len(lengths), task.seq_len) and task.seq_len == task.max_tokens
    assert ids.dtype == tg.dtype == data["op"].dtype == torch.long
    out = []
    for row, trow, L in zip(ids.tolist(), tg.tolist(), lengths.tolist()):
        assert task.min_tokens <= L <= task.max_tokens
        assert all(t == task.pad_id for t in row[L:])
        assert all(t == IGNORE_INDEX for t in trow[L - 1:])
        pos = [i for i, t in enumerate(trow) if t != IGNORE_INDEX]
        assert pos == list(range(pos[0], L - 1))  # one contiguous run ending at the last token
        assert [trow[i] for i in pos] == row[pos[0] + 1:L]  # target at t = token at t + 1
        prompt, answer = tok.decode(row[:pos[0] + 1]), tok.decode(row[pos[0] + 1:L])
        assert prompt.endswith("Answer:") and answer.endswith(".")
        out.append((tok.decode(row[:L]), answer.strip()))
    return out


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    """A small byte-level BPE tokenizer.json trained here on generated text of both families."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    texts = [r.text for fam in ("symbolic", "realistic")
             for r in GSMInfinite(fam, min_tokens=300, max_tokens=400).texts(60, seed=0)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def symbolic():
    return GSMInfinite()


@pytest.fixture(scope="module")
def realistic():
    return GSMInfinite(**REALISTIC)


# ---------------------------------------------------------------------------------------- tokenizer
def test_word_tokenizer_round_trip_and_unknowns():
    tok = load_tokenizer("builtin", words=["assign", "v1", "=", "5", ".", "Answer", ":", ","])
    assert isinstance(tok, WordTokenizer) and tok.vocab[:2] == ["<pad>", "<unk>"] and tok.pad_id == 0
    assert tok.encode("assign v1 = 5.") == [2, 3, 4, 5, 6]
    assert tok.decode([2, 3, 4, 5, 6]) == "assign v1 = 5."
    assert tok.decode(tok.encode("Answer: v1, v1.")) == "Answer: v1, v1."
    assert tok.encode("assign v2") == [2, 1]  # unknown word -> <unk>
    assert tok.encode("assign v1") + tok.encode("= 5.") == tok.encode("assign v1 = 5.")  # additive
    assert tok.vocab_size == 10
    with pytest.raises(SleepzooError, match="words"):
        load_tokenizer("builtin")
    with pytest.raises(SleepzooError, match="single word"):
        WordTokenizer(["two words"])


def test_json_tokenizer_loading(bpe_path, tmp_path):
    tok = load_tokenizer(bpe_path)
    assert isinstance(tok, JsonTokenizer)
    assert tok.vocab[tok.pad_id] == "<pad>" and tok.vocab_size == len(tok.vocab) == 320
    text = "Question: which variables equal 6? assign v3 = 5."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "v9"]) == [tok.encode(text), tok.encode("v9")]
    # A directory holding tokenizer.json (a model directory) works too.
    import os
    assert load_tokenizer(os.path.dirname(bpe_path)).encode(text) == tok.encode(text)
    missing = str(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(SleepzooError, match="tokenizer") as info:
        load_tokenizer(missing)
    assert missing in str(info.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SleepzooError, match="could not read"):
        load_tokenizer(str(bad))


# --------------------------------------------------------------------------------------- solvers
@pytest.mark.parametrize("split", ["train", "test"])
def test_symbolic_answers_match_independent_solver(symbolic, split):
    data = symbolic.generate(400 if split == "train" else 240, seed=3, split=split)
    for (text, answer), op in zip(check_layout(symbolic, data), data["op"].tolist()):
        want, ops = solve_symbolic(text)
        assert answer == want, text
        assert ops == op, text


@pytest.mark.parametrize("split", ["train", "test"])
def test_realistic_answers_match_independent_solver(realistic, split):
    data = realistic.generate(300 if split == "train" else 160, seed=4, split=split)
    for (text, answer), op in zip(check_layout(realistic, data), data["op"].tolist()):
        want, ops = solve_realistic(text)
        assert answer == want, text
        assert ops == op, text
    # The side channel agrees with the text, and texts() is exactly what generate() encodes.
    rendered = realistic.texts(100, seed=4, split=split)
    for ex, row, L in zip(rendered, data["input_ids"], data["length"]):
        assert f"{eval_graph(ex.graph)}." == ex.answer.strip() == solve_realistic(ex.text)[0]
        assert ex.prompt_ids + ex.answer_ids == row[:L].tolist()


def test_symbolic_side_channel(symbolic):
    for ex in symbolic.texts(100, seed=5):
        values = dict(ex.graph["assign"])
        for child, parent, delta in ex.graph["edges"]:  # edges come parent first
            values[child] = values[parent] + delta
        want = sorted((x for x, v in values.items() if v == ex.graph["query"]), key=lambda x: int(x[1:]))
        assert want == ex.graph["answer"] and ex.answer == " " + ", ".join(want) + "."
        assert len(ex.graph["edges"]) == ex.op


def test_text_is_canonical_for_builtin(symbolic, realistic):
    # Decoding the builtin tokens gives back the generated text exactly; nothing is <unk>.
    for task in (symbolic, realistic):
        for ex in task.texts(50, seed=6):
            ids = ex.prompt_ids + ex.answer_ids
            assert 1 not in ids  # <unk>
            assert task.tokenizer_object.decode(ids) == ex.text
            assert ex.text.startswith("Question: ")  # the question comes before the context


# ------------------------------------------------------------------------------------ lengths, seeds
@pytest.mark.parametrize("family,max_op,lo,hi", [("symbolic", 8, 100, 160), ("symbolic", 4, 60, 64),
                                                ("realistic", 8, 260, 340), ("realistic", 3, 130, 140)])
def test_lengths_inside_range_builtin(family, max_op, lo, hi):
    task = GSMInfinite(family, min_op=1, max_op=max_op, min_tokens=lo, max_tokens=hi)
    data = task.generate(300, seed=1)
    lengths = data["length"]
    assert lo <= lengths.min() and lengths.max() <= hi
    assert (data["input_ids"] != task.pad_id).sum(1).equal(lengths)
    if hi - lo > 20:  # the target length is uniform in the range: both ends are reached
        assert lengths.min() < lo + (hi - lo) / 4 and lengths.max() > hi - (hi - lo) / 4


@pytest.mark.parametrize("family,max_op,lo,hi", [("symbolic", 8, 150, 220), ("realistic", 4, 380, 460)])
def test_lengths_inside_range_json_tokenizer(bpe_path, family, max_op, lo, hi):
    task = GSMInfinite(family, max_op=max_op, min_tokens=lo, max_tokens=hi, tokenizer=bpe_path)
    assert task.vocab_size == 320 and task.pad_id == task.vocab.index("<pad>")
    data = task.generate(120, seed=2)
    solve = solve_symbolic if family == "symbolic" else solve_realistic
    for text, answer in check_layout(task, data):
        assert solve(text)[0] == answer
    for ex in task.texts(40, seed=2):  # the lengths are of the real encoding of the whole text
        assert lo <= len(task.tokenizer_object.encode(ex.prompt)) + len(ex.answer_ids) <= hi


def test_deterministic_by_seed(symbolic, realistic):
    for task in (symbolic, realistic):
        a, b = task.generate(64, seed=5), task.generate(64, seed=5)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not torch.equal(a["input_ids"], task.generate(64, seed=6)["input_ids"])
        assert not torch.equal(a["input_ids"], task.generate(64, seed=5, split="test")["input_ids"])
        np.random.seed(1)
        torch.manual_seed(1)
        fresh = GSMInfinite(**task.config())
        assert torch.equal(a["input_ids"], fresh.generate(64, seed=5)["input_ids"])
        # smaller requests are prefixes of larger ones, in both splits
        assert torch.equal(task.generate(300, seed=5)["input_ids"][:64], a["input_ids"])
        t = task.generate(40, seed=5, split="test")["input_ids"]
        assert torch.equal(task.generate(16, seed=5, split="test")["input_ids"], t[:16])


def test_train_and_test_never_overlap():
    # A tiny problem space (3 variable names, values 0..4, one operation, no room for distractors): the
    # training split would hit every problem without the structural split.
    task = GSMInfinite(min_op=1, max_op=1, num_vars=3, max_value=4, min_tokens=15, max_tokens=30, test_per_op=400)
    train = task.generate(3000, seed=0)
    test = task.generate(300, seed=1, split="test")
    rows = lambda d: {tuple(r) for r in d["input_ids"].tolist()}
    tr, te = rows(train), rows(test)
    assert len(tr) > 20 and len(te) > 2
    assert not tr & te
    # problems, not only token rows: no answer+statement set is shared
    canon = lambda task, d: {(solve_symbolic(t)[0], frozenset(split_text(t)[1]), split_text(t)[0])
                             for t, _ in check_layout(task, d)}
    assert not canon(task, train) & canon(task, test)
    # and the default task, with different seeds on each side
    task = GSMInfinite(max_op=2)
    assert not rows(task.generate(2000, seed=1)) & rows(task.generate(400, seed=2, split="test"))


def test_op_is_uniform_in_training():
    task = GSMInfinite(min_op=1, max_op=8)
    ops = task.generate(2400, seed=0)["op"]
    counts = np.bincount(ops.numpy(), minlength=9)[1:]
    assert counts.sum() == 2400 and counts.min() > 0
    expected = 2400 / 8
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 24.3, counts  # 7 degrees of freedom, p = 0.001


def test_test_split_has_test_per_op_problems_per_op():
    task = GSMInfinite(min_op=2, max_op=5, test_per_op=30)
    assert task.test_size == 120
    data = task.generate(120, seed=0, split="test")
    assert data["op"].tolist() == [2 + i % 4 for i in range(120)]
    assert Counter(data["op"].tolist()) == {2: 30, 3: 30, 4: 30, 5: 30}
    assert task.generate(6, seed=0, split="test")["op"].tolist() == [2, 3, 4, 5, 2, 3]
    with pytest.raises(SleepzooError, match="test_per_op"):
        task.generate(121, seed=0, split="test")
    # the paper's setting: 200 per op, 1600 in all for ops 1..8
    assert GSMInfinite().test_size == 1600


# ------------------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize("kwargs,field", [
    ({"min_op": 0}, "min_op"), ({"max_op": MAX_OP + 1}, "max_op"), ({"min_op": 5, "max_op": 3}, "max_op"),
    ({"family": "poetry"}, "family"), ({"tokenizer": "/no/such/dir/tokenizer.json"}, "tokenizer"),
    ({"min_tokens": 10, "max_tokens": 20}, "max_tokens"), ({"min_tokens": 50, "max_tokens": 40}, "max_tokens"),
    ({"family": "realistic"}, "max_tokens"),  # op 8 word problems need ~300 builtin tokens
    ({"min_op": 1.5}, "min_op"), ({"test_per_op": 0}, "test_per_op"), ({"max_value": 2}, "max_value"),
])
def test_bad_config_is_one_clear_error(kwargs, field):
    with pytest.raises(SleepzooError) as info:
        GSMInfinite(**kwargs)
    msg = str(info.value)
    assert field in msg, msg
    if field == "tokenizer":
        assert "/no/such/dir/tokenizer.json" in msg


def test_range_that_cannot_be_filled_is_an_error():
    # 12 variable names leave room for ~9 distractor statements: 300 tokens cannot be reached.
    with pytest.raises(SleepzooError, match="num_vars"):
        GSMInfinite(num_vars=12, min_tokens=300, max_tokens=320)
    # a range narrower than the statement lengths can match
    with pytest.raises(SleepzooError, match="min_tokens/max_tokens"):
        GSMInfinite(min_op=1, max_op=1, min_tokens=101, max_tokens=101)


@pytest.mark.parametrize("kwargs,arg", [({"num_examples": -1, "seed": 0}, "num_examples"),
                                        ({"num_examples": 2, "seed": -1}, "seed"),
                                        ({"num_examples": 2, "seed": 0, "split": "dev"}, "split")])
def test_bad_generate_arguments(symbolic, kwargs, arg):
    with pytest.raises(SleepzooError, match=arg):
        symbolic.generate(**kwargs)


def test_constructor_is_recipe_friendly_and_describes(symbolic):
    for name, p in inspect.signature(GSMInfinite).parameters.items():
        assert p.annotation is not inspect.Parameter.empty, name
        assert p.default is not inspect.Parameter.empty, name
    d = symbolic.describe()
    assert d["name"] == "gsm_infinite" and d["seq_len"] == 160 and d["test_size"] == 1600
    assert d["tokenizer"]["class"] == "WordTokenizer" and d["vocab_size"] == symbolic.vocab_size == 347
    vocab = symbolic.vocab
    assert vocab[:9] == ["<pad>", "<unk>", ".", ",", "?", ":", "=", "+", "-"] and len(set(vocab)) == len(vocab)
    assert not any(c in w for w in vocab for c in "{}")  # template placeholders are not words
    assert {"v0", "v199", "0", "20", "Question", "Answer", "assign", "lions", "Zoo"} <= set(vocab)
    assert GSMInfinite(**d["config"]).generate(3, 0)["input_ids"].equal(symbolic.generate(3, 0)["input_ids"])
    assert issubclass(GSMInfinite, Task) and GSMInfinite.buckets == ("op",)
    assert symbolic.generate(0, seed=0)["input_ids"].shape == (0, 160)


def test_generation_is_fast(symbolic):
    start = time.perf_counter()
    symbolic.generate(1000, seed=9)
    symbolic.generate(400, seed=9, split="test")  # 8 candidate problems per test example
    assert time.perf_counter() - start < 4.0  # ~0.6 s on one busy core


def test_docstring_examples_are_real():
    task = GSMInfinite(min_op=2, max_op=2, min_tokens=40, max_tokens=50)
    d = task.generate(1, seed=0)
    doc = re.sub(r"\\\n", "", GSMInfinite.__doc__)
    assert task.decode(d["input_ids"][0], d["targets"][0]) in doc
    task = GSMInfinite("realistic", min_op=2, max_op=2, min_tokens=80, max_tokens=100)
    d = task.generate(1, seed=0)
    assert task.decode(d["input_ids"][0], d["targets"][0]) in doc


# ---------------------------------------------------------------------------------------- evaluate
class CheatModel(torch.nn.Module):
    """Predicts the targets it is handed, except on examples whose op is in ``wrong_ops``."""

    def __init__(self, task: GSMInfinite, wrong_ops: frozenset = frozenset()):
        super().__init__()
        self.task, self.wrong_ops = task, wrong_ops

    def forward(self, input_ids, targets, *, window=None, loops=None):
        v = self.task.vocab_size
        answer = targets.clone()
        if self.wrong_ops:
            for b in range(len(input_ids)):
                text = self.task.tokenizer_object.decode(input_ids[b].tolist())
                op = solve_symbolic(text.split(" Answer:")[0] + " Answer: x")[1]
                if op in self.wrong_ops:  # predict <unk> at the last answer token
                    last = int((targets[b] != IGNORE_INDEX).nonzero().max())
                    answer[b, last] = 1
        logits = torch.zeros(*input_ids.shape, v)
        mask = answer != IGNORE_INDEX
        logits[mask] = F.one_hot(answer[mask], v).float() * 20.0
        return SimpleNamespace(logits=logits, loss=None)


def test_evaluate_with_a_cheating_model():
    task = GSMInfinite(min_op=1, max_op=8, test_per_op=16)
    res = task.evaluate(CheatModel(task), batch_size=50)  # default: the whole test split
    assert res["num_examples"] == 128 and res["exact_accuracy"] == res["token_accuracy"] == 1.0
    assert res["loss"] < 1e-6 and res["auc_op"] == 1.0
    by_op = res["buckets"]["op"]
    assert sorted(by_op, key=int) == [str(o) for o in range(1, 9)]
    assert all(b["exact_accuracy"] == 1.0 and b["num_examples"] == 16 for b in by_op.values())
    # wrong from op 5 on (solved from the text): accuracy 1,1,1,1,0,0,0,0 -> area 3.5 over a range of 7
    res = task.evaluate(CheatModel(task, frozenset({5, 6, 7, 8})), num_examples=64, batch_size=64)
    assert res["exact_accuracy"] == 0.5 and res["auc_op"] == pytest.approx(0.5)
    assert [res["buckets"]["op"][str(o)]["exact_accuracy"] for o in range(1, 9)] == [1.0] * 4 + [0.0] * 4
    assert all(res["buckets"]["op"][str(o)]["num_examples"] == 8 for o in range(1, 9))


def test_auc_over_op():
    op = torch.tensor([2, 2, 4, 4, 6, 6])
    assert auc_over_op(op, torch.tensor([1, 1, 1, 0, 0, 0])) == pytest.approx((0.75 * 2 + 0.25 * 2) / 4)
    assert auc_over_op(torch.tensor([3, 3]), torch.tensor([1, 0])) == 0.5


# ------------------------------------------------------------------------------------------ recipe
def test_tiny_recipe_builds_and_trains_a_step():
    import sleepzoo
    registered = "gsm_infinite" not in registry.names("task")
    if registered:
        registry.register("task", "gsm_infinite")(GSMInfinite)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend on a busy machine
    try:
        recipe = sleepzoo.load_recipe("recipes/gsm-infinite-tiny.yaml")
        task = sleepzoo.build_task(recipe)
        model = sleepzoo.build_model(recipe, vocab_size=task.vocab_size)
        assert isinstance(task, GSMInfinite) and task.family == "symbolic"
        assert recipe.sleep.window < task.min_tokens  # the context spans several windows
        batch = task.generate(4, seed=0)
        out = model(batch["input_ids"], batch["targets"])
        assert out.logits.shape[:2] == (4, task.seq_len) and out.logits.shape[2] >= task.vocab_size
        assert torch.isfinite(out.loss)
        out.loss.backward()
    finally:
        torch.set_num_threads(threads)
        if registered:
            registry.unregister("task", "gsm_infinite")

