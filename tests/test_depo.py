"""Tests of the Depo task (SPEC 2): multi-hop retrieval over a shuffled directed cycle.

Answers are checked by an independent solver written here: it reads the edge list back from the token
strings, builds a successor dict and walks it, so it shares nothing with the vectorised generator.
"""

from __future__ import annotations

import inspect
import math
import re
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sleepzoo
from sleepzoo import registry
from sleepzoo.registry import SleepzooError
from sleepzoo.tasks import Task
from sleepzoo.tasks.depo import Depo, eval_hop_set

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
HOP = re.compile(r"^<hop_(\d+)>$")


# ----------------------------------------------------------------------------------- reference solver
def parse(task: Depo, ids: torch.Tensor) -> tuple[dict[str, str], list[tuple[int, str, str]], int]:
    """(successor dict, [(k, x, y)] queries as written, position of the first edge token) of one example.

    Reads the context strictly: ``<pad>``s, then only ``x -> y ,`` groups up to the end of the context.
    """
    tokens = [task.vocab[i] for i in ids.tolist()]
    context, queries = tokens[:task.context_len], tokens[task.context_len:]
    first = next(i for i, t in enumerate(context) if t != "<pad>")
    assert all(t == "<pad>" for t in context[:first])
    edges = context[first:]
    assert len(edges) % 4 == 0
    succ: dict[str, str] = {}
    for j in range(0, len(edges), 4):
        x, arrow, y, comma = edges[j:j + 4]
        assert (arrow, comma) == ("->", ",") and x.startswith("v") and y.startswith("v")
        assert x not in succ, "a node with two outgoing edges"
        succ[x] = y
    items = []
    for j in range(0, task.num_queries * 4, 4):
        hop, x, colon, y = queries[j:j + 4]
        assert HOP.match(hop) and colon == ":"
        items.append((int(HOP.match(hop).group(1)), x, y))
    assert all(t == "<pad>" for t in queries[task.num_queries * 4:])
    return succ, items, first


def walk(succ: dict[str, str], x: str, k: int) -> str:
    for _ in range(k):
        x = succ[x]
    return x


def is_single_cycle(succ: dict[str, str]) -> bool:
    """Every node has one successor, successors are distinct nodes of the dict, and one orbit visits all."""
    if set(succ.values()) != set(succ):
        return False
    start = next(iter(succ))
    seen, x = {start}, succ[start]
    while x != start:
        if x in seen:
            return False
        seen.add(x)
        x = succ[x]
    return len(seen) == len(succ)


CONFIGS = [
    {},  # the paper's sizes
    {"max_nodes": 12, "context_len": 48, "query_len": 12, "num_queries": 3, "max_hops": 8, "node_vocab": 16},
    {"max_nodes": 6, "min_nodes": 2, "context_len": 30, "query_len": 20, "num_queries": 5, "max_hops": 13,
     "node_vocab": 6},  # k well beyond n: walks wrap around; every name in every cycle
]


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_match_reference_solver(kwargs, split):
    task = Depo(**kwargs)
    data = task.generate(300, seed=11, split=split)
    ids, tg = data["input_ids"], data["targets"]
    assert ids.shape == tg.shape == (300, task.seq_len)
    for i in range(300):
        succ, items, first = parse(task, ids[i])
        n = len(succ)
        assert is_single_cycle(succ)
        assert task.min_nodes <= n <= task.max_nodes and n == int(data["num_nodes"][i])
        assert first == task.context_len - 4 * n  # left-padded: the edges end exactly at the context's end
        if split == "test":
            assert n == task.max_nodes
        for q, (k, x, y) in enumerate(items):
            pos = task.context_len + 4 * q + 2  # the ':' of query q
            assert task.vocab[ids[i, pos]] == ":"
            assert task.vocab[tg[i, pos]] == walk(succ, x, k) == y
            assert 1 <= k <= task.max_hops and k == int(data["hops"][i, q])
        # The only targets are the answers.
        mask = tg[i] != -100
        assert mask.nonzero().flatten().tolist() == task.answer_positions
        starts = [x for _, x, _ in items]
        if n >= task.num_queries:
            assert len(set(starts)) == len(starts)  # no query repeats an earlier one


def test_hand_made_example_reads_back():
    # The docstring's test example: cycle v2 -> v3 -> v5 -> v4 -> v6 -> v2, 4 hops.
    task = Depo(max_nodes=5, context_len=24, query_len=8, num_queries=2, max_hops=4, node_vocab=8)
    data = task.generate(3, seed=0, split="test")
    succ, items, _ = parse(task, data["input_ids"][2])
    assert succ == {"v2": "v3", "v3": "v5", "v5": "v4", "v4": "v6", "v6": "v2"}
    assert items == [(4, "v3", "v2"), (4, "v5", "v3")]


