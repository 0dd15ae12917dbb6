"""Gated DeltaNet mixer: the fast-weight block whose state S survives an eviction.

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


class GatedRMSNorm(nn.Module):
    """``RMSNorm(x) * weight * silu(gate)`` over the last dim (fla's FusedRMSNormGated, in plain torch)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):  # normalise in float32, then scale in x's dtype
            xf = x.float()
            out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight
        else:  # torch's fused kernel: x * rsqrt(mean(x^2) + eps) * weight
            out = F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return out if gate is None else out * F.silu(gate)


def decay_parameters(num_heads: int, a_min: float = 1e-4) -> tuple[nn.Parameter, nn.Parameter]:
    """``A_log`` and ``dt_bias`` (H,) initialised as in Mamba2 / fla: A ~ U(a_min, 16), dt log-uniform in
    [1e-3, 0.1] stored as softplus^-1(dt); both excluded from weight decay."""
    A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(a_min, 16)))
    dt = torch.exp(torch.rand(num_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
    dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
    A_log._no_weight_decay = dt_bias._no_weight_decay = True
    return A_log, dt_bias


class _TapConv(torch.autograd.Function):
    """``y[:, t] = sum_j seq[:, t + j] * taps[j]``: a causal depthwise conv over time as a sum over its W taps,
    with a hand-written backward (W in-place multiply-adds each way, no zero-filled slice gradients).

    On a CPU this is 2-3x faster than ``F.conv1d`` forward and backward at every length measured (T 25 to 512;
    the depthwise conv's backward is the slow part, docs/performance.md); values equal up to rounding."""

    @staticmethod
    def forward(ctx, seq: Tensor, taps: Tensor) -> Tensor:  # seq (B, T + W - 1, C), taps (W, C) -> (B, T, C)
        width = taps.shape[0]
        T = seq.shape[1] - width + 1
        y = seq[:, :T] * taps[0]
        for j in range(1, width):
            y.addcmul_(seq[:, j:j + T], taps[j])
        ctx.save_for_backward(seq, taps)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None]:
        seq, taps = ctx.saved_tensors
        width, T = taps.shape[0], dy.shape[1]
        d_seq = d_taps = None
        if ctx.needs_input_grad[0]:
            d_seq = seq.new_zeros(seq.shape)
            for j in range(width):
                d_seq[:, j:j + T].addcmul_(dy, taps[j])
        if ctx.needs_input_grad[1]:
            d_taps = torch.stack([(dy * seq[:, j:j + T]).sum((0, 1)) for j in range(width)])
        return d_seq, d_taps


def causal_depthwise_conv(x: Tensor, weight: Tensor, history: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv over time: x (B, T, C), weight (C, 1, W), history (B, <= W-1, C) the inputs just
    before x (None or empty: zeros). Returns (y (B, T, C), the last W-1 inputs as the next history).

    Computed as a weighted sum over the taps (tap j multiplies the input W - 1 - j steps back), which on a CPU
    beats a ``conv1d`` call at every length: ~80 us of call overhead for decoding, a slow backward in training
    (measured; docs/performance.md)."""
    T, width = x.shape[1], weight.shape[-1]
    seq = x if history is None else torch.cat([history, x], dim=1)  # (B, P + T, C)
    short = seq[:, -(T + width - 1):]
    if short.shape[1] < T + width - 1:  # less history than the taps reach: zeros before the sequence
        short = F.pad(short, (0, 0, T + width - 1 - short.shape[1], 0))
    taps = weight[:, 0].t()  # (W, C)
    out = torch.promote_types(short.dtype, taps.dtype)
    dt = torch.promote_types(out, torch.float32)  # the taps' sum accumulates in at least float32
    short, taps = short.to(dt), taps.to(dt)
    if T == 1:  # decoding: one multiply and one sum
        y = (short * taps).sum(1, keepdim=True)
    else:
        y = _TapConv.apply(short, taps)
    return y.to(out), seq[:, -(width - 1):] if width > 1 else seq[:, :0]


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet sequence mixer.

    Per token: q, k, v = silu(conv(W x)); q, k L2-normalised per head; beta = sigmoid(b_proj x);
    g = -exp(A_log) * softplus(a_proj x + dt_bias), in at least float32 (also under bf16 weights or autocast);
    the fast-weight rule updates S (B, H, K, V) and reads o = S^T q / sqrt(K); output =
    o_proj(RMSNorm(o) * silu(g_proj x)) per head.

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

    carried_state: tuple[str, ...] = ("fast_weights",)

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int = 64, expand_v: float = 2.0,
                 conv_size: int = 4, use_short_conv: bool = True, use_gate: bool = True,
                 rule: str = "gated_delta", chunk_size: int = 64, norm_eps: float = 1e-5,
                 layer_idx: int | None = None):
        super().__init__()
        where = f"gated_deltanet (layer {layer_idx})"
        head_v_dim = int(round(head_dim * expand_v))
        if num_heads < 1 or head_dim < 1 or head_v_dim < 1:
            raise SleepzooError(f"{where}: num_heads={num_heads}, head_dim={head_dim}, expand_v={expand_v} "
                                "must give positive sizes")
        if not math.isclose(head_v_dim, head_dim * expand_v):
            raise SleepzooError(f"{where}: head_dim * expand_v = {head_dim * expand_v} must be a whole number")
        if conv_size < 1 or chunk_size < 1:
            raise SleepzooError(f"{where}: conv_size={conv_size} and chunk_size={chunk_size} must be >= 1")
        self.num_heads, self.head_k_dim, self.head_v_dim = num_heads, head_dim, head_v_dim
        self.key_dim, self.value_dim = num_heads * head_dim, num_heads * head_v_dim
        self.use_short_conv, self.use_gate = use_short_conv, use_gate
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx
        self.rule_name = rule
        self.rule = registry.get("rule", rule)

        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.a_proj = nn.Linear(d_model, num_heads, bias=False)
        self.b_proj = nn.Linear(d_model, num_heads, bias=False)
        self.A_log, self.dt_bias = decay_parameters(num_heads)
        if use_short_conv:
            self.q_conv1d = nn.Conv1d(self.key_dim, self.key_dim, conv_size, groups=self.key_dim, bias=False)
            self.k_conv1d = nn.Conv1d(self.key_dim, self.key_dim, conv_size, groups=self.key_dim, bias=False)
            self.v_conv1d = nn.Conv1d(self.value_dim, self.value_dim, conv_size, groups=self.value_dim, bias=False)
        if use_gate:
            self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def _features(self, x: Tensor, state: MixerState) -> tuple[Tensor, Tensor, Tensor, dict]:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        caches: dict = {}
        if self.use_short_conv:
            # The conv history is a cache: it starts empty in a fresh window and in every pass of hard
            # eviction (SPEC 1); a sliding-window eviction retains the wake pass's, like its K/V.
            get = (lambda key: None) if state is None else state.get
            q, caches["conv_q"] = causal_depthwise_conv(q, self.q_conv1d.weight, get("conv_q"))
            k, caches["conv_k"] = causal_depthwise_conv(k, self.k_conv1d.weight, get("conv_k"))
            v, caches["conv_v"] = causal_depthwise_conv(v, self.v_conv1d.weight, get("conv_v"))
        return F.silu(q), F.silu(k), F.silu(v), caches

    def forward(self, x: Tensor, state: MixerState = None, *, span: int | None = None) -> tuple[Tensor, MixerState]:
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        q, k, v, caches = self._features(x, state)
        q = l2norm(q.view(B, T, H, K))  # (B, T, H, K)
        k = l2norm(k.view(B, T, H, K))  # (B, T, H, K)
        v = v.view(B, T, H, V)  # (B, T, H, V)
        beta = self.b_proj(x).sigmoid()  # (B, T, H)
        # The log decay in at least float32 (as the Jet and Mamba2 mixers compute it): under bf16 weights or
        # autocast, bf16's 8-bit mantissa would round softplus and exp, and g sums over a whole chunk.
        gdt = torch.promote_types(x.dtype, torch.float32)
        g = -self.A_log.to(gdt).exp() * F.softplus(self.a_proj(x).to(gdt) + self.dt_bias.to(gdt))  # (B, T, H) <= 0
        S0 = None if state is None else state.get("fast_weights")
        o, S = self.rule(q, k, v, g, beta, scale=K ** -0.5, initial_state=S0, chunk_size=self.chunk_size)
        gate = self.g_proj(x).view(B, T, H, V) if self.use_gate else None
        o = self.o_norm(o, gate)  # (B, T, H, V)
        return self.o_proj(o.reshape(B, T, H * V)), {"fast_weights": S, **caches}

    def evict(self, state: MixerState, retain: int) -> MixerState:
        """Keep S; keep the conv history only while tokens are retained (it never exceeds W - 1 tokens)."""
        if state is None:
            return None
        keep = {"fast_weights": state["fast_weights"]}
        if retain > 0:
            keep.update({k: v[:, -retain:] for k, v in state.items() if k.startswith("conv_")})
        return keep
