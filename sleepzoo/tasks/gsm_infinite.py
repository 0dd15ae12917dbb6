"""GSM-Infinite (SPEC 2): synthetic GSM8K-like arithmetic, difficulty = number of operations, length = distractors.

A clean-room generator written from the paper's description only (the original generator has no licence; none
of its code or templates is used). See :class:`GSMInfinite`.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sleepzoo.registry import SleepzooError
from sleepzoo.tasks.base import IGNORE_INDEX, TokenizedTask, _check_int
from sleepzoo.tokenizer import WORD_PATTERN, Tokenizer, WordTokenizer, describe_tokenizer, load_tokenizer

FAMILIES = ("symbolic", "realistic")
#: Largest number of operations the generators support (min_op >= 1, max_op <= MAX_OP).
MAX_OP = 32
ANSWER_CUE = " Answer:"

# ------------------------------------------------------------------------------------ realistic world
#: First words of entity names ("Maple Zoo", "Maple Farm", ...); 20 entities per domain.
PLACES = ("Riverside", "Maple", "Oak", "Pine", "Cedar", "Sunny", "Hilltop", "Lakeside", "Willow", "Birch",
          "Granite", "Silver", "Golden", "Meadow", "Harbor", "Valley", "Summit", "Brook", "Elm", "Aspen")
#: domain -> (entity noun, category word used in totals, 16 items written in the plural)
DOMAINS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "zoo": ("Zoo", "animals", ("lions", "tigers", "zebras", "giraffes", "penguins", "bears", "wolves", "foxes",
                               "otters", "monkeys", "owls", "eagles", "camels", "hippos", "koalas", "pandas")),
    "farm": ("Farm", "animals", ("cows", "sheep", "goats", "pigs", "hens", "ducks", "horses", "geese",
                                 "donkeys", "rabbits", "turkeys", "llamas", "alpacas", "oxen", "ponies", "quails")),
    "shop": ("Shop", "items", ("pens", "cups", "lamps", "clocks", "bags", "hats", "shoes", "scarves", "candles",
                               "mugs", "plates", "kites", "brushes", "combs", "toys", "wallets")),
    "library": ("Library", "books", ("novels", "atlases", "comics", "magazines", "dictionaries", "cookbooks",
                                     "biographies", "textbooks", "journals", "manuals", "almanacs", "anthologies",
                                     "encyclopedias", "thrillers", "mysteries", "fables")),
}
DOMAIN_NAMES = tuple(DOMAINS)
#: A given quantity: one template is drawn per sentence (not the last for n = 1: "There are 1 ...").
LEAF_TEMPLATES = ("{E} has {n} {I}.", "The number of {I} in {E} is {n}.", "There are {n} {I} in {E}.")
#: A derived quantity, by operation; {S} is "The number of {I} in {E}", {A}/{B} references to operands.
DERIVED_TEMPLATES = {
    "add": "{S} is {c} more than {A}.",
    "sub": "{S} is {c} fewer than {A}.",
    "mul": "{S} is {c} times {A}.",
    "sum": "{S} equals the sum of {A} and {B}.",
    "diff": "{S} equals {A} minus {B}.",
}
QUESTION_PLAIN = "Question: how many {I} are in {E}?"
QUESTION_TOTAL = "Question: how many {C} are in {E} in total?"
REF_PLAIN = "the number of {I} in {E}"
REF_TOTAL = "the total number of {C} in {E}"
#: Constants of the unary operations.
ADD_CONSTANTS = (1, 2, 3)
MUL_CONSTANTS = (2, 3)

# ------------------------------------------------------------------------------------ symbolic world
SYMBOLIC_QUESTION = "Question: which variables equal {n}?"
SYMBOLIC_ASSIGN = "assign {x} = {n}."
#: Edge kinds of the symbolic trees: copy, +1, -1.
SYMBOLIC_EDGES = ("{x} = {y}.", "{x} = {y} + 1.", "{x} = {y} - 1.")
SYMBOLIC_DELTAS = (0, 1, -1)


def builtin_words(max_value: int, num_vars: int) -> list[str]:
    """The builtin tokenizer's words (after ``<pad> <unk>``): punctuation, template words, entity and item
    names, the numbers ``0 .. max_value`` and the variable names ``v0 .. v{num_vars-1}``, in that order."""
    texts = [SYMBOLIC_QUESTION, SYMBOLIC_ASSIGN, *SYMBOLIC_EDGES, ANSWER_CUE, *LEAF_TEMPLATES,
             *DERIVED_TEMPLATES.values(), "The number of", QUESTION_PLAIN, QUESTION_TOTAL, REF_PLAIN, REF_TOTAL,
             " ".join(PLACES)]
    for noun, category, items in DOMAINS.values():
        texts += [noun, category, " ".join(items)]
    words = [".", ",", "?", ":", "=", "+", "-"]
    seen = set(words)
    for text in texts:
        for w in WORD_PATTERN.findall(re.sub(r"\{\w+\}", " ", text)):  # not the {placeholders}
            if w not in seen and not w.isdigit():
                seen.add(w)
                words.append(w)
    return words + [str(i) for i in range(max_value + 1)] + [f"v{i}" for i in range(num_vars)]


# --------------------------------------------------------------------------------------- problems
@dataclass
class Core:
    """The problem without its distractors: what decides the split and the answer.

    Drawn as structure only (``key`` and ``state``); :meth:`GSMInfinite._materialize` writes its text for
    the candidates that are kept: ``question``, ``statements`` (in generation order), ``answer`` (the text
    after ``Answer:`` without the leading space: ``"v9, v12."`` or ``"7."``), ``graph`` (machine-readable,
    see :meth:`GSMInfinite.texts`) and ``length`` (tokens of question + statements + answer).
    """

    family: str
    op: int
    key: bytes  # 16-byte digest of the problem's canonical form: its identity for the split
    state: Any
    question: str = ""
    statements: list[str] = field(default_factory=list)
    answer: str = ""
    graph: dict[str, Any] = field(default_factory=dict)
    length: int = -1


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass
class _SymbolicProblem:
    names: list[int]  # variable numbers; names[0] is the assigned root
    values: list[int]
    parents: list[int]  # parents[i] = index of node i's parent (i >= 1); parents[0] = -1
    kinds: list[int]  # index into SYMBOLIC_EDGES (i >= 1)
    asked: int


def _symbolic_core(r: random.Random, op: int, max_value: int, num_vars: int) -> Core:
    """A random recursive tree of ``op`` edges (copy / +1 / -1) hanging from one assigned root."""
    names = r.sample(range(num_vars), op + 1)
    values = [r.randint(0, max_value)]
    parents, kinds = [-1], [-1]
    for i in range(1, op + 1):
        p = r.randrange(i)
        v = values[p]
        k = r.choice((0, 1, 2) if 0 < v < max_value else (0, 1) if v < max_value else (0, 2))
        values.append(v + SYMBOLIC_DELTAS[k])
        parents.append(p)
        kinds.append(k)
    asked = values[r.randrange(1, op + 1)]
    # Identity: the assignment, the set of edges (creation order does not matter) and the question.
    edges = sorted((names[i], names[parents[i]], kinds[i]) for i in range(1, op + 1))
    key = np.array([0, op, names[0], values[0], asked, *(x for e in edges for x in e)], dtype="<i8")
    return Core("symbolic", op, _digest(key.tobytes()), _SymbolicProblem(names, values, parents, kinds, asked))


def _symbolic_text(core: Core) -> None:
    pb: _SymbolicProblem = core.state
    names = [f"v{n}" for n in pb.names]
    core.statements = [SYMBOLIC_ASSIGN.format(x=names[0], n=pb.values[0])] + [
        SYMBOLIC_EDGES[pb.kinds[i]].format(x=names[i], y=names[pb.parents[i]]) for i in range(1, core.op + 1)]
    answer = [f"v{n}" for n in sorted(n for n, v in zip(pb.names, pb.values) if v == pb.asked)]
    core.question = SYMBOLIC_QUESTION.format(n=pb.asked)
    core.answer = ", ".join(answer) + "."
    edges = [(names[i], names[pb.parents[i]], SYMBOLIC_DELTAS[pb.kinds[i]]) for i in range(1, core.op + 1)]
    core.graph = {"assign": {names[0]: pb.values[0]}, "edges": edges, "query": pb.asked, "answer": answer}


class _SymbolicDistractors:
    """One unassigned tree: its root never gets a value, so none of its variables has one.

    :meth:`propose` offers a statement, :meth:`accept` commits it (only committed nodes become parents).
    """

    def __init__(self, r: random.Random, used: set[int], num_vars: int):
        self.r = r
        self.pool = [i for i in range(num_vars) if i not in used]
        r.shuffle(self.pool)
        self.nodes = [self.pool.pop()] if self.pool else []  # the unassigned root

    def propose(self) -> str | None:
        if not self.pool or not self.nodes:
            return None
        r = self.r
        return SYMBOLIC_EDGES[r.randrange(3)].format(x=f"v{self.pool[-1]}", y=f"v{r.choice(self.nodes)}")

    def accept(self) -> None:
        self.nodes.append(self.pool.pop())

    def exhausted_hint(self) -> str:
        return "num_vars (the supply of variable names for distractors)"


@dataclass
class _Node:
    kind: str  # leaf | add | sub | mul | sum | diff | total
    children: list[int] = field(default_factory=list)
    const: int = 0
    value: int = 0
    entity: int = -1
    item: int = -1


def _unary_options(x: int, max_value: int) -> list[tuple[str, int]]:
    opts = [("add", c) for c in ADD_CONSTANTS if x + c <= max_value]
    opts += [("sub", c) for c in ADD_CONSTANTS if c <= x]
    opts += [("mul", c) for c in MUL_CONSTANTS if x >= 1 and x * c <= max_value]
    return opts


def _apply(kind: str, c: int, xs: list[int]) -> int:
    if kind == "add":
        return xs[0] + c
    if kind == "sub":
        return xs[0] - c
    if kind == "mul":
        return xs[0] * c
    if kind in ("sum", "total"):
        return xs[0] + xs[1]
    if kind == "diff":
        return xs[0] - xs[1]
    raise AssertionError(kind)


class _World:
    """Names of one domain: entity ``e`` is ``PLACES[e] + noun``, item ``i`` is ``items[i]``."""

    def __init__(self, domain: str):
        self.domain = domain
        self.noun, self.category, self.items = DOMAINS[domain]

    def entity(self, e: int) -> str:
        return f"{PLACES[e]} {self.noun}"

    def ref(self, node: _Node) -> str:
        if node.kind == "total":
            return REF_TOTAL.format(C=self.category, E=self.entity(node.entity))
        return REF_PLAIN.format(I=self.items[node.item], E=self.entity(node.entity))

    def sentence(self, r: random.Random, node: _Node, operands: list[_Node]) -> str:
        E, I = self.entity(node.entity), self.items[node.item]
        if node.kind == "leaf":
            template = LEAF_TEMPLATES[r.randrange(len(LEAF_TEMPLATES) - (node.value == 1))]
            return template.format(E=E, I=I, n=node.value)
        refs = [self.ref(o) for o in operands]
        return DERIVED_TEMPLATES[node.kind].format(S="The" + REF_PLAIN.format(I=I, E=E)[3:], c=node.const,
                                                   A=refs[0], B=refs[1] if len(refs) > 1 else "")


def _realistic_core(r: random.Random, op: int, max_value: int) -> Core:
    """A random computation tree with ``op`` operations (internal nodes) over quantities of one domain.

    Shape: internal node i > 0 hangs from a random earlier internal node with a free operand slot (arity 1
    or 2, drawn per node); free slots left over become given quantities (leaves). Values are chosen bottom-up
    among the operations that keep every quantity in ``[0, max_value]``. A ``total`` node is the sum of the
    only two quantities of an entity kept for it.
    """
    world = _World(DOMAIN_NAMES[r.randrange(len(DOMAIN_NAMES))])
    leaf_max = max(2, max_value // 2)
    nodes = [_Node("?") for _ in range(op)]
    arity = [r.randint(1, 2) for _ in range(op)]
    for i in range(1, op):
        free = [j for j in range(i) if len(nodes[j].children) < arity[j]]
        nodes[r.choice(free)].children.append(i)
    for j in range(op):
        while len(nodes[j].children) < arity[j]:
            nodes[j].children.append(len(nodes))
            nodes.append(_Node("leaf", value=r.randint(1, leaf_max)))
    for j in reversed(range(op)):  # children have larger indices than their parent
        node = nodes[j]
        kids = [nodes[c] for c in node.children]
        if len(kids) == 1:
            node.kind, node.const = r.choice(_unary_options(kids[0].value, max_value))
        else:
            x, y = kids[0].value, kids[1].value
            kinds = ["diff"]
            if x + y <= max_value:
                kinds.append("sum")
                if all(k.kind != "total" for k in kids):
                    kinds.append("total")
            node.kind = r.choice(kinds)
            if node.kind == "diff" and x < y:
                node.children.reverse()
        node.value = _apply(node.kind, node.const, [nodes[c].value for c in node.children])
    # Names: each total keeps a fresh entity for its two operands alone; every other quantity gets an unused
    # (entity, item) pair of an entity that no total keeps.
    totals = [n for n in nodes if n.kind == "total"]
    kept = r.sample(range(len(PLACES)), len(totals))
    used: set[tuple[int, int]] = set()
    for n, e in zip(totals, kept):
        n.entity = e
        for c, item in zip(n.children, r.sample(range(len(world.items)), 2)):
            nodes[c].entity, nodes[c].item = e, item
            used.add((e, item))
    kept_set = set(kept)
    free_entities = [e for e in range(len(PLACES)) if e not in kept_set]
    for n in nodes:
        if n.kind != "total" and n.entity < 0:
            while True:
                pair = (r.choice(free_entities), r.randrange(len(world.items)))
                if pair not in used:
                    break
            used.add(pair)
            n.entity, n.item = pair
    # Identity: the domain, the question and every quantity's definition (not the wording, not the order).
    ident = [(n.entity, -1 if n.kind == "total" else n.item) for n in nodes]
    canon = (world.domain, ident[0], sorted((ident[i], n.kind, n.const, n.value if n.kind == "leaf" else -1,
                                              tuple(ident[c] for c in n.children)) for i, n in enumerate(nodes)))
    return Core("realistic", op, _digest(repr(canon).encode()), (world, nodes, used, kept_set))


def _realistic_text(core: Core, r: random.Random) -> None:
    """Sentences of a realistic core (``r`` draws the wording of given quantities)."""
    world, nodes, _, _ = core.state
    core.statements = [world.sentence(r, n, [nodes[c] for c in n.children]) for n in nodes if n.kind != "total"]
    root = nodes[0]
    if root.kind == "total":
        core.question = QUESTION_TOTAL.format(C=world.category, E=world.entity(root.entity))
    else:
        core.question = QUESTION_PLAIN.format(I=world.items[root.item], E=world.entity(root.entity))
    core.answer = f"{root.value}."
    core.graph = {"domain": world.domain, "root": world.ref(root), "answer": root.value,
                  "nodes": {world.ref(n): {"op": n.kind, "args": [world.ref(nodes[c]) for c in n.children],
                                           "const": n.const, "value": n.value} for n in nodes}}


class _RealisticDistractors:
    """Quantities of other (entity, item) pairs of the same domain, given or derived from quantities already
    stated (problem quantities included, totals excluded); never in an entity kept for a total, so they
    change nothing the question depends on."""

    def __init__(self, r: random.Random, state: Any, max_value: int):
        world, nodes, used, kept = state
        self.r, self.world, self.max_value = r, world, max_value
        self.operands = [n for n in nodes if n.kind != "total"]
        self.used = set(used)
        self.free_entities = [e for e in range(len(PLACES)) if e not in kept]
        self.pending: _Node | None = None

    def _pair(self) -> tuple[int, int] | None:
        r = self.r
        for _ in range(64):
            pair = (r.choice(self.free_entities), r.randrange(len(self.world.items)))
            if pair not in self.used:
                return pair
        free = [(e, i) for e in self.free_entities for i in range(len(self.world.items)) if (e, i) not in self.used]
        return r.choice(free) if free else None

    def propose(self) -> str | None:
        pair = self._pair()
        if pair is None:
            return None
        r, mv = self.r, self.max_value
        node = _Node("leaf", entity=pair[0], item=pair[1])
        operands: list[_Node] = []
        u = r.random()
        if u < 0.35 or not self.operands:
            node.value = r.randint(1, max(2, mv // 2))
        elif u < 0.7 or len(self.operands) < 2:
            a = r.choice(self.operands)
            node.kind, node.const = r.choice(_unary_options(a.value, mv))
            operands = [a]
        else:
            a, b = r.sample(self.operands, 2)
            node.kind = "sum" if a.value + b.value <= mv and r.random() < 0.5 else "diff"
            operands = [a, b] if node.kind == "sum" or a.value >= b.value else [b, a]
        if node.kind != "leaf":
            node.value = _apply(node.kind, node.const, [o.value for o in operands])
        self.pending = node
        return self.world.sentence(r, node, operands)

    def accept(self) -> None:
        node = self.pending
        self.used.add((node.entity, node.item))
        self.operands.append(node)
        self.pending = None

    def exhausted_hint(self) -> str:
        return "min_tokens (each domain has only 20 x 16 quantities to mention)"


@dataclass
class Rendered:
    """One full example: ``prompt`` (question, context, ``" Answer:"``) and ``answer`` (``" v9, v12."``)."""

    prompt: str
    answer: str
    prompt_ids: list[int]
    answer_ids: list[int]
    op: int
    graph: dict[str, Any]

    @property
    def text(self) -> str:
        return self.prompt + self.answer

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


# ------------------------------------------------------------------------------------------------ task
class GSMInfinite(TokenizedTask):
    """GSM-Infinite (SPEC 2): GSM8K-like problems, difficulty = operations ``op``, length = distractors.

    A clean-room generator written from the paper's description (no code or template of the unlicensed
    original is used). An example is, as text, ``Question: ... <shuffled statements> Answer: <answer>`` —
    the question comes *before* the context and there is no chain of thought. Two families:

    * ``symbolic``: a random recursive tree of ``op`` statements (``vX = vY.``, ``vX = vY + 1.``,
      ``vX = vY - 1.``) hanging from one assigned root (``assign vR = n.``), plus one *unassigned* distractor
      tree of the same statements whose root never gets a value. The question asks which variables equal
      the value of a random non-root problem variable; the answer is that set, sorted by variable number
      and written ``v9, v12.``. All problem values stay in ``[0, max_value]``. Variable names are drawn at
      random from ``v0 .. v{num_vars-1}`` per example.
    * ``realistic``: a word problem in one of four domains (zoos, farms, shops, libraries) over quantities
      "the number of <item> in <entity>". A random computation tree of ``op`` operations (``+ c``, ``- c``,
      ``* c`` with c in 1..3 / 2..3, sum and difference of two quantities, and *totals*: "the total number of
      animals in X" is the sum of the only two quantities stated for X) over given quantities. Plain
      integers, no modular arithmetic: operations are drawn among those that keep every quantity in
      ``[0, max_value]`` (given quantities in ``[1, max_value // 2]``), so numbers stay small. Distractor
      sentences state other quantities of the same domain, given or derived from stated ones (problem
      quantities included), never in an entity that a total sums over: they never affect the answer.
      Answer ``7.``.

    **Length.** The full example (question + context + answer) is between ``min_tokens`` and ``max_tokens``
    tokens of the tokenizer in use: a target length is drawn uniformly in that range and distractors are
    added until the next would pass it (then, if still short of ``min_tokens``, while they fit under
    ``max_tokens``); the token count is then checked on the real encoding and corrected if needed. Tokens
    are ``encode(prompt) + encode(answer)`` where the answer text starts with a space (``" v9, v12."``).
    Every example is right-padded with ``pad_id`` (no targets) to ``seq_len = max_tokens``.

    **Targets** (aligned with inputs as in every task: the target at ``t`` is the token at ``t + 1``) are on
    the answer tokens only, i.e. at the positions of ``:`` of ``Answer:`` through the token before the
    final ``.``, so the answer tokens including the final ``.`` are predicted. Exact accuracy (every answer
    token right) is exact match of the answer; for ``symbolic`` it equals set equality, since the set is
    written in one canonical (sorted) order.

    **Tokenizer.** ``tokenizer: builtin`` (default) is a word-level vocabulary of a few hundred tokens
    (:func:`builtin_words`: punctuation, template words, names, numbers ``0..max_value``, ``v0..v{num_vars-1}``)
    for models trained from scratch; a path loads a pretrained model's ``tokenizer.json`` (or a directory
    holding one), see :mod:`sleepzoo.tokenizer`.

    **Ops and splits.** Training draws ``op ~ U[min_op, max_op]``. The test split is ``test_per_op`` problems
    per op, in a fixed order: test example ``i`` has ``op = min_op + i % n_ops`` (``n_ops = max_op - min_op
    + 1``), and each op has its own stream, so ``evaluate(num_examples=n)`` (= ``generate(n, seed, "test")``)
    scores the first ``n`` of that order: ``n // n_ops`` problems per op (the first ``n % n_ops`` ops get one
    more). ``n`` may not exceed ``test_per_op * n_ops`` (:attr:`test_size`, the default of ``evaluate``).
    Train and test are disjoint by problem: the split is decided by a stable hash of the *core problem*
    (question, problem statements, answer; not the distractors or their order), so a test problem never
    appears in training, even with other distractors. Deterministic in the seed (Python's ``random`` seeded
    from numpy per example).

    The built data has ``op`` (LongTensor ``[n]``, the bucket that :meth:`evaluate` reports every metric by)
    and ``length`` (tokens before padding). :meth:`evaluate` adds ``auc_op``: the area under exact accuracy
    against op (trapezoid over the ops present), divided by their range (the accuracy itself if one op).

    Options are checked: ``family`` in {symbolic, realistic}; ``1 <= min_op <= max_op <= MAX_OP`` (32);
    a missing tokenizer path; a token range too small for the problem at ``max_op`` (realistic problems are
    longer: op 8 needs about 300 builtin tokens) or too narrow/large to fill with distractors.

    Examples (real outputs, decoded with :meth:`decode`; ``=>`` shows the target tokens)::

        >>> t = GSMInfinite(min_op=2, max_op=2, min_tokens=40, max_tokens=50)
        >>> d = t.generate(1, seed=0); print(t.decode(d["input_ids"][0], d["targets"][0]))
        Question: which variables equal 0? assign v185 = 0. v80 = v76. v176 = v76 - 1. v90 = v176 + 1. \
v66 = v102. v102 = v185. Answer: v66, v102, v185. => v66, v102, v185.

    (``v185 -> v102 -> v66`` is the problem, 2 operations; ``v76`` is the unassigned distractor root.)
    The builtin vocabulary has 347 tokens with the defaults. ::

        >>> t = GSMInfinite("realistic", min_op=2, max_op=2, min_tokens=80, max_tokens=100)
        >>> d = t.generate(1, seed=0); print(t.decode(d["input_ids"][0], d["targets"][0]))
        Question: how many fables are in Pine Library? Pine Library has 1 mysteries. The number of fables \
in Pine Library equals the number of almanacs in Cedar Library minus the number of mysteries in Pine \
Library. The number of manuals in Birch Library is 1 more than the number of mysteries in Pine Library. \
The number of manuals in Elm Library is 7. The number of almanacs in Cedar Library is 2 fewer than the \
number of manuals in Elm Library. Answer: 4. => 4.
    """

    name = "gsm_infinite"
    buckets = ("op",)
    #: Cores (cheap) are drawn this many at a time; distractors are only made for the examples kept.
    draw_chunk = 256
    #: Cores longer than max_tokens are redrawn; this many in a row means the range is too small.
    max_core_redraws = 1000

    def __init__(self, family: str = "symbolic", min_op: int = 1, max_op: int = 8, min_tokens: int = 100,
                 max_tokens: int = 160, tokenizer: str = "builtin", test_per_op: int = 200,
                 max_value: int = 20, num_vars: int = 200) -> None:
        owner = "GSMInfinite"
        if family not in FAMILIES:
            raise SleepzooError(f"{owner}: family must be one of {', '.join(FAMILIES)}, got {family!r}")
        self.family = family
        self.min_op = _check_int(owner, "min_op", min_op, minimum=1, maximum=MAX_OP)
        self.max_op = _check_int(owner, "max_op", max_op, minimum=1, maximum=MAX_OP)
        if self.max_op < self.min_op:
            raise SleepzooError(f"{owner}: max_op must be >= min_op ({self.min_op}), got {self.max_op!r}")
        self.min_tokens = _check_int(owner, "min_tokens", min_tokens, minimum=1)
        self.max_tokens = _check_int(owner, "max_tokens", max_tokens, minimum=1)
        if self.max_tokens < self.min_tokens:
            raise SleepzooError(f"{owner}: max_tokens must be >= min_tokens ({self.min_tokens}), got "
                                f"{self.max_tokens!r}")
        self.test_per_op = _check_int(owner, "test_per_op", test_per_op, minimum=1)
        self.max_value = _check_int(owner, "max_value", max_value, minimum=4, maximum=9999)
        self.num_vars = _check_int(owner, "num_vars", num_vars, minimum=self.max_op + 2)
        if not isinstance(tokenizer, str):
            raise SleepzooError(f"{owner}: tokenizer must be 'builtin' or a path, got {tokenizer!r}")
        self.tokenizer = tokenizer
        self._tok: Tokenizer = load_tokenizer(tokenizer, words=builtin_words(self.max_value, self.num_vars))
        self._word_level = isinstance(self._tok, WordTokenizer)
        self._cue_len = self._count(ANSWER_CUE)
        self._check_feasible()

    # ------------------------------------------------------------------------------------ properties
    @property
    def seq_len(self) -> int:
        return self.max_tokens

    @property
    def ops(self) -> list[int]:
        return list(range(self.min_op, self.max_op + 1))

    @property
    def test_size(self) -> int:
        """The whole test split: ``test_per_op`` problems per op."""
        return self.test_per_op * len(self.ops)

    # ------------------------------------------------------------------------------------ token counts
    def _count(self, text: str) -> int:
        if self._word_level:
            return self._tok.count(text)  # type: ignore[attr-defined]
        return len(self._tok.encode(text))

    def _core_length(self, core: Core) -> int:
        """Tokens of question + statements + `` Answer:`` + answer, counted piece by piece."""
        return (self._count(core.question) + sum(self._count(" " + s) for s in core.statements)
                + self._cue_len + self._count(" " + core.answer))

    # ------------------------------------------------------------------------------------ generation
    def _make_core(self, r: random.Random, op: int) -> Core:
        if self.family == "symbolic":
            return _symbolic_core(r, op, self.max_value, self.num_vars)
        return _realistic_core(r, op, self.max_value)

    def _draw_fixed(self, rng: np.random.Generator, ops: np.ndarray) -> dict[str, np.ndarray]:
        """Candidate contents with the given ops: the core problem (structure only), its 128-bit identity
        ``key`` (the split key) and seeds for its wording and its distractors."""
        m = len(ops)
        seeds = rng.integers(0, 2 ** 63 - 1, size=(m, 3), dtype=np.int64)
        cores = np.empty(m, dtype=object)
        for j in range(m):
            cores[j] = self._make_core(random.Random(int(seeds[j, 0])), int(ops[j]))
        keys = np.frombuffer(b"".join(c.key for c in cores), dtype="<i8").reshape(m, 2)
        return {"op": np.asarray(ops, dtype=np.int64), "seed": seeds[:, 1:].copy(), "key": keys, "core": cores}

    def _draw(self, rng: np.random.Generator, m: int) -> dict[str, np.ndarray]:
        return self._draw_fixed(rng, rng.integers(self.min_op, self.max_op + 1, size=m))

    def _split_key(self, content: dict[str, np.ndarray]) -> np.ndarray:
        return content["key"]

    def _materialize(self, core: Core, seed: int) -> Core:
        """Write the core's text (once) and count its tokens."""
        if core.length < 0:
            if core.family == "symbolic":
                _symbolic_text(core)
            else:
                _realistic_text(core, random.Random(seed))
            core.length = self._core_length(core)
        return core

    def _too_small(self, op: int, length: int) -> SleepzooError:
        return SleepzooError(
            f"GSMInfinite: max_tokens={self.max_tokens} is too small for {self.family} problems at op {op}: the "
            f"problem alone (question, statements, answer) takes up to {length} tokens of tokenizer "
            f"{self.tokenizer!r}; raise max_tokens (and min_tokens) or lower max_op")

    def _select(self, n: int, seed: int, split: str) -> dict[str, np.ndarray]:
        """The contents of ``generate(n, seed, split)``: kept candidates, in order (see the class doc)."""
        want_test = split == "test"
        if not want_test:
            return self._stream(np.random.default_rng(np.random.SeedSequence([seed, 0])), n, False, None)
        nops = len(self.ops)
        if n > self.test_size:
            raise SleepzooError(
                f"GSMInfinite: the test split has test_per_op={self.test_per_op} problems for each of {nops} "
                f"ops ({self.test_size} in all); {n} were asked for: raise test_per_op or ask for fewer")
        parts = []
        for j, op in enumerate(self.ops):
            count = len(range(j, n, nops))
            rng = np.random.default_rng(np.random.SeedSequence([seed, 1, op]))
            parts.append(self._stream(rng, count, True, op))
        # example i is the (i // nops)-th problem of op min_op + i % nops
        content = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        offsets = np.cumsum([0] + [len(p["op"]) for p in parts])
        index = np.array([offsets[i % nops] + i // nops for i in range(n)], dtype=np.int64)
        return {k: v[index] for k, v in content.items()}

    def _stream(self, rng: np.random.Generator, n: int, want_test: bool, op: int | None) -> dict[str, np.ndarray]:
        """``n`` contents of one split from ``rng`` (ops uniform, or all ``op``): candidates of the other
        split are dropped, then problems too long for ``max_tokens`` (rare: see :meth:`_check_feasible`)."""
        kept: list[dict[str, np.ndarray]] = []
        have = fruitless = too_long = 0
        while have < n:
            if op is None:
                cand = self._draw(rng, self.draw_chunk)
            else:
                cand = self._draw_fixed(rng, np.full(self.draw_chunk, op, dtype=np.int64))
            index = np.flatnonzero(self.is_test(cand) == want_test)
            if index.size == 0:
                fruitless += self.draw_chunk
                if fruitless >= self.max_fruitless_draws:
                    raise SleepzooError(f"GSMInfinite: no {'test' if want_test else 'train'} problem found in "
                                        f"{fruitless} draws; the configuration {self.config()} has too few "
                                        f"distinct problems to split")
                continue
            fruitless = 0
            fits = []
            for j in index:
                core = self._materialize(cand["core"][j], int(cand["seed"][j, 0]))
                if core.length <= self.max_tokens:
                    fits.append(j)
                    too_long = 0
                    if have + len(fits) == n:
                        break
                else:
                    too_long += 1
                    if too_long >= self.max_core_redraws:
                        raise self._too_small(core.op, core.length)
            index = np.asarray(fits, dtype=np.int64)
            kept.append({k: v[index] for k, v in cand.items()})
            have += index.size
        if not kept:
            return {"op": np.zeros(0, np.int64), "seed": np.zeros((0, 2), np.int64),
                    "key": np.zeros((0, 2), np.int64), "core": np.empty(0, dtype=object)}
        return {k: np.concatenate([p[k] for p in kept]) for k in kept[0]}

    def _render(self, core: Core, seed: int) -> Rendered:
        """Add distractors to ``core`` until the example is inside the token range; shuffle; encode."""
        r = random.Random(seed)
        lo, hi = self.min_tokens, self.max_tokens
        target = r.randint(lo, hi)
        if self.family == "symbolic":
            source: Any = _SymbolicDistractors(r, set(core.state.names), self.num_vars)
        else:
            source = _RealisticDistractors(r, core.state, self.max_value)
        chosen: list[str] = []
        length, misses = core.length, 0
        while True:
            s = source.propose()
            if s is None:
                break
            c = self._count(" " + s)
            if length + c <= target or (length < lo and length + c <= hi):
                source.accept()
                chosen.append(s)
                length += c
                misses = 0
            elif length >= lo:
                break
            else:
                misses += 1
                if misses > 64:
                    break
        sentences = list(core.statements) + chosen
        r.shuffle(sentences)
        question = core.question
        answer = " " + core.answer
        answer_ids = self._tok.encode(answer)
        for _ in range(64):  # the piecewise count is exact for the builtin tokenizer; check the real one
            prompt = question + " " + " ".join(sentences) + ANSWER_CUE if sentences else question + ANSWER_CUE
            prompt_ids = self._tok.encode(prompt)
            total = len(prompt_ids) + len(answer_ids)
            if total > hi and chosen:
                sentences.remove(chosen.pop())  # the last accepted: no other distractor depends on it
            elif total < lo and (s := source.propose()) is not None:
                source.accept()
                chosen.append(s)
                sentences.insert(r.randint(0, len(sentences)), s)
            else:
                break
        if not lo <= total <= hi:
            why = (f"ran out of distractors; raise {source.exhausted_hint()}" if total < lo and s is None
                   else "the range is too narrow for the statement lengths; widen it")
            raise SleepzooError(
                f"GSMInfinite: min_tokens/max_tokens: could not make a {self.family} op-{core.op} example of "
                f"{lo}..{hi} tokens of tokenizer {self.tokenizer!r} (got {total}): {why}")
        return Rendered(prompt, answer, prompt_ids, answer_ids, core.op, core.graph)

    def _render_all(self, content: dict[str, np.ndarray]) -> list[Rendered]:
        return [self._render(self._materialize(core, int(seed[0])), int(seed[1]))
                for core, seed in zip(content["core"], content["seed"])]

    def _build(self, content: dict[str, np.ndarray], split: str) -> dict[str, torch.Tensor]:
        rendered = self._render_all(content)
        n, T = len(rendered), self.seq_len
        ids = np.full((n, T), self.pad_id, dtype=np.int64)
        targets = np.full((n, T), IGNORE_INDEX, dtype=np.int64)
        lengths = np.zeros(n, dtype=np.int64)
        for i, ex in enumerate(rendered):
            seq = ex.prompt_ids + ex.answer_ids
            p, L = len(ex.prompt_ids), len(seq)
            ids[i, :L] = seq
            targets[i, p - 1:L - 1] = seq[p:]
            lengths[i] = L
        return {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets),
                "op": torch.as_tensor(np.asarray(content["op"], dtype=np.int64)),
                "length": torch.from_numpy(lengths)}

    def generate(self, num_examples: int, seed: int, split: str = "train") -> dict[str, torch.Tensor]:
        """Like :meth:`Task.generate`; the test split is ordered by op (see the class docstring)."""
        n, seed = self._generate_args(num_examples, seed, split)
        data = self._build(self._select(n, seed, split), split)
        self._check_batch(data, n)
        return data

    def texts(self, num_examples: int, seed: int, split: str = "train") -> list[Rendered]:
        """The examples of ``generate(num_examples, seed, split)`` as :class:`Rendered` (prompt and answer
        text, their token ids, op, and ``graph``: the problem in machine-readable form).

        ``graph`` of a symbolic problem: ``{"assign": {root: value}, "edges": [(child, parent, delta), ...],
        "query": value, "answer": [names]}``; of a realistic one: ``{"domain", "root", "answer", "nodes":
        {reference: {"op": leaf|add|sub|mul|sum|diff|total, "args": [references], "const", "value"}}}``.
        """
        n, seed = self._generate_args(num_examples, seed, split)
        return self._render_all(self._select(n, seed, split))

    def _check_feasible(self) -> None:
        """Reject now, not mid-training, a token range that cannot hold the problems or cannot be filled.

        64 problems at ``max_op`` (a fixed stream): more than 1 in 10 of them too long for ``max_tokens`` is
        an error (longer ones are redrawn during generation, which would skew the problems at that op).
        Then a few full examples at ``min_op`` and ``max_op`` are built, which fails if distractors cannot
        bring them into the range.
        """
        rng = np.random.default_rng(12345)
        content = self._draw_fixed(rng, np.full(64, self.max_op, dtype=np.int64))
        lengths = sorted(self._materialize(c, int(s[0])).length for c, s in zip(content["core"], content["seed"]))
        if lengths[int(0.9 * len(lengths))] > self.max_tokens:
            raise self._too_small(self.max_op, lengths[-1])
        for op in sorted({self.min_op, self.max_op}):
            content = self._draw_fixed(rng, np.full(8, op, dtype=np.int64))
            for core, seed in zip(content["core"], content["seed"]):
                if self._materialize(core, int(seed[0])).length <= self.max_tokens:
                    self._render(core, int(seed[1]))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["tokenizer"] = describe_tokenizer(self._tok)
        d["test_size"] = self.test_size
        return d

    # --------------------------------------------------------------------------------------- metrics
    def evaluate(self, model: torch.nn.Module, *, num_examples: int | None = None, **kwargs: Any) -> dict[str, Any]:
        """:meth:`Task.evaluate` on the first ``num_examples`` test problems (default: all of them,
        :attr:`test_size`), cycling through the ops; adds ``auc_op``."""
        return super().evaluate(model, num_examples=self.test_size if num_examples is None else num_examples,
                                **kwargs)

    def _extra_metrics(self, predictions: torch.Tensor, data: dict[str, torch.Tensor]) -> dict[str, Any]:
        targets = data["targets"]
        mask = targets != IGNORE_INDEX
        exact = ((predictions == targets) | ~mask).all(dim=1).double()
        return {"auc_op": auc_over_op(data["op"], exact)}


def auc_over_op(op: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under mean(correct) against op (trapezoid over the op values present) / their range; with a
    single op value, the accuracy at it."""
    op = torch.as_tensor(op)
    correct = torch.as_tensor(correct, dtype=torch.float64)
    values = sorted(int(v) for v in torch.unique(op).tolist())
    if not values:
        return 0.0
    acc = [float(correct[op == v].mean()) for v in values]
    if len(values) == 1:
        return acc[0]
    area = sum((values[i + 1] - values[i]) * (acc[i] + acc[i + 1]) / 2 for i in range(len(values) - 1))
    return area / (values[-1] - values[0])
