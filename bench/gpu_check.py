"""One prepared check for a lent GPU: accelerated back ends against the torch reference, then throughput.

    python bench/gpu_check.py --out gpu_check.json                 # on a CUDA machine, ~5-8 minutes on an H100
    python bench/gpu_check.py --dry-run --out /tmp/dry.json        # tiny sizes on the CPU: checks the code path
    python bench/gpu_check.py --only fla attention --out part.json # some sections only

Sections, each run in its own try/except and reported whatever happens (``status``: ok, failed, skipped, error):

* ``fla``: fla's Triton kernels (plugin ``sleepzoo-fla``) against sleepzoo's torch ops, values and every
  gradient (q, k, v, g, beta, initial state), float32 and bfloat16, ragged lengths: ``sleepzoo_fla.parity``.
* ``attention``: every attention back end that imports (``sdpa``, ``flex``, ``flash_attn``, ``xformers``)
  against an explicit-mask float32 softmax: causal, sliding window, a KV cache (S > T), GQA, one-token decode;
  output and the gradients of q, k, v. A back end whose ``unsupported`` gives a reason is reported with it.
* ``throughput``: the paper's Figure 6 set-up: an Ouro-1.4B-sized model (the shipped config.json, random
  weights) with the retrofit's six Jet layers, one wake step, sleep over all blocks, bfloat16, on T = 12,288
  tokens with window L in {1k, 2k, 4k} and loops N in {1, 2, 4}: tokens/s of a training step (forward +
  backward, activation checkpointing per pass) and of an inference forward, with the largest batch that fits
  (halved on OOM), and the training slowdown against N = 1. It uses the fla rule and flash-attn where they
  run, else the torch rule and sdpa (recorded in each row).

* ``jet2b_train``: one training step of a real-size Jet-Nemotron-2B (the shipped config.json, random weights,
  bf16 weights, loops 2 over the paper's middle 14 blocks, window 2,000) on the paper's GSM-Infinite batch:
  256 problems of T = 3,300 tokens with 5 answer tokens each, taken in micro-batches (train.micro_batch_size:
  the largest that fits, halved on OOM), activation checkpointing per pass, the head at the targets only.
  Reports the micro-batch, peak memory, the step's seconds and tokens/s.

* ``bench``: the ``sleepzoo bench`` suites (ops, loops, window, wake, memory) with ``--device cuda``: the same
  cases and acceptance checks as on the CPU, float32.

The plugins are imported from ``plugins/`` when they are not installed. A time budget (``--budget-s``) skips
what would not finish. Results: a printed table per section and JSON at ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGINS = {"sleepzoo_fla": "sleepzoo-fla", "sleepzoo_flash_attn": "sleepzoo-flash-attn",
           "sleepzoo_xformers": "sleepzoo-xformers"}
SECTIONS = ("fla", "attention", "throughput", "jet2b_train", "bench")


def import_plugin(module: str):
    """``module`` from its installed distribution, else from ``plugins/<dist>`` in this checkout."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != package:
            raise  # the plugin is there but its dependency is not: let the caller report it
    sys.path.insert(0, os.path.join(ROOT, "plugins", PLUGINS[package]))
    return importlib.import_module(module)