# ---------------------------------------------------------------------------------------- layout
def test_layout_and_vocab():
    task = Depo()
    assert (task.seq_len, task.window, task.pad_id) == (360, 75, 0)
    assert task.vocab[:4] == ["<pad>", "->", ",", ":"]
    assert task.vocab[4:20] == [f"<hop_{k}>" for k in range(1, 17)]
    assert task.vocab[20:] == [f"v{i}" for i in range(100)] and task.vocab_size == 120
    assert task.answer_positions == [302 + 4 * i for i in range(10)]
    assert task.hop_token(16) == task.vocab.index("<hop_16>") and task.node_token(7) == task.vocab.index("v7")
    data = task.generate(500, seed=0)
    ids = data["input_ids"]
    assert ids.dtype == torch.long and ids.min() >= 0 and ids.max() < task.vocab_size
    # Every edge token sits in the first context_len = 4 windows of L = 75 tokens, i.e. before the queries.
    edge_tokens = (ids == task.vocab.index("->")) | (ids == task.vocab.index(","))
    assert not edge_tokens[:, task.context_len:].any()
    assert (edge_tokens.sum(1) == 2 * data["num_nodes"]).all()
    # Query block: hop token, node, ':', node; then 20 pads.
    q = ids[:, 300:340].view(500, 10, 4)
    assert ((q[..., 0] >= 4) & (q[..., 0] < 20)).all() and (q[..., 2] == 3).all()
    assert (q[..., 1] >= 20).all() and (q[..., 3] >= 20).all()
    assert (ids[:, 340:] == 0).all()
    assert data["k"].tolist() == [-1] * 500  # training examples mix hop counts
    assert data["hops"].shape == (500, 10) and data["num_nodes"].shape == (500,)
    for key in ("k", "hops", "num_nodes"):
        assert data[key].dtype == torch.long


def test_answer_follows_as_input_token():
    # Teacher forcing: the token after each ':' is the answer that was the target at the ':'.
    task = Depo()
    data = task.generate(200, seed=3, split="test")
    pos = task.answer_positions
    assert torch.equal(data["targets"][:, pos], data["input_ids"][:, [p + 1 for p in pos]])


def test_generate_zero_examples():
    task = Depo()
    for split in ("train", "test"):
        data = task.generate(0, seed=0, split=split)
        assert data["input_ids"].shape == (0, 360) and data["k"].shape == (0,)


def test_eval_hop_set():
    assert eval_hop_set(16) == [1, 2, 4, 8, 16]
    assert eval_hop_set(8) == [1, 2, 4, 8]
    assert eval_hop_set(12) == [1, 2, 4, 8, 12]
    assert eval_hop_set(1) == [1]
    assert eval_hop_set(3) == [1, 2, 3]
    assert Depo(max_hops=5).test_hops == [1, 2, 4, 5]


# ------------------------------------------------------------------------------ determinism, split
def test_deterministic_by_seed_and_split():
    task = Depo()
    a, b = task.generate(100, seed=5), task.generate(100, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], task.generate(100, seed=6)["input_ids"])
    assert not torch.equal(a["input_ids"], task.generate(100, seed=5, split="test")["input_ids"])
    np.random.seed(1)
    torch.manual_seed(1)
    c = Depo().generate(100, seed=5)
    assert torch.equal(a["input_ids"], c["input_ids"]) and torch.equal(a["targets"], c["targets"])


def test_smaller_request_is_a_prefix():
    task = Depo(max_nodes=12, context_len=48, query_len=12, num_queries=3, max_hops=8, node_vocab=16)
    for split in ("train", "test"):
        big = task.generate(5000, seed=2, split=split)
        small = task.generate(37, seed=2, split=split)
        assert all(torch.equal(big[k][:37], small[k]) for k in small)


