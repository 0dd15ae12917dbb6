"""Mamba2-style mixer on the ``gated_linear`` fast-weight rule (scalar per-head decay, no delta term).

Paper: Dao & Gu, *Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State
Space Duality* (ICML 2024). Parameter names and shapes follow mamba_ssm's ``Mamba2`` layer (in_proj conv1d
dt_bias A_log D norm out_proj, with ``d_ssm = d_inner``, no extra MLP part, ``D`` per head), so its weights map
over where the sizes agree; the scan itself is sleepzoo's rule plugin.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import registry
from ..registry import SleepzooError
from . import MixerState
from .parts import RMSNorm, ShortConvolution, decay_parameters, evict_conv_caches


class Mamba2(nn.Module):
    """Mamba2 sequence mixer with scalar per-head decay, written on a fast-weight ``rule`` plugin.

    Per token, with d_inner = H * P channels split into H heads of P values and G groups of heads sharing B, C:

    * ``z, xBC, dt = in_proj(u)`` (widths d_inner, d_inner + 2*G*N, H; in that order, as mamba_ssm);
    * ``x, B, C = silu(conv1d(xBC))``: a causal depthwise conv of width W with bias; its history (the last W - 1
      rows of xBC) is a cache, ``conv_xbc`` in the state, like Gated DeltaNet's conv caches;
    * ``dt = softplus(dt + dt_bias)``; ``g = -exp(A_log) * dt`` (log decay <= 0);
    * the rule (default ``gated_linear``) with ``k = B``, ``q = C``, ``v = x`` and ``beta = dt``:
      ``S <- exp(g) S + dt * B x^T`` (S: (B, H, N, P)), ``y = S^T C`` (no 1/sqrt(N) scale, as in Mamba2).
      Writing ``beta = dt`` equals ``v = x * dt`` for this rule (Mamba2's discretised input ``dt * B * x``); a
      rule that reads no beta is given ``v = x * dt`` instead;
    * ``y = y + D * x`` (a skip, one D per head);
    * ``out_proj(norm(y, z))`` with ``norm`` = RMSNorm(y * silu(z)) over each group's d_inner / G channels.

    Differences from mamba_ssm's Mamba2 (ours): the scan is the rule plugin (any registered rule works; a delta
    rule would want normalised keys, which Mamba2's B are not); no dt limits, no learned initial states.

    Sizes: ``num_heads`` H and ``head_dim`` P set d_inner = H * P when ``head_dim`` is given; otherwise
    d_inner = expand * d_model (mamba_ssm) and P = d_inner / H. So by default (``head_dim=None``) ``expand``
    decides the width, and an explicit ``head_dim`` overrides it.

    Parameters: with d = d_model, E = d_inner = H*P, N = state_size, G groups, W = conv_size:
    ``d*(2E + 2GN + H)`` (in_proj) ``+ (W + 1)*(E + 2GN)`` (conv1d weight and bias) ``+ 3H`` (dt_bias, A_log,
    D) ``+ E`` (norm) ``+ E*d`` (out_proj).

    Args:
        d_model: model width.
        num_heads: H (default 4).
        head_dim: P, values per head (default None: expand * d_model / H).
        state_size: N, the key/query width (B and C) (default 64).
        expand: d_inner / d_model when ``head_dim`` is None (default 2).
        num_groups: G, groups of heads sharing B and C (mamba_ssm's ngroups; default 1); must divide H.
        conv_size: W (default 4).
        rule: name of a ``rule`` plugin for the fast-weight update (default "gated_linear").
        chunk_size: chunk length of the chunked rule (default 64).
        norm_eps: eps of the gated RMSNorm (default 1e-5).
        layer_idx: position in the stack (for messages).
    """

    carried_state: tuple[str, ...] = ("fast_weights",)

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, state_size: int = 64,
                 expand: float = 2, num_groups: int = 1, conv_size: int = 4, rule: str = "gated_linear",
                 chunk_size: int = 64, norm_eps: float = 1e-5, layer_idx: int | None = None):
        super().__init__()
        where = f"mamba2 (layer {layer_idx})"
        if num_heads < 1 or state_size < 1:
            raise SleepzooError(f"{where}: num_heads={num_heads} and state_size={state_size} must be >= 1")
        if head_dim is None:
            d_inner = expand * d_model
            if not math.isclose(d_inner, round(d_inner)) or round(d_inner) % num_heads or d_inner < num_heads:
                raise SleepzooError(f"{where}: expand * d_model = {d_inner} must be a whole multiple of "
                                    f"num_heads={num_heads} (or give head_dim)")
            head_dim = int(round(d_inner)) // num_heads
        if head_dim < 1:
            raise SleepzooError(f"{where}: head_dim={head_dim} must be >= 1")
        if num_groups < 1 or num_heads % num_groups:
            raise SleepzooError(f"{where}: num_groups={num_groups} must divide num_heads={num_heads}")
        if conv_size < 1 or chunk_size < 1:
            raise SleepzooError(f"{where}: conv_size={conv_size} and chunk_size={chunk_size} must be >= 1")
        self.num_heads, self.head_dim, self.state_size, self.num_groups = num_heads, head_dim, state_size, num_groups
        self.d_inner = num_heads * head_dim
        self.conv_dim = self.d_inner + 2 * num_groups * state_size
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx
        self.rule_name = rule
        self.rule = registry.get("rule", rule)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * num_groups * state_size + num_heads, bias=False)
        self.conv1d = ShortConvolution(self.conv_dim, conv_size, bias=True)
        # Initialisation as in mamba_ssm: A ~ U(1, 16), dt log-uniform in [1e-3, 0.1] (softplus^-1), D = 1.
        self.A_log, self.dt_bias = decay_parameters(num_heads, a_min=1.0)
        self.D = nn.Parameter(torch.ones(num_heads))
        self.D._no_weight_decay = True
        self.norm = RMSNorm(self.d_inner, eps=norm_eps, group_size=self.d_inner // num_groups, gate_first=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, u: Tensor, state: MixerState = None, *, span: int | None = None) -> tuple[Tensor, MixerState]:
        Bsz, T, _ = u.shape
        H, P, N, G = self.num_heads, self.head_dim, self.state_size, self.num_groups
        E = self.d_inner
        z, xbc, dt = self.in_proj(u).split([E, self.conv_dim, H], dim=-1)
        # The conv history is a cache (SPEC 1): empty in a fresh window and in every pass of hard eviction.
        history = None if state is None else state.get("conv_xbc")
        xbc, conv_xbc = self.conv1d(xbc, history)
        xbc = F.silu(xbc)
        x, Bk, Cq = xbc.split([E, G * N, G * N], dim=-1)
        x = x.view(Bsz, T, H, P)  # (B, T, H, P)
        Bk = Bk.view(Bsz, T, G, N).repeat_interleave(H // G, dim=2)  # (B, T, H, N): head h reads group h // (H/G)
        Cq = Cq.view(Bsz, T, G, N).repeat_interleave(H // G, dim=2)  # (B, T, H, N)
        cdt = torch.promote_types(u.dtype, torch.float32)  # decays in at least float32
        dt = F.softplus(dt.to(cdt) + self.dt_bias.to(cdt))  # (B, T, H)
        g = -self.A_log.to(cdt).exp() * dt  # (B, T, H), log decay <= 0
        rule = self.rule
        if rule.uses_beta:
            v, beta = x, dt
        else:
            v, beta = x * dt.unsqueeze(-1).to(x.dtype), None
        S0 = None if state is None else state.get("fast_weights")
        y, S = rule(Cq, Bk, v, g, beta, scale=1.0, initial_state=S0, chunk_size=self.chunk_size)
        y = y.to(x.dtype) + self.D.to(x.dtype)[:, None] * x  # (B, T, H, P)
        out = self.out_proj(self.norm(y.reshape(Bsz, T, E), z))
        return out, {"fast_weights": S, "conv_xbc": conv_xbc}

    evict = evict_conv_caches