def environment() -> dict:
    versions = {}
    for dist in ("torch", "triton", "fla-core", "flash-attn", "xformers", "sleepzoo"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "versions": versions, "cuda": cuda,
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"}


# ----------------------------------------------------------------------------------------------------------------
# (a) fla kernels vs torch ops


def check_fla(device: torch.device, dry_run: bool, deadline: float) -> dict:
    parity = import_plugin("sleepzoo_fla.parity")
    if dry_run:
        rows = parity.run(device, lengths=(5,), B=1, H=2, K=16, V=16)
    else:
        rows = parity.run(device, lengths=parity.LENGTHS)
    print(parity.format_table(rows))
    return {"status": "ok" if all(r["ok"] for r in rows) else "failed", "rows": rows}


# ----------------------------------------------------------------------------------------------------------------
# (b) attention back ends vs an explicit-mask softmax

BF16, FP32 = torch.bfloat16, torch.float32
# (name, dtype, T, S, window, H, Hkv, D): bfloat16 throughout, one float32 case (flash-attn reports its reason);
# few shapes, because a compiled flex attention compiles once per shape
ATTENTION_CASES = [
    ("causal", BF16, 512, 512, None, 8, 8, 64),
    ("window", BF16, 1000, 1000, 256, 8, 8, 128),
    ("cache+window+gqa", BF16, 384, 1024, 512, 8, 2, 64),
    ("gqa", BF16, 512, 512, None, 16, 4, 128),
    ("decode", BF16, 1, 777, 300, 8, 2, 64),
    ("cache+window+gqa", FP32, 384, 1024, 512, 8, 2, 64),
]
DRY_ATTENTION_CASES = [("causal", FP32, 6, 6, None, 2, 2, 16), ("cache+window+gqa", FP32, 3, 9, 4, 4, 2, 16),
                       ("decode", FP32, 1, 7, 3, 4, 1, 16)]
ATTENTION_TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def reference_attention(q, k, v, window, scale):
    """Softmax attention in float32 with an explicit bottom-right-aligned causal/window mask built by hand."""
    T, S = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    q_pos = torch.arange(S - T, S, device=q.device)[:, None]
    k_pos = torch.arange(S, device=q.device)[None, :]
    allowed = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window is not None else True)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v.float()


def attention_backends() -> tuple[dict, dict]:
    """The back ends that import, and why the others do not."""
    from sleepzoo.mixers.attention import flex_attention, sdpa_attention

    found, missing = {"sdpa": sdpa_attention, "flex": flex_attention}, {}
    for name, module in (("flash_attn", "sleepzoo_flash_attn.attention"), ("xformers", "sleepzoo_xformers.attention")):
        try:
            found[name] = getattr(import_plugin(module), name)
        except Exception as exc:  # noqa: BLE001
            missing[name] = f"{type(exc).__name__}: {exc}"
    return found, missing


def _relative(got, want) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def compare_attention(backend, case, device) -> dict:
    name, dtype, T, S, window, H, Hkv, D = case
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(2, h, n, D, generator=gen).to(device, dtype) for h, n in ((H, T), (Hkv, S), (Hkv, S)))
    scale = D ** -0.5
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    row = {"case": name, "dtype": str(dtype).removeprefix("torch."), "T": T, "S": S, "window": window,
           "H": H, "Hkv": Hkv, "D": D}
    unsupported = getattr(backend, "unsupported", None)
    reason = unsupported(*leaves, window=window) if unsupported else None
    grads = reason is None
    if reason is not None:  # maybe it runs without gradients (flex on a CPU)
        with torch.no_grad():
            no_grad_reason = unsupported(q, k, v, window=window)
        if no_grad_reason is not None:
            return {**row, "ok": None, "skipped": reason}
        row["note"] = f"values only: {reason}"
    refs = [x.float().clone().requires_grad_() for x in (q, k, v)]
    want = reference_attention(*refs, window, scale)
    with torch.set_grad_enabled(grads):
        got = backend(*(leaves if grads else (q, k, v)), causal=True, window=window, scale=scale)
    row["o"] = _relative(got, want)
    if grads:
        do = torch.randn(want.shape, generator=gen).to(device)
        (got.float() * do).sum().backward()
        (want * do).sum().backward()
        for n, leaf, ref in zip("qkv", leaves, refs):
            row[f"d{n}"] = _relative(leaf.grad, ref.grad)
    errors = [row[c] for c in ("o", "dq", "dk", "dv") if c in row]
    row["ok"] = all(e <= ATTENTION_TOLERANCE[dtype] for e in errors)
    return row