def test_train_and_test_never_overlap():
    # A tiny space (3-node cycles over 5 names, 1 query, k in 1..2): 20 cycles x 3 starts = 60 split keys
    # and 720 distinct examples, so 20k training draws hit nearly all of the training ones.
    task = Depo(max_nodes=3, min_nodes=3, context_len=12, query_len=4, num_queries=1, max_hops=2, node_vocab=5)
    train = {tuple(r) for r in task.generate(20_000, seed=0, split="train")["input_ids"].tolist()}
    test = {tuple(r) for r in task.generate(3_000, seed=0, split="test")["input_ids"].tolist()}
    assert train and test and not train & test
    assert len(train | test) == 720  # nothing lost: the splits partition the example space
    assert 0.03 < len(test) / 720 < 0.3  # about 1 in 8 of it

    def keys(rows):  # (cycle, start) of each example, read back from the tokens
        out = set()
        for r in rows:
            succ, items, _ = parse(task, torch.tensor(r))
            out.add((frozenset(succ.items()), items[0][1]))
        return out

    assert not keys(train) & keys(test)  # structural: a test cycle + start never appears in training
    # The default task, different seeds on each side.
    task = Depo()
    train = {tuple(r) for r in task.generate(3000, seed=1)["input_ids"].tolist()}
    test = {tuple(r) for r in task.generate(1000, seed=2, split="test")["input_ids"].tolist()}
    assert not train & test


def test_split_key_ignores_edge_order():
    task = Depo(max_nodes=6, context_len=24, query_len=8, num_queries=2, max_hops=4, node_vocab=10)
    task._drawing = "train"
    content = task._draw(np.random.default_rng(0), 50)
    shuffled = dict(content)
    shuffled["order"] = content["order"].copy()
    n = content["n"]
    for i in range(50):  # another written order of the same edges
        shuffled["order"][i, :n[i]] = np.roll(content["order"][i, :n[i]], 1)
    np.testing.assert_array_equal(task.is_test(shuffled), task.is_test(content))
    np.testing.assert_array_equal(task._split_key(shuffled), task._split_key(content))


# --------------------------------------------------------------------------------- distributions
def chi2_threshold(df: int, z: float = 4.0) -> float:
    """Upper-tail critical value of chi-square (~3e-5 tail for z = 4), Wilson-Hilferty approximation."""
    try:
        from scipy.stats import chi2  # type: ignore[import-not-found]
        return float(chi2.isf(3.17e-5, df))
    except ImportError:
        c = 2.0 / (9.0 * df)
        return df * (1.0 - c + z * math.sqrt(c)) ** 3


def assert_fits(counts: dict[int, int], probs: dict[int, float]):
    total = sum(counts.values())
    assert set(counts) <= set(probs)
    stat = sum((counts.get(v, 0) - total * p) ** 2 / (total * p) for v, p in probs.items())
    assert stat < chi2_threshold(len(probs) - 1), stat
    for v, p in probs.items():  # and no single bin far off (5 sigma)
        assert abs(counts.get(v, 0) - total * p) < 5 * math.sqrt(total * p * (1 - p)) + 1, v


def test_training_distributions():
    task = Depo()
    data = task.generate(20_000, seed=0)
    # n: P(n) proportional to 1 / (n + sqrt(75)) on [3, 75].
    w = {n: 1.0 / (n + math.sqrt(75)) for n in range(3, 76)}
    z = sum(w.values())
    want = {n: v / z for n, v in w.items()}
    assert task.size_distribution() == pytest.approx(want)
    assert_fits(Counter(data["num_nodes"].tolist()), want)
    # k: uniform on [1, 16], per query.
    hops = data["hops"].flatten().tolist()
    assert_fits(Counter(hops), {k: 1 / 16 for k in range(1, 17)})
    # The queries' hop tokens say the same.
    q = data["input_ids"][:, 300:340].view(-1, 10, 4)[..., 0] - 3
    assert torch.equal(q, data["hops"])


def test_test_split_sizes_and_equal_hop_shares():
    task = Depo()
    data = task.generate(1000, seed=0, split="test")
    assert (data["num_nodes"] == 75).all()
    k = data["k"]
    assert Counter(k.tolist()) == {1: 200, 2: 200, 4: 200, 8: 200, 16: 200}
    assert torch.equal(data["hops"], k[:, None].expand(-1, 10))  # one k for every query of an example
    assert k[:7].tolist() == [1, 2, 4, 8, 16, 1, 2]
    odd = Depo(max_nodes=12, context_len=48, query_len=12, num_queries=3, max_hops=6, node_vocab=16)
    shares = Counter(odd.generate(402, seed=1, split="test")["k"].tolist())
    assert shares == {1: 101, 2: 101, 4: 100, 6: 100}


def test_generation_is_fast():
    task = Depo()
    start = time.perf_counter()
    task.generate(10_000, seed=0)
    task.generate(10_000, seed=0, split="test")  # draws ~8x as many candidates
    assert time.perf_counter() - start < 10.0  # ~1.5 s on one busy core


