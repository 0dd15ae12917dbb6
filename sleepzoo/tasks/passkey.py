"""Passkey retrieval (``task: passkey``): a needle of digits in a haystack of filler, asked for at the end.

See :class:`Passkey`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sleepzoo.registry import SleepzooError
from sleepzoo.tasks.base import IGNORE_INDEX, TokenizedTask, _check_int
from sleepzoo.tasks.text import load_documents, load_text_tokenizer
from sleepzoo.tokenizer import describe_tokenizer

NEEDLE = " The pass key is {key}. Remember it. "
QUESTION = " What is the pass key? The pass key is"
BUILTIN_FILLER = "builtin"
#: The built-in haystack: neutral sentences, repeated in this order.
FILLER_SENTENCES = (
    "The river runs past the old mill.", "A light rain fell in the afternoon.",
    "The shop on the corner opens at nine.", "Birds sat in a row on the fence.",
    "The road turns left after the bridge.", "Someone left a bicycle by the door.",
    "The clock in the hall is a little slow.", "Clouds moved slowly over the hills.",
)
#: Depths are bucketed in percent: ``depth_pct`` = round(100 * depth).
DEFAULT_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
MAX_DIGITS = 18  # 10**18 keys still fit in an int64


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class Passkey(TokenizedTask):
    """Passkey retrieval across evicted windows: recall a key of digits read many windows before the question.

    An example is exactly ``length`` tokens::

        [filler: round(depth * H) tokens] [needle] [filler: the rest of H] [question] [answer]

    needle ``" The pass key is DDDDD. Remember it. "``, question ``" What is the pass key? The pass key is"``,
    answer ``" DDDDD"`` (``digits`` decimal digits, leading zeros kept); H, the haystack, is whatever
    ``length`` leaves after needle, question and answer. So ``depth`` is measured in tokens: 0 puts the
    needle first, 1 right before the question. The filler is a window of the filler stream at a random
    offset (the stream repeats when shorter than H): the built-in one (``filler: builtin``, neutral sentences
    repeated) or documents read like ``task: text`` from ``filler`` (paths, a glob or a list; joined by a
    blank line). Each piece is encoded on its own, so positions are exact with any tokenizer.

    **Targets** are the answer's tokens only (aligned: the target at ``t`` is the token at ``t + 1``); an
    answer token that is only whitespace (the byte tokenizer's space) belongs to the prompt, so with
    ``tokenizer: byte`` the targets are exactly the digits. Exact accuracy = every digit right. Examples of a
    ``length`` below the longest are right-padded (no targets) to ``seq_len = max(length)``.

    **Options.** ``length`` (tokens, or a list to sweep), ``depth`` (a fraction in [0, 1], or a list),
    ``digits`` (1..18), ``filler``, ``tokenizer`` (``byte`` or a tokenizer.json path), ``text_field`` (of
    JSON-lines / parquet filler). Each example draws its key uniformly, and its depth and length uniformly
    from the lists.

    **Split** by a stable hash of (key, depth, length): a test (key, depth, length) never occurs in training.
    **Metrics**: every metric per ``depth_pct`` (round(100 * depth)) and per ``length`` bucket.
    """

    name = "passkey"
    buckets = ("depth_pct", "length")

    def __init__(self, length: int | list[int] = 512, depth: float | list[float] = DEFAULT_DEPTHS,
                 digits: int = 5, filler: str | list[str] = BUILTIN_FILLER, tokenizer: str = "byte",
                 text_field: str = "text") -> None:
        owner = "passkey"
        self.digits = _check_int(owner, "digits", digits, minimum=1, maximum=MAX_DIGITS)
        lengths = [_check_int(owner, "length", v, minimum=1) for v in _as_list(length)]
        depths = [self._check_depth(v) for v in _as_list(depth)]
        if not lengths or not depths:
            raise SleepzooError(f"{owner}: {'length' if not lengths else 'depth'} must not be an empty list")
        self.length = length if not isinstance(length, (list, tuple)) else list(length)
        self.depth = depth if not isinstance(depth, (list, tuple)) else list(depth)
        self._lengths, self._depths = sorted(set(lengths)), sorted(set(depths))
        if len({round(100 * d) for d in self._depths}) < len(self._depths):
            raise SleepzooError(f"{owner}: depth: {self.depth!r} has depths closer than 0.01, which share a "
                                f"depth_pct bucket; give distinct percentages")
        if not isinstance(tokenizer, str):
            raise SleepzooError(f"{owner}: tokenizer must be 'byte' or the path of a tokenizer.json, got {tokenizer!r}")
        self.tokenizer, self.filler, self.text_field = tokenizer, filler, text_field
        self._tok = load_text_tokenizer(tokenizer, owner)
        self._question = self._encode(QUESTION)
        self._filler = self._filler_stream(filler)
        shortest = min(self._lengths)
        fixed = self._fixed_tokens()
        if shortest <= fixed:
            raise SleepzooError(f"{owner}: length: {shortest} tokens is too short: needle, question and a "
                                f"{self.digits}-digit answer take up to {fixed} tokens of tokenizer {tokenizer!r}, "
                                f"and the haystack needs at least 1; use length >= {fixed + 1}")

    @staticmethod
    def _check_depth(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise SleepzooError(f"passkey: depth must be a fraction in [0, 1] (or a list of them), got "
                                f"{type(value).__name__} {value!r}")
        return float(value)

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text), dtype=np.int64)

    def _filler_stream(self, filler: str | list[str]) -> np.ndarray:
        if filler == BUILTIN_FILLER:
            text = " ".join(FILLER_SENTENCES)
        else:
            text = "\n\n".join(load_documents(filler, text_field=self.text_field, owner="passkey: filler"))
        stream = self._encode(" " + text)
        if len(stream) == 0:
            raise SleepzooError(f"passkey: filler: {filler!r} encodes to no tokens")
        return stream

    def _key_text(self, key: int) -> str:
        return f"{int(key):0{self.digits}d}"

    def _answer(self, key: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt tokens, target tokens) of the answer: leading whitespace-only tokens go to the prompt."""
        ids = self._encode(" " + self._key_text(key))
        lead = 0
        while lead < len(ids) - 1 and not self._tok.decode([int(ids[lead])]).strip():
            lead += 1
        return ids[:lead], ids[lead:]

    def _fixed_tokens(self) -> int:
        """The most tokens that needle + question + answer take over a sample of keys (all keys when few)."""
        keys = range(10 ** self.digits) if self.digits <= 2 else [0, 10 ** self.digits - 1, *range(1, 10 ** 3, 37)]
        return max(len(self._encode(NEEDLE.format(key=self._key_text(k)))) + len(self._question)
                   + sum(len(p) for p in self._answer(k)) for k in keys)

    # ------------------------------------------------------------------------------------ properties
    @property
    def seq_len(self) -> int:
        return max(self._lengths)

    # ------------------------------------------------------------------------------------ generation
    def _draw(self, rng: np.random.Generator, m: int) -> dict[str, np.ndarray]:
        return {"key": rng.integers(0, 10 ** self.digits, size=m, dtype=np.int64),
                "depth": rng.integers(0, len(self._depths), size=m, dtype=np.int64),
                "length": rng.integers(0, len(self._lengths), size=m, dtype=np.int64),
                "offset": rng.integers(0, len(self._filler), size=m, dtype=np.int64)}

    def _split_key(self, content: dict[str, np.ndarray]) -> np.ndarray:
        depth_ppm = np.round(np.asarray(self._depths)[content["depth"]] * 1e6).astype(np.int64)
        return np.stack([content["key"], depth_ppm, np.asarray(self._lengths, np.int64)[content["length"]]], axis=1)

    def _haystack(self, offset: int, size: int) -> np.ndarray:
        reps = -(-(offset + size) // len(self._filler))
        return np.tile(self._filler, reps)[offset:offset + size]

    def layout(self, key: int, depth: float, length: int, offset: int = 0) -> dict[str, Any]:
        """One example's tokens and where its parts are: ``ids`` (``length`` tokens), ``needle_start``,
        ``needle_end``, ``question_start``, ``answer_start`` (the first target token) and ``targets`` (the
        answer tokens that are targets)."""
        needle = self._encode(NEEDLE.format(key=self._key_text(key)))
        lead, answer = self._answer(key)
        room = length - len(needle) - len(self._question) - len(lead) - len(answer)
        if room < 1:
            raise SleepzooError(f"passkey: length: {length} tokens cannot hold needle, question and answer "
                                f"({length - room} tokens) and a haystack")
        before = int(round(depth * room))
        hay = self._haystack(offset, room)
        ids = np.concatenate([hay[:before], needle, hay[before:], self._question, lead, answer])
        question_start = before + len(needle) + room - before
        return {"ids": ids, "needle_start": before, "needle_end": before + len(needle),
                "question_start": question_start, "answer_start": len(ids) - len(answer), "targets": answer}

    def _build(self, content: dict[str, np.ndarray], split: str) -> dict[str, torch.Tensor]:
        n, T = len(content["key"]), self.seq_len
        ids = np.full((n, T), self.pad_id, dtype=np.int64)
        targets = np.full((n, T), IGNORE_INDEX, dtype=np.int64)
        needle_start = np.zeros(n, dtype=np.int64)
        depths = np.asarray(self._depths)[content["depth"]]
        lengths = np.asarray(self._lengths, dtype=np.int64)[content["length"]]
        for i in range(n):
            ex = self.layout(int(content["key"][i]), float(depths[i]), int(lengths[i]), int(content["offset"][i]))
            L, a = len(ex["ids"]), ex["answer_start"]
            ids[i, :L] = ex["ids"]
            targets[i, a - 1:L - 1] = ex["targets"]
            needle_start[i] = ex["needle_start"]
        return {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets),
                "depth_pct": torch.from_numpy(np.round(depths * 100).astype(np.int64)),
                "length": torch.from_numpy(lengths), "key": torch.from_numpy(content["key"].copy()),
                "needle_start": torch.from_numpy(needle_start)}

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["tokenizer"] = describe_tokenizer(self._tok)
        d["depths"] = self._depths
        d["lengths"] = self._lengths
        d["filler_tokens"] = int(len(self._filler))
        return d
