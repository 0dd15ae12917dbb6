"""Parts of the fast-weight mixers (Gated DeltaNet, JetBlock, Mamba2), kept once as fla keeps its ``fla/modules``.

* the causal convolutions over time: :class:`ShortConvolution` (a depthwise conv with learned taps, computed by
  :func:`causal_depthwise_conv`) and :class:`DynamicShortConvolution` (Jet's: its taps generated per token,
  computed by :func:`dynamic_causal_conv`); both read and return a history, the cache a window carries;
* :class:`RMSNorm`: the one RMSNorm of the mixers and of Jet-Nemotron's blocks (plain, gated after or before
  the norm, over groups of channels, in float32 for low-precision inputs or always);
* :func:`decay_parameters`: the ``A_log`` / ``dt_bias`` initialisation of the per-head decay;
* :func:`evict_conv_caches`: the eviction of a mixer whose caches are conv histories.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import MixerState

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def decay_parameters(num_heads: int, a_min: float = 1e-4) -> tuple[nn.Parameter, nn.Parameter]:
    """``A_log`` and ``dt_bias`` (H,) initialised as in Mamba2 / fla: A ~ U(a_min, 16), dt log-uniform in
    [1e-3, 0.1] stored as softplus^-1(dt); both excluded from weight decay."""
    A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(a_min, 16)))
    dt = torch.exp(torch.rand(num_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
    dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
    A_log._no_weight_decay = dt_bias._no_weight_decay = True
    return A_log, dt_bias


def evict_conv_caches(mixer: nn.Module, state: MixerState, retain: int) -> MixerState:
    """The eviction of a fast-weight mixer whose caches are conv histories (``conv_*`` entries, at most W - 1
    inputs each): keep the fast weights (``mixer.carried_state``); keep the last ``retain`` rows of every
    conv history while tokens are retained (``retain > 0``), none with ``retain = 0`` (the conv restarts).

    A mixer takes it as its method: ``evict = evict_conv_caches``."""
    if state is None:
        return None
    keep = {key: state[key] for key in mixer.carried_state}
    if retain > 0:
        keep.update({key: value[:, -retain:] for key, value in state.items() if key.startswith("conv_")})
    return keep


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, the mean square taken over groups of ``group_size`` consecutive channels of the
    last dim (the whole dim by default), with an optional gate ``silu(gate)``:

    * after the norm, ``RMSNorm(x) * weight * silu(gate)`` (fla's FusedRMSNormGated; the output norm of Gated
      DeltaNet and Jet), the default;
    * before it with ``gate_first``, ``RMSNorm(x * silu(gate)) * weight`` (mamba_ssm's RMSNormGated with
      ``norm_before_gate=False``; Mamba2's norm).

    Precision: a float16 / bfloat16 input is normalised (and gated first) in float32, rounded back to its dtype
    and then scaled by the weight; other dtypes are computed in their own. With ``float32`` every input is
    normalised and scaled in float32 and rounded back at the end (Qwen2's norm, as the published Jet-Nemotron
    computes it; a float64 input too).

    Args:
        dim: the normalised width (the weight's size).
        eps: added to the mean square (default 1e-5).
        group_size: channels per group; must divide ``dim`` (default None: the whole dim).
        gate_first: gate before the norm (default False: after).
        float32: compute in float32 whatever the input dtype (default False).
    """

    def __init__(self, dim: int, eps: float = 1e-5, *, group_size: int | None = None, gate_first: bool = False,
                 float32: bool = False):
        super().__init__()
        self.eps = eps
        self.group_size = dim if group_size is None else group_size
        self.gate_first, self.float32 = gate_first, float32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        dtype = x.dtype
        upcast = self.float32 or dtype in _LOW_PRECISION
        xf = x.float() if upcast else x
        if gate is not None and self.gate_first:
            xf = xf * F.silu(gate.to(xf.dtype))
        groups = xf.unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        if upcast:
            normed = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        else:  # torch's kernel, the same sum as the line above
            normed = F.rms_norm(groups, (self.group_size,), eps=self.eps)
        normed = normed.flatten(-2)
        out = (self.weight.float() * normed).to(dtype) if self.float32 else normed.to(dtype) * self.weight
        return out if gate is None or self.gate_first else out * F.silu(gate)


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


class ShortConvolution(nn.Conv1d):
    """Causal depthwise conv of width W over ``channels`` inputs with learned taps (fla's ShortConvolution, no
    activation): an ``nn.Conv1d`` (parameters ``weight`` (C, 1, W), ``bias`` (C,) when asked for) computed by
    :func:`causal_depthwise_conv`, the bias added after the taps' sum."""

    def __init__(self, channels: int, kernel_size: int, *, bias: bool = False):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias)

    def forward(self, x: Tensor, history: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """x (B, T, channels), history (B, <= W-1, channels) or None.
        Returns (conv output (B, T, channels), the last W - 1 inputs as the next history)."""
        y, history = causal_depthwise_conv(x, self.weight, history)
        return (y if self.bias is None else y + self.bias), history


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
    block input by :class:`KernelGenerator` (no activation on the kernel; the caller applies silu after).

    Initialisation (ours; a pretrained checkpoint overwrites it): w1 as nn.Linear; w2.weight zero and w2.bias
    as nn.Conv1d's depthwise default, U(-1/sqrt(W), 1/sqrt(W)), so the conv starts as a static short conv and
    learns the dynamic part from there (Jet-Nemotron zeroes w1 and w2 and draws w2.bias from
    N(0, initializer_range)). w2 is marked custom-initialised: model builders must not redraw it (see
    HybridLM._init_weights)."""

    def __init__(self, channels: int, kernel_size: int, *, generator_input_size: int, generator_hidden_size: int):
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        self.kernel_generator = KernelGenerator(generator_input_size, generator_hidden_size, channels, kernel_size)
        w2 = self.kernel_generator.w2
        with torch.no_grad():
            w2.weight.zero_()
            w2.bias.uniform_(-1 / math.sqrt(kernel_size), 1 / math.sqrt(kernel_size))
        w2._sleepzoo_custom_init = True

    def forward(self, x: Tensor, generator_input: Tensor, history: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, channels), generator_input (B, T, d_in), history (B, <= W-1, channels) or None.
        Returns (conv output (B, T, channels), the last W - 1 inputs as the next history)."""
        return dynamic_causal_conv(x, self.kernel_generator(generator_input), history)