# ----------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("kwargs,words", [
    ({"max_hops": 0}, ["max_hops", "0", ">= 1"]),
    ({"min_nodes": 1}, ["min_nodes", "1", ">= 2"]),
    ({"max_nodes": 2, "min_nodes": 3}, ["max_nodes=2", "min_nodes=3"]),
    ({"context_len": 200}, ["context_len=200", "75-node cycle", "300 tokens", "context_len >= 300",
                            "max_nodes <= 50"]),
    ({"query_len": 30}, ["query_len=30", "10 queries", "40 tokens", "query_len >= 40", "num_queries <= 7"]),
    ({"node_vocab": 50}, ["node_vocab=50", "max_nodes=75", "node_vocab >= 75"]),
    ({"num_queries": 0}, ["num_queries", ">= 1"]),
    ({"max_nodes": 7.5}, ["max_nodes", "7.5"]),
    ({"max_hops": True}, ["max_hops", "True"]),
    ({"context_len": "300"}, ["context_len", "'300'"]),
])
def test_bad_config_is_one_clear_error(kwargs, words):
    with pytest.raises(SleepzooError) as info:
        Depo(**kwargs)
    for w in words:
        assert w in str(info.value)


def test_constructor_is_recipe_friendly():
    params = inspect.signature(Depo).parameters
    assert list(params) == ["max_nodes", "min_nodes", "context_len", "query_len", "num_queries", "max_hops",
                            "node_vocab"]
    for name, p in params.items():
        assert p.annotation is not inspect.Parameter.empty, name
        assert p.default is not inspect.Parameter.empty, name


def test_describe_round_trips():
    task = Depo(max_nodes=10, context_len=44, query_len=12, num_queries=3, max_hops=5, node_vocab=12)
    d = task.describe()
    assert d["name"] == "depo" and d["class"] == "sleepzoo.tasks.depo:Depo"
    assert d["config"] == {"max_nodes": 10, "min_nodes": 3, "context_len": 44, "query_len": 12,
                           "num_queries": 3, "max_hops": 5, "node_vocab": 12}
    assert (d["seq_len"], d["window"], d["test_hops"]) == (56, 11, [1, 2, 4, 5])
    assert Depo(**d["config"]).generate(5, 1)["input_ids"].equal(task.generate(5, 1)["input_ids"])
    assert repr(task).startswith("Depo(max_nodes=10, min_nodes=3,") and issubclass(Depo, Task)


def test_docstring_examples_are_real():
    task = Depo(max_nodes=5, context_len=24, query_len=8, num_queries=2, max_hops=4, node_vocab=8)
    data = task.generate(2, seed=0)
    assert task.decode(data["input_ids"], data["targets"]).split("\n") == [
        "<pad>*8 v1 -> v5 , v6 -> v1 , v3 -> v6 , v5 -> v3 , | <hop_1> v5 :=>v3 v3 <hop_1> v1 :=>v5 v5",
        "<pad>*12 v7 -> v3 , v3 -> v4 , v4 -> v7 , | <hop_2> v4 :=>v3 v3 <hop_3> v3 :=>v3 v3"]
    assert data["input_ids"][0].tolist() == [0] * 8 + [9, 1, 13, 2, 14, 1, 9, 2, 11, 1, 14, 2, 13, 1, 11, 2,
                                                       4, 13, 3, 11, 4, 9, 3, 13]
    data = task.generate(3, seed=0, split="test")
    assert task.decode(data["input_ids"], data["targets"]).split("\n") == [
        "<pad>*4 v6 -> v4 , v4 -> v0 , v5 -> v6 , v0 -> v2 , v2 -> v5 , | <hop_1> v4 :=>v0 v0 <hop_1> v0 :=>v2 v2",
        "<pad>*4 v5 -> v7 , v0 -> v4 , v7 -> v0 , v2 -> v5 , v4 -> v2 , | <hop_2> v5 :=>v0 v0 <hop_2> v4 :=>v5 v5",
        "<pad>*4 v3 -> v5 , v2 -> v3 , v5 -> v4 , v4 -> v6 , v6 -> v2 , | <hop_4> v3 :=>v2 v2 <hop_4> v5 :=>v3 v3"]
    big = Depo()
    data = big.generate(1, seed=0, split="test")
    text = big.decode(data["input_ids"][0], data["targets"][0])
    assert text.startswith("v69 -> v78 , v18 -> v67 , ")
    assert "| <hop_1> v26 :=>v73 v73 <hop_1> v12 :=>v49 v49 " in text and text.endswith(" <pad>*20")


