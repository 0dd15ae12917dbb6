"""JetBlock mixer (Jet-Nemotron's linear-attention block): Gated DeltaNet with a dynamic convolution on v.

Paper: Gu, Hu, Hatamizadeh, et al., *Jet-Nemotron: Efficient Language Model with Post Neural Architecture
Search* (NVIDIA, 2025, arXiv 2508.15884). Parameter names are those of the released Jet-Nemotron checkpoints
under ``model.layers.{i}.self_attn.``: q_proj k_proj v_proj b_proj a_proj A_log dt_bias
dynamic_conv1d.kernel_generator.w1 dynamic_conv1d.kernel_generator.w2 g_proj o_norm o_proj (SPEC 3).
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
from .gated_deltanet import GatedRMSNorm, decay_parameters


def dynamic_causal_conv(x: Tensor, kernels: Tensor, history: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv whose kernel changes with every token.

    ``y[b, t, c] = sum_j kernels[b, t, c, j] * x[b, t - (W - 1) + j, c]`` for ``j = 0 .. W - 1``: tap ``W - 1``
    reads the token itself, tap 0 the token ``W - 1`` steps back; positions before the sequence read
    ``history`` (the inputs just before ``x``, oldest first) and zeros beyond it.

    Args:
        x: (B, T, C) inputs.
        kernels: (B, T, C, W) one kernel per token and channel.
        history: (B, P, C) the inputs before ``x``, or None (empty). Only its last W - 1 rows are read.

    Returns:
        (y (B, T, C), the last ``min(W - 1, P + T)`` inputs as the next history).
    """
    T, W = x.shape[1], kernels.shape[-1]
    seq = x if history is None else torch.cat([history.to(x.dtype), x], dim=1)  # (B, P + T, C)
    missing = max(0, (W - 1) - (seq.shape[1] - T))  # zero rows so that every token has W - 1 predecessors
    padded = F.pad(seq, (0, 0, missing, 0))[:, -(T + W - 1):]  # (B, T + W - 1, C): x and its W - 1 predecessors
    y = padded[:, W - 1: W - 1 + T] * kernels[..., W - 1]
    for j in range(W - 1):  # a loop over the W taps: no (B, T, C, W) window tensor besides the kernels
        y = y + padded[:, j: j + T] * kernels[..., j]
    new_history = seq[:, -(W - 1):] if W > 1 else seq[:, :0]
    return y, new_history