def check_attention(device: torch.device, dry_run: bool, deadline: float) -> dict:
    found, missing = attention_backends()
    cases = DRY_ATTENTION_CASES if dry_run else ATTENTION_CASES
    rows = []
    for backend_name, backend in found.items():
        for case in cases:
            head = {"backend": backend_name, "case": case[0], "dtype": str(case[1]).removeprefix("torch.")}
            if time.monotonic() > deadline:
                rows.append({**head, "ok": None, "skipped": "time budget"})
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", category=UserWarning)
                    rows.append({"backend": backend_name, **compare_attention(backend, case, device)})
            except Exception as exc:  # noqa: BLE001
                rows.append({**head, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]})
    print(f"{'backend':<11}{'case':<18}{'dtype':<9}{'o':>9}{'dq':>9}{'dk':>9}{'dv':>9}  ok")
    for r in rows:
        head = f"{r['backend']:<11}{r['case']:<18}{r.get('dtype', ''):<9}"
        if "error" in r or "skipped" in r:
            print(head + ("ERROR " + r["error"] if "error" in r else "skipped: " + r["skipped"]))
            continue
        cells = "".join(f"{r[c]:>9.1e}" if c in r else f"{'-':>9}" for c in ("o", "dq", "dk", "dv"))
        print(head + cells + ("  ok" if r["ok"] else "  FAIL") + (f"  ({r['note']})" if "note" in r else ""))
    for name, why in missing.items():
        print(f"{name:<11}not importable: {why}")
    failed = any(r["ok"] is False for r in rows)
    return {"status": "failed" if failed else "ok", "rows": rows, "not_importable": missing}


# ----------------------------------------------------------------------------------------------------------------
# (c) hybrid throughput against loops and window


def _choose_rule_and_backend(device: torch.device) -> tuple[str, str, dict]:
    """The fastest rule and attention back end that run here, registered in-process when not installed."""
    from sleepzoo import registry

    why = {}
    probe = torch.zeros(1, 1, 1, 64, device=device, dtype=torch.bfloat16)
    rule = "gated_delta"
    try:
        fla_rules = import_plugin("sleepzoo_fla.rules")
        problem = fla_rules.kernel_problem("fla_gated_delta", probe, probe)
        if problem is None:
            if "fla_gated_delta" not in registry.names("rule"):
                registry.register("rule", "fla_gated_delta")(fla_rules.fla_gated_delta)
            rule = "fla_gated_delta"
        else:
            why["rule"] = problem
    except Exception as exc:  # noqa: BLE001
        why["rule"] = f"{type(exc).__name__}: {exc}"
    backend = "sdpa"
    try:
        flash = import_plugin("sleepzoo_flash_attn.attention").flash_attn
        problem = flash.unsupported(probe, probe, probe, window=None)
        if problem is None:
            if "flash_attn" not in registry.names("attention"):
                registry.register("attention", "flash_attn")(flash)
            backend = "flash_attn"
        else:
            why["attention"] = problem
    except Exception as exc:  # noqa: BLE001
        why["attention"] = f"{type(exc).__name__}: {exc}"
    return rule, backend, why


def _build_ouro(dry_run: bool, window: int, loops: int, rule: str, backend: str, device, dtype):
    """The paper's Figure 6 model: Ouro-1.4B's shapes (the shipped config.json, random weights) with the
    retrofit's six Jet layers, one wake step, sleep over all blocks. ``dry_run``: the same structure, tiny."""
    from sleepzoo.config import SleepConfig
    from sleepzoo.models.ouro import OuroLM
    from sleepzoo.pretrained import published_config

    config = json.loads(open(published_config("ouro-1.4b")).read())
    layers = [3, 7, 11, 15, 19, 23]
    jet = {"rule": rule}
    if dry_run:
        config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=16, vocab_size=256)
        layers, jet = [1, 3], {"rule": rule, "num_heads": 2, "head_dim": 16}
    torch.manual_seed(0)
    with torch.device(device):
        model = OuroLM.from_config(config, wake_passes=1, backend=backend,
                                   sleep=SleepConfig(window=window, loops=loops))
        model.configure(sleep_layers=layers, sleep_layer_options=jet)
    return model.to(dtype=dtype), config["vocab_size"]


