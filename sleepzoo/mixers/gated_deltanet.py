"""The Gated DeltaNet family: one fast-weight mixer whose state S survives an eviction, with the convolution
on each of q, k and v chosen apart; Gated DeltaNet (short convs on all three) is one configuration of it and
Jet-Nemotron's JetBlock (:mod:`sleepzoo.mixers.jet`: no conv on q, k, a dynamic conv on v) another.

Paper: Yang, Kautz, Hatamizadeh, *Gated Delta Networks: Improving Mamba2 with Delta Rule* (ICLR 2025).
Parameter names follow flash-linear-attention's ``GatedDeltaNet`` layer, so its checkpoints map over:
q_proj k_proj v_proj a_proj b_proj A_log dt_bias q_conv1d k_conv1d v_conv1d g_proj o_norm o_proj.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import registry
from ..ops import l2norm
from ..registry import SleepzooError
from . import MixerState
from .parts import DynamicShortConvolution, RMSNorm, ShortConvolution, decay_parameters, evict_conv_caches

CONVS = ("none", "short", "dynamic")  # the convolution on one of q, k, v


def conv_name(projection: str, kind: str) -> str:
    """The module name of ``projection``'s conv: ``q_conv1d`` (short, fla's names), ``dynamic_conv1d`` for v
    (Jet-Nemotron's name) and ``q_dynamic_conv1d`` / ``k_dynamic_conv1d`` (dynamic on q / k)."""
    if kind == "short":
        return f"{projection}_conv1d"
    return "dynamic_conv1d" if projection == "v" else f"{projection}_dynamic_conv1d"


class GatedDeltaMixer(nn.Module):
    """A Gated-DeltaNet-family sequence mixer, the conv on each of q, k, v chosen apart.

    Per token, with x the block input:

    * for p in q, k, v: ``p = silu(conv_p(p_proj x))``, where conv_p is ``"none"`` (no conv), ``"short"`` (a
      causal depthwise conv of width W with learned taps, :class:`ShortConvolution`) or ``"dynamic"`` (a causal
      depthwise conv of width W whose taps are generated from x per token, :class:`DynamicShortConvolution`);
    * q, k L2-normalised per head; beta = sigmoid(b_proj x); g = -exp(A_log) * softplus(a_proj x + dt_bias),
      in at least float32 (also under bf16 weights or autocast);
    * the fast-weight rule updates S (B, H, K, V) and reads o = S^T q / sqrt(K);
    * output = o_proj(RMSNorm(o) * silu(g_proj x)) per head (without ``use_gate``: a plain RMSNorm), o taken
      in x's dtype.

    State: ``fast_weights`` S, carried across every eviction; ``conv_q`` / ``conv_k`` / ``conv_v``, the last
    W - 1 inputs of each convolved projection, are caches (SPEC 1): empty in a fresh window and in every pass
    of hard eviction, their last ``retain`` rows kept by a sliding one (:func:`evict_conv_caches`).

    Parameters: with d = d_model, H heads, K = head_dim, V = round(expand_v * K), R = reduction:
    ``d*H*(2K + 2V)`` (q, k, v, o projections) ``+ d*H*V`` (g_proj, with use_gate) ``+ 2*d*H`` (a, b)
    ``+ 2H`` (A_log, dt_bias) ``+ V`` (o_norm), and per convolved projection of width C (H*K for q, k, H*V for
    v): ``W*C`` (short) or ``(C // R)*d + (C // R + 1)*C*W`` (dynamic: w1, w2 and its bias).

    Args:
        d_model: model width.
        num_heads: H (default 4).
        head_dim: K, the key/query width per head (default 64).
        expand_v: V / K; H*K*expand_v and K*expand_v must be whole numbers up to 1e-5 relative (default 2.0).
        q_conv, k_conv, v_conv: the conv on q, k, v: "none", "short" or "dynamic" (default "short").
        conv_size: W, the conv width (default 4).
        dconv_generator_reduction: R; a dynamic conv's kernel generator is C // R wide (default 8).
        use_gate: output gate g_proj (default True).
        rule: name of a ``rule`` plugin for the fast-weight update (default "gated_delta").
        chunk_size: chunk length of the chunked rule (default 64).
        norm_eps: eps of o_norm (default 1e-5; a string such as "1e-5" is accepted).
        layer_idx: position in the stack (for messages).
    """

    carried_state: tuple[str, ...] = ("fast_weights",)
    mixer_name = "gated_delta_mixer"  # in messages: the registered name (of the family, or a configuration)
    # fla registers a_proj first, Jet-Nemotron b_proj: the order fixes a seeded build's initial weights
    head_gate_order: tuple[str, str] = ("a_proj", "b_proj")

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int = 64, expand_v: float = 2.0,
                 q_conv: str = "short", k_conv: str = "short", v_conv: str = "short", conv_size: int = 4,
                 dconv_generator_reduction: int = 8, use_gate: bool = True, rule: str = "gated_delta",
                 chunk_size: int = 64, norm_eps: float = 1e-5, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.convs = {"q": q_conv, "k": k_conv, "v": v_conv}
        self.head_v_dim = self._check(num_heads, head_dim, expand_v, conv_size, chunk_size)
        self.num_heads, self.head_k_dim = num_heads, head_dim
        self.key_dim, self.value_dim = num_heads * head_dim, num_heads * self.head_v_dim
        self._check_reduction(dconv_generator_reduction)
        self.conv_size, self.use_gate, self.chunk_size = conv_size, use_gate, chunk_size
        self.rule_name = rule
        self.rule = registry.get("rule", rule)

        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        for name in self.head_gate_order:
            setattr(self, name, nn.Linear(d_model, num_heads, bias=False))
        self.A_log, self.dt_bias = decay_parameters(num_heads)
        for p, kind in self.convs.items():
            if kind != "none":
                setattr(self, conv_name(p, kind), self._conv(kind, self._width(p), d_model,
                                                             dconv_generator_reduction))
        if use_gate:
            self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.o_norm = RMSNorm(self.head_v_dim, eps=float(norm_eps))
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def _fail(self, msg: str) -> SleepzooError:
        return SleepzooError(f"{self.mixer_name} (layer {self.layer_idx}): {msg}")

    def _check(self, num_heads: int, head_dim: int, expand_v: float, conv_size: int, chunk_size: int) -> int:
        """Validate the sizes and the conv choices; return V, the value width per head."""
        head_v_dim = int(round(head_dim * expand_v))
        if num_heads < 1 or head_dim < 1 or head_v_dim < 1:
            raise self._fail(f"num_heads={num_heads}, head_dim={head_dim}, expand_v={expand_v} must give "
                             "positive sizes")
        if not math.isclose(head_v_dim, head_dim * expand_v, rel_tol=1e-5):
            raise self._fail(f"head_dim * expand_v = {head_dim * expand_v} must be a whole number")
        if conv_size < 1 or chunk_size < 1:
            raise self._fail(f"conv_size={conv_size} and chunk_size={chunk_size} must be >= 1")
        for p, kind in self.convs.items():
            if kind not in CONVS:
                raise self._fail(f"{p}_conv={kind!r} must be one of {', '.join(map(repr, CONVS))}")
        return head_v_dim

    def _check_reduction(self, reduction: int) -> None:
        for p, kind in self.convs.items():
            width = self._width(p)
            if kind == "dynamic" and (reduction < 1 or width // reduction < 1):
                raise self._fail(f"dconv_generator_reduction={reduction} must be >= 1 and at most the "
                                 f"{'value' if p == 'v' else 'key'} width {width}")

    def _width(self, projection: str) -> int:
        return self.value_dim if projection == "v" else self.key_dim

    def _conv(self, kind: str, channels: int, d_model: int, reduction: int) -> nn.Module:
        if kind == "short":
            return ShortConvolution(channels, self.conv_size)
        return DynamicShortConvolution(channels, self.conv_size, generator_input_size=d_model,
                                       generator_hidden_size=channels // reduction)

    def _features(self, x: Tensor, state: MixerState) -> tuple[Tensor, Tensor, Tensor, dict]:
        """q, k, v = silu(conv(W x)) (B, T, H*K / H*V) and the new conv histories (``conv_q`` ...)."""
        features, caches = [], {}
        for p, kind in self.convs.items():
            u = getattr(self, f"{p}_proj")(x)
            if kind != "none":
                # The conv history is a cache: it starts empty in a fresh window and in every pass of hard
                # eviction (SPEC 1); a sliding-window eviction retains the wake pass's, like its K/V.
                history = None if state is None else state.get(f"conv_{p}")
                conv = getattr(self, conv_name(p, kind))
                u, caches[f"conv_{p}"] = conv(u, history) if kind == "short" else conv(u, x, history)
            features.append(F.silu(u))
        return (*features, caches)

    def forward(self, x: Tensor, state: MixerState = None, *, span: int | None = None) -> tuple[Tensor, MixerState]:
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        q, k, v, caches = self._features(x, state)
        q = l2norm(q.view(B, T, H, K))  # (B, T, H, K)
        k = l2norm(k.view(B, T, H, K))  # (B, T, H, K)
        v = v.view(B, T, H, V)  # (B, T, H, V)
        beta = self.b_proj(x).sigmoid()  # (B, T, H)
        # The log decay in at least float32 (as the Mamba2 mixer computes it): under bf16 weights or autocast,
        # bf16's 8-bit mantissa would round softplus and exp, and g sums over a whole chunk.
        gdt = torch.promote_types(x.dtype, torch.float32)
        g = -self.A_log.to(gdt).exp() * F.softplus(self.a_proj(x).to(gdt) + self.dt_bias.to(gdt))  # (B, T, H) <= 0
        S0 = None if state is None else state.get("fast_weights")
        o, S = self.rule(q, k, v, g, beta, scale=K ** -0.5, initial_state=S0, chunk_size=self.chunk_size)
        gate = self.g_proj(x).view(B, T, H, V) if self.use_gate else None
        o = self.o_norm(o.to(x.dtype), gate)  # (B, T, H, V)
        return self.o_proj(o.reshape(B, T, H * V)), {"fast_weights": S, **caches}

    evict = evict_conv_caches


class GatedDeltaNet(GatedDeltaMixer):
    """Gated DeltaNet sequence mixer (registered as ``gated_deltanet``): :class:`GatedDeltaMixer` with the
    same short conv on q, k and v (or none).

    Parameters: with d = d_model, H heads, K = head_dim, V = expand_v * K:
    ``d*H*(2K + 2V) + H*V*d`` (q, k, v, g, o projections) ``+ 2*d*H`` (a, b) ``+ 2H`` (A_log, dt_bias)
    ``+ W*H*(2K + V)`` (short convs) ``+ V`` (o_norm).

    Args:
        d_model: model width.
        num_heads: H (default 4).
        head_dim: K, the key/query width per head (default 64).
        expand_v: V / K (default 2.0, as in fla).
        conv_size: short causal conv width W on q, k, v (default 4).
        use_short_conv: apply the short convs (default True). Without them q, k, v = silu(W x).
        use_gate: output gate g_proj (default True); without it o_norm is a plain RMSNorm.
        rule: name of a ``rule`` plugin for the fast-weight update (default "gated_delta").
        chunk_size: chunk length of the chunked rule (default 64).
        norm_eps: eps of o_norm (default 1e-5).
        layer_idx: position in the stack (for messages).
    """

    mixer_name = "gated_deltanet"

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int = 64, expand_v: float = 2.0,
                 conv_size: int = 4, use_short_conv: bool = True, use_gate: bool = True,
                 rule: str = "gated_delta", chunk_size: int = 64, norm_eps: float = 1e-5,
                 layer_idx: int | None = None):
        conv = "short" if use_short_conv else "none"
        super().__init__(d_model, num_heads=num_heads, head_dim=head_dim, expand_v=expand_v, q_conv=conv,
                         k_conv=conv, v_conv=conv, conv_size=conv_size, use_gate=use_gate, rule=rule,
                         chunk_size=chunk_size, norm_eps=norm_eps, layer_idx=layer_idx)
