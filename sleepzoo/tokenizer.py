"""Tokenizers for text tasks: a pretrained model's ``tokenizer.json``, a built-in word level, or bytes.

Text tasks produce strings; the tokens, and so the lengths that the tasks control, come from the tokenizer in
use. :func:`load_tokenizer` turns a task's ``tokenizer`` option into a :class:`Tokenizer`:

* ``"builtin"`` (from-scratch models): :class:`WordTokenizer`, a small deterministic word-level vocabulary
  that the task supplies (``words``): every word, number and punctuation mark is one token. Ids 0 and 1 are
  ``<pad>`` and ``<unk>``, then the words in the order given (duplicates dropped).
* ``"byte"`` (from-scratch models on arbitrary text: ``task: text``, ``task: passkey``): :class:`ByteTokenizer`,
  the UTF-8 bytes of the text. Ids 0 and 1 are ``<pad>`` and ``<eos>`` (the end-of-document separator),
  byte ``b`` is id ``b + 2``: 258 ids. Every string round-trips: ``decode(encode(s)) == s``.
* a path: :class:`JsonTokenizer`, a ``tokenizer.json`` of the `tokenizers` library (Hugging Face format),
  loaded with ``tokenizers.Tokenizer.from_file``; a directory is taken to hold ``tokenizer.json``. No special
  tokens (BOS/EOS) are added when encoding: tasks add what they need.

Every tokenizer has ``encode(str) -> list[int]``, ``encode_batch(list[str]) -> list[list[int]]``,
``decode(ids) -> str``, ``vocab`` (token strings, index = id), ``vocab_size``, ``pad_id`` and ``eos_id`` (the
end-of-document token, None where the tokenizer has none).

Example::

    from sleepzoo.tokenizer import load_tokenizer
    tok = load_tokenizer("builtin", words=["assign", "v1", "=", "5", "."])
    tok.encode("assign v1 = 5.")        # [2, 3, 4, 5, 6]
    tok.decode([2, 3, 4, 5, 6])         # 'assign v1 = 5.'
    tok = load_tokenizer("/models/qwen/tokenizer.json")   # or the model directory
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from sleepzoo.registry import SleepzooError

BUILTIN = "builtin"
BYTE = "byte"
PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
#: How :class:`WordTokenizer` splits text: runs of letters/digits/underscores, or one other non-space char.
WORD_PATTERN = re.compile(r"\w+|[^\w\s]")
#: Marks written without a space before them when :class:`WordTokenizer` decodes.
_ATTACH_LEFT = frozenset(".,?!:;)")
#: Tokens tried, in order, as the padding token of a ``tokenizer.json`` that sets no padding.
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<unk>")
#: Tokens tried, in order, as the end-of-document token of a ``tokenizer.json``.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")


class Tokenizer:
    """What a text task needs from a tokenizer (see the module docstring)."""

    #: How it was asked for ("builtin" or the resolved path), for messages.
    spec: str = ""

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    #: Token strings, index = token id (tokenizers that keep their own table; others override :attr:`vocab`).
    _vocab: Sequence[str] = ()

    @property
    def vocab(self) -> list[str]:
        """Token strings; index = token id."""
        return list(self._vocab)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab) if self._vocab else len(self.vocab)  # no copy of a large table

    @property
    def pad_id(self) -> int:
        """The padding id: 0, ``<pad>``, for sleepzoo's own tokenizers."""
        return 0

    @property
    def eos_id(self) -> int | None:
        """The end-of-document token (None: the tokenizer has none)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, vocab_size={self.vocab_size})"


class WordTokenizer(Tokenizer):
    """Word level: text is split by :data:`WORD_PATTERN` and each piece looked up; unknown pieces -> ``<unk>``.

    ``decode`` joins tokens with single spaces, except before ``. , ? ! : ; )``; so text written in that
    canonical spacing (single spaces, punctuation attached to the word before it) decodes back exactly.
    Encoding is additive: ``encode(a + " " + b) == encode(a) + encode(b)``.
    """

    def __init__(self, words: Iterable[str], spec: str = BUILTIN) -> None:
        vocab = [PAD, UNK]
        seen = set(vocab)
        for w in words:
            if not isinstance(w, str) or not w:
                raise SleepzooError(f"WordTokenizer: words must be non-empty strings, got {w!r}")
            if WORD_PATTERN.fullmatch(w) is None:
                raise SleepzooError(f"WordTokenizer: {w!r} is not a single word or punctuation mark, so text "
                                    f"could never encode to it")
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        self._vocab = vocab
        self._ids = {w: i for i, w in enumerate(vocab)}
        self.spec = spec

    def encode(self, text: str) -> list[int]:
        ids, unk = self._ids, 1
        return [ids.get(w, unk) for w in WORD_PATTERN.findall(text)]

    def count(self, text: str) -> int:
        """``len(encode(text))`` without the lookups."""
        return len(WORD_PATTERN.findall(text))

    def decode(self, ids: Iterable[int]) -> str:
        vocab, n = self._vocab, len(self._vocab)
        out: list[str] = []
        for i in ids:
            i = int(i)
            w = vocab[i] if 0 <= i < n else f"<unk:{i}>"
            if out and w not in _ATTACH_LEFT:
                out.append(" ")
            out.append(w)
        return "".join(out)



class JsonTokenizer(Tokenizer):
    """A ``tokenizer.json`` (``tokenizers.Tokenizer.from_file``). Encodes without special tokens.

    ``pad_id`` is the padding token the file configures, else the first of :data:`PAD_CANDIDATES` it has,
    else 0 (padding never carries a target, so any id works for a causal model). Ids the file leaves unused
    show in :attr:`vocab` as ``<unused:ID>``.
    """

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as exc:  # pragma: no cover - tokenizers is a dependency
            raise SleepzooError("tokenizer: reading a tokenizer.json needs the 'tokenizers' package "
                                "(pip install tokenizers)") from exc
        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as exc:
            raise SleepzooError(f"tokenizer: could not read {path!r} as a tokenizer.json: {exc}") from exc
        self.spec = path
        table = self._tok.get_vocab(with_added_tokens=True)
        size = max(self._tok.get_vocab_size(with_added_tokens=True), max(table.values(), default=-1) + 1)
        vocab = [f"<unused:{i}>" for i in range(size)]
        for token, i in table.items():
            vocab[i] = token
        self._vocab = vocab
        self._pad_id = self._find_pad(table)
        self._eos_id = next((int(table[t]) for t in EOS_CANDIDATES if t in table), None)

    def _find_pad(self, table: dict[str, int]) -> int:
        padding = self._tok.padding
        if padding and padding.get("pad_id") is not None and padding.get("pad_token") in table:
            return int(padding["pad_id"])
        for token in PAD_CANDIDATES:
            if token in table:
                return int(table[token])
        return 0

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ``<pad>`` = 0, ``<eos>`` = 1, byte ``b`` = ``b + 2`` (258 ids; see the module docstring).

    ``decode`` turns byte ids back into text (a byte sequence cut inside a multi-byte character decodes to
    U+FFFD there) and writes ``<pad>`` / ``<eos>`` for the two special ids; ids past the vocabulary show as
    ``<unk:ID>``. :attr:`vocab` names printable ASCII bytes by their character (space as ``▁``) and the
    others ``<0xNN>``.
    """

    #: Ids before the first byte.
    SPECIALS = (PAD, EOS)
    OFFSET = len(SPECIALS)

    def __init__(self) -> None:
        self.spec = BYTE
        names = [chr(b) if 0x21 <= b <= 0x7E else "\u2581" if b == 0x20 else f"<0x{b:02X}>" for b in range(256)]
        self._vocab = [*self.SPECIALS, *names]

    def encode(self, text: str) -> list[int]:
        # a lone surrogate (valid in a Python str, not in UTF-8) is encoded as "?"
        data = text.encode("utf-8", errors="replace") if not text.isascii() else text.encode("ascii")
        return (np.frombuffer(data, dtype=np.uint8).astype(np.int64) + self.OFFSET).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if self.OFFSET <= i < self.OFFSET + 256:
                run.append(i - self.OFFSET)
                continue
            if run:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
            out.append(self.SPECIALS[i] if 0 <= i < self.OFFSET else f"<unk:{i}>")
        if run:
            out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


    @property
    def eos_id(self) -> int:
        return 1