class KernelGenerator(nn.Module):
    """``w2(silu(w1 x))``: a per-token kernel for every channel and tap, as (..., channels, W).

    w1: d_in -> hidden, no bias; w2: hidden -> channels * W, with bias. The flat output of w2 is read
    channel-major: output ``c * W + j`` is tap ``j`` of channel ``c``.
    """

    def __init__(self, d_in: int, hidden: int, channels: int, kernel_size: int):
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        self.w1 = nn.Linear(d_in, hidden, bias=False)
        self.w2 = nn.Linear(hidden, channels * kernel_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        flat = self.w2(F.silu(self.w1(x)))  # (..., channels * W)
        return flat.view(*x.shape[:-1], self.channels, self.kernel_size)  # (..., channels, W)


class DynamicShortConvolution(nn.Module):
    """Causal depthwise conv of width W over ``channels`` inputs, its kernel generated per token from the
    block input by :class:`KernelGenerator` (no activation on the kernel; the caller applies silu after)."""

    def __init__(self, channels: int, kernel_size: int, *, generator_input_size: int, generator_hidden_size: int):
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        self.kernel_generator = KernelGenerator(generator_input_size, generator_hidden_size, channels, kernel_size)

    def forward(self, x: Tensor, generator_input: Tensor, history: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, channels), generator_input (B, T, d_in), history (B, <= W-1, channels) or None.
        Returns (conv output (B, T, channels), the last W - 1 inputs as the next history)."""
        return dynamic_causal_conv(x, self.kernel_generator(generator_input), history)


class JetBlock(nn.Module):
    """Jet-Nemotron's JetBlock: Gated DeltaNet without short convs on q/k, with a dynamic conv on v.

    Per token t, with x_t the block input:

    * q = silu(q_proj x), k = silu(k_proj x) (H heads x K), L2-normalised per head;
    * v = silu(DConv(v_proj x)) (H heads x V), where DConv is a causal depthwise conv of width W whose kernel is
      generated from x_t: ``kernel_t = w2(silu(w1 x_t))`` reshaped to (H*V channels, W taps), channel-major, and
      ``DConv(u)_t[c] = sum_j kernel_t[c, j] * u_{t-(W-1)+j}[c]`` (tap W-1 is the token itself);
    * beta = sigmoid(b_proj x); g = -exp(A_log) * softplus(a_proj x + dt_bias) (log decay <= 0);
    * the fast-weight rule (default gated delta) updates S (B, H, K, V) and reads o = S^T q / sqrt(K);
    * output = o_proj(RMSNorm(o) * silu(g_proj x)) per head (o_norm).

    Kernel layout, from NVlabs/Jet-Nemotron (``jetai/modeling/hf/dynamic_conv.py``, read for facts): the
    generator reads the block input x (not v_proj x); w2's flat output is ``(channel, tap)`` with the tap
    fastest (einops ``'b t (d w) -> b t d w'``); the conv is the left-padded unfold, i.e. the sum above; no
    activation on the generated kernel; silu on the conv output. The generator width is ``value_dim //
    dconv_generator_reduction`` (Jet-Nemotron-2B: 3072 // 8 = 384).

    The conv history (the last W - 1 values of v_proj x) is a cache, ``conv_v`` in the state: it starts empty
    in a fresh window, is dropped by a hard eviction and kept (its last ``retain`` rows) by a sliding one.

    Initialisation (ours; a pretrained checkpoint overwrites it): A_log, dt_bias as in Mamba2 / fla; w1 as
    nn.Linear; w2.weight zero and w2.bias as nn.Conv1d's depthwise default, so the block starts as Gated
    DeltaNet with a static short conv on v and learns the dynamic part from there. (Jet-Nemotron zeroes w1 and
    w2 and draws w2.bias from N(0, initializer_range).)

    Parameters: with d = d_model, H heads, K = head_dim, V = round(expand_v * K), D_v = H*V, R = reduction:
    ``d*H*(2K + 3V)`` (q, k, v, g, o projections) ``+ 2*d*H`` (a, b) ``+ 2H`` (A_log, dt_bias)
    ``+ (D_v // R) * d`` (w1) ``+ (D_v // R + 1) * D_v * W`` (w2 and its bias) ``+ V`` (o_norm).
    Jet-Nemotron-2B (d 1536, H 12, K 96, V 256, W 4, R 8): 23,052,568 per block.

    Args:
        d_model: model width.
        num_heads: H (default 4; Jet-Nemotron-2B: 12).
        head_dim: K, the key/query width per head (default 64; Jet-Nemotron-2B: 96).
        expand_v: V / K; H*K*expand_v and K*expand_v must be whole numbers up to 1e-5 relative (default 2.0;
            Jet-Nemotron-2B: 2.6666666667, so V = 256).
        conv_size: W, the dynamic conv width (default 4).
        dconv_generator_reduction: R; the kernel generator's hidden width is H*V // R (default 8).
        rule: name of a ``rule`` plugin for the fast-weight update (default "gated_delta").
        chunk_size: chunk length of the chunked rule (default 64).
        norm_eps: eps of o_norm (default 1e-5; a string such as Jet's config "1e-5" is accepted).
        layer_idx: position in the stack (for messages).
    """

    carried_state: tuple[str, ...] = ("fast_weights",)

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int = 64, expand_v: float = 2.0,
                 conv_size: int = 4, dconv_generator_reduction: int = 8, rule: str = "gated_delta",
                 chunk_size: int = 64, norm_eps: float = 1e-5, layer_idx: int | None = None):
        super().__init__()
        where = f"jet (layer {layer_idx})"
        head_v_dim = int(round(head_dim * expand_v))
        if num_heads < 1 or head_dim < 1 or head_v_dim < 1:
            raise SleepzooError(f"{where}: num_heads={num_heads}, head_dim={head_dim}, expand_v={expand_v} "
                                "must give positive sizes")
        if not math.isclose(head_v_dim, head_dim * expand_v, rel_tol=1e-5):
            raise SleepzooError(f"{where}: head_dim * expand_v = {head_dim * expand_v} must be a whole number")
        if conv_size < 1 or chunk_size < 1:
            raise SleepzooError(f"{where}: conv_size={conv_size} and chunk_size={chunk_size} must be >= 1")
        value_dim = num_heads * head_v_dim
        if dconv_generator_reduction < 1 or value_dim // dconv_generator_reduction < 1:
            raise SleepzooError(f"{where}: dconv_generator_reduction={dconv_generator_reduction} must be >= 1 and "
                                f"at most the value width {value_dim}")
        self.num_heads, self.head_k_dim, self.head_v_dim = num_heads, head_dim, head_v_dim
        self.key_dim, self.value_dim = num_heads * head_dim, value_dim
        self.conv_size = conv_size
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx
        self.rule_name = rule
        self.rule = registry.get("rule", rule)

        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.b_proj = nn.Linear(d_model, num_heads, bias=False)
        self.a_proj = nn.Linear(d_model, num_heads, bias=False)
        self.A_log, self.dt_bias = decay_parameters(num_heads)  # as in Mamba2 / fla / Jet
        self.dynamic_conv1d = DynamicShortConvolution(
            self.value_dim, conv_size, generator_input_size=d_model,
            generator_hidden_size=self.value_dim // dconv_generator_reduction)
        with torch.no_grad():
            w2 = self.dynamic_conv1d.kernel_generator.w2
            w2.weight.zero_()
            w2.bias.uniform_(-1 / math.sqrt(conv_size), 1 / math.sqrt(conv_size))
        w2._sleepzoo_custom_init = True  # model builders must not redraw it (see HybridLM._init_weights)
        self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(head_v_dim, eps=float(norm_eps))
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def forward(self, x: Tensor, state: MixerState = None, *, span: int | None = None) -> tuple[Tensor, MixerState]:
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        q = F.silu(self.q_proj(x))
        k = F.silu(self.k_proj(x))
        # The conv history is a cache (SPEC 1): empty in a fresh window and in every pass of hard eviction.
        history = None if state is None else state.get("conv_v")
        v, conv_v = self.dynamic_conv1d(self.v_proj(x), x, history)
        v = F.silu(v)
        q = l2norm(q.view(B, T, H, K))  # (B, T, H, K)
        k = l2norm(k.view(B, T, H, K))  # (B, T, H, K)
        v = v.view(B, T, H, V)  # (B, T, H, V)
        beta = self.b_proj(x).sigmoid()  # (B, T, H)
        gdt = torch.promote_types(x.dtype, torch.float32)  # decays in at least float32, as Jet does
        g = -self.A_log.to(gdt).exp() * F.softplus(self.a_proj(x).to(gdt) + self.dt_bias.to(gdt))  # (B, T, H)
        S0 = None if state is None else state.get("fast_weights")
        o, S = self.rule(q, k, v, g, beta, scale=K ** -0.5, initial_state=S0, chunk_size=self.chunk_size)
        gate = self.g_proj(x).view(B, T, H, V)
        o = self.o_norm(o.to(x.dtype), gate)  # (B, T, H, V)
        return self.o_proj(o.reshape(B, T, H * V)), {"fast_weights": S, "conv_v": conv_v}

    def evict(self, state: MixerState, retain: int) -> MixerState:
        """Keep S; keep the conv history only while tokens are retained (it never exceeds W - 1 tokens)."""
        if state is None:
            return None
        keep = {"fast_weights": state["fast_weights"]}
        if retain > 0 and "conv_v" in state:
            keep["conv_v"] = state["conv_v"][:, -retain:]
        return keep
