"""lm-evaluation-harness integration: sleepzoo models as the harness's ``sleepzoo`` model (docs/lm-eval.md).

    pip install -e '.[eval]'
    python -m sleepzoo.harness --model sleepzoo --model_args run=runs/tiny-N2,loops=4 --tasks my_task \\
        --include_path my_tasks/
    sleepzoo-lm-eval --model sleepzoo --model_args pretrained=~/models/Ouro-1.4B,window=2000,loops=4 --tasks ...

    import lm_eval, sleepzoo.harness                      # importing the module registers "sleepzoo"
    lm_eval.simple_evaluate(model="sleepzoo", model_args="run=runs/tiny-N2,loops=4", tasks=[...])

The harness (lm-eval 0.4.13) looks ``--model`` up in its own registry and has no hook through which an
installed package could add a name (no entry-point group, no import option), so plain ``lm_eval --model
sleepzoo`` does not know the name: ``python -m sleepzoo.harness`` / ``sleepzoo-lm-eval`` import this module,
which registers it, and then run the harness's own command line with the same arguments.

Every request is read through the sleep stream (:class:`sleepzoo.engine.Stream`), exactly as streaming
inference reads it: the window fills, the model sleeps (``loops`` passes) and evicts, so a context of any
length is consumed window by window in bounded memory; the head's scores are taken one piece (at most a
window, :data:`SCORE_PIECE` tokens) at a time, and the log-softmax only where a token is scored.

* ``loglikelihood``: context + continuation streamed; the sum of the continuation tokens' log-probabilities
  and whether each was the argmax (``is_greedy``).
* ``loglikelihood_rolling``: the prefix token (the tokenizer's end-of-text token, else its padding token) and
  the whole document streamed; the sum of every document token's log-probability (each token is predicted
  once, with everything before it behind it in the stream: there are no re-read overlapping windows).
* ``generate_until``: the context streamed, then tokens decoded one at a time (greedy; sampling with
  ``do_sample``/``temperature``/``top_k``) until a stop string of ``until`` (or the end-of-text token) appears,
  or ``max_gen_toks`` tokens; the text is cut before the stop string.

Requests are scored ``batch_size`` at a time as rows of one stream (right-padded: a causal model's scores of
a row never depend on what follows them, and every row's windows start at the same positions); generation
runs one request at a time.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .registry import MissingDependencyError, SleepzooError
from .tokenizer import Tokenizer, load_tokenizer

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as _exc:  # the optional extra is not installed: the module imports, using it is one error
    TemplateLM, register_model, _MISSING = object, None, _exc
else:
    _MISSING = None

NAME = "sleepzoo"
INSTALL = "pip install -e '.[eval]' (or pip install 'lm-eval==0.4.13')"
#: Keyword arguments of ``--model_args`` (and of :class:`SleepzooLM`).
MODEL_ARGS = ("run", "pretrained", "window", "loops", "max_loops", "tolerance", "eviction", "sleep_every", "dtype",
              "device", "batch_size", "max_batch_size", "tokenizer", "max_length", "seed")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Tokens tried, in order, as the end-of-text token (the prefix of an empty context and of rolling documents,
#: and a stop string of generation); a tokenizer with none of them uses its padding token as the prefix.
EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[EOS]", "<|eot_id|>")
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k")
DEFAULT_MAX_GEN_TOKS = 256
#: Tokens fed to the stream at a time (at most a window): bounds the (batch, tokens, vocab) scores of one feed,
#: e.g. 8 x 512 x 151,936 for Jet-Nemotron; feeding a window in pieces gives the same scores as in one.
SCORE_PIECE = 512


def _missing() -> MissingDependencyError:
    return MissingDependencyError(f"the lm-evaluation-harness integration needs the package 'lm_eval', which is "
                                  f"not installed ({_MISSING}); install it: {INSTALL}")


class TaskVocabulary(Tokenizer):
    """A run's task vocabulary as a tokenizer: text is whitespace-separated tokens of the vocabulary, as
    ``sleepzoo generate RUN --prompt`` reads them; decoding joins tokens with single spaces."""

    def __init__(self, vocab: Sequence[str], spec: str) -> None:
        self._vocab = list(vocab)
        self._ids = {tok: i for i, tok in enumerate(self._vocab)}
        self.spec = spec

    def encode(self, text: str) -> list[int]:
        pieces = text.split()
        unknown = sorted({p for p in pieces if p not in self._ids})
        if unknown:
            raise SleepzooError(f"text holds {', '.join(map(repr, unknown[:8]))}, not tokens of the run's task "
                                f"vocabulary (e.g. {', '.join(self._vocab[:12])}); give its tasks text in that "
                                f"vocabulary, or tokenizer=PATH (a tokenizer.json) in --model_args")
        return [self._ids[p] for p in pieces]

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self._vocab)
        return " ".join(self._vocab[i] if 0 <= i < n else f"<unk:{i}>" for i in map(int, ids))

    @property
    def vocab(self) -> list[str]:
        return list(self._vocab)

    @property
    def pad_id(self) -> int:
        return self._ids.get("<pad>", 0)


def _check_positive(name: str, value: Any, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SleepzooError(f"{NAME} model_args: {name}={value!r} is invalid: it must be an integer >= 1"
                            + (" (or unset)" if allow_none else ""))
    return value


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise SleepzooError(f"{NAME} model_args: dtype={dtype!r} is invalid: choose {', '.join(DTYPES)} or auto (the "
                        f"run's float32, the pretrained config's torch_dtype)")


def _resolve_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise SleepzooError(f"{NAME} model_args: device={device!r} is invalid: give cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        # the harness's command line asks for cuda:0 unless told otherwise: run where we can, and say so
        print(f"note: {NAME}: device {device!r} asked for, but CUDA is not available here: running on cpu "
              f"(--device cpu says so)", file=sys.stderr, flush=True)
        return torch.device("cpu")
    return resolved


def _parse_gen_kwargs(gen_kwargs: Any) -> dict[str, Any]:
    """The harness's generation keyword arguments as (stop strings, max tokens, sampling); one clear error for
    anything this model does not do."""
    if not isinstance(gen_kwargs, dict):
        raise SleepzooError(f"generate_until: gen_kwargs must be a dict, got {gen_kwargs!r}")
    unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
    if unknown:
        raise SleepzooError(f"generate_until: generation_kwargs {', '.join(unknown)} not supported by the {NAME} "
                            f"model; it takes {', '.join(GEN_KWARGS)}")
    until = gen_kwargs.get("until")
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not (isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until)):
        raise SleepzooError(f"generate_until: until={until!r} must be a string or a list of strings")
    max_gen = _check_positive("max_gen_toks", gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS), False)
    do_sample = gen_kwargs.get("do_sample", False)
    if not isinstance(do_sample, bool):
        raise SleepzooError(f"generate_until: do_sample={do_sample!r} must be true or false")
    temperature = gen_kwargs.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or temperature < 0):
        raise SleepzooError(f"generate_until: temperature={temperature!r} must be a number >= 0")
    if temperature == 0:
        do_sample = False  # the harness's convention: temperature 0 is greedy decoding
    top_k = gen_kwargs.get("top_k")
    if top_k is not None:
        top_k = _check_positive("top_k", top_k)
    return {"until": [s for s in until if s], "max_gen_toks": max_gen, "do_sample": do_sample,
            "temperature": 1.0 if temperature is None else float(temperature), "top_k": top_k}


def first_stop(text: str, until: Sequence[str]) -> int | None:
    """Where the earliest stop string of ``until`` starts in ``text`` (None: none occurs)."""
    found = [i for i in (text.find(s) for s in until) if i >= 0]
    return min(found) if found else None


class SleepzooLM(TemplateLM):  # type: ignore[misc, valid-type]
    """A sleepzoo model (a run directory or a pretrained folder) as an lm-evaluation-harness ``LM``.

    Args (``--model_args key=value,...``; see docs/lm-eval.md):
        run: a run directory (``sleepzoo train --out``); its newest weights, as ``sleepzoo generate`` loads them.
        pretrained: a pretrained folder (config.json + safetensors), read by :func:`sleepzoo.from_pretrained`.
        window, loops, eviction, sleep_every: sleep settings (default the model's own: the run's last stage,
            or the folder's published / saved settings); ``loops=auto`` sleeps adaptively, with
            ``max_loops`` and ``tolerance`` (docs/adaptive-sleep.md).
        dtype: float32, float64, bfloat16, float16 or auto (default: the run's float32, the folder's
            torch_dtype).
        device: default cuda when available, else cpu.
        batch_size: requests scored together as rows of one stream (default 1; generation: one at a time).
        tokenizer: a tokenizer.json (or a folder holding one); default the run's task tokenizer (its
            tokenizer.json, or its vocabulary as whitespace-separated tokens) or the folder's tokenizer.json.
        max_length: the most tokens of a request the stream reads (longer contexts lose their start; for
            generation, room is left for ``max_gen_toks``); default no limit: the stream's memory is bounded by
            the window whatever the length. Rolling log-likelihoods always read the whole document.
        seed: the sampling generator's seed (``do_sample``), default 0.
    """

    def __init__(self, run: str | None = None, pretrained: str | None = None, window: int | None = None,
                 loops: int | str | None = None, eviction: str | None = None, sleep_every: int | None = None,
                 max_loops: int | None = None, tolerance: float | None = None, dtype: Any = None, device: Any = None, batch_size: Any = 1, max_batch_size: Any = None,
                 tokenizer: str | None = None, max_length: int | None = None, seed: int = 0, **unknown: Any):
        if _MISSING is not None:
            raise _missing()
        super().__init__()
        if unknown:
            raise SleepzooError(f"{NAME} model_args: unknown {', '.join(sorted(unknown))}; allowed: "
                                f"{', '.join(MODEL_ARGS)}")
        if (run is None) == (pretrained is None):
            raise SleepzooError(f"{NAME} model_args: give exactly one of run=RUN_DIR or pretrained=FOLDER (got "
                                f"run={run!r}, pretrained={pretrained!r})")
        if str(batch_size).startswith("auto"):
            raise SleepzooError(f"{NAME} model_args: batch_size={batch_size!r} is not supported: give an integer "
                                f">= 1 (requests scored together as rows of one stream)")
        self.batch_size = _check_positive("batch_size", batch_size, False)
        self.max_length_limit = _check_positive("max_length", max_length)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SleepzooError(f"{NAME} model_args: seed={seed!r} is invalid: it must be an integer")
        torch_dtype = _resolve_dtype(dtype)
        self._device = _resolve_device(device)
        if tokenizer is not None and (not isinstance(tokenizer, str) or tokenizer == "builtin"):
            raise SleepzooError(f"{NAME} model_args: tokenizer={tokenizer!r} is invalid: give the path of a "
                                f"tokenizer.json (or of a folder holding one), or leave it unset for the model's own")
        if run is not None:
            self.model, default_tok = self._load_run(str(run), torch_dtype)
        else:
            self.model, default_tok = self._load_pretrained(str(pretrained), torch_dtype)
        self.tok: Tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else default_tok()
        vocab = self.model.vocab_size
        if self.tok.vocab_size > vocab:
            raise SleepzooError(f"tokenizer {self.tok.spec!r} has {self.tok.vocab_size} tokens but the model's "
                                f"vocabulary has {vocab} rows: its ids would not fit; give the model's own tokenizer")
        self.model.eval()
        self.settings = {"window": window, "loops": loops, "eviction": eviction, "sleep_every": sleep_every,
                         "max_loops": max_loops, "tolerance": tolerance}
        self.new_stream()  # the settings checked now, before any request: one clear error for a bad value
        self.generator = torch.Generator(device=self._device).manual_seed(seed)
        vocab_tokens = self.tok.vocab
        eot = next((t for t in EOT_CANDIDATES if t in vocab_tokens), None)
        self._eot_id = vocab_tokens.index(eot) if eot is not None else self.tok.pad_id
        self._eot_text = eot

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "SleepzooLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "SleepzooLM":
        """The harness's own settings (``--batch_size``, ``--device``: the command line always passes them,
        device ``cuda:0`` by default) under ``model_args``: a value given in both is ``model_args``'."""
        given = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**given, **arg_dict})

    # -- loading ----------------------------------------------------------------------------------------------
    def _load_run(self, run: str, dtype: torch.dtype | None) -> tuple[torch.nn.Module, Any]:
        from .train import load_run  # the loader of `sleepzoo generate`

        _, model, task, _ = load_run(run)
        model = model.to(device=self._device, dtype=dtype or torch.float32)

        def tokenizer() -> Tokenizer:
            own = getattr(task, "tokenizer_object", None)  # a text task's tokenizer.json, or its builtin words
            return own if isinstance(own, Tokenizer) else TaskVocabulary(task.vocab, f"{run} (task vocabulary)")
        return model, tokenizer

    def _load_pretrained(self, folder: str, dtype: torch.dtype | None) -> tuple[torch.nn.Module, Any]:
        import os

        import sleepzoo

        model = sleepzoo.from_pretrained(folder, dtype=dtype, device=self._device)

        def tokenizer() -> Tokenizer:
            path = os.path.join(os.path.expanduser(folder), "tokenizer.json")
            if not os.path.isfile(path):
                raise SleepzooError(f"pretrained folder {folder!r} has no tokenizer.json; give tokenizer=PATH in "
                                    f"--model_args")
            return load_tokenizer(path)
        return model, tokenizer

    def new_stream(self) -> Any:
        """A fresh sleep stream over the model with this evaluation's settings."""
        return self.model.start_stream(**self.settings)

    # -- what the harness asks of a model -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot_id

    @property
    def max_length(self) -> int | None:
        return self.max_length_limit

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.spec)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: Iterable[int], **kwargs: Any) -> str:
        return self.tok.decode(tokens)

    # -- scoring ----------------------------------------------------------------------------------------------
    def _score(self, rows: list[tuple[list[int], int]], desc: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, all greedy) of the last ``n`` tokens of each ``tokens`` in ``rows`` =
        ``[(tokens, n), ...]``, each predicted from every token before it through the sleep stream."""
        from tqdm import tqdm

        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        bar = tqdm(total=len(rows), desc=desc, disable=disable_tqdm)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            for i, result in zip(batch, self._score_batch([rows[i] for i in batch])):
                out[i] = result
            bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _score_batch(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        width = max(len(tokens) for tokens, _ in rows) - 1
        pad = self.tok.pad_id
        inputs = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T): token t predicts token t + 1
        targets = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (tokens, n) in enumerate(rows):
            inputs[r, :len(tokens) - 1] = torch.tensor(tokens[:-1])
            targets[r, len(tokens) - 1 - n:len(tokens) - 1] = torch.tensor(tokens[len(tokens) - n:])
        inputs, targets = inputs.to(self._device), targets.to(self._device)
        stream = self.new_stream()
        logprob = torch.zeros(len(rows), dtype=torch.float64, device=self._device)
        greedy = torch.ones(len(rows), dtype=torch.bool, device=self._device)
        piece = min(stream.policy.chunk, SCORE_PIECE)  # the head's scores never exceed (B, piece, vocab)
        for s in range(0, width, piece):
            logits = stream.feed(inputs[:, s:s + piece])  # (B, t, vocab)
            tgt = targets[:, s:s + piece]
            mask = tgt != -100
            if not bool(mask.any()):
                continue
            picked = logits[mask]  # (n, vocab): the positions that predict a scored token
            if picked.dtype in (torch.float16, torch.bfloat16):
                picked = picked.float()
            want = tgt[mask]  # (n,)
            lp = picked.log_softmax(dim=-1).gather(-1, want[:, None])[:, 0]  # (n,)
            row = mask.nonzero()[:, 0]  # (n,) the batch row of each
            logprob.index_add_(0, row, lp.double())
            greedy[row[picked.argmax(dim=-1) != want]] = False
        return [(float(lp), bool(g)) for lp, g in zip(logprob.cpu(), greedy.cpu())]

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        rows = []
        for _, context_enc, continuation_enc in requests:
            tokens = list(context_enc) + list(continuation_enc)
            if self.max_length_limit is not None:
                tokens = tokens[-(self.max_length_limit + 1):]  # the last token is predicted, never read
            rows.append((tokens, min(len(continuation_enc), len(tokens) - 1)))
        results = self._score(rows, "sleepzoo loglikelihood", disable_tqdm)
        for (pair, _, _), result in zip(requests, results):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        rows = []
        for request in requests:
            (text,) = request.args
            tokens = [self.eot_token_id] + self.tok_encode(text)
            rows.append((tokens, len(tokens) - 1))
        results = [lp for lp, _ in self._score(rows, "sleepzoo loglikelihood_rolling", disable_tqdm)]
        for request, lp in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, lp)
        return results

    # -- generation -------------------------------------------------------------------------------------------
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        out = []
        for request in tqdm(requests, desc="sleepzoo generate_until", disable=disable_tqdm):
            context, gen_kwargs = request.args
            text = self.generate_one(context, gen_kwargs)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    @torch.no_grad()
    def generate_one(self, context: str, gen_kwargs: dict) -> str:
        """Stream ``context``, then decode until a stop string, the end-of-text token or ``max_gen_toks``."""
        from .models.base import sample_next

        kw = _parse_gen_kwargs(gen_kwargs)
        until = kw["until"] + ([self._eot_text] if self._eot_text else [])
        ids = self.tok_encode(context) or [self.eot_token_id]
        if self.max_length_limit is not None:
            ids = ids[-max(1, self.max_length_limit - kw["max_gen_toks"]):]
        prompt = torch.tensor([ids], dtype=torch.long, device=self._device)  # (1, T)
        stream = self.new_stream()
        piece = min(stream.policy.chunk, SCORE_PIECE)
        for s in range(0, prompt.shape[1], piece):  # piece by piece: only the last logits are kept
            logits = stream.feed(prompt[:, s:s + piece])[:, -1]  # (1, vocab)
        generated: list[int] = []
        text = ""
        for i in range(kw["max_gen_toks"]):
            nxt = sample_next(logits, kw["do_sample"], kw["temperature"], kw["top_k"], self.generator)  # (1, 1)
            generated.append(int(nxt))
            text = self.tok_decode(generated)
            cut = first_stop(text, until)
            if cut is not None:
                return text[:cut]
            if i + 1 < kw["max_gen_toks"]:
                logits = stream.feed(nxt)[:, -1]
        return text


if _MISSING is None and __name__ != "__main__":
    # Registered once, under the module's own name: `python -m sleepzoo.harness` runs this file as __main__
    # and main() imports sleepzoo.harness, which registers here (the registry refuses a second class).
    register_model(NAME)(SleepzooLM)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sleepzoo.harness ARGS`` / ``sleepzoo-lm-eval ARGS``: the harness's command line (``lm-eval
    ARGS``) with the ``sleepzoo`` model registered. A sleepzoo error (a bad model argument, a missing run)
    is one line ``error: ...`` on stderr and exit status 2."""
    if _MISSING is not None:
        print(f"error: {_missing()}", file=sys.stderr)
        raise SystemExit(2)
    import importlib

    importlib.import_module("sleepzoo.harness")  # registers "sleepzoo" (a no-op when already imported)
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]  # the harness parses sys.argv itself
    try:
        cli_evaluate()
    except SleepzooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
