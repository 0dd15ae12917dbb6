"""Parity of fla's kernels (the ``fla_*`` rules) with sleepzoo's torch ops: values and every gradient.

For each rule (``fla_gated_delta``, ``fla_delta``, ``fla_gated_linear``, ``fla_linear``), form (chunk, recurrent,
step), dtype and sequence length, the rule runs on inputs rounded to that dtype and its torch twin runs on the
same rounded values in float32; a random cotangent on the output and on the final state gives the gradients
of ``q, k, v, g, beta`` and the initial state. Each is scored as a relative RMS error
``||fla - torch|| / ||torch||`` and passes under :data:`TOLERANCE` (float32 is loose because Triton's float32
matmuls use TF32). Lengths are ragged on purpose (not multiples of fla's 64-token chunks).

    python plugins/sleepzoo-fla/parity.py            # on a CUDA machine; prints a table, exit 1 on a failure
    python plugins/sleepzoo-fla/parity.py --quick    # fewer lengths
    python plugins/sleepzoo-fla/parity.py --device cpu --quick   # the code path on a CPU (all fallbacks)

Without a CUDA device (and without ``--device cpu``) it says so and exits 0. On CUDA a row where fla's kernels
could not run (so the torch op ran, e.g. Triton failed to import) fails, with the reason in its ``path``.
``bench/gpu_check.py`` runs the same :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch
import torch.nn.functional as F
from sleepzoo.ops import rules as torch_rules

from . import rules as fla_rules

RULES = ("fla_gated_delta", "fla_delta", "fla_gated_linear", "fla_linear")
FORMS = ("chunk", "recurrent", "step")
LENGTHS = (1, 37, 64, 100, 300)
QUICK_LENGTHS = (37, 100)
TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float64: 1e-10}
GRADS = ("q", "k", "v", "g", "beta", "S0")


def _inputs(rule, B: int, T: int, H: int, K: int, V: int, device: torch.device, seed: int) -> dict:
    """float32 inputs as the mixers make them: unit-norm keys, log-decays in (-inf, 0), beta in (0, 1)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    return {
        "q": randn(B, T, H, K),
        "k": F.normalize(randn(B, T, H, K), dim=-1),
        "v": randn(B, T, H, V),
        "g": F.logsigmoid(randn(B, T, H) + 2.0) if rule.uses_gate else None,
        "beta": torch.sigmoid(randn(B, T, H)) if rule.uses_beta else None,
        "S0": 0.1 * randn(B, H, K, V),
    }


def _run_form(rule, form: str, x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, S)`` of ``rule``'s ``form`` on inputs ``x``; the step form reads the first token only."""
    if form == "step":
        first = {n: (None if t is None else t[:, 0]) for n, t in x.items() if n != "S0"}
        return rule.step(first["q"], first["k"], first["v"], first["g"], first["beta"], x["S0"])
    fn = rule.chunk if form == "chunk" else rule.recurrent
    return fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["S0"], output_final_state=True)


def _relative_error(got: torch.Tensor | None, want: torch.Tensor | None) -> float | None:
    if got is None or want is None:
        return None
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def compare(name: str, form: str, dtype: torch.dtype, T: int, *, device: torch.device, B: int = 2, H: int = 4,
            K: int = 64, V: int = 64, seed: int = 0, expect_kernels: bool = True) -> dict:
    """One row: relative errors of ``o``, ``S`` and every gradient of rule ``name`` against its torch twin.

    With ``expect_kernels`` a row where fla's kernels could not run (and the torch op ran) fails.
    """
    rule = getattr(fla_rules, name)
    twin = getattr(torch_rules, name.removeprefix("fla_"))
    T = 1 if form == "step" else T
    base = _inputs(rule, B, T, H, K, V, device, seed)
    rounded = {n: (None if t is None else t.to(dtype)) for n, t in base.items()}
    rounded["S0"] = base["S0"]  # states are float32 accumulators in both implementations
    leaves = {n: (None if t is None else t.clone().requires_grad_()) for n, t in rounded.items()}
    ref_leaves = {n: (None if t is None else t.float().clone().requires_grad_()) for n, t in rounded.items()}

    # which path runs: on a GPU a fallback to the torch op would compare the torch op with itself
    fallback = fla_rules.kernel_problem(name, leaves["q"], leaves["v"])
    o, S = _run_form(rule, form, leaves)
    o_ref, S_ref = _run_form(twin, form, ref_leaves)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    do = torch.randn(o_ref.shape, generator=gen).to(device)
    dS = torch.randn(S_ref.shape, generator=gen).to(device)
    ((o.float() * do).sum() + (S.float() * dS).sum()).backward()
    ((o_ref * do).sum() + (S_ref * dS).sum()).backward()

    row = {"rule": name, "form": form, "dtype": str(dtype).removeprefix("torch."), "T": T,
           "path": "fla" if fallback is None else f"torch ({fallback})",
           "o": _relative_error(o, o_ref), "S": _relative_error(S, S_ref)}
    for n in GRADS:
        leaf, ref = leaves[n], ref_leaves[n]
        row[f"d{n}"] = None if leaf is None else _relative_error(leaf.grad, ref.grad)
    errors = [row[c] for c in ("o", "S", *(f"d{n}" for n in GRADS)) if row[c] is not None]
    row["ok"] = all(e <= TOLERANCE[dtype] for e in errors)  # NaN compares False: a NaN fails
    if expect_kernels and fallback is not None:
        row["ok"] = False
    return row


def run(device: torch.device | str | None = None, *, dtypes=(torch.float32, torch.bfloat16), lengths=LENGTHS,
        rules=RULES, forms=FORMS, **sizes) -> list[dict]:
    """Every (rule, form, dtype, length) comparison; the step form once per dtype. Errors become failed rows."""
    device = torch.device("cuda" if device is None else device)
    rows = []
    for name in rules:
        for form in forms:
            for dtype in dtypes:
                for T in (lengths[:1] if form == "step" else lengths):
                    try:
                        with warnings.catch_warnings():  # the CPU dry run falls back on purpose
                            warnings.simplefilter("ignore", category=UserWarning)
                            rows.append(compare(name, form, dtype, T, device=device,
                                                expect_kernels=device.type == "cuda", **sizes))
                    except Exception as exc:  # noqa: BLE001  (a kernel failure is a result to report)
                        rows.append({"rule": name, "form": form, "dtype": str(dtype).removeprefix("torch."),
                                     "T": T, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of :func:`run`'s rows (relative errors, '-' where a tensor does not apply)."""
    cols = ["o", "S"] + [f"d{n}" for n in GRADS]
    lines = [f"{'rule':<17}{'form':<10}{'dtype':<9}{'T':>5}  " + "".join(f"{c:>9}" for c in cols) + "  ok"]
    for r in rows:
        head = f"{r['rule']:<17}{r['form']:<10}{r['dtype']:<9}{r['T']:>5}  "
        if "error" in r:
            lines.append(head + f"ERROR {r['error']}")
            continue
        cells = "".join(f"{'-':>9}" if r[c] is None else f"{r[c]:>9.1e}" for c in cols)
        path = "" if r["path"] == "fla" else f"  {r['path']}"
        lines.append(head + cells + ("  ok" if r["ok"] else "  FAIL") + path)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (the fallback path, for a dry run)")
    parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS} only")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    args = parser.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print("fla parity: no CUDA device here, nothing to compare (fla's kernels need one); "
              "use --device cpu to exercise the fallback path")
        return 0
    rows = run(args.device, lengths=QUICK_LENGTHS if args.quick else LENGTHS)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} comparisons within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
