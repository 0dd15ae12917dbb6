"""The benchmark suites: what sleep costs, measured on the machine at hand.

==========  ==================================================================================================
``ops``     the chunked gated delta rule against its step-by-step loop and fla-core's naive chunk reference
            (forward+backward, B=2, T=2048, H=4, K=V=64), its matmul FLOP/s against this machine's matmul rate
``loops``   forward+backward time of one consolidated window (wake + N-1 sleep passes) and of a training
            step, against loops N in {1, 2, 4, 8} at a fixed window
``window``  throughput against window L at a fixed sequence length: sequential windows with sleep against a
            fully parallel sliding-window-attention hybrid of the same weights (the paper's Figure 6a)
``wake``    per-token decode time against the context already streamed (1k ... 64k tokens) and loops,
            against a full-attention model of the same size whose KV cache holds the whole context; and
            against the position in a 2,000-token window (the first tokens against the last ones), with the
            attention cache as a preallocated buffer written in place and as a concatenation per token
``memory``  peak training memory (tensors created by a forward+backward) against N, with and without
            activation checkpointing per pass
``study``   one training step (forward, backward, clipping, AdamW) of the CPU sleep study's model and task
            (``recipes/study/rule110-depth.yaml``: d 64, 4 blocks, one evicted 25-token window, batch 64)
            against loops N in {1, 2, 4}
==========  ==================================================================================================

Every suite is a list of :class:`~sleepzoo.benchmarks.core.Case`; :func:`checks` turns a run's results into
the acceptance checks (each with its measured value, the target and whether it holds). ``size="tiny"`` gives
the same cases at toy sizes, for tests of the machinery.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import engine
from ..build import build_model
from ..config import load_recipe
from ..registry import SleepzooError
from .core import Case, Result, matmul_rate, peak_bytes

SUITES = ("ops", "loops", "window", "wake", "memory", "study")
HYBRID = ("attention", "gated_deltanet", "attention", "gated_deltanet")
VOCAB = 256

# sizes per suite: "default" is what `sleepzoo bench` runs (all suites < 5 minutes on a 2-core CPU),
# "tiny" checks the machinery in seconds
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "default": {
        "ops": {"B": 2, "T": 2048, "H": 4, "K": 64, "V": 64, "rounds": 5, "recurrent_rounds": 2},
        "loops": {"d": 256, "B": 2, "L": 256, "windows": 4, "loops": (1, 2, 4, 8), "rounds": 9},
        "window": {"d": 256, "B": 1, "T": 2048, "windows": (128, 256, 512, 1024), "loops": (1, 2), "rounds": 3},
        "wake": {"d": 256, "L": 256, "contexts": (1024, 4096, 16384, 65536), "loops": (1, 4), "tokens": 96,
                 "position_L": 2000, "position_tokens": 48},
        "memory": {"d": 128, "B": 2, "L": 128, "windows": 8, "loops": (1, 2, 4, 8)},
        "study": {"B": 64, "loops": (1, 2, 4), "rounds": 15},
    },
    "tiny": {
        "ops": {"B": 1, "T": 96, "H": 2, "K": 8, "V": 8, "rounds": 2, "recurrent_rounds": 1},
        "loops": {"d": 32, "B": 2, "L": 16, "windows": 3, "loops": (1, 2), "rounds": 2},
        "window": {"d": 32, "B": 1, "T": 64, "windows": (16, 32), "loops": (1,), "rounds": 2},
        "wake": {"d": 32, "L": 16, "contexts": (32, 96), "loops": (1, 2), "tokens": 4, "position_L": 16,
                 "position_tokens": 4},
        "memory": {"d": 32, "B": 2, "L": 16, "windows": 3, "loops": (1, 2)},
        "study": {"B": 4, "loops": (1, 2), "rounds": 2},
    },
}


def hybrid(d_model: int, *, layers: tuple[str, ...] = HYBRID, attention_window: int | None = None,
           seed: int = 0, device: str | torch.device = "cpu", kv_cache: str = "buffer") -> Any:
    """The benchmarks' model: ``layers`` of width ``d_model`` (heads of 64, or d/4 when smaller), SwiGLU
    MLPs, vocabulary 256, in train mode. ``kv_cache``: the attention mixer's decoding cache (its option)."""
    torch.manual_seed(seed)
    head_dim = min(64, d_model // 4)
    heads = d_model // head_dim
    attention = {"num_heads": heads, "head_dim": head_dim}
    if attention_window is not None:
        attention["window"] = attention_window
    if kv_cache != "buffer":
        attention["kv_cache"] = kv_cache
    recipe = load_recipe({"model": {"d_model": d_model, "layers": list(layers), "vocab_size": VOCAB,
                                    "mixers": {"attention": attention,
                                               "gated_deltanet": {"num_heads": heads, "head_dim": head_dim}}}})
    return build_model(recipe).to(device).train()


def _tokens(B: int, T: int, seed: int = 0, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same tokens on every device
    ids, tgt = torch.randint(0, VOCAB, (B, T), generator=gen), torch.randint(0, VOCAB, (B, T), generator=gen)
    return ids.to(device), tgt.to(device)


def _fast_weight_sum(states: list) -> torch.Tensor | int:
    """What a following window would make of the fast weights: a scalar that depends on all of them, so the
    backward pass reaches every sleep pass (the loss of the window itself only sees the wake pass)."""
    return sum(s["fast_weights"].sum() for s in states if isinstance(s, dict) and "fast_weights" in s)


# ----------------------------------------------------------------------------------------------------------------
# ops


def chunked_flops(B: int, T: int, H: int, K: int, V: int, C: int = 64) -> int:
    """Matmul FLOPs of one forward of the chunked gated delta rule (:func:`sleepzoo.ops.gated_delta_rule`),
    counted from its products: per chunk K K^T and Q K^T (C x C x K each), the unit-triangular solve
    (C^2 (V+K) / 2 multiply-adds), P W (C x C x (V+K)), Kd^T W (K x C x (V+K)), the state step (K x K x V) and
    the read-out Q S0 (C x K x V)."""
    n = math.ceil(T / C)
    per_chunk = 2 * (C * C * K * 2 + C * C * (V + K) / 2 + C * C * (V + K) + K * C * (V + K) + K * K * V + C * K * V)
    return int(B * H * n * per_chunk)


def _ops_cases(s: dict) -> list[Case]:
    from ..ops import gated_delta_rule, gated_delta_rule_recurrent

    B, T, H, K, V, dev = s["B"], s["T"], s["H"], s["K"], s["V"], s["device"]
    shape = {"B": B, "T": T, "H": H, "K": K, "V": V}

    def make_inputs() -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        return {"q": torch.randn(B, T, H, K, generator=gen),
                "k": F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
                "v": torch.randn(B, T, H, V, generator=gen),
                "g": F.logsigmoid(torch.randn(B, T, H, generator=gen) + 1.0),
                "beta": torch.sigmoid(torch.randn(B, T, H, generator=gen))}

    def fwd_bwd(op: Callable) -> Callable[[], Callable[[], None]]:
        def make() -> Callable[[], None]:
            leaves = {n: x.to(dev).requires_grad_() for n, x in make_inputs().items()}

            def run() -> None:
                for x in leaves.values():
                    x.grad = None
                o, S = op(**leaves)
                (o.sum() + S.sum()).backward()
            return run
        return make

    from .fla_naive import load_naive

    naive, _ = load_naive("gated_delta_rule")
    naive_chunk = getattr(naive, "naive_chunk_gated_delta_rule", None)

    def fla_naive(q, k, v, g, beta):
        return naive_chunk(q, k, v, g, beta, chunk_size=64, output_final_state=True)

    group = f"ops: gated_delta fwd+bwd B={B} T={T} H={H} K={K} V={V} float32"
    flops = 3 * chunked_flops(B, T, H, K, V)  # forward + backward ~ 3 forwards of matmul work
    cases = [
        Case("ops", "chunked", group, {"op": "chunked", **shape},
             make=fwd_bwd(lambda **x: gated_delta_rule(**x, output_final_state=True)), tokens=B * T,
             baseline="chunked", rounds=s["rounds"], info={"flops": flops}),
        Case("ops", "recurrent", group, {"op": "recurrent", **shape},
             make=fwd_bwd(lambda **x: gated_delta_rule_recurrent(**x, output_final_state=True)), tokens=B * T,
             baseline="chunked", rounds=s["recurrent_rounds"]),
    ]
    if naive_chunk is not None:
        cases.append(Case("ops", "fla_naive_chunk", group, {"op": "fla_naive_chunk", **shape},
                          make=fwd_bwd(fla_naive), tokens=B * T, baseline="chunked", rounds=s["rounds"]))
    cases.append(Case("ops", "matmul_rate", "ops: this machine's float32 matmul rate", {},
                      measure=lambda: {"gflops_per_s": round(matmul_rate(device=str(dev)) / 1e9, 2)}))
    return cases


# ----------------------------------------------------------------------------------------------------------------
# loops


def _loops_cases(s: dict) -> list[Case]:
    d, B, L, W, dev = s["d"], s["B"], s["L"], s["windows"], s["device"]
    group = f"loops: one consolidated window, fwd+bwd, B={B} L={L} d={d}"

    def window_and_state() -> tuple[Any, torch.Tensor, torch.Tensor, list]:
        """The model, a window of tokens, and the state a window in the middle of a sequence starts from: the
        fast weights left by an earlier window (evicted as full_flush does), which the backward pass reaches
        into as under full BPTT (they are leaves that require grad)."""
        model = hybrid(d, device=dev)
        ids, tgt = _tokens(B, L, device=dev)
        earlier, _ = _tokens(B, L, seed=1, device=dev)
        with torch.no_grad():
            _, _, states, _ = engine._chunk(model, earlier, None, [None] * len(model.layers), 1, False, None)
        states = engine.resolve_eviction("full_flush", L).evict(states, model.mixers())
        for state in states:
            for value in (state or {}).values():
                if isinstance(value, torch.Tensor):
                    value.requires_grad_()
        return model, ids, tgt, states

    def make_plain() -> Callable[[], None]:
        """The same window without the engine: the model's modules called by hand (sleepzoo's overhead)."""
        model, ids, tgt, start = window_and_state()

        def run() -> None:
            model.zero_grad(set_to_none=True)
            h, states = model.embed(ids), []
            for block, state in zip(model.layers, start):
                h, state = block(h, state)
                states.append(state)
            loss = F.cross_entropy(model.head(h).flatten(0, 1), tgt.flatten(), reduction="sum")
            (loss + _fast_weight_sum(states)).backward()
        return run

    cases = [Case("loops", "plain", group, {"N": 1, "B": B, "L": L, "d": d, "engine": False}, make=make_plain,
                  tokens=B * L, baseline="plain", rounds=s["rounds"])]
    for N in s["loops"]:
        def make_window(N: int = N) -> Callable[[], None]:
            model, ids, tgt, start = window_and_state()

            def run() -> None:
                model.zero_grad(set_to_none=True)
                _, loss, states, _ = engine._chunk(model, ids, tgt, start, N, False, None)
                (loss + _fast_weight_sum(states)).backward()
            return run

        def make_step(N: int = N) -> Callable[[], None]:
            model = hybrid(d, device=dev)
            ids, tgt = _tokens(B, W * L, device=dev)

            def run() -> None:
                model.zero_grad(set_to_none=True)
                model(ids, tgt, window=L, loops=N, return_logits=False).loss.backward()
            return run

        cases.append(Case("loops", f"window[N={N}]", group, {"N": N, "B": B, "L": L, "d": d}, make=make_window,
                          tokens=B * L, baseline="plain", rounds=s["rounds"]))
        cases.append(Case("loops", f"step[N={N}]", f"loops: training step, fwd+bwd, B={B} T={W * L} L={L} d={d}",
                          {"N": N, "B": B, "T": W * L, "L": L, "d": d}, make=make_step, tokens=B * W * L,
                          baseline=f"step[N={s['loops'][0]}]", rounds=s["rounds"]))
    return cases


# ----------------------------------------------------------------------------------------------------------------
# window


def _window_cases(s: dict) -> list[Case]:
    d, B, T, dev = s["d"], s["B"], s["T"], s["device"]
    cases = []
    for L in s["windows"]:
        group = f"window: L={L}, T={T}, B={B}, d={d}, fwd+bwd"

        def make_swa(L: int = L) -> Callable[[], None]:
            model = hybrid(d, attention_window=L, device=dev)  # same weights as the sleep model (same seed)
            ids, tgt = _tokens(B, T, device=dev)

            def run() -> None:
                model.zero_grad(set_to_none=True)
                model(ids, tgt, window=T, loops=1, return_logits=False).loss.backward()
            return run

        cases.append(Case("window", f"swa[L={L}]", group, {"method": "swa", "L": L, "N": 1, "T": T},
                          make=make_swa, tokens=B * T, baseline=f"swa[L={L}]", rounds=s["rounds"]))
        for N in s["loops"]:
            def make_sleep(L: int = L, N: int = N) -> Callable[[], None]:
                model = hybrid(d, device=dev)
                ids, tgt = _tokens(B, T, device=dev)

                def run() -> None:
                    model.zero_grad(set_to_none=True)
                    model(ids, tgt, window=L, loops=N, return_logits=False).loss.backward()
                return run

            cases.append(Case("window", f"sleep[L={L},N={N}]", group, {"method": "sleep", "L": L, "N": N, "T": T},
                              make=make_sleep, tokens=B * T, baseline=f"swa[L={L}]", rounds=s["rounds"]))
    return cases


# ----------------------------------------------------------------------------------------------------------------
# wake


class _GrowingStream:
    """One stream per loop count, fed up to each context in turn (64k tokens are prefilled once); every case
    decodes on its own fork of it at its context."""

    def __init__(self, d: int, L: int, loops: int, device: str | torch.device = "cpu"):
        self.model = hybrid(d, device=device).eval()
        self.device = device
        self.stream = self.model.start_stream(window=L, loops=loops)
        self.gen = torch.Generator().manual_seed(0)
        self.L = L

    @torch.no_grad()
    def fork_at(self, context: int) -> engine.Stream:
        while self.stream.tokens < context:
            take = min(self.L - self.stream.filled or self.L, context - self.stream.tokens)
            self.stream.feed(torch.randint(0, VOCAB, (1, take), generator=self.gen).to(self.device))
        return self.stream.fork()


def _wake_cases(s: dict) -> list[Case]:
    d, L, dev = s["d"], s["L"], s["device"]
    streams: dict[int, _GrowingStream] = {}
    full_model: list = []
    cases = []
    first = f"wake[N={s['loops'][0]},ctx={s['contexts'][0]}]"
    for N in s["loops"]:
        for ctx in s["contexts"]:
            def make(N: int = N, ctx: int = ctx) -> Callable[[], None]:
                if N not in streams:
                    streams[N] = _GrowingStream(d, L, N, dev)
                stream = streams[N].fork_at(ctx)
                token = torch.zeros(1, 1, dtype=torch.long, device=dev)

                @torch.no_grad()
                def run() -> None:  # the stream sleeps when its window fills: the median is the wake pass
                    stream.feed(token)
                return run

            cases.append(Case("wake", f"wake[N={N},ctx={ctx}]", f"wake: decode one token, d={d}, L={L}",
                              {"method": "sleep", "N": N, "context": ctx, "L": L}, make=make, tokens=1,
                              baseline=first, rounds=s["tokens"], warmup=2))
    for ctx in s["contexts"]:
        def make_full(ctx: int = ctx) -> Callable[[], None]:
            if not full_model:
                full_model.append(hybrid(d, layers=("attention",) * len(HYBRID), device=dev).eval())
            model = full_model[0]
            gen = torch.Generator().manual_seed(0)
            # A KV cache of ``ctx`` tokens: decode time depends on its size, not its values, and prefilling
            # 64k tokens of full attention would take this CPU minutes.
            states = [{"k": torch.randn(1, m.num_kv_heads, ctx, m.head_dim, generator=gen).to(dev),
                       "v": torch.randn(1, m.num_kv_heads, ctx, m.head_dim, generator=gen).to(dev), "offset": ctx}
                      for m in model.mixers()]
            token = torch.zeros(1, 1, dtype=torch.long, device=dev)

            @torch.no_grad()
            def run() -> None:
                engine.wake(model, token, states, None)
            return run

        # its own group: interleaved with the sleep cases, reading a 64k-token cache would evict theirs
        cases.append(Case("wake", f"full_attention[ctx={ctx}]", f"wake: decode one token, full attention, d={d}",
                          {"method": "full_attention", "N": 1, "context": ctx}, make=make_full, tokens=1,
                          baseline=f"full_attention[ctx={s['contexts'][0]}]", rounds=s["tokens"], warmup=2))
    return cases + _position_cases(s)


def _position_cases(s: dict) -> list[Case]:
    """Decode time at the start of a window against its end (issue 11, item 7): one token at a time, in the
    second window of a ``full_flush`` stream (the first has been slept on and evicted, so the cache is as every
    later window finds it). ``position[pos=1]`` times the tokens at positions 1 + warmup ... of the window,
    ``position[pos=L-1]`` the last ones, ending at L - 1 (the token that fills the window; the next one would
    sleep). With ``kv_cache=buffer`` (the default) a token writes its K/V in place into a preallocated buffer,
    so what grows with the position is only the attention read itself; ``kv_cache=concat`` (the old path)
    also copies the whole cache per token per layer. ``attention_read[pos=...]`` times that read alone: the
    attention calls of every attention layer, as the mixer makes them, for the token in the middle of the
    timed positions (the floor of the growth: reading L tokens' K/V is the work of attention). One group:
    all run interleaved."""
    d, L, R, dev = s["d"], s["position_L"], s["position_tokens"], s["device"]
    warmup = 2
    if L < R + warmup + 2:
        raise SleepzooError(f"wake: position_L={L} is too short for {R} + {warmup} timed tokens")
    group = f"wake: decode one token at a position of the window, d={d}, L={L}, full_flush"
    models: dict[str, Any] = {}
    cases = []
    for cache in ("buffer", "concat"):
        for pos in (1, L - 1):
            start = 1 if pos == 1 else L - R - warmup  # the window's tokens cached when the first call comes

            def make(cache: str = cache, start: int = start) -> Callable[[], None]:
                if cache not in models:
                    models[cache] = hybrid(d, device=dev, kv_cache=cache).eval()  # same weights (same seed)
                stream = models[cache].start_stream(window=L, loops=1)
                gen = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    for take in (L, start):  # a whole window, then this window's first tokens
                        stream.feed(torch.randint(0, VOCAB, (1, take), generator=gen).to(dev))
                token = torch.zeros(1, 1, dtype=torch.long, device=dev)

                @torch.no_grad()
                def run() -> None:
                    stream.feed(token)
                return run

            cases.append(Case("wake", f"position[pos={pos},kv_cache={cache}]", group,
                              {"method": "position", "N": 1, "L": L, "position": pos, "kv_cache": cache,
                               "first_position": start + warmup, "last_position": start + warmup + R - 1},
                              make=make, tokens=1, baseline="position[pos=1,kv_cache=buffer]", rounds=R,
                              warmup=warmup))
    for pos in (1, L - 1):
        middle = (1 if pos == 1 else L - R - warmup) + warmup + R // 2  # the median position of its decode case

        def make_read(middle: int = middle) -> Callable[[], None]:
            from ..mixers.attention import Attention, attend, visible_keys

            model = hybrid(d, device=dev).eval()
            stream = model.start_stream(window=L, loops=1)
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for take in (L, middle + 1):  # the keys the token at position ``middle`` reads, its own included
                    stream.feed(torch.randint(0, VOCAB, (1, take), generator=gen).to(dev))
            calls = []
            for m, state in zip(stream.mixers, stream.states):
                if isinstance(m, Attention):
                    q = torch.randn(1, m.num_heads, 1, m.head_dim, generator=gen).to(dev)
                    calls.append((m, q, *visible_keys(state["k"], state["v"], 1, None)))

            @torch.no_grad()
            def run() -> None:
                for m, q, k, v, causal, window in calls:
                    attend(m.backend, m.backend_name, q, k, v, causal=causal, window=window,
                           scale=m.head_dim ** -0.5)
            return run

        cases.append(Case("wake", f"attention_read[pos={pos}]", group,
                          {"method": "attention_read", "N": 1, "L": L, "position": pos,
                           "first_position": middle, "last_position": middle},
                          make=make_read, tokens=1, baseline="position[pos=1,kv_cache=buffer]", rounds=R,
                          warmup=warmup))
    return cases


# ----------------------------------------------------------------------------------------------------------------
# memory


def _memory_cases(s: dict) -> list[Case]:
    d, B, L, W, dev = s["d"], s["B"], s["L"], s["windows"], s["device"]
    cases = []
    for ckpt in (False, True):
        for N in s["loops"]:
            def measure(N: int = N, ckpt: bool = ckpt) -> dict[str, Any]:
                model = hybrid(d, device=dev)
                ids, tgt = _tokens(B, W * L, device=dev)
                params = sum(p.numel() * p.element_size() for p in model.parameters())

                def step() -> None:
                    model(ids, tgt, window=L, loops=N, checkpoint=ckpt, return_logits=False).loss.backward()
                return {"peak_bytes": peak_bytes(step, dev), "parameter_bytes": params}

            tag = "on" if ckpt else "off"
            cases.append(Case("memory", f"memory[N={N},checkpoint={tag}]",
                              f"memory: peak of a training step, B={B} T={W * L} L={L} d={d}",
                              {"N": N, "checkpoint": ckpt, "B": B, "T": W * L, "L": L}, measure=measure))
    return cases


# ----------------------------------------------------------------------------------------------------------------
# study

# The CPU sleep study's model, sleep and task (recipes/study/rule110-depth.yaml; a test keeps the two equal).
STUDY = {
    "model": {"name": "hybrid", "d_model": 64, "layers": list(HYBRID), "tie_embeddings": True,
              "mixers": {"attention": {"num_heads": 4, "num_kv_heads": 4, "head_dim": 16},
                         "gated_deltanet": {"num_heads": 4, "head_dim": 16, "expand_v": 1.0, "conv_size": 4,
                                            "chunk_size": 32}}},
    "sleep": {"window": 25, "loops": 1, "eviction": "full_flush", "gate": True},
    "task": {"name": "rule110", "steps": [0, 1, 2, 3, 4, 6, 8], "states": 1, "bits": 24},
    "train": {"optimizer": "adamw", "adamw_lr": 1.0e-3, "betas": [0.9, 0.95], "weight_decay": 1.0e-4},
}


def _study_cases(s: dict) -> list[Case]:
    from ..optim import build_optimizers  # the trainer's own pieces
    from ..train import batch_seed, build

    B, dev = s["B"], s["device"]
    cases = []
    for N in s["loops"]:
        def make(N: int = N) -> Callable[[], None]:
            recipe = load_recipe({**STUDY, "sleep": {**STUDY["sleep"], "loops": N}})
            model, task = build(recipe)
            model.to(dev).train()
            optimizers = build_optimizers(model, recipe.train)
            params = [p for p in model.parameters() if p.requires_grad]
            batches = [task.generate(B, seed=batch_seed(0, i), split="train") for i in range(4)]
            batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
            calls = [0]

            def run() -> None:  # the trainer's step: zero_grad, forward, backward, clip, update
                batch = batches[calls[0] % len(batches)]
                calls[0] += 1
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                model(batch["input_ids"], batch["targets"], return_logits=False).loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                for opt in optimizers:
                    opt.step()
            return run

        T = STUDY["sleep"]["window"] + 1  # the window and its query token
        cases.append(Case("study", f"step[N={N}]", f"study: training step of the sleep study's model, B={B} T={T}",
                          {"N": N, "B": B, "T": T}, make=make, tokens=B * T, baseline=f"step[N={s['loops'][0]}]",
                          rounds=s["rounds"], warmup=2))
    return cases


BUILDERS: dict[str, Callable[[dict], list[Case]]] = {
    "ops": _ops_cases, "loops": _loops_cases, "window": _window_cases, "wake": _wake_cases,
    "memory": _memory_cases, "study": _study_cases}


def cases(suite: str, size: str = "default", device: str | torch.device = "cpu") -> list[Case]:
    """The cases of ``suite`` at ``size`` ("default" or "tiny") on ``device``, in the order they run."""
    if suite not in BUILDERS:
        raise SleepzooError(f"unknown benchmark suite {suite!r}; suites: {', '.join(SUITES)}")
    if size not in SIZES:
        raise SleepzooError(f"unknown benchmark size {size!r}; sizes: {', '.join(SIZES)}")
    found = BUILDERS[suite]({**SIZES[size][suite], "device": torch.device(device)})
    for case in found:
        case.device = str(torch.device(device))
    return found


# ----------------------------------------------------------------------------------------------------------------
# acceptance checks


def _check(name: str, value: float | None, target: str, ok: bool | None, detail: str = "") -> dict[str, Any]:
    return {"check": name, "value": None if value is None else round(value, 4), "target": target,
            "ok": ok, "detail": detail}


def _round_ratio(a: Result, b: Result) -> float:
    """Median over rounds of a's time / b's time in the same round (interleaved runs: each round's pair ran
    back to back, so drift of the machine cancels); the ratio of medians when the rounds do not pair up."""
    if len(a.times) == len(b.times) and a.times:
        return statistics.median(x / y for x, y in zip(a.times, b.times))
    return a.median / b.median


def checks(results: list[Result]) -> list[dict[str, Any]]:
    """The acceptance checks that the results of this run allow (a suite not run gives none)."""
    by = {r.case.fullname: r for r in results}
    med = {k: r.median for k, r in by.items()}
    info = {k: r.extra_info for k, r in by.items()}
    out: list[dict[str, Any]] = []

    # loops: a consolidated window at N loops costs N wake passes
    window_results = {r.case.params["N"]: r for r in results
                      if r.case.suite == "loops" and r.case.name.startswith("window[")}
    windows = sorted((n, r.median) for n, r in window_results.items())
    base = window_results.get(1)
    if base and "loops::plain" in by:
        ratio = _round_ratio(base, by["loops::plain"])
        out.append(_check("loops: engine window N=1 / the same modules called by hand", ratio, "about 1",
                          None, f"{100 * (ratio - 1):+.1f} % overhead"))
    for N, r in sorted(window_results.items()):
        if N > 1 and base:
            ratio = _round_ratio(r, base)
            out.append(_check(f"loops: window time N={N} / N=1", ratio, f"[{0.9 * N:.1f}, {1.1 * N:.1f}]",
                              0.9 * N <= ratio <= 1.1 * N, f"{ratio / N:.3f} N"))
    # loops: the step at N against (windows - 1) consolidated windows at N + one wake pass
    steps = {r.case.params["N"]: r for r in results if r.case.suite == "loops" and r.case.name.startswith("step[")}
    wins = dict(windows)
    for N, r in sorted(steps.items()):
        W = r.case.params["T"] // r.case.params["L"]
        if N in wins and 1 in wins:
            predicted = (W - 1) * wins[N] + wins[1]
            out.append(_check(f"loops: step time N={N} / (windows x window time)", r.median / predicted,
                              "about 1 (no cost outside the passes)", None))

    # wake: flat in context and loops, far below full attention
    wake = {(r.case.params["method"], r.case.params["N"], r.case.params["context"]): r.median
            for r in results if r.case.suite == "wake" and r.case.params["method"] in ("sleep", "full_attention")}
    contexts = sorted({c for (_, _, c) in wake})
    if contexts:
        lo, hi = contexts[0], contexts[-1]
        loops = sorted({n for (m, n, _) in wake if m == "sleep"})
        for N in loops:
            if ("sleep", N, lo) in wake and ("sleep", N, hi) in wake:
                ratio = wake[("sleep", N, hi)] / wake[("sleep", N, lo)]
                out.append(_check(f"wake: ms/token at {hi} / at {lo} tokens, N={N}", ratio, "[0.9, 1.1]",
                                  0.9 <= ratio <= 1.1))
        if len(loops) > 1 and all(("sleep", n, hi) in wake for n in loops):
            ratio = wake[("sleep", loops[-1], hi)] / wake[("sleep", loops[0], hi)]
            out.append(_check(f"wake: ms/token N={loops[-1]} / N={loops[0]} at {hi}", ratio, "[0.9, 1.1]",
                              0.9 <= ratio <= 1.1))
        if ("full_attention", 1, hi) in wake and ("sleep", loops[0], hi) in wake:
            ratio = wake[("full_attention", 1, hi)] / max(wake[("sleep", n, hi)] for n in loops
                                                         if ("sleep", n, hi) in wake)
            out.append(_check(f"wake: full attention / sleep ms/token at {hi}", ratio, ">= 10", ratio >= 10))

    # wake: the last tokens of a window decode as fast as its first ones (a cache written in place); what
    # remains of the difference is attention's read of the cache, timed alone
    at = {(r.case.params.get("kv_cache", "read"), r.case.params["position"]): r for r in results
          if r.case.suite == "wake" and r.case.params.get("method") in ("position", "attention_read")}
    reads = sorted(p for (c, p) in at if c == "read")
    read_growth = (at[("read", reads[1])].median - at[("read", reads[0])].median) if len(reads) == 2 else None
    for cache in ("buffer", "concat"):
        ends = sorted(p for (c, p) in at if c == cache)
        if len(ends) == 2:
            first, last = at[(cache, ends[0])], at[(cache, ends[1])]
            ratio = _round_ratio(last, first)
            ok = 0.9 <= ratio <= 1.1 if cache == "buffer" else None
            growth = last.median - first.median
            detail = (f"positions {last.case.params['first_position']}-{last.case.params['last_position']} / "
                      f"{first.case.params['first_position']}-{first.case.params['last_position']}: "
                      f"{first.median * 1e3:.3f} -> {last.median * 1e3:.3f} ms")
            if read_growth is not None:
                detail += f"; the attention read alone grows by {read_growth * 1e3:.3f} ms"
            out.append(_check(f"wake: ms/token at window position {ends[1]} / at position {ends[0]}, "
                              f"kv_cache={cache}", ratio, "[0.9, 1.1]" if cache == "buffer" else "(reported)", ok,
                              detail))
            if read_growth is not None:  # the acceptance proper: nothing but attention's own read grows
                excess = (growth - read_growth) / first.median
                out.append(_check(f"wake: (growth from position {ends[0]} to {ends[1]} - the attention read's) / "
                                  f"ms at position {ends[0]}, kv_cache={cache}", excess,
                                  "[-0.1, 0.1]" if cache == "buffer" else "(reported)",
                                  -0.1 <= excess <= 0.1 if cache == "buffer" else None,
                                  f"{(growth - read_growth) * 1e3:+.3f} ms per token"))

    # memory: checkpointing keeps the peak from growing with N
    mem = {(r.case.params["N"], r.case.params["checkpoint"]): r.extra_info["peak_bytes"]
           for r in results if r.case.suite == "memory"}
    for ckpt, tag in ((True, "on"), (False, "off")):
        if (1, ckpt) in mem:
            for N in sorted(n for (n, c) in mem if c == ckpt and n > 1):
                ratio = mem[(N, ckpt)] / mem[(1, ckpt)]
                target = "<= 1.5" if ckpt and N == 4 else "(reported)"
                out.append(_check(f"memory: peak N={N} / N=1, checkpoint {tag}", ratio, target,
                                  ratio <= 1.5 if ckpt and N == 4 else None))

    # ops: the chunked op against fla-core's naive chunk, and against the machine's matmul rate
    if med.get("ops::chunked") and med.get("ops::fla_naive_chunk"):
        ratio = med["ops::fla_naive_chunk"] / med["ops::chunked"]
        out.append(_check("ops: chunked speed / fla naive chunk", ratio, ">= 2", ratio >= 2))
    if med.get("ops::chunked") and med.get("ops::recurrent"):
        out.append(_check("ops: chunked speed / recurrent", med["ops::recurrent"] / med["ops::chunked"],
                          "(reported)", None))
    if "ops::chunked" in info and "ops::matmul_rate" in info:
        share = info["ops::chunked"]["gflops_per_s"] / info["ops::matmul_rate"]["gflops_per_s"]
        out.append(_check("ops: chunked GFLOP/s / matmul GFLOP/s", share, "(reported)", None,
                          f"{info['ops::chunked']['gflops_per_s']:.1f} of "
                          f"{info['ops::matmul_rate']['gflops_per_s']:.1f} GFLOP/s"))
    return out