def load_tokenizer(spec: str, words: Sequence[str] | None = None) -> Tokenizer:
    """``"builtin"`` -> :class:`WordTokenizer` over ``words``; ``"byte"`` -> :class:`ByteTokenizer`; a path
    -> :class:`JsonTokenizer`.

    A path may name the ``tokenizer.json`` file or a directory holding one (a model directory). ``~`` is
    expanded. A path that does not exist raises :class:`~sleepzoo.registry.SleepzooError` naming it.
    """
    if not isinstance(spec, str) or not spec:
        raise SleepzooError(f"tokenizer: expected 'builtin', 'byte' or the path of a tokenizer.json, got {spec!r}")
    if spec == BYTE:
        return ByteTokenizer()
    if spec == BUILTIN:
        if words is None:
            raise SleepzooError("tokenizer: the builtin tokenizer is a word-level vocabulary that the task "
                                "supplies; call load_tokenizer('builtin', words=[...])")
        return WordTokenizer(words)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise SleepzooError(f"tokenizer: {path!r} does not exist; give the path of a tokenizer.json (or of a "
                            f"directory holding one), 'byte' for UTF-8 bytes, or 'builtin' for the task's own "
                            f"word-level vocabulary (where the task has one)")
    return JsonTokenizer(path)


def describe_tokenizer(tok: Any) -> dict[str, Any]:
    """JSON-ready summary for run metadata."""
    return {"class": type(tok).__name__, "spec": tok.spec, "vocab_size": tok.vocab_size, "pad_id": tok.pad_id,
            "eos_id": tok.eos_id}
