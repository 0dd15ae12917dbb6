"""Rule 110: predict a bit of a cellular automaton many steps ahead (SPEC 2), a P-complete sequential task."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sleepzoo.registry import SleepzooError
from sleepzoo.tasks.base import IGNORE_INDEX, Task, _check_int

#: Wolfram's rule number: bit (4*left + 2*centre + right) of 110 is the new centre cell.
RULE = 110
#: The same table as a lookup array: 111->0 110->1 101->1 100->0 011->1 010->1 001->1 000->0.
RULE_TABLE = np.array([(RULE >> i) & 1 for i in range(8)], dtype=np.uint8)

_U64 = np.uint64


def rule110_step(cells: np.ndarray) -> np.ndarray:
    """One Rule-110 update of every row of ``cells`` (0/1 array, cells along the last axis, periodic)."""
    cells = np.asarray(cells, dtype=np.uint8)
    left = np.roll(cells, 1, axis=-1)  # left[..., i] = cells[..., i-1], wrapping around
    right = np.roll(cells, -1, axis=-1)  # right[..., i] = cells[..., i+1]
    return RULE_TABLE[(left << 2) | (cells << 1) | right]


def rule110_evolve(cells: np.ndarray, steps: int) -> np.ndarray:
    """``steps`` Rule-110 updates of 0/1 ``cells`` (last axis = cells, periodic boundary); any width >= 1."""
    out = np.asarray(cells, dtype=np.uint8)
    for _ in range(steps):
        out = rule110_step(out)
    return out


def _evolve_packed(words: np.ndarray, width: int, steps: int) -> np.ndarray:
    """:func:`rule110_evolve` on states packed into uint64 words (bit i = cell i), for 3 <= width <= 64.

    Much faster than the unpacked form because a whole state updates in a handful of word operations.
    Rule 110 as a boolean formula: new = (centre | right) & ~(left & centre & right).
    """
    mask = _U64((1 << width) - 1)
    up, down = _U64(1), _U64(width - 1)
    x = words.astype(_U64) & mask
    left, right, tmp = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    for _ in range(steps):
        # Rotations within `width` bits. Bits at and above `width` pick up junk, but every operation below
        # is bitwise, so one mask at the end of the step clears them. In-place ops: no allocations.
        np.left_shift(x, up, out=left)
        left |= np.right_shift(x, down, out=tmp)  # bit i <- cell i-1
        np.right_shift(x, up, out=right)
        right |= np.left_shift(x, down, out=tmp)  # bit i <- cell i+1
        np.bitwise_and(left, x, out=tmp)
        tmp &= right
        np.invert(tmp, out=tmp)
        x |= right
        x &= tmp
        x &= mask
    return x


class Rule110(Task):
    """Rule 110 (SPEC 2): remember ``states`` random bit strings, then answer where each one goes.

    An example is ``states`` independent random states of ``bits`` cells, written one token (``0`` or ``1``)
    per cell, state after state, followed by the query tokens ``Q1 .. Q{states}``. The target at query ``Qi``
    is cell 0 (the first token written) of state ``i`` after ``steps`` Rule-110 updates with a periodic
    boundary; there is no other target. T = ``states * bits + states`` (100 by default), and
    :attr:`window` = ``bits`` puts one state in each attention window, so that every state has been
    evicted before the queries arrive.

    Vocabulary (token id = index): ``<pad> 0 1 Q1 .. Q{states}``. Rule table for (left, centre, right):
    111->0 110->1 101->1 100->0 011->1 010->1 001->1 000->0.

    Example: ``Rule110(steps=1, states=2, bits=8).generate(1, seed=0)``, decoded with its targets (``decode``
    writes ``Qi=>answer``; the input ids are ``2 2 2 2 2 1 2 1 1 2 1 1 1 1 1 2 3 4``)::

        11111010 01000001 | Q1=>1 Q2=>1

    State 1 is ``11111010``: cell 0 is ``1``, its left neighbour is cell 7 (``0``, periodic boundary) and its
    right neighbour cell 1 (``1``); (0, 1, 1) -> 1. State 2, ``01000001``: (1, 0, 1) -> 1. With the default
    ``Rule110()`` (32 steps, 4 states of 24 bits, T = 100) an example of the test split reads::

        110111100000111000000011 110010001101011111100101 111001010000010010111101 110110110110100101101110 | Q1=>0 Q2=>1 Q3=>1 Q4=>0

    The metrics from :meth:`evaluate` add ``label_accuracy`` (list, one
    accuracy per query, in order) and the same values as ``label_accuracy_1 .. label_accuracy_{states}``.
    """

    name = "rule110"

    def __init__(self, steps: int | list[int] = 32, states: int = 4, bits: int = 24) -> None:
        # A list of step counts makes a mixed-depth task: every example draws its t from the list (the test
        # split cycles through it) and writes it as a token ``T{t}`` before each state, so the window (which
        # grows by one token) knows how far to run the automaton before it is evicted. The metrics then come
        # per t under ``buckets["t"]``: the x axis of the paper's Figure 2a, from one run.
        if isinstance(steps, (list, tuple)):
            if not steps:
                raise SleepzooError("Rule110: steps=[] is empty; give one step count or a list of them, e.g. [0, 2, 4, 8]")
            values = [_check_int("Rule110", "steps", t, minimum=0) for t in steps]
            if len(set(values)) != len(values):
                raise SleepzooError(f"Rule110: steps={list(steps)!r} repeats a value; list each t once")
            self.step_list: list[int] | None = values
            self.steps = values  # type: ignore[assignment]
            self.buckets = ("t",)
        else:
            self.steps = _check_int("Rule110", "steps", steps, minimum=0)
            self.step_list = None
        self.states = _check_int("Rule110", "states", states, minimum=1)
        # At least 3 cells so that a cell's left and right neighbours are distinct from each other.
        self.bits = _check_int("Rule110", "bits", bits, minimum=3)
        self._vocab = ["<pad>", "0", "1"] + [f"Q{i + 1}" for i in range(self.states)]
        self._vocab += [f"T{t}" for t in (self.step_list or [])]
        self._nbytes = (self.bits + 7) // 8
        # Random bytes are drawn per state; bits beyond `bits` in the last byte are cleared so that each
        # state has exactly one byte encoding (the encoding is the split key).
        spare = self._nbytes * 8 - self.bits
        self._last_byte_mask = np.uint8(0xFF >> spare)

    @property
    def _span(self) -> int:
        """Tokens per state: its cells, plus the ``T{t}`` token in the mixed-depth form."""
        return self.bits + (self.step_list is not None)

    # ------------------------------------------------------------------------------------ properties
    @property
    def vocab(self) -> list[str]:
        return list(self._vocab)

    @property
    def seq_len(self) -> int:
        return self.states * self._span + self.states

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def window(self) -> int:
        """Suggested attention window for recipes: one state (with its ``T{t}`` token) per window."""
        return self._span

    @property
    def query_positions(self) -> list[int]:
        """Positions of ``Q1 .. Q{states}`` (the only positions with targets)."""
        start = self.states * self._span
        return list(range(start, start + self.states))

    # ------------------------------------------------------------------------------------ generation
    def _draw(self, rng: np.random.Generator, m: int) -> np.ndarray:
        # uint8 [m, states, nbytes]: the packed states themselves. Drawing bytes, not bits, makes the
        # rejection loop cheap: the test split keeps only 1 candidate in 8.
        raw = rng.integers(0, 256, size=(m, self.states, self._nbytes), dtype=np.uint8)
        raw[..., -1] &= self._last_byte_mask
        if self.step_list is None:
            return raw
        return {"raw": raw, "t": rng.integers(0, len(self.step_list), size=m)}

    def _split_key(self, content: np.ndarray) -> np.ndarray:
        # All states' bytes, read as little-endian uint64 words (zero-padded): the same identity as the
        # bytes themselves, but 8x fewer columns for the hash to mix.
        if isinstance(content, dict):  # mixed depth: t is not part of the key (the test split cycles t)
            content = content["raw"]
        flat = content.reshape(content.shape[0], -1)
        width = -(-flat.shape[1] // 8) * 8
        padded = np.zeros((flat.shape[0], width), dtype=np.uint8)
        padded[:, : flat.shape[1]] = flat
        return padded.view("<u8")

    def _unpack(self, raw: np.ndarray) -> np.ndarray:
        """uint8 [n, states, bits] cells from packed bytes (little-endian bit order: bit i = cell i)."""
        return np.unpackbits(raw, axis=-1, count=self.bits, bitorder="little")

    def answers(self, cells: np.ndarray, steps: int | None = None) -> np.ndarray:
        """Cell 0 of each state after ``steps`` updates (default: the task's; required in the mixed-depth
        form); ``cells`` is 0/1 ``[..., bits]``."""
        cells = np.asarray(cells, dtype=np.uint8)
        if steps is None:
            if self.step_list is not None:
                raise SleepzooError(f"Rule110.answers: this task mixes steps={self.step_list}; say which t")
            steps = self.steps
        steps = _check_int("Rule110.answers", "steps", steps, minimum=0)
        raw = np.packbits(cells, axis=-1, bitorder="little") if self.bits <= 64 else None
        return self._cell0(raw, cells, steps)

    def _cell0(self, raw: np.ndarray | None, cells: np.ndarray, steps: int) -> np.ndarray:
        """Cell 0 after ``steps`` updates: from the packed bytes ``[..., nbytes]`` viewed as uint64 words when
        bits <= 64 (much faster), else from the 0/1 ``cells``."""
        if self.bits > 64:
            return rule110_evolve(cells, steps)[..., 0]
        padded = np.zeros(raw.shape[:-1] + (8,), dtype=np.uint8)
        padded[..., : raw.shape[-1]] = raw
        return (_evolve_packed(padded.view("<u8")[..., 0], self.bits, steps) & _U64(1)).astype(np.uint8)

    def _build(self, content: Any, split: str) -> dict[str, torch.Tensor]:
        if self.step_list is None:
            raw, t_of = content, None
        else:
            raw = content["raw"]
            m = raw.shape[0]
            # test: t cycles through the list, so every bucket gets the same share of the test examples
            index = np.arange(m) % len(self.step_list) if split == "test" else content["t"]
            t_of = np.asarray(self.step_list, dtype=np.int64)[index]
        n = raw.shape[0]
        cells = self._unpack(raw)  # [n, S, B]
        if t_of is None:
            answer = self._cell0(raw, cells, self.steps)  # [n, S], from the drawn bytes (no repacking)
        else:
            answer = np.zeros((n, self.states), dtype=np.uint8)
            for t in np.unique(t_of):
                rows = t_of == t
                answer[rows] = self._cell0(raw[rows], cells[rows], int(t))
        ids = np.empty((n, self.seq_len), dtype=np.int64)
        body = self.states * self._span
        states = ids[:, :body].reshape(n, self.states, self._span)
        if t_of is None:
            states[:] = cells + 1  # "0" is id 1, "1" is id 2
        else:
            states[:, :, 0] = (3 + self.states + index)[:, None]  # T{t}, after the query tokens
            states[:, :, 1:] = cells + 1
        ids[:, :body] = states.reshape(n, body)
        ids[:, body:] = np.arange(3, 3 + self.states)  # Q1 is id 3
        targets = np.full((n, self.seq_len), IGNORE_INDEX, dtype=np.int64)
        targets[:, body:] = answer + 1
        out = {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets)}
        if t_of is not None:
            out["t"] = torch.from_numpy(t_of)
        return out

    # --------------------------------------------------------------------------------------- display
    def decode(self, ids: Any, targets: Any = None) -> str:
        """States as bit strings, then the queries: ``11111010 01000001 | Q1=>1 Q2=>1`` (with targets).

        Sequences that are not of this task's length fall back to the generic space-separated form.
        """
        ids_t = torch.as_tensor(ids)
        if ids_t.ndim != 1 or ids_t.numel() != self.seq_len or self.step_list is not None:
            return super().decode(ids, targets)
        tg_t = None if targets is None else torch.as_tensor(targets)
        body = self.states * self.bits
        words = ["".join(self._token(int(i)) for i in ids_t[s * self.bits:(s + 1) * self.bits])
                 for s in range(self.states)]
        queries = super().decode(ids_t[body:], None if tg_t is None else tg_t[body:])
        return " ".join(words) + " | " + queries

    # --------------------------------------------------------------------------------------- metrics
    def _extra_metrics(self, predictions: torch.Tensor, data: dict[str, torch.Tensor]) -> dict[str, Any]:
        q = self.query_positions
        correct = (predictions[:, q] == data["targets"][:, q]).double().mean(dim=0).tolist()
        out: dict[str, Any] = {"label_accuracy": correct}
        out.update({f"label_accuracy_{i + 1}": acc for i, acc in enumerate(correct)})
        return out

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["window"] = self.window
        return d