def _time(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_throughput(device: torch.device, dry_run: bool, deadline: float) -> dict:
    """Training and inference tokens/s against loops N for an Ouro-1.4B-sized model at T = 12k tokens with
    window L in {1k, 2k, 4k} (the paper's Figure 6 set-up), bfloat16, the largest batch that fits."""
    if device.type != "cuda" and not dry_run:
        return {"status": "skipped", "reason": "no CUDA device"}
    T = 96 if dry_run else 12288
    windows, loops_list = ((16, 32), (1, 2)) if dry_run else ((1024, 2048, 4096), (1, 2, 4))
    dtype = torch.float32 if dry_run else torch.bfloat16
    first_batch, repeats = (2, 1) if dry_run else (4, 2)
    rule, backend, why = _choose_rule_and_backend(device)
    rows = []
    for window in windows:
        batch = first_batch
        for loops in loops_list:
            row = {"T": T, "L": window, "N": loops, "rule": rule, "backend": backend}
            if time.monotonic() > deadline:
                rows.append({**row, "skipped": "time budget"})
                continue
            try:
                row.update(_throughput_row(device, dry_run, window, loops, rule, backend, dtype, T, batch, repeats))
                batch = row["B"]  # larger N needs at least as much memory: start the next row from here
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
    print(f"Ouro-1.4B-sized{' (dry run: tiny)' if dry_run else ''}, retrofit Jet layers, wake_passes 1, T={T} {str(dtype).removeprefix('torch.')} rule={rule} "
          f"attention={backend}" + (f"  (fallbacks: {why})" if why else ""))
    print(f"{'L':>6}{'N':>3}{'B':>4}{'train tok/s':>14}{'infer tok/s':>14}{'step s':>9}{'vs N=1':>8}{'peak GB':>9}")
    base = {}
    for r in rows:
        head = f"{r['L']:>6}{r['N']:>3}"
        if "error" in r or "skipped" in r:
            print(head + "  " + r.get("error", r.get("skipped")))
            continue
        if r["N"] == 1:
            base[r["L"]] = r["train_tokens_per_s"]
        r["train_slowdown_vs_N1"] = base[r["L"]] / r["train_tokens_per_s"] if r["L"] in base else None
        peak = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
        slow = "-" if r["train_slowdown_vs_N1"] is None else f"{r['train_slowdown_vs_N1']:.2f}x"
        print(head + f"{r['B']:>4}{r['train_tokens_per_s']:>14.0f}{r['infer_tokens_per_s']:>14.0f}"
              f"{r['train_step_s']:>9.3f}{slow:>8}{peak:>9}")
    status = "failed" if any("error" in r for r in rows) else "ok"
    return {"status": status, "rows": rows, "rule": rule, "backend": backend, "fallbacks": why,
            "model": {"config": "ouro-1.4b", "sleep_layers": 6, "wake_passes": 1, "T": T, "dtype": str(dtype)}}


def _throughput_row(device, dry_run: bool, window: int, loops: int, rule: str, backend: str, dtype, T: int,
                    batch: int, repeats: int) -> dict:
    """Time one (L, N): halve the batch on out-of-memory until it fits."""
    model, vocab = _build_ouro(dry_run, window, loops, rule, backend, device, dtype)
    model.train()
    while True:
        ids = torch.randint(0, vocab, (batch, T), device=device)

        def train_step():
            model.zero_grad(set_to_none=True)
            model(ids, ids, checkpoint=True, return_logits=False).loss.backward()

        def infer():
            with torch.no_grad():
                model(ids, return_logits=False)

        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            train_s = _time(train_step, device, repeats)
            infer_s = _time(infer, device, repeats)
            break
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        # out of memory: free outside the except block (the traceback holds the activations)
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        batch //= 2
    return {"B": batch, "train_step_s": train_s, "train_tokens_per_s": batch * T / train_s, "infer_s": infer_s,
            "infer_tokens_per_s": batch * T / infer_s,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


# ----------------------------------------------------------------------------------------------------------------
# (d) one paper-scale training step: Jet-Nemotron-2B, batch 256 x 3,300 tokens in micro-batches


def check_jet2b_train(device: torch.device, dry_run: bool, deadline: float) -> dict:
    """One optimizer step's forward/backward over the paper's batch, accumulated over micro-batches."""
    from sleepzoo.models.jet_nemotron import JetNemotronLM
    from sleepzoo.pretrained import published_config
    from sleepzoo.precision import Precision
    from sleepzoo.train import _accumulate

    config = json.loads(open(published_config("jet-nemotron-2b")).read())
    batch, T, targets, window, micro = 256, 3300, 5, 2000, 16
    if dry_run:
        config.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=512, num_hidden_layers=6, bos_token_id=1, eos_token_id=1,
                      layer_types=["jet", "jet", "attn", "swa", "jet", "jet"])
        config["efficient_attention_config"] = {
            "jet": dict(config["efficient_attention_config"]["jet"], num_heads=2, head_dim=16, expand_v=1.0),
            "swa": {"window_size": 16}}
        batch, T, window, micro = 8, 96, 40, 4
    torch.manual_seed(0)
    with torch.device(device):
        model = JetNemotronLM.from_config(config)
    model = model.to(dtype=torch.float32 if dry_run else torch.bfloat16)
    model.sleep.window, model.sleep.loops, model.sleep.checkpoint = window, 2, True
    model.train()
    vocab = config["vocab_size"]
    ids = torch.randint(0, vocab, (batch, T), device=device)
    tg = torch.full_like(ids, -100)
    tg[:, -targets:] = ids[:, -targets:]
    params = [p for p in model.parameters() if p.requires_grad]
    precision = Precision("none", device)
    rows = []
    while True:
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            model.zero_grad(set_to_none=True)
            loss = _accumulate(model, ids, tg, micro, float((tg != -100).sum()), 1, precision, params)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            break
        except torch.cuda.OutOfMemoryError:
            if micro == 1:
                raise
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append({"micro_batch_size": micro, "status": "out of memory"})
        micro //= 2
        if time.monotonic() > deadline:
            return {"status": "skipped", "reason": "time budget", "tried": rows}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    result = {"status": "ok", "batch": batch, "T": T, "targets_per_example": targets, "window": window, "loops": 2,
              "micro_batch_size": micro, "step_s": seconds, "tokens_per_s": batch * T / seconds,
              "peak_mem_gb": peak, "loss": float(loss), "parameters": model.num_parameters(), "tried": rows}
    print(f"Jet-Nemotron-2B{' (dry run: tiny, float32)' if dry_run else ', bf16'}, batch {batch} x T {T}, micro-batch "
          f"{micro}: {seconds:.1f} s/step, {batch * T / seconds:,.0f} tokens/s, peak "
          f"{'-' if peak is None else f'{peak:.1f} GiB'}, loss {float(loss):.3f}")
    return result


# ----------------------------------------------------------------------------------------------------------------
# (e) the `sleepzoo bench` suites on the GPU


def check_bench(device: torch.device, dry_run: bool, deadline: float) -> dict:
    """``sleepzoo bench --device cuda``: the CPU suites' cases and acceptance checks on the GPU (float32)."""
    from sleepzoo import benchmarks

    rows, done = [], []
    for suite in benchmarks.SUITES:
        if time.monotonic() > deadline:
            rows.append({"suite": suite, "skipped": "time budget"})
            continue
        for r in benchmarks.run([suite], size="tiny" if dry_run else "default", device=str(device)):
            done.append(r)
            rows.append({"case": r.case.fullname, "median_ms": None if r.median is None else r.median * 1e3,
                         **r.extra_info})
    found = benchmarks.checks(done)
    for row in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    for c in found:
        print(f"{c['check']:<60} {c['value']!s:>10} {c['target']:<20} {c['ok']}")
    return {"status": "ok", "rows": rows, "checks": found}


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="write the JSON report here")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: check the code path")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip work that starts after this many seconds")
    args = parser.parse_args(argv)

    start = time.monotonic()
    deadline = start + args.budget_s
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    report = {"environment": environment(), "dry_run": args.dry_run, "device": str(device), "sections": {}}
    print(json.dumps(report["environment"]))
    checks = {"fla": check_fla, "attention": check_attention, "throughput": check_throughput,
              "jet2b_train": check_jet2b_train, "bench": check_bench}
    for name in args.only:
        print(f"\n== {name} ==")
        t0 = time.monotonic()
        if device.type != "cuda" and not args.dry_run:
            result = {"status": "skipped", "reason": "no CUDA device (use --dry-run to check the code path)"}
            print(result["reason"])
        elif time.monotonic() > deadline:
            result = {"status": "skipped", "reason": "time budget"}
        else:
            try:
                result = checks[name](device, args.dry_run, deadline)
            except Exception as exc:  # noqa: BLE001  (fail soft: the next section still runs)
                result = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-3000:]}
                print(result["traceback"])
        result["seconds"] = round(time.monotonic() - t0, 1)
        report["sections"][name] = result
        with open(args.out, "w") as f:  # after every section, so a timeout still leaves the finished ones
            json.dump(report, f, indent=1, default=str)
    report["seconds"] = round(time.monotonic() - start, 1)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print("\n" + "  ".join(f"{n}: {r['status']} ({r['seconds']}s)" for n, r in report["sections"].items()))
    print(f"report: {args.out}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
