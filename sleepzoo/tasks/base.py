"""The task protocol: seeded synthetic data with a structural train/test split, and a generic evaluator.

A task plugin (entry-point group ``sleepzoo.task``) is a :class:`Task` subclass, built from a recipe as
``TaskCls(**options)``. Recipes check options against the constructor's signature, so every constructor
argument has a type annotation and a default; *values* are checked in ``__init__`` and rejected with a
:class:`~sleepzoo.registry.SleepzooError` naming the argument, the bad value and what is allowed.

Every example is exactly :attr:`Task.seq_len` tokens. ``targets`` is aligned with ``input_ids`` (the target at
position ``t`` is what the model should output *at* ``t``, not a shifted next token) and is ``-100`` where no
loss is taken.

Train/test disjointness is structural, not a matter of luck: an example belongs to the test split iff a
stable hash of its content (:func:`stable_hash`) falls in one fixed bucket out of :attr:`Task.test_buckets`;
each split draws candidates and throws away those of the other split. Identical examples therefore always
land in the same split, whatever seeds or sizes were used to generate them.

A subclass implements :attr:`~Task.vocab`, :attr:`~Task.seq_len`, :meth:`~Task._draw` (candidate contents)
and :meth:`~Task._build` (contents -> tensors), and may override :meth:`~Task._split_key` (what is hashed),
:meth:`~Task._extra_metrics` (task-specific metrics) and :meth:`~Task.decode`.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Union

import numpy as np
import torch
import torch.nn.functional as F

from sleepzoo.engine import pass_summary
from sleepzoo.registry import SleepzooError

IGNORE_INDEX = -100
SPLITS = ("train", "test")

# Content drawn by a task: one array, or a mapping of arrays, all with the example index as axis 0.
Content = Union[np.ndarray, Mapping[str, np.ndarray]]

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, elementwise on a uint64 array (array arithmetic wraps modulo 2**64 silently)."""
    z = x + _GOLDEN
    z = (z ^ (z >> _U64(30))) * _MIX1
    z = (z ^ (z >> _U64(27))) * _MIX2
    return z ^ (z >> _U64(31))


