"""Language modelling on local text files (``task: text``): plain text, JSON lines, parquet, saved datasets.

See :class:`TextTask`. :func:`load_documents` (files -> documents) is shared with ``task: passkey``'s filler.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sleepzoo.registry import SleepzooError
from sleepzoo.tasks.base import IGNORE_INDEX, SPLITS, TokenizedTask, _check_int, stable_hash
from sleepzoo.tokenizer import BUILTIN, Tokenizer, describe_tokenizer, load_tokenizer

PACKINGS = ("pack", "crop")
#: How a plain-text file is cut into documents: the whole file, or at blank lines.
TEXT_DOCUMENTS = ("file", "blank_line")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
#: Plain-text suffixes read when a *directory* is given (a file named explicitly is read whatever its suffix).
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
#: What a directory walk reads (``.json`` only when named: in a directory it is more often metadata).
WALKED_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".ndjson") + PARQUET_SUFFIXES
#: A directory holding one of these was written by Hugging Face ``datasets``' ``save_to_disk``.
DATASETS_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
#: One or more lines holding only whitespace: the document boundary of ``text_documents: blank_line``.
BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")


# ------------------------------------------------------------------------------------------- loading
def _as_list(paths: str | list[str], owner: str) -> list[str]:
    items = [paths] if isinstance(paths, str) else list(paths) if isinstance(paths, (list, tuple)) else None
    if items is None or not items or not all(isinstance(p, str) and p for p in items):
        raise SleepzooError(f"{owner}: paths must be a file, a directory or a glob (or a list of them), got "
                            f"{paths!r}")
    return items


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in DATASETS_MARKERS)


def resolve_paths(paths: str | list[str], owner: str) -> list[Path]:
    """The sources that ``paths`` names, in order: each entry is a file, a directory (its files with a known
    suffix, recursively, sorted; or itself when ``datasets`` saved it) or a glob (matches sorted). An entry
    that names nothing raises SleepzooError naming it; a source named twice is read once."""
    out: list[Path] = []
    for item in _as_list(paths, owner):
        path = Path(os.path.expanduser(item))
        if any(c in item for c in "*?["):
            found = [Path(p) for p in sorted(glob.glob(os.path.expanduser(item), recursive=True))]
            found = [p for p in found if p.is_file() or _is_saved_dataset(p)]
        elif _is_saved_dataset(path) or path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in WALKED_SUFFIXES)
        else:
            raise SleepzooError(f"{owner}: paths: {item!r} does not exist (give a file, a directory or a glob)")
        if not found:
            raise SleepzooError(f"{owner}: paths: {item!r} names no file to read (a directory is searched for "
                                f"{' '.join(WALKED_SUFFIXES)} files)")
        out += found
    return list(dict.fromkeys(out))


def _read_text(path: Path, text_documents: str, owner: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SleepzooError(f"{owner}: {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if text_documents == "file":
        return [text]
    return BLANK_LINES.split(text)


def _json_rows(path: Path, owner: str) -> list[tuple[int, Any]]:
    """(line number, object) of a JSON-lines file; a ``.json`` file holding one JSON list gives its items."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SleepzooError(f"{owner}: {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except ValueError:
            whole = None
        if isinstance(whole, list):
            return [(i + 1, row) for i, row in enumerate(whole)]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except ValueError as exc:
            raise SleepzooError(f"{owner}: {path}:{number} is not a JSON line ({exc}); JSON lines hold one "
                                f"object per line") from None
    return rows


def _read_jsonl(path: Path, text_field: str, owner: str) -> list[str]:
    docs = []
    for number, row in _json_rows(path, owner):
        value = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(value, str):
            got = "no such field" if not isinstance(row, dict) or text_field not in row else repr(value)[:60]
            raise SleepzooError(f"{owner}: text_field: {path}:{number} has no string field {text_field!r} "
                                f"({got}); set text_field to the field that holds the text")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # valid JSON ("\ud800") that is not text: a lone surrogate
            raise SleepzooError(f"{owner}: {path}:{number}: field {text_field!r} is not valid Unicode text "
                                f"({exc.reason} at character {exc.start}); fix or drop that line") from None
        docs.append(value)
    return docs


def _column(names: list[str], text_field: str, source: Path, owner: str) -> None:
    if text_field not in names:
        raise SleepzooError(f"{owner}: text_field: {str(source)!r} has no column {text_field!r} (it has "
                            f"{', '.join(names) or 'none'}); set text_field to the column that holds the text")


def _read_parquet(path: Path, text_field: str, owner: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SleepzooError(f"{owner}: reading {str(path)!r} needs pyarrow: pip install pyarrow "
                            f"(or pip install -e '.[text]')") from None
    try:
        schema = pq.read_schema(path)
        _column(list(schema.names), text_field, path, owner)
        values = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    except SleepzooError:
        raise
    except Exception as exc:
        raise SleepzooError(f"{owner}: could not read {str(path)!r} as parquet: {exc}") from None
    return [v for v in values if isinstance(v, str)]


def _read_saved_dataset(path: Path, text_field: str, owner: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise SleepzooError(f"{owner}: {str(path)!r} was saved by Hugging Face datasets; reading it needs the "
                            f"datasets package: pip install datasets (or pip install -e '.[text]')") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise SleepzooError(f"{owner}: datasets.load_from_disk({str(path)!r}) failed: {exc}") from None
    # A DatasetDict's own splits are read in name order: this task makes its own split by hash.
    parts = [loaded[k] for k in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    docs: list[str] = []
    for part in parts:
        _column(list(part.column_names), text_field, path, owner)
        docs += [v for v in part[text_field] if isinstance(v, str)]
    return docs


def load_documents(paths: str | list[str], *, text_field: str = "text", text_documents: str = "file",
                   max_documents: int = 0, owner: str = "text") -> list[str]:
    """The documents of ``paths`` in order (see :func:`resolve_paths`), read by suffix: ``.jsonl``,
    ``.ndjson``, ``.json`` as JSON lines (the string field ``text_field`` of each object; a ``.json`` file may
    instead hold one list of objects), ``.parquet`` with
    pyarrow (column ``text_field``), a ``datasets.save_to_disk`` directory with ``datasets.load_from_disk``,
    anything else as UTF-8 plain text (one document per file, or per blank-line-separated block with
    ``text_documents="blank_line"``). Documents that are empty or only whitespace are dropped; with
    ``max_documents > 0`` only the first that many are kept. An empty result raises SleepzooError."""
    if text_documents not in TEXT_DOCUMENTS:
        raise SleepzooError(f"{owner}: text_documents must be one of {', '.join(TEXT_DOCUMENTS)}, got "
                            f"{text_documents!r}")
    if not isinstance(text_field, str) or not text_field:
        raise SleepzooError(f"{owner}: text_field must be a non-empty string, got {text_field!r}")
    docs: list[str] = []
    sources = resolve_paths(paths, owner)
    for source in sources:
        if _is_saved_dataset(source):
            found = _read_saved_dataset(source, text_field, owner)
        elif source.suffix.lower() in JSONL_SUFFIXES:
            found = _read_jsonl(source, text_field, owner)
        elif source.suffix.lower() in PARQUET_SUFFIXES:
            found = _read_parquet(source, text_field, owner)
        else:
            found = _read_text(source, text_documents, owner)
        docs += [d for d in found if d.strip()]
        if 0 < max_documents <= len(docs):
            return docs[:max_documents]
    if not docs:
        shown = ", ".join(str(s) for s in sources[:3]) + (" ..." if len(sources) > 3 else "")
        raise SleepzooError(f"{owner}: paths: the corpus is empty: {len(sources)} source(s) ({shown}) hold no "
                            f"non-blank document")
    return docs


def document_keys(docs: list[str]) -> np.ndarray:
    """``[n, 2]`` int64: a 128-bit digest of each document's UTF-8 text, the identity its split is decided by
    (so the split does not depend on the tokenizer, and identical documents share a split)."""
    digests = b"".join(hashlib.blake2b(d.encode("utf-8"), digest_size=16).digest() for d in docs)
    return np.frombuffer(digests, dtype="<i8").reshape(len(docs), 2).astype(np.int64)


def load_text_tokenizer(spec: str, owner: str) -> Tokenizer:
    """``"byte"`` or a tokenizer.json path (text tasks have no word list for ``"builtin"``)."""
    if spec == BUILTIN:
        raise SleepzooError(f"{owner}: tokenizer: 'builtin' is a task's own word-level vocabulary, which free text "
                            f"has none of; give 'byte' (UTF-8 bytes) or the path of a tokenizer.json")
    return load_tokenizer(spec)


def window_chunk(model: torch.nn.Module, window: int | None) -> int | None:
    """Tokens per window of ``model`` evaluated with ``window`` (None: the model's own): the engine's chunk,
    i.e. the window under ``full_flush``, ``sleep_every`` under ``sliding_window``; None for a model without
    sleep settings and no window given."""
    sleep = getattr(model, "sleep", None)
    if sleep is None:
        return window
    from sleepzoo.engine import resolve_eviction

    window = sleep.window if window is None else window
    return resolve_eviction(sleep.eviction, window, getattr(sleep, "sleep_every", None)).chunk


def _grouped(token_loss: torch.Tensor, correct: torch.Tensor, mask: torch.Tensor, size: int) -> dict[str, Any]:
    """Loss and token accuracy over consecutive groups of ``size`` positions, keyed by the group index."""
    T = mask.shape[1]
    out = {}
    for g, start in enumerate(range(0, T, size)):
        m = mask[:, start:start + size]
        count = int(m.sum())
        if count == 0:
            continue
        out[str(g)] = {"loss": float(token_loss[:, start:start + size].double().sum()) / count,
                       "token_accuracy": float(correct[:, start:start + size].sum()) / count,
                       "num_examples": int(m.any(dim=1).sum()), "num_targets": count,
                       "start": start, "end": min(start + size, T)}
    return out


# ---------------------------------------------------------------------------------------------- task
class TextTask(TokenizedTask):
    """Language modelling on your own documents: next-token loss everywhere, per window and per position.

    **Corpus.** ``paths``: a file, a directory (searched recursively for ``.txt .text .md .rst .jsonl
    .ndjson .parquet``), a glob, or a list of them (see :func:`load_documents`). Plain text is one
    document per file (``text_documents: file``) or one per block separated by one or more blank lines
    (``text_documents: blank_line``: lines holding only whitespace); JSON lines give the string field
    ``text_field`` (default ``text``) of each object; parquet (pyarrow) and ``datasets.save_to_disk``
    directories (``datasets``; both optional: ``pip install -e '.[text]'``) give the column ``text_field``.
    Blank documents are dropped; ``max_documents > 0`` keeps the first that many. The files are read and
    tokenized once, when the task is built.

    **Tokens.** ``tokenizer: byte`` (UTF-8 bytes, 258 ids, :class:`~sleepzoo.tokenizer.ByteTokenizer`) or
    the path of a ``tokenizer.json`` (or of a model directory). Each document is its tokens followed by the
    end-of-document token (``<eos>``; a tokenizer.json's ``<|endoftext|>``, ``</s>``, ... or, without one,
    its padding token).

    **Split.** A document is in the test split iff a stable hash of its text falls in 1 of 8 buckets, so a
    document is never in both splits, whatever the tokenizer, ``seq_len`` or packing; an identical copy of a
    document goes where the document goes.

    **Examples** (``seq_len`` T; targets aligned as in every task: the target at ``t`` is the token at
    ``t + 1``; every real next token is a target):

    * ``packing: pack``: a split's documents are concatenated (corpus order, each ending in ``<eos>``) into
      one stream ``s``; an example is ``s[o : o + T]`` with targets ``s[o + 1 : o + T + 1]``. The test split
      is the non-overlapping examples ``o = 0, T, 2T, ...`` (``(len(s) - 1) // T`` of them; the tail dropped);
      training draws ``o`` uniformly from every offset, so a small corpus still gives varied batches.
    * ``packing: crop``: one example per document: ``d = tokens + [<eos>]`` cropped to its first T + 1
      tokens; inputs ``d[:T]`` (right-padded with the padding token), targets ``d[1:T + 1]``, ``-100`` on
      the padding. The test split is every test document once; training draws documents uniformly.

    ``generate(n, seed, "test")`` is the first ``n`` of a seeded shuffle of the test examples (``n`` may not
    exceed their number, :attr:`test_size`); ``evaluate`` scores ``min(num_examples, test_size)`` of them.
    ``generate(n, seed, "train")`` draws with replacement.

    **Metrics.** :meth:`evaluate` adds, under ``buckets``: ``window`` (loss and token accuracy of the targets
    in each window index ``t // chunk``, chunk = the window the model evaluates with, or ``sleep_every``
    under sliding-window eviction: window 0 is read before any eviction, window ``w`` after ``w``) and
    ``position`` (the same over buckets of ``position_bucket`` positions; 0: a quarter of the window, or
    T / 16 for a model without a window). Each entry holds ``loss``, ``token_accuracy``, ``num_targets``,
    ``num_examples`` (examples with a target there) and its positions ``start``/``end``.
    :func:`sleepzoo.report.plot_loss_by_position` draws them for several runs (one line per N).
    """

    name = "text"

    def __init__(self, paths: str | list[str] = "", seq_len: int = 256, tokenizer: str = "byte",
                 packing: str = "pack", text_field: str = "text", text_documents: str = "file",
                 max_documents: int = 0, position_bucket: int = 0) -> None:
        owner = "text"
        if paths == "" or paths == []:
            raise SleepzooError(f"{owner}: paths is required: a file, a directory or a glob of documents (or a "
                                f"list of them), e.g. task.paths=docs/*.md")
        self.paths = paths if isinstance(paths, str) else list(paths)
        self._seq_len = _check_int(owner, "seq_len", seq_len, minimum=1)
        if packing not in PACKINGS:
            raise SleepzooError(f"{owner}: packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
        self.packing = packing
        self.text_field = text_field
        self.text_documents = text_documents
        self.max_documents = _check_int(owner, "max_documents", max_documents, minimum=0)
        self.position_bucket = _check_int(owner, "position_bucket", position_bucket, minimum=0)
        if not isinstance(tokenizer, str):
            raise SleepzooError(f"{owner}: tokenizer must be 'byte' or the path of a tokenizer.json, got {tokenizer!r}")
        self.tokenizer = tokenizer
        self._tok = load_text_tokenizer(tokenizer, owner)
        docs = load_documents(paths, text_field=text_field, text_documents=text_documents,
                              max_documents=self.max_documents, owner=owner)
        self._num_documents = len(docs)
        test = (stable_hash(document_keys(docs)) % np.uint64(self.test_buckets)) == 0
        eos = self._tok.eos_id if self._tok.eos_id is not None else self._tok.pad_id
        self._eos_id = eos
        encoded = self._tok.encode_batch(docs)
        # int32 halves the memory of a large corpus (every vocabulary in use has far fewer than 2**31 ids)
        self._docs = {split: [np.asarray(encoded[i] + [eos], dtype=np.int32)
                              for i in np.flatnonzero(test == (split == "test"))] for split in SPLITS}
        self._streams = {s: np.concatenate(d) if d else np.zeros(0, np.int32) for s, d in self._docs.items()}
        self._eval_chunk: int | None = None

    # ------------------------------------------------------------------------------------ properties
    @property
    def seq_len(self) -> int:
        return self._seq_len

    def num_examples(self, split: str) -> int:
        """The examples a split holds: windows of the packed stream (test: non-overlapping; train: every
        offset) or documents (crop)."""
        if self.packing == "crop":
            return len(self._docs[split])
        tokens = len(self._streams[split])  # an example at offset o needs o + T + 1 <= tokens
        if split == "train":
            return max(tokens - self.seq_len, 0)
        return max(tokens - 1, 0) // self.seq_len

    @property
    def test_size(self) -> int:
        return self.num_examples("test")

    # ------------------------------------------------------------------------------------ generation
    def nbytes(self, num_examples: int) -> int:
        return 16 * num_examples * self.seq_len

    def generate(self, num_examples: int, seed: int, split: str = "train") -> dict[str, torch.Tensor]:
        """``num_examples`` examples of ``split`` (see the class docstring): train draws with replacement,
        test is a seeded shuffle's prefix; deterministic in (corpus, options, n, seed, split)."""
        n, seed = self._generate_args(num_examples, seed, split)
        have = self.num_examples(split)
        if have == 0 and n > 0:
            raise SleepzooError(self._empty_split(split))
        rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split)]))
        if split == "train":
            index = rng.integers(0, have, size=n) if n else np.zeros(0, np.int64)
        else:
            if n > have:
                raise SleepzooError(f"text.generate: num_examples: the test split holds {have} examples of {self.seq_len} "
                                    f"tokens ({len(self._docs['test'])} documents); {n} were asked for")
            index = rng.permutation(have)[:n]
        data = self._pack(index, split) if self.packing == "pack" else self._crop(index, split)
        self._check_batch(data, n)
        return data

    def _empty_split(self, split: str) -> str:
        docs, tokens = len(self._docs[split]), len(self._streams[split])
        need = (f"at least {self.seq_len + 1} tokens of {split} documents (seq_len + 1)" if self.packing == "pack"
                else f"one {split} document")
        return (f"text: paths: the {split} split has {docs} of the corpus's {self._num_documents} documents "
                f"({tokens} tokens; 1 document in {self.test_buckets} goes to test, by a hash of its text) and "
                f"{self.packing} needs {need}: add documents, use text_documents=blank_line to cut files at blank "
                f"lines, or lower seq_len")

    def _pack(self, index: np.ndarray, split: str) -> dict[str, torch.Tensor]:
        stream, T = self._streams[split], self.seq_len
        offsets = index if split == "train" else index * T
        rows = offsets[:, None] + np.arange(T + 1)[None, :]
        window = stream[rows].astype(np.int64) if len(index) else np.zeros((0, T + 1), np.int64)
        return {"input_ids": torch.from_numpy(np.ascontiguousarray(window[:, :T])),
                "targets": torch.from_numpy(np.ascontiguousarray(window[:, 1:]))}

    def _crop(self, index: np.ndarray, split: str) -> dict[str, torch.Tensor]:
        T = self.seq_len
        ids = np.full((len(index), T), self.pad_id, dtype=np.int64)
        targets = np.full((len(index), T), IGNORE_INDEX, dtype=np.int64)
        for row, i in enumerate(index):
            doc = self._docs[split][int(i)][:T + 1]
            ids[row, :min(len(doc), T)] = doc[:T]
            targets[row, :len(doc) - 1] = doc[1:]
        return {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets)}

    # --------------------------------------------------------------------------------------- display
    def decode(self, ids: Any, targets: Any = None) -> str:
        """The text of the input tokens (trailing padding dropped; ``<eos>`` between documents shown as such).
        ``targets`` are the next tokens, so they are not repeated; a 2-D input gives one line per example."""
        ids_t = torch.as_tensor(ids)
        if ids_t.ndim == 2:
            return "\n".join(self.decode(row) for row in ids_t)
        seq = ids_t.tolist()
        while seq and seq[-1] == self.pad_id:
            seq.pop()
        return self._tok.decode(seq)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["tokenizer"] = describe_tokenizer(self._tok)
        d["documents"] = {s: len(self._docs[s]) for s in SPLITS}
        d["tokens"] = {s: int(len(self._streams[s])) for s in SPLITS}
        d["test_size"] = self.test_size
        return d

    # --------------------------------------------------------------------------------------- metrics
    def evaluate(self, model: torch.nn.Module, *, num_examples: int = 512, window: int | None = None,
                 **kwargs: Any) -> dict[str, Any]:
        """:meth:`Task.evaluate` on ``min(num_examples, test_size)`` test examples; adds the ``window`` and
        ``position`` buckets (see the class docstring) for the window the model evaluates with."""
        n = _check_int("text.evaluate", "num_examples", num_examples, minimum=1)
        if self.test_size == 0:
            raise SleepzooError(self._empty_split("test"))
        self._eval_chunk = window_chunk(model, window)
        try:
            return super().evaluate(model, num_examples=min(n, self.test_size), window=window, **kwargs)
        finally:
            self._eval_chunk = None

    def _extra_metrics(self, predictions: torch.Tensor, data: dict[str, torch.Tensor]) -> dict[str, Any]:
        targets, token_loss = data["targets"], data["token_loss"]
        mask = targets != IGNORE_INDEX
        correct = (predictions == targets) & mask
        chunk = self._eval_chunk
        size = self.position_bucket or (max(1, chunk // 4) if chunk else max(1, self.seq_len // 16))
        buckets = {"position": {str(v["start"]): v for v in _grouped(token_loss, correct, mask, size).values()}}
        if chunk:
            buckets = {"window": _grouped(token_loss, correct, mask, chunk), **buckets}
        return {"buckets": buckets}