def test_decode_forms():
    task = Depo(max_nodes=5, context_len=24, query_len=8, num_queries=2, max_hops=4, node_vocab=8)
    ids = task.generate(1, seed=0)["input_ids"][0]
    assert task.decode(ids) == "<pad>*8 v1 -> v5 , v6 -> v1 , v3 -> v6 , v5 -> v3 , | <hop_1> v5 : v3 <hop_1> v1 : v5"
    assert task.decode(ids.tolist()) == task.decode(ids)
    assert task.decode([0, 0, 3, 999]) == "<pad> <pad> : <unk:999>"  # not a full example: generic form


# ---------------------------------------------------------------------------------------- evaluate
class CheatingModel(torch.nn.Module):
    """Puts a large logit on the target wherever there is one; wrong (answer = the start node) for ``bad_k``."""

    def __init__(self, task: Depo, bad_k: frozenset[int] = frozenset()):
        super().__init__()
        self.task, self.bad_k = task, bad_k

    def forward(self, input_ids, targets, *, window=None, loops=None):
        answer = targets.clone()
        for k in self.bad_k:
            rows = input_ids[:, self.task.context_len] == self.task.hop_token(k)
            for p in self.task.answer_positions:
                answer[rows, p] = input_ids[rows, p - 1]  # the start node: never the answer (k % n != 0)
        logits = torch.zeros(*input_ids.shape, self.task.vocab_size)
        mask = answer != -100
        logits[mask] = F.one_hot(answer[mask], self.task.vocab_size).float() * 30.0
        return SimpleNamespace(logits=logits, loss=None)


def test_evaluate_with_a_cheating_model():
    task = Depo()
    res = task.evaluate(CheatingModel(task), num_examples=250, batch_size=64)
    assert res["exact_accuracy"] == res["token_accuracy"] == 1.0 and res["loss"] < 1e-6
    assert res["num_targets"] == 2500
    by_k = res["buckets"]["k"]
    assert set(by_k) == {"1", "2", "4", "8", "16"}
    for b in by_k.values():
        assert b["num_examples"] == 50 and b["num_targets"] == 500
        assert b["token_accuracy"] == b["exact_accuracy"] == 1.0 and b["loss"] < 1e-6
    assert res["hop_accuracy"] == [1.0] * 5 and res["hop_accuracy_16"] == 1.0


def test_evaluate_reports_per_hop():
    task = Depo(max_nodes=12, context_len=48, query_len=12, num_queries=3, max_hops=8, node_vocab=16)
    res = task.evaluate(CheatingModel(task, bad_k=frozenset({4, 8})), num_examples=200, batch_size=50)
    by_k = res["buckets"]["k"]
    assert set(by_k) == {"1", "2", "4", "8"}
    assert [by_k[k]["token_accuracy"] for k in ("1", "2", "4", "8")] == [1.0, 1.0, 0.0, 0.0]
    assert by_k["1"]["loss"] < 1e-6 < 10 < by_k["8"]["loss"]
    assert res["hop_accuracy"] == [1.0, 1.0, 0.0, 0.0]
    assert (res["hop_accuracy_1"], res["hop_accuracy_4"]) == (1.0, 0.0)
    assert res["token_accuracy"] == 0.5 and res["exact_accuracy"] == 0.5


# ------------------------------------------------------------------------------ registry, recipes
@pytest.fixture
def depo_registered():
    """``task: depo`` resolvable whether or not the entry point is installed yet."""
    added = "depo" not in registry.names("task")
    if added:
        registry.register("task", "depo")(Depo)
    yield
    if added:
        registry.unregister("task", "depo")


def test_registry_gives_depo(depo_registered):
    assert registry.get("task", "depo") is Depo


@pytest.mark.parametrize("name", ["depo.yaml", "depo-tiny.yaml"])
def test_recipes_build(depo_registered, name):
    recipe = sleepzoo.load_recipe(RECIPES / name)
    task = sleepzoo.build_task(recipe)
    assert isinstance(task, Depo)
    assert recipe.sleep.window == task.window  # the cycle fills 4 windows and is evicted
    assert task.query_len <= recipe.sleep.window  # all queries in the last window
    assert task.context_len % recipe.sleep.window == 0
    with torch.device("meta"):
        model = sleepzoo.build_model(recipe, vocab_size=task.vocab_size)
    assert sum(p.numel() for p in model.parameters()) > 0
