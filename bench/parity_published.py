#!/usr/bin/env python
"""Parity of sleepzoo's native Jet-Nemotron and Ouro with the published modeling code, on tiny random weights.

For each model: build a tiny sleepzoo model (:func:`sleepzoo.pretrained.from_config`) with the published layer
types and features, give every weight a random value, write it with :func:`sleepzoo.pretrained.save_pretrained`
(float32), load that folder with sleepzoo (:func:`sleepzoo.pretrained.from_pretrained`) and with the published
config and model classes (``from_pretrained``, local files only), run the same token ids through both and
print the differences of the logits. See docs/parity.md for the versions, the commands and the results.

The published code is NOT a dependency of sleepzoo and is not in this repository: point this script at your own
checkouts, in an environment that has what they need (transformers 4.5x, and fla for Jet-Nemotron)::

    python bench/parity_published.py --jet-src ~/src/Jet-Nemotron --ouro-src ~/src/Ouro-1.4B

``--jet-src``: a clone of github.com/NVlabs/Jet-Nemotron (its ``jetai/modeling/hf`` folder is used), or any
folder that holds ``modeling_jet_nemotron.py`` and its siblings (e.g. a snapshot of the Hugging Face repo).
``--ouro-src``: a folder holding the remote code of ByteDance/Ouro-1.4B, ``configuration_ouro.py`` and
``modeling_ouro.py`` (a snapshot of the Hugging Face repo).

Jet-Nemotron's published kernels are Triton (GPU only). On a CPU the script runs the published model with
torch stand-ins, patched into the loaded published modules only (nothing is changed on disk):

* the gated delta rule (``chunk_gated_delta_rule``, ``fused_recurrent_gated_delta_rule``): fla's own torch
  references ``fla.ops.gated_delta_rule.naive.naive_{chunk,recurrent}_gated_delta_rule``, after the q/k L2 norm
  that the kernels apply with ``use_qk_l2norm_in_kernel=True`` (fla's formula: ``x / sqrt(sum x^2 + 1e-6)``);
  several packed sequences (``cu_seqlens``) are run one by one;
* ``FusedRMSNormGated``: fla's torch reference ``fla.modules.layernorm_gated.rms_norm_ref`` (norm, weight,
  then times ``silu(gate)``);
* the dynamic convolution: the published module's own ``"naive"`` implementation.

``--stand-ins triton`` keeps the published kernels (on a machine where they run). This script is a developer
tool: nothing in the package or the tests imports it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import tempfile
import types
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

# ---------------------------------------------------------------------------------------------------------
# tiny configurations: the published layer types and features, small sizes
# ---------------------------------------------------------------------------------------------------------

# Jet-Nemotron: jet, attn and swa layers; GQA with q/k/v biases; tied embeddings; Jet-Nemotron-2B's
# expand_v = 2.6666666667 (head_v = 32 here, as 256 = 96 * 2.67 there); a window smaller than the inputs.
JET_TINY: dict[str, Any] = {
    "architectures": ["JetNemotronForCausalLM"],
    "model_type": "jet_nemotron",
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 6,
    "layer_types": ["jet", "attn", "jet", "swa", "swa", "jet"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "efficient_attention_config": {
        "jet": {"conv_size": 4, "dconv_generator_reduction": 8, "dconv_implementation": "triton",
                "expand_v": 2.6666666667, "head_dim": 12, "mode": "chunk", "norm_eps": "1e-5", "num_heads": 4},
        "swa": {"window_size": 16},
    },
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "attention_dropout": 0.0,
    "use_cache": False,
}

# Ouro: sandwich-norm layers looped total_ut_steps = 3 times, the early-exit gate, an untied head, no biases.
OURO_TINY: dict[str, Any] = {
    "architectures": ["OuroForCausalLM"],
    "model_type": "ouro",
    "vocab_size": 89,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 1024,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "total_ut_steps": 3,
    "early_exit_threshold": 1.0,
    "use_cache": False,
}

THRESHOLDS = (0.5, 0.9)  # Ouro's threshold exit, besides the config's 1.0


# ---------------------------------------------------------------------------------------------------------
# sleepzoo side
# ---------------------------------------------------------------------------------------------------------

def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and away from its initial value (all-ones norms, zero biases or a zero dynamic-conv
    generator would hide a missing or misplaced term)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                continue  # already random (Mamba2-style init); keeps the decays in their trained range
            if p.dim() == 1 and ("norm" in name):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif "early_exit_gate" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 2 else 0.5))
            elif "kernel_generator.w2" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.dim() == 2 else 0.4))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def write_sleepzoo_model(config: dict, folder: Path, seed: int) -> None:
    from sleepzoo.pretrained import from_config, save_pretrained

    torch.manual_seed(seed)
    model = from_config(dict(config))
    randomize(model, seed)
    model = model.float().eval()
    save_pretrained(model, folder)


def load_sleepzoo(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    from sleepzoo.pretrained import from_pretrained

    return from_pretrained(folder, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------------------
# published side: loading the code as a package, CPU stand-ins for Triton kernels
# ---------------------------------------------------------------------------------------------------------

def find_code(src: Path, marker: str, candidates: tuple[str, ...]) -> Path:
    for sub in candidates:
        if (src / sub / marker).is_file():
            return (src / sub).resolve()
    raise SystemExit(f"{src}: no {marker} in {', '.join(str(src / c) for c in candidates)}")


def load_package(name: str, folder: Path) -> types.ModuleType:
    """``folder`` as package ``name`` (its files import each other relatively, as Hugging Face remote code does)."""
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    package.__file__ = str(folder / "__init__.py")
    sys.modules[name] = package
    return package


def fla_l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fla's L2 norm as its kernel computes it (float32): ``x / sqrt(sum(x^2) + eps)`` over the last dim."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


L2NORM = {"fla": fla_l2norm}  # the formula the stand-ins use


def _segments(cu_seqlens: torch.Tensor | None, total: int) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, total)]
    bounds = [int(b) for b in cu_seqlens.tolist()]
    return list(pairwise(bounds))


def make_delta_rule_standin(naive: Callable, *, chunked: bool) -> Callable:
    """A drop-in for fla's ``chunk_gated_delta_rule`` / ``fused_recurrent_gated_delta_rule`` built on fla's naive
    torch reference (keyword call, as the published JetBlock makes it)."""

    def run(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
            use_qk_l2norm_in_kernel=False, **_ignored):
        if use_qk_l2norm_in_kernel:
            q, k = L2NORM["fla"](q), L2NORM["fla"](k)
        outs, finals = [], []
        for i, (s, e) in enumerate(_segments(cu_seqlens, q.shape[1])):
            h0 = None if initial_state is None else initial_state[i: i + 1] if cu_seqlens is not None else initial_state
            sl = (slice(None), slice(s, e))
            args = {"q": q[sl], "k": k[sl], "v": v[sl], "g": g[sl], "beta": beta[sl], "scale": scale,
                    "initial_state": h0, "output_final_state": output_final_state}
            if chunked:
                args["chunk_size"] = 64
            o, ht = naive(**args)
            outs.append(o.to(q.dtype))
            finals.append(ht)
        o = torch.cat(outs, dim=1)
        final = torch.cat(finals, dim=0) if output_final_state else None
        return o, final

    return run


def make_gated_norm_standin(rms_norm_ref: Callable) -> type:
    class RMSNormGatedStandin(torch.nn.Module):
        """fla's FusedRMSNormGated (rmsnorm(x) * weight * silu(g)) through fla's torch reference."""

        def __init__(self, hidden_size: int, elementwise_affine: bool = True, eps: float = 1e-5,
                     activation: str = "swish", **_ignored):
            super().__init__()
            assert activation in ("swish", "silu") and elementwise_affine
            self.eps = eps
            self.weight = torch.nn.Parameter(torch.ones(hidden_size))

        def forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
            assert residual is None and not prenorm
            return rms_norm_ref(x, self.weight, None, z=g, eps=self.eps, norm_before_gate=True, upcast=True)

    return RMSNormGatedStandin


def load_published_jet(src: Path, stand_ins: str) -> dict[str, Any]:
    code = find_code(src, "modeling_jet_nemotron.py", (".", "jetai/modeling/hf"))
    load_package("published_jet", code)
    config_mod = importlib.import_module("published_jet.configuration_jet_nemotron")
    jet_block = importlib.import_module("published_jet.jet_block")
    modeling = importlib.import_module("published_jet.modeling_jet_nemotron")
    if stand_ins == "torch":
        from fla.modules.layernorm_gated import rms_norm_ref
        from fla.ops.gated_delta_rule.naive import (
            naive_chunk_gated_delta_rule,
            naive_recurrent_gated_delta_rule,
        )

        jet_block.chunk_gated_delta_rule = make_delta_rule_standin(naive_chunk_gated_delta_rule, chunked=True)
        jet_block.fused_recurrent_gated_delta_rule = make_delta_rule_standin(naive_recurrent_gated_delta_rule,
                                                                             chunked=False)
        jet_block.FusedRMSNormGated = make_gated_norm_standin(rms_norm_ref)
    return {"code": code, "config_cls": config_mod.JetNemotronConfig, "model_cls": modeling.JetNemotronForCausalLM}


def load_published_ouro(src: Path) -> dict[str, Any]:
    code = find_code(src, "modeling_ouro.py", (".",))
    if not (code / "configuration_ouro.py").is_file():
        raise SystemExit(f"{code}: configuration_ouro.py is missing (modeling_ouro.py imports it)")
    load_package("published_ouro", code)
    config_mod = importlib.import_module("published_ouro.configuration_ouro")
    modeling = importlib.import_module("published_ouro.modeling_ouro")
    return {"code": code, "config_cls": config_mod.OuroConfig, "model_cls": modeling.OuroForCausalLM}


class _Float64Torch:
    """``torch`` as fla's naive references see it under --exact-float64: their float32 is float64."""

    float32 = torch.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def install_exact_float64() -> None:
    """--exact-float64 (an ablation, float64 runs only): remove every float32 rounding on both sides, so that the
    comparison measures the math and not float32 casts. In this process only: ``Tensor.float()`` of a floating
    tensor returns it unchanged (sleepzoo's Jet RMSNorm, the published JetBlock's decay, fla's references);
    fla's naive references compute in float64; the published RMSNorms compute in the input dtype and the
    published RoPE tables in float64 (as sleepzoo's). Ouro's eager attention keeps a float32 softmax: use sdpa."""
    original_float = torch.Tensor.float

    def float_keep_floating(self, *args, **kwargs):
        return self if self.is_floating_point() else original_float(self, *args, **kwargs)

    torch.Tensor.float = float_keep_floating
    try:
        from fla.ops.gated_delta_rule import naive

        naive.torch = _Float64Torch()
    except ImportError:
        pass

    def rmsnorm_native(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    def rope_float64(self, x, position_ids):
        dim = self.inv_freq.numel() * 2
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = position_ids[:, :, None].to(torch.float64) * inv_freq[None, None, :]
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    for module_name, norm, rope in (("published_jet.modeling_jet_nemotron", "JetNemotronRMSNorm",
                                     "JetNemotronRotaryEmbedding"),
                                    ("published_ouro.modeling_ouro", "OuroRMSNorm", "OuroRotaryEmbedding")):
        module = sys.modules.get(module_name)
        if module is not None:
            getattr(module, norm).forward = rmsnorm_native
            getattr(module, rope).forward = rope_float64


def from_published(pub: dict, folder: Path, dtype: torch.dtype, attn: str, stand_ins: str) -> torch.nn.Module:
    config = pub["config_cls"].from_pretrained(folder, local_files_only=True)
    model, info = pub["model_cls"].from_pretrained(folder, config=config, torch_dtype=torch.float32,
                                                    attn_implementation=attn, local_files_only=True,
                                                    output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k != "missing_keys"}
    missing = [k for k in info.get("missing_keys", []) if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or problems:
        raise SystemExit(f"published model did not load sleepzoo's weights cleanly: missing {missing}, {problems}")
    if stand_ins == "torch":
        for module in model.modules():
            if hasattr(module, "kernel_generator") and hasattr(module, "implementation"):
                module.implementation = "naive"  # the published DynamicShortConvolution's torch path
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------------------------

def diff(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    """max |a - b|; that over max |b| (relative to the logits' scale); the largest elementwise relative
    difference over entries with |b| >= 1e-3 max |b|; the share of positions whose argmax agrees."""
    a, b = ours.double(), theirs.double()
    d = (a - b).abs()
    scale = b.abs().max().item()
    big = b.abs() >= 1e-3 * scale
    return {"max_abs": d.max().item(), "max_rel": d.max().item() / scale,
            "max_rel_elem": (d[big] / b.abs()[big]).max().item(),
            "argmax_agree": (a.argmax(-1) == b.argmax(-1)).double().mean().item()}


def run_jet(args: argparse.Namespace, work: Path, rows: list[dict]) -> None:
    pub = load_published_jet(Path(args.jet_src).expanduser(), args.stand_ins)
    if args.exact_float64:
        install_exact_float64()
    kept: dict = {}
    folder = work / "jet_nemotron_tiny"
    write_sleepzoo_model(JET_TINY, folder, args.seed)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ours_model = load_sleepzoo(folder, dtype)
        for attn in ("sdpa",):  # the published JetNemotronModel accepts sdpa and flash_attention_2 only
            theirs_model = from_published(pub, folder, dtype, attn, args.stand_ins)
            for T in args.jet_seq_lens:
                ids = torch.randint(0, JET_TINY["vocab_size"], (1, T), generator=torch.Generator().manual_seed(T))
                mask = torch.ones_like(ids)  # as generate() passes it (see docs/parity.md for the forward without)
                with torch.no_grad():
                    theirs = theirs_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    ours = ours_model(ids).logits
                path = "fused_recurrent" if T <= 64 else "chunk"
                rows.append({"model": "jet_nemotron", "dtype": dtype_name, "attn": attn, "T": T,
                             "what": f"logits ({path} path)", **diff(ours, theirs)})
                kept[(dtype_name, T)] = (ours, theirs)
    floor_rows(rows, "jet_nemotron", "sdpa", kept)


@torch.no_grad()
def ouro_cases(ours_model, theirs_model, ids: torch.Tensor, S: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(what, sleepzoo logits, published logits) for every published exit mode and its sleepzoo counterpart."""
    T = ids.shape[1]

    def theirs(**kw):
        return theirs_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kw).logits

    default = theirs()  # the config's early_exit_threshold (1.0)
    cases = [("default forward (threshold 1.0) vs engine forward", ours_model(ids, window=T, loops=1).logits, default),
             ("default forward (threshold 1.0) vs exit 'last'", ours_model.exit_logits(ids, "last"), default)]
    for s in range(S):
        cases.append((f"exit_at_step={s} vs 'step' {s}", ours_model.exit_logits(ids, "step", step=s),
                      theirs(exit_at_step=s)))
    for t in THRESHOLDS:
        cases.append((f"exit_threshold={t} vs 'threshold' {t}", ours_model.exit_logits(ids, "threshold", threshold=t),
                      theirs(exit_threshold=t)))
    saved = theirs_model.early_exit_threshold
    theirs_model.early_exit_threshold = None  # else the threshold branch wins over the weighted one
    try:
        expected = theirs(use_weighted_exit=True)
    finally:
        theirs_model.early_exit_threshold = saved
    cases.append(("use_weighted_exit vs 'expected'", ours_model.exit_logits(ids, "expected"), expected))
    return cases


def run_ouro(args: argparse.Namespace, work: Path, rows: list[dict]) -> None:
    pub = load_published_ouro(Path(args.ouro_src).expanduser())
    if args.exact_float64:
        install_exact_float64()
    kept: dict = {}
    folder = work / "ouro_tiny"
    write_sleepzoo_model(OURO_TINY, folder, args.seed + 1)
    S = OURO_TINY["total_ut_steps"]
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ours_model = load_sleepzoo(folder, dtype)
        for attn in args.attn:
            theirs_model = from_published(pub, folder, dtype, attn, "torch")
            for T in args.ouro_seq_lens:
                ids = torch.randint(0, OURO_TINY["vocab_size"], (2, T), generator=torch.Generator().manual_seed(T))
                cases = ouro_cases(ours_model, theirs_model, ids, S)
                for what, ours, theirs_logits in cases:
                    rows.append({"model": "ouro", "dtype": dtype_name, "attn": attn, "T": T, "what": what,
                                 **diff(ours, theirs_logits)})
                    if attn == args.attn[-1] and what.startswith("default forward (threshold 1.0) vs exit"):
                        kept[(dtype_name, T)] = (ours, theirs_logits)
                if dtype_name == args.dtypes[0] and attn == args.attn[0]:
                    with torch.no_grad():
                        _, gates = ours_model.step_outputs(ids)
                    from sleepzoo.models.ouro import exit_distribution

                    pdf = exit_distribution(gates)
                    for t in THRESHOLDS:
                        steps = ours_model.exit_steps(pdf, t)
                        counts = [int((steps == s).sum()) for s in range(S)]
                        print(f"ouro T={T}: tokens per exit step at threshold {t}: {counts}")
    floor_rows(rows, "ouro", args.attn[-1], kept)


def floor_rows(rows: list[dict], model: str, attn: str, kept: dict) -> None:
    """The float32 rounding floor: each side's float32 logits against its own float64 logits (same weights)."""
    for (dtype_name, T), (ours32, theirs32) in sorted(kept.items()):
        if dtype_name != "float32" or ("float64", T) not in kept:
            continue
        ours64, theirs64 = kept[("float64", T)]
        rows.append({"model": model, "dtype": "f32/f64", "attn": attn, "T": T,
                     "what": "rounding floor: sleepzoo f32 vs sleepzoo f64", **diff(ours32, ours64)})
        rows.append({"model": model, "dtype": "f32/f64", "attn": attn, "T": T,
                     "what": "rounding floor: published f32 vs published f64", **diff(theirs32, theirs64)})


def print_table(rows: list[dict]) -> None:
    head = f"{'model':<13} {'dtype':<8} {'attn':<6} {'T':>4}  {'what':<52} {'max abs':>9} {'max rel':>9} " \
           f"{'rel elem':>9} {'argmax':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<13} {r['dtype']:<8} {r['attn']:<6} {r['T']:>4}  {r['what']:<52} {r['max_abs']:9.2e} "
              f"{r['max_rel']:9.2e} {r['max_rel_elem']:9.2e} {r['argmax_agree']:7.1%}")


def versions(args: argparse.Namespace) -> dict[str, str]:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    try:
        import fla

        out["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        out["fla"] = "not installed"
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jet-src", help="checkout of NVlabs/Jet-Nemotron (or a folder with modeling_jet_nemotron.py)")
    parser.add_argument("--ouro-src", help="folder with Ouro's configuration_ouro.py and modeling_ouro.py")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--attn", nargs="+", default=["eager", "sdpa"], choices=["eager", "sdpa"],
                        help="the published Ouro's attn_implementation(s) (Jet-Nemotron's accepts sdpa only on a CPU)")
    parser.add_argument("--jet-seq-lens", nargs="+", type=int, default=[48, 160],
                        help="token counts (the published JetBlock runs its recurrent kernel up to 64, chunked above)")
    parser.add_argument("--ouro-seq-lens", nargs="+", type=int, default=[40])
    parser.add_argument("--stand-ins", choices=["torch", "triton"], default="torch",
                        help="Jet-Nemotron kernels: fla's torch references (CPU) or the published Triton ones")
    parser.add_argument("--exact-float64", action="store_true",
                        help="ablation (with --dtypes float64): no float32 rounding anywhere, on either side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for the tiny checkpoints (default: a temporary folder)")
    parser.add_argument("--json", help="also write the rows and versions to this file")
    args = parser.parse_args(argv)
    if not args.jet_src and not args.ouro_src:
        parser.error("give --jet-src and/or --ouro-src")
    if args.exact_float64 and args.dtypes != ["float64"]:
        parser.error("--exact-float64 changes float32 arithmetic in this process: use it with --dtypes float64")
    if args.exact_float64 and "eager" in args.attn:
        parser.error("--exact-float64: the published eager attention takes its softmax in float32; use --attn sdpa")
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows: list[dict] = []
        if args.jet_src:
            run_jet(args, work, rows)
        if args.ouro_src:
            run_ouro(args, work, rows)
    info = versions(args)
    info["mode"] = "exact-float64" if args.exact_float64 else "as published"
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print_table(rows)
    worst = {dt: max((r["max_rel"] for r in rows if r["dtype"] == dt), default=math.nan) for dt in args.dtypes}
    print("largest max rel per dtype: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"versions": info, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
