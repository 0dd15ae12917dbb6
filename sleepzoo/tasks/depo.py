"""Depo: multi-hop retrieval over a directed cycle written as a shuffled edge list (SPEC 2; Physics of LMs 4.1)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sleepzoo.registry import SleepzooError
from sleepzoo.tasks.base import IGNORE_INDEX, Task, _check_int

#: Tokens per edge ``x -> y ,`` and per query ``<hop_k> x : y``.
TOKENS_PER_EDGE = 4
TOKENS_PER_QUERY = 4
# Fixed token ids (the hop tokens and node names follow them).
_PAD, _ARROW, _COMMA, _COLON = 0, 1, 2, 3
_FIRST_HOP = 4


def eval_hop_set(max_hops: int) -> list[int]:
    """The hop counts of the test split: powers of two up to ``max_hops``, plus ``max_hops`` itself.

    ``16 -> [1, 2, 4, 8, 16]`` (the paper's), ``12 -> [1, 2, 4, 8, 12]``, ``1 -> [1]``.
    """
    hops = [1 << i for i in range(max_hops.bit_length()) if (1 << i) <= max_hops]
    if hops[-1] != max_hops:
        hops.append(max_hops)
    return hops


class Depo(Task):
    """Depo (SPEC 2): follow ``k`` edges of a directed cycle that was only shown, shuffled, in evicted context.

    An example has two blocks, T = ``context_len + query_len`` tokens (360 by default):

    * **context** (``context_len`` tokens, 300): a directed cycle over ``n`` distinct nodes, written as its
      ``n`` edges ``x -> y ,`` (4 tokens each) in random order, left-padded with ``<pad>``. Node names are
      single tokens ``v0 .. v{node_vocab-1}``, drawn at random (without repetition) for every example.
    * **queries** (``query_len`` tokens, 60): ``num_queries`` items ``<hop_k> x : y`` (4 tokens each), then
      ``<pad>`` up to ``query_len``. ``y`` is the node reached from ``x`` after ``k`` hops along the cycle
      (``k`` may exceed ``n``: the walk wraps around). The only targets are the answers: the target at
      each ``:`` is ``y`` (targets are aligned with the inputs, see :mod:`sleepzoo.tasks.base`, so the
      model answers *at* ``:``; ``y`` then follows as an ordinary input token).

    Sizes. Training draws ``n`` in ``[min_nodes, max_nodes]`` with P(n) proportional to
    ``1 / (n + sqrt(max_nodes))`` and, for every query, ``k ~ U[1, max_hops]`` and a start node.
    The test split always has ``n = max_nodes`` and **one** ``k`` for all queries of an example, taken from
    :attr:`test_hops` (powers of two up to ``max_hops``, plus ``max_hops`` if it is not one; the paper's
    ``{1, 2, 4, 8, 16}``) in turn: test example ``i`` has ``k = test_hops[i % len(test_hops)]``, so each
    ``k`` has an equal share (to within one example). The start nodes of an example's queries are distinct
    when ``n >= num_queries`` (otherwise every node starts as evenly many queries as possible), so no query
    repeats an earlier one whose answer is still in the window.

    The suggested attention window (:attr:`window`) is ``context_len // 4`` (75 by default): the cycle
    spans the first 4 windows and is evicted before the queries, which (with ``query_len <= window``) all
    sit in the last window.

    Split. An example belongs to the test split iff the stable hash of its *cycle* (the successor of every
    node name, so it does not depend on the order the edges are written in) and its query start nodes falls
    in the test bucket. Hop counts are left out of the key: identical examples still always share a split
    (the key is coarser than the example), and the test split can then assign ``k`` by position.

    Built data: ``input_ids``, ``targets`` and, per example, ``k`` (LongTensor ``[n]``: the test example's
    hop count; ``-1`` for training examples, whose queries mix hop counts), ``hops`` (``[n, num_queries]``:
    every query's ``k``) and ``num_nodes`` (``[n]``). :meth:`~Task.evaluate` reports every metric per ``k``
    under ``result["buckets"]["k"]`` (the paper's metric is the test loss per ``k``) and adds
    ``hop_accuracy`` (answer accuracy per ``k``, in :attr:`test_hops` order) and the same values as
    ``hop_accuracy_{k}`` (suffix = the hop count ``k``).

    Vocabulary (token id = index): ``<pad> -> , : <hop_1> .. <hop_{max_hops}> v0 .. v{node_vocab-1}``.

    Example: ``task = Depo(max_nodes=5, context_len=24, query_len=8, num_queries=2, max_hops=4,
    node_vocab=8)``; ``task.generate(2, seed=0)`` decoded with its targets (``decode`` writes runs of
    ``<pad>`` as ``<pad>*N``, the context/query boundary as ``|`` and the target ``y`` at ``:`` as
    ``:=>y``)::

        <pad>*8 v1 -> v5 , v6 -> v1 , v3 -> v6 , v5 -> v3 , | <hop_1> v5 :=>v3 v3 <hop_1> v1 :=>v5 v5
        <pad>*12 v7 -> v3 , v3 -> v4 , v4 -> v7 , | <hop_2> v4 :=>v3 v3 <hop_3> v3 :=>v3 v3

    (the input ids of the first are ``0 0 0 0 0 0 0 0 9 1 13 2 14 1 9 2 11 1 14 2 13 1 11 2 4 13 3 11 4 9
    3 13``). The first cycle is v1 -> v5 -> v3 -> v6 -> v1 (4 nodes, left-padded by 8); the second is
    v7 -> v3 -> v4 -> v7, so 3 hops from v3 go once round and land on v3. The test split of the same task
    (``generate(3, seed=0, split="test")``) has 5 nodes and k = 1, 2, 4 in turn::

        <pad>*4 v6 -> v4 , v4 -> v0 , v5 -> v6 , v0 -> v2 , v2 -> v5 , | <hop_1> v4 :=>v0 v0 <hop_1> v0 :=>v2 v2
        <pad>*4 v5 -> v7 , v0 -> v4 , v7 -> v0 , v2 -> v5 , v4 -> v2 , | <hop_2> v5 :=>v0 v0 <hop_2> v4 :=>v5 v5
        <pad>*4 v3 -> v5 , v2 -> v3 , v5 -> v4 , v4 -> v6 , v6 -> v2 , | <hop_4> v3 :=>v2 v2 <hop_4> v5 :=>v3 v3

    With the defaults (n = 75 of 100 names, 10 queries, T = 360) a test example is 300 context tokens of
    75 edges ``v69 -> v78 , v18 -> v67 , ...`` (no padding at n = 75), then
    ``| <hop_1> v26 :=>v73 v73 <hop_1> v12 :=>v49 v49 ... <pad>*20``.
    """

    name = "depo"
    buckets = ("k",)

    def __init__(self, max_nodes: int = 75, min_nodes: int = 3, context_len: int = 300, query_len: int = 60,
                 num_queries: int = 10, max_hops: int = 16, node_vocab: int = 100) -> None:
        owner = "Depo"
        # A cycle needs two distinct nodes (a -> b -> a); one node would be a self-loop, not a cycle.
        self.min_nodes = _check_int(owner, "min_nodes", min_nodes, minimum=2)
        self.max_nodes = _check_int(owner, "max_nodes", max_nodes, minimum=2)
        if self.max_nodes < self.min_nodes:
            raise SleepzooError(f"{owner}: max_nodes={self.max_nodes} is smaller than min_nodes={self.min_nodes}; "
                                f"use max_nodes >= {self.min_nodes} or min_nodes <= {self.max_nodes}")
        self.context_len = _check_int(owner, "context_len", context_len, minimum=1)
        self.query_len = _check_int(owner, "query_len", query_len, minimum=1)
        self.num_queries = _check_int(owner, "num_queries", num_queries, minimum=1)
        self.max_hops = _check_int(owner, "max_hops", max_hops, minimum=1)
        self.node_vocab = _check_int(owner, "node_vocab", node_vocab, minimum=1)
        if self.node_vocab < self.max_nodes:
            raise SleepzooError(f"{owner}: node_vocab={self.node_vocab} is smaller than max_nodes={self.max_nodes}: "
                                f"a {self.max_nodes}-node cycle needs {self.max_nodes} distinct node names; use "
                                f"node_vocab >= {self.max_nodes} or max_nodes <= {self.node_vocab}")
        need = self.max_nodes * TOKENS_PER_EDGE
        if need > self.context_len:
            fit = self.context_len // TOKENS_PER_EDGE
            alt = f" or max_nodes <= {fit}" if fit >= self.min_nodes else ""
            raise SleepzooError(f"{owner}: context_len={self.context_len} can not hold a {self.max_nodes}-node cycle "
                                f"({need} tokens, {TOKENS_PER_EDGE} per edge); use context_len >= {need}{alt}")
        need = self.num_queries * TOKENS_PER_QUERY
        if need > self.query_len:
            fit = self.query_len // TOKENS_PER_QUERY
            alt = f" or num_queries <= {fit}" if fit >= 1 else ""
            raise SleepzooError(f"{owner}: query_len={self.query_len} can not hold {self.num_queries} queries "
                                f"({need} tokens, {TOKENS_PER_QUERY} per query); use query_len >= {need}{alt}")
        self._vocab = (["<pad>", "->", ",", ":"] + [f"<hop_{k}>" for k in range(1, self.max_hops + 1)]
                       + [f"v{i}" for i in range(self.node_vocab)])
        self._node0 = _FIRST_HOP + self.max_hops  # token id of v0
        sizes = np.arange(self.min_nodes, self.max_nodes + 1)
        weights = 1.0 / (sizes + np.sqrt(self.max_nodes))
        self._sizes = sizes
        self._size_cdf = np.cumsum(weights / weights.sum())
        self._size_cdf[-1] = 1.0
        self._test_hops = eval_hop_set(self.max_hops)
        self._drawing = "train"  # which split's distribution _draw samples (set by generate)

    # ------------------------------------------------------------------------------------ properties
    @property
    def vocab(self) -> list[str]:
        return list(self._vocab)

    @property
    def seq_len(self) -> int:
        return self.context_len + self.query_len

    @property
    def pad_id(self) -> int:
        return _PAD

    @property
    def window(self) -> int:
        """Suggested attention window for recipes: the context fills 4 windows (75 by default)."""
        return max(self.context_len // 4, 1)

    @property
    def test_hops(self) -> list[int]:
        """Hop counts of the test split, in the order test examples cycle through them."""
        return list(self._test_hops)

    @property
    def answer_positions(self) -> list[int]:
        """Positions of the ``:`` tokens, where the targets (the answers) are."""
        return [self.context_len + TOKENS_PER_QUERY * i + 2 for i in range(self.num_queries)]

    def size_distribution(self) -> dict[int, float]:
        """P(n) of the training split: ``n -> probability``, proportional to ``1 / (n + sqrt(max_nodes))``."""
        p = np.diff(self._size_cdf, prepend=0.0)
        return {int(n): float(q) for n, q in zip(self._sizes, p)}

    def node_token(self, i: int) -> int:
        """Token id of node name ``v{i}``."""
        return self._node0 + i

    def hop_token(self, k: int) -> int:
        """Token id of ``<hop_{k}>``."""
        return _FIRST_HOP + k - 1

    # ------------------------------------------------------------------------------------ generation
    def generate(self, num_examples: int, seed: int, split: str = "train") -> dict[str, torch.Tensor]:
        # The test split draws from another distribution (n = max_nodes, one k per example), and the base
        # class's _draw does not see the split: tell it here.
        previous, self._drawing = self._drawing, split
        try:
            return super().generate(num_examples, seed, split)
        finally:
            self._drawing = previous

    def _draw(self, rng: np.random.Generator, m: int) -> dict[str, np.ndarray]:
        """Candidates of the split being generated: ``n``, the cycle, the edge order, starts and hops.

        * ``n`` [m]: number of nodes;
        * ``cycle`` [m, max_nodes]: node names (0-based) in cycle order, ``cycle[j] -> cycle[(j+1) % n]``;
          entries from ``n`` on are unused;
        * ``order`` [m, max_nodes]: the edges in written order (edge ``j`` leaves ``cycle[j]``); the first
          ``n`` entries are a permutation of ``0 .. n-1``;
        * ``start`` [m, num_queries]: cycle positions of the query start nodes;
        * ``hops`` [m, num_queries]: every query's ``k`` (training); zeros for the test split, whose ``k``
          is assigned by position in :meth:`_build`.
        """
        test = self._drawing == "test"
        big, q = self.max_nodes, self.num_queries
        if test:
            n = np.full(m, big, dtype=np.int64)
        else:
            n = self._sizes[np.searchsorted(self._size_cdf, rng.random(m), side="right").clip(max=len(self._sizes) - 1)]
        # A uniformly random ordered subset of the node names: the first max_nodes of a row permutation.
        names = rng.permuted(np.broadcast_to(np.arange(self.node_vocab), (m, self.node_vocab)), axis=1)
        cycle = np.ascontiguousarray(names[:, :big])
        unused = np.arange(big) >= n[:, None]
        # Random permutations of 0 .. n-1 (slots past n sort last): random keys, argsorted.
        keys = rng.random((m, big))
        keys[unused] = 2.0
        order = np.argsort(keys, axis=1)
        keys = rng.random((m, big))
        keys[unused] = 2.0
        perm = np.argsort(keys, axis=1)
        # Query j starts at perm[j % n]: distinct starts when n >= num_queries, else as even as possible.
        start = np.take_along_axis(perm, np.arange(q) % n[:, None], axis=1)
        if test:
            hops = np.zeros((m, q), dtype=np.int64)
        else:
            hops = rng.integers(1, self.max_hops + 1, size=(m, q), dtype=np.int64)
        return {"n": n, "cycle": cycle, "order": order, "start": start, "hops": hops}

    def _successors(self, content: dict[str, np.ndarray]) -> np.ndarray:
        """[m, node_vocab]: the successor name of every node name in the cycle, -1 for names not in it."""
        n, cycle = content["n"], content["cycle"]
        m, big = cycle.shape
        j = np.arange(big)
        nxt = np.take_along_axis(cycle, (j + 1) % n[:, None], axis=1)
        # Unused slots write into a spare last column, dropped afterwards.
        where = np.where(j < n[:, None], cycle, self.node_vocab)
        succ = np.full((m, self.node_vocab + 1), -1, dtype=np.int64)
        np.put_along_axis(succ, where, nxt, axis=1)
        return succ[:, :-1]

    def _split_key(self, content: dict[str, np.ndarray]) -> np.ndarray:
        # The cycle as a successor map (independent of edge order and of where the cycle list starts) and
        # the query start node names. Hop counts are not part of it (see the class docstring).
        start_names = np.take_along_axis(content["cycle"], content["start"], axis=1)
        return np.concatenate([self._successors(content), start_names], axis=1)

    def _build(self, content: dict[str, np.ndarray], split: str) -> dict[str, torch.Tensor]:
        n, cycle, order, start = content["n"], content["cycle"], content["order"], content["start"]
        m, big = cycle.shape
        q = self.num_queries
        if split == "test":
            k = np.asarray(self._test_hops, dtype=np.int64)[np.arange(m) % len(self._test_hops)]
            hops = np.repeat(k[:, None], q, axis=1)
        else:
            hops = content["hops"].astype(np.int64)
            k = np.full(m, -1, dtype=np.int64)
        tok = cycle.astype(np.int64) + self._node0  # node names as token ids, cycle order
        # Edges in written order: slot s holds edge order[s], i.e. cycle[order[s]] -> cycle[order[s]+1 mod n].
        src = np.take_along_axis(tok, order, axis=1)
        dst = np.take_along_axis(tok, (order + 1) % n[:, None], axis=1)
        edges = np.empty((m, big, TOKENS_PER_EDGE), dtype=np.int64)
        edges[..., 0], edges[..., 1], edges[..., 2], edges[..., 3] = src, _ARROW, dst, _COMMA
        edges = edges.reshape(m, big * TOKENS_PER_EDGE)
        # Right-align the 4n edge tokens at the end of the context (left padding).
        width = big * TOKENS_PER_EDGE
        idx = np.arange(width) - (width - TOKENS_PER_EDGE * n[:, None])
        body = np.where(idx >= 0, np.take_along_axis(edges, idx.clip(min=0), axis=1), _PAD)
        ids = np.full((m, self.seq_len), _PAD, dtype=np.int64)
        ids[:, self.context_len - width:self.context_len] = body
        # Queries.
        x = np.take_along_axis(tok, start, axis=1)
        y = np.take_along_axis(tok, (start + hops) % n[:, None], axis=1)
        queries = np.empty((m, q, TOKENS_PER_QUERY), dtype=np.int64)
        queries[..., 0], queries[..., 1], queries[..., 2], queries[..., 3] = _FIRST_HOP + hops - 1, x, _COLON, y
        c0 = self.context_len
        ids[:, c0:c0 + q * TOKENS_PER_QUERY] = queries.reshape(m, q * TOKENS_PER_QUERY)
        targets = np.full((m, self.seq_len), IGNORE_INDEX, dtype=np.int64)
        targets[:, self.answer_positions] = y
        return {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets),
                "k": torch.from_numpy(k), "hops": torch.from_numpy(np.ascontiguousarray(hops)),
                "num_nodes": torch.from_numpy(n.astype(np.int64))}

    # --------------------------------------------------------------------------------------- display
    def decode(self, ids: Any, targets: Any = None) -> str:
        """Context, then ``|``, then the queries, with runs of ``<pad>`` written ``<pad>*N``.

        ``<pad>*12 v7 -> v3 , v3 -> v4 , v4 -> v7 , | <hop_2> v4 :=>v3 v3 ...`` (with targets). Sequences that
        are not of this task's length fall back to the generic space-separated form.
        """
        ids_t = torch.as_tensor(ids)
        if ids_t.ndim != 1 or ids_t.numel() != self.seq_len:
            return super().decode(ids, targets)
        tg_t = None if targets is None else torch.as_tensor(targets)
        c0 = self.context_len
        parts = []
        for lo, hi in ((0, c0), (c0, self.seq_len)):
            words = super().decode(ids_t[lo:hi], None if tg_t is None else tg_t[lo:hi]).split(" ")
            out: list[str] = []
            for w in words:
                if w == "<pad>" and out and out[-1].startswith("<pad>"):
                    count = int(out[-1][6:]) if out[-1] != "<pad>" else 1
                    out[-1] = f"<pad>*{count + 1}"
                else:
                    out.append(w)
            parts.append(" ".join(out))
        return " | ".join(parts)

    # --------------------------------------------------------------------------------------- metrics
    def _extra_metrics(self, predictions: torch.Tensor, data: dict[str, torch.Tensor]) -> dict[str, Any]:
        pos = self.answer_positions
        correct = (predictions[:, pos] == data["targets"][:, pos]).double()  # [n, num_queries]
        out: dict[str, Any] = {}
        accs = []
        for k in self._test_hops:
            rows = data["k"] == k
            accs.append(float(correct[rows].mean()) if bool(rows.any()) else float("nan"))
        out["hop_accuracy"] = accs
        out.update({f"hop_accuracy_{k}": a for k, a in zip(self._test_hops, accs)})
        return out

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["window"] = self.window
        d["test_hops"] = self.test_hops
        return d