def stable_hash(keys: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of ``keys`` (integers, shape ``[n, ...]``), identical on every run/platform.

    Python's ``hash()`` is salted per process, so it cannot decide splits. Each element is mixed with a
    position-dependent salt and the mixed values are summed (a vectorised, order-sensitive combination),
    then mixed once more. Rows must be the same length; negative values are taken modulo 2**64.
    """
    keys = np.asarray(keys)
    if keys.ndim == 0:
        raise SleepzooError(f"stable_hash: keys must have an example axis, got a scalar {keys!r}")
    if not np.issubdtype(keys.dtype, np.integer) and keys.dtype != np.bool_:
        raise SleepzooError(f"stable_hash: keys must be integers, got dtype {keys.dtype}")
    flat = keys.reshape(keys.shape[0], -1).astype(np.int64, copy=False).view(_U64)
    salts = _splitmix64(np.arange(1, flat.shape[1] + 1, dtype=_U64))
    mixed = _splitmix64(flat ^ salts)
    return _splitmix64(mixed.sum(axis=1, dtype=_U64) + _U64(flat.shape[1]))


def _check_int(owner: str, name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as an int, or raise SleepzooError naming ``name``, ``value`` and the allowed range."""
    if minimum is not None and maximum is not None:
        allowed = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        allowed = f"an integer >= {minimum}"
    elif maximum is not None:
        allowed = f"an integer <= {maximum}"
    else:
        allowed = "an integer"
    # bool is an Integral, but `steps: true` in a recipe is a mistake, not 1.
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise SleepzooError(f"{owner}: {name} must be {allowed}, got {type(value).__name__} {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise SleepzooError(f"{owner}: {name} must be {allowed}, got {value!r}")
    return int(value)


#: The share of the machine's memory that one generated batch (or a model's weights) may take.
MEMORY_FRACTION = 0.5


@functools.lru_cache(maxsize=None)
def machine_memory() -> int | None:
    """Bytes of memory this process can use: the physical memory, or a smaller cgroup (container) limit;
    None where neither can be read. Read once per process: every generated batch checks against it."""
    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(int(limit), total or int(limit))
    except OSError:
        pass
    return total


def memory_limit() -> int | None:
    """The most bytes a batch may take: :data:`MEMORY_FRACTION` of :func:`machine_memory` (None: no limit)."""
    total = machine_memory()
    return None if total is None else int(total * MEMORY_FRACTION)


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f} GiB"


def check_memory(nbytes: int, what: str, fix: str) -> None:
    """Refuse, before allocating, ``what`` that needs ``nbytes`` when that is more than :func:`memory_limit`."""
    limit = memory_limit()
    if limit is not None and nbytes > limit:
        raise SleepzooError(f"{what} need about {gib(nbytes)} ({nbytes:,} bytes), more than the limit of "
                            f"{gib(limit)} ({MEMORY_FRACTION:.0%} of this machine's {gib(machine_memory())}); {fix}")


def _scores(example_loss: torch.Tensor, correct: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """Loss and accuracies of a set of examples from per-example summed CE and per-token correctness."""
    num_targets = int(mask.sum())
    return {
        "loss": float(example_loss.sum()) / max(num_targets, 1),
        "token_accuracy": float(correct.sum()) / max(num_targets, 1),
        "exact_accuracy": float((correct | ~mask).all(dim=1).double().mean()) if len(mask) else 0.0,
        "num_examples": int(mask.shape[0]),
        "num_targets": num_targets,
    }


def _take(content: Content, index: np.ndarray) -> Content:
    if isinstance(content, Mapping):
        return {k: v[index] for k, v in content.items()}
    return content[index]


def _concat(parts: list[Content]) -> Content:
    if isinstance(parts[0], Mapping):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return np.concatenate(parts)


def _length(content: Content) -> int:
    if isinstance(content, Mapping):
        return len(next(iter(content.values())))
    return len(content)


class Task:
    """Base class of sleepzoo tasks (plugins of kind ``task``).

    Subclasses must provide:

    * ``vocab`` (property): token strings, index = token id;
    * ``seq_len`` (property): T, the length of every example;
    * ``_draw(rng, m)``: ``m`` random candidate example contents (an array or a mapping of arrays, the
      example index first), using only ``rng``;
    * ``_build(content, split)``: a dict with ``input_ids`` and ``targets`` (LongTensor ``[n, T]``) and any
      extra per-example tensors that :meth:`_extra_metrics` may want;

    may name in ``buckets`` per-example LongTensor ``[n]`` keys of the built data (e.g. Depo's hop count
    ``k``), for which :meth:`evaluate` reports every metric per value under ``result["buckets"]``;
    and store each constructor argument as an attribute of the same name (read by :meth:`describe`).
    """

    #: Registry name (the entry-point name); used in messages and in :meth:`describe`.
    name: ClassVar[str] = "task"
    #: One bucket in this many holds the test split (1 in 8 of the example space).
    test_buckets: ClassVar[int] = 8
    #: Candidates are drawn this many at a time. Fixed, so that ``generate(n, seed)`` is a prefix of
    #: ``generate(m, seed)`` for n <= m (changing it changes every data set: don't, casually).
    draw_chunk: ClassVar[int] = 4096
    #: Give up when this many candidates in a row were all of the other split (the example space is too
    #: small to hold both splits, e.g. a tiny config whose few examples all hash to one side).
    max_fruitless_draws: ClassVar[int] = 1 << 20
    #: Per-example keys of the built data that evaluation breaks metrics down by (the paper's x axes).
    buckets: ClassVar[tuple[str, ...]] = ()

    # ----------------------------------------------------------------------------------------- protocol
    @property
    def vocab(self) -> list[str]:
        """Token strings; the index of a string is its token id."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def seq_len(self) -> int:
        """T: every example is exactly this many tokens."""
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>`` (tasks put it first in the vocabulary)."""
        return self.vocab.index("<pad>")

    def _draw(self, rng: np.random.Generator, m: int) -> Content:
        """``m`` random candidate contents (not yet split-filtered), drawn from ``rng`` only."""
        raise NotImplementedError

    def _build(self, content: Content, split: str) -> dict[str, torch.Tensor]:
        """Turn accepted contents into ``{"input_ids", "targets", ...}`` tensors."""
        raise NotImplementedError

    def _split_key(self, content: Content) -> np.ndarray:
        """Integer array ``[m, ...]`` that identifies each example; its hash decides the split.

        It must be a function of everything that makes the example what it is (two candidates with the same
        key must be the same example), or train/test could share examples. The default hashes the content
        array itself; tasks with mapping contents must override this.
        """
        if isinstance(content, Mapping):
            raise NotImplementedError(f"{type(self).__name__} draws a mapping: it must override _split_key")
        return content

    def _extra_metrics(self, predictions: torch.Tensor, data: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Task-specific metrics, added to :meth:`evaluate`'s result.

        ``predictions`` is the argmax token at every target position (LongTensor ``[n, T]``, on the CPU; -1 where
        a sleepzoo model computed no logits because there is no target) and
        ``data`` the whole generated test split (``input_ids``, ``targets`` and any extras from
        :meth:`_build`) plus ``token_loss``: each target token's cross-entropy (float32 ``[n, T]``, 0 where
        there is no target), for metrics by position. The base class adds nothing.
        """
        return {}

    # ------------------------------------------------------------------------------------------- data
    def nbytes(self, num_examples: int) -> int:
        """About the bytes ``generate(num_examples)`` allocates: ``input_ids`` and ``targets`` (int64), and
        one draw of :attr:`draw_chunk` candidates at about a byte per token."""
        return (16 * num_examples + self.draw_chunk) * self.seq_len

    def check_size(self, num_examples: int, what: str | None = None) -> None:
        """Refuse ``num_examples`` examples that would not fit in memory (:func:`check_memory`), before
        anything is drawn; ``what`` names the setting that asked for them."""
        asked = f"{what}: " if what else ""
        check_memory(self.nbytes(num_examples),
                     f"{asked}{num_examples:,} examples of {type(self).__name__}'s {self.seq_len:,} tokens",
                     "ask for fewer examples, or shorter sequences (the task's options)")

    def is_test(self, content: Content) -> np.ndarray:
        """Bool array: which of these contents belong to the test split."""
        keys = self._split_key(content)
        return (stable_hash(keys) % _U64(self.test_buckets)) == 0

    def _generate_args(self, num_examples: Any, seed: Any, split: Any) -> tuple[int, int]:
        """:meth:`generate`'s arguments checked (one error naming the bad one) and the batch's size against the
        machine's memory; returns (num_examples, seed)."""
        owner = f"{type(self).__name__}.generate"
        n = _check_int(owner, "num_examples", num_examples, minimum=0)
        seed = _check_int(owner, "seed", seed, minimum=0)
        if split not in SPLITS:
            raise SleepzooError(f"{owner}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.check_size(n, owner)
        return n, seed

    def generate(self, num_examples: int, seed: int, split: str = "train") -> dict[str, torch.Tensor]:
        """``num_examples`` examples of ``split`` ("train" or "test"), deterministic in (config, n, seed, split).

        Returns ``{"input_ids": LongTensor[n, T], "targets": LongTensor[n, T], ...}`` with targets ``-100``
        where no loss is taken. Only a local generator seeded by ``(seed, split)`` is used, never global
        RNG state. Candidates are drawn :attr:`draw_chunk` at a time, so a smaller ``num_examples`` gives a
        prefix of a larger one with the same seed.
        """
        n, seed = self._generate_args(num_examples, seed, split)
        want_test = split == "test"
        # The split is part of the seed so that train and test of one seed are unrelated streams.
        rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split)]))
        kept: list[Content] = []
        have = fruitless = 0
        while have < n:
            candidates = self._draw(rng, self.draw_chunk)
            index = np.flatnonzero(self.is_test(candidates) == want_test)
            if index.size == 0:
                fruitless += self.draw_chunk
                if fruitless >= self.max_fruitless_draws:
                    raise SleepzooError(
                        f"{type(self).__name__}: no {split} example found in {fruitless} draws; the "
                        f"configuration {self.config()} has too few distinct examples to split 1 in "
                        f"{self.test_buckets} into a test set")
                continue
            fruitless = 0
            index = index[: n - have]
            kept.append(_take(candidates, index))
            have += index.size
        if kept:
            content = _concat(kept)
        else:  # n == 0: build from an empty slice so subclasses see the right shapes
            content = _take(self._draw(np.random.default_rng(0), 1), np.zeros(0, dtype=np.int64))
        data = self._build(content, split)
        self._check_batch(data, n)
        return data

    def _check_batch(self, data: dict[str, torch.Tensor], n: int) -> None:
        """Catch a subclass breaking the protocol here rather than deep inside a training step."""
        for key in ("input_ids", "targets"):
            t = data.get(key)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.long or tuple(t.shape) != (n, self.seq_len):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise AssertionError(f"{type(self).__name__}._build: {key} must be a LongTensor of shape "
                                     f"{(n, self.seq_len)}, got {got}")

    # ----------------------------------------------------------------------------------------- display
    def decode(self, ids: Any, targets: Any = None) -> str:
        """Token ids as text, space-separated; with ``targets``, each target is shown as ``token=>target``.

        A 2-D input gives one line per example. Ids outside the vocabulary show as ``<unk:ID>``.
        """
        ids_t = torch.as_tensor(ids)
        tg_t = None if targets is None else torch.as_tensor(targets)
        if ids_t.ndim == 2:
            return "\n".join(self.decode(ids_t[i], None if tg_t is None else tg_t[i]) for i in range(len(ids_t)))
        if tg_t is not None and tg_t.shape != ids_t.shape:
            raise SleepzooError(f"decode: targets shape {tuple(tg_t.shape)} differs from ids shape "
                                f"{tuple(ids_t.shape)}")
        words = []
        for pos, i in enumerate(ids_t.tolist()):
            word = self._token(i)
            if tg_t is not None and int(tg_t[pos]) != IGNORE_INDEX:
                word += "=>" + self._token(int(tg_t[pos]))
            words.append(word)
        return " ".join(words)

    def _token(self, i: int) -> str:
        vocab = self.vocab
        return vocab[i] if 0 <= i < len(vocab) else f"<unk:{i}>"

    # ------------------------------------------------------------------------------------------ config
    def config(self) -> dict[str, Any]:
        """Constructor arguments and their values: ``type(self)(**task.config())`` rebuilds the task."""
        params = inspect.signature(type(self).__init__).parameters
        return {p: getattr(self, p) for p, spec in params.items()
                if p != "self" and spec.kind in (spec.POSITIONAL_OR_KEYWORD, spec.KEYWORD_ONLY)}

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for run metadata: name, class, config and derived sizes."""
        return {
            "name": self.name,
            "class": f"{type(self).__module__}:{type(self).__qualname__}",
            "config": self.config(),
            "seq_len": self.seq_len,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "test_fraction": 1 / self.test_buckets,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # -------------------------------------------------------------------------------------- evaluation
    def evaluate(self, model: torch.nn.Module, *, num_examples: int = 512, batch_size: int = 256,
                 seed: int = 0, window: int | None = None, loops: int | str | None = None,
                 device: str | torch.device = "cpu", max_loops: int | None = None,
                 tolerance: float | None = None) -> dict[str, Any]:
        """Score ``model`` on ``num_examples`` examples of the test split.

        The model is called as ``model(input_ids, targets, window=window, loops=loops)`` (targets are passed
        because a sleeping model decides from them which windows are pure context) and must return an object
        with ``.logits`` ``[B, T, V]``. The loss is recomputed here from the logits, summed over target
        tokens and divided by their total count, so it does not depend on ``batch_size`` or on how the model
        reduces its own ``.loss``. The model is put in eval mode and its previous mode restored.

        Returns ``loss``, ``token_accuracy`` (over target tokens), ``exact_accuracy`` (every target of an
        example right; an example without targets counts as right), ``num_examples``, ``num_targets`` and
        whatever :meth:`_extra_metrics` adds. A sleepzoo model also reports the sleep passes it used
        (``passes_mean``, over every example and consolidated window, and ``passes_hist``, the count of each
        number of passes; per bucket too): under ``loops="auto"`` (with ``max_loops`` / ``tolerance``, passed
        to the model when given) they vary by example.
        """
        owner = f"{type(self).__name__}.evaluate"
        n = _check_int(owner, "num_examples", num_examples, minimum=1)
        bs = _check_int(owner, "batch_size", batch_size, minimum=1)
        data = self.generate(n, seed, "test")
        ids_all, tg_all = data["input_ids"], data["targets"]
        predictions = torch.empty_like(ids_all)
        token_loss = torch.zeros(ids_all.shape, dtype=torch.float32)  # CE at each target, 0 elsewhere
        adaptive = {k: v for k, v in (("max_loops", max_loops), ("tolerance", tolerance)) if v is not None}
        passes: list[torch.Tensor] = []  # (B, windows slept) per batch, from a sleepzoo model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, n, bs):
                    ids = ids_all[start:start + bs].to(device)
                    tg = tg_all[start:start + bs].to(device)
                    if getattr(model, "supports_target_logits", False) and bool((tg != IGNORE_INDEX).any()):
                        # a sleepzoo model: the head at the target positions only, no (B, T, vocab) tensor
                        out = model(ids, tg, window=window, loops=loops, return_logits="targets", **adaptive)
                        passes.append(out.passes.cpu())
                        rows, cols = out.target_positions[:, 0].cpu(), out.target_positions[:, 1].cpu()
                        ce = F.cross_entropy(out.logits.float(), tg[rows.to(tg.device), cols.to(tg.device)],
                                             reduction="none").cpu()
                        token_loss[start + rows, cols] = ce
                        pred = torch.full(ids.shape, -1, dtype=predictions.dtype)  # -1: no target, no prediction
                        pred[rows, cols] = out.logits.argmax(dim=-1).cpu()
                        predictions[start:start + bs] = pred
                        continue
                    out = model(ids, tg, window=window, loops=loops, **adaptive)
                    if getattr(out, "passes", None) is not None:
                        passes.append(out.passes.cpu())
                    logits = out.logits
                    if logits.shape[:2] != ids.shape:
                        raise SleepzooError(f"{owner}: model returned logits of shape {tuple(logits.shape)} "
                                            f"for inputs of shape {tuple(ids.shape)}")
                    # float32 for the loss: bf16 log-softmax over a large vocab is too coarse to compare runs.
                    ce = F.cross_entropy(logits.float().flatten(0, 1), tg.flatten(), ignore_index=IGNORE_INDEX,
                                         reduction="none").view(tg.shape)  # (B, T), 0 where no target
                    token_loss[start:start + bs] = ce.cpu()
                    predictions[start:start + bs] = logits.argmax(dim=-1).cpu()
        finally:
            model.train(was_training)
        example_loss = token_loss.double().sum(dim=1)  # summed CE over each example's targets
        mask = tg_all != IGNORE_INDEX
        correct = (predictions == tg_all) & mask
        result = _scores(example_loss, correct, mask)
        slept = torch.cat(passes) if sum(p.shape[0] for p in passes) == n else None  # (n, windows slept)
        if slept is not None:
            result.update(pass_summary(slept))
        for name in self.buckets:  # e.g. Depo's hop count k, GSM-Infinite's op: the paper's x axes
            values = data[name]
            per_value = result.setdefault("buckets", {})[name] = {}
            for v in torch.unique(values).tolist():
                at = values == v
                per_value[str(int(v))] = _scores(example_loss[at], correct[at], mask[at])
                if slept is not None:
                    per_value[str(int(v))]["passes_mean"] = pass_summary(slept[at])["passes_mean"]
        result.update(self._extra_metrics(predictions, {**data, "token_loss": token_loss}))
        return result


class TokenizedTask(Task):
    """A task whose tokens come from a tokenizer (``self._tok``, a :class:`sleepzoo.tokenizer.Tokenizer`, set
    by the subclass's ``__init__``): its vocabulary, size and pad id are the tokenizer's."""

    _tok: Any

    @property
    def vocab(self) -> list[str]:
        return self._tok.vocab

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size

    @property
    def pad_id(self) -> int:
        return self._tok.pad_id

    @property
    def tokenizer_object(self) -> Any:
        """The tokenizer itself (what decodes a model's generated ids, e.g. ``sleepzoo generate``)."""
        return self._tok

    def decode(self, ids: Any, targets: Any = None) -> str:
        """The text of an example (trailing padding dropped); with ``targets``, ``" => "`` and the target
        tokens decoded. A 2-D input gives one line per example."""
        ids_t = torch.as_tensor(ids)
        tg_t = None if targets is None else torch.as_tensor(targets)
        if ids_t.ndim == 2:
            return "\n".join(self.decode(ids_t[i], None if tg_t is None else tg_t[i]) for i in range(len(ids_t)))
        seq = ids_t.tolist()
        while seq and seq[-1] == self.pad_id:
            seq.pop()
        text = self._tok.decode(seq)
        if tg_t is not None:
            if tg_t.shape != ids_t.shape:
                raise SleepzooError(f"decode: targets shape {tuple(tg_t.shape)} differs from ids shape "
                                    f"{tuple(ids_t.shape)}")
            text += " => " + self._tok.decode(t for t in tg_t.tolist() if t != IGNORE_INDEX).strip()
        return text
