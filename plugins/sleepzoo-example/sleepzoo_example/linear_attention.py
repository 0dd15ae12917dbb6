"""Linear-attention mixer, registered as the ``mixer`` plugin ``linear_attention``."""

from __future__ import annotations

import torch.nn.functional as F
from sleepzoo import registry
from sleepzoo.registry import SleepzooError
from torch import Tensor, nn


def feature_map(x: Tensor) -> Tensor:
    """``elu(x) + 1`` (positive, as in Katharopoulos et al.), L2-normalised over the head dim so that every
    write ``beta k v^T`` has a bounded size (and the delta rule, ``rule="delta"``, stays contractive)."""
    return F.normalize(F.elu(x) + 1.0, p=2, dim=-1, eps=1e-6)


class LinearAttention(nn.Module):
    """Linear attention as a fast-weight mixer: the state ``S`` (B, H, K, K) survives an eviction.

    Paper: Katharopoulos et al., *Transformers are RNNs: Fast Autoregressive Transformers with Linear
    Attention* (ICML 2020). Per token: q, k = phi(W x) with phi = L2-normalised ``elu + 1`` per head;
    v = W_v x; beta = sigmoid(b_proj x) (only when the rule reads beta); the rule writes S and reads
    o = S^T q / sqrt(K); output = o_proj(RMSNorm(o)) per head. There are no positions and no attention
    window, so ``span`` is accepted for the mixer contract and unused; the state holds only S, so an
    eviction (which keeps the fast weights) leaves it whole.

    Parameters: with d = d_model, H heads, K = head_dim: ``4*d*H*K`` (q, k, v, o projections)
    ``+ d*H`` (b_proj, when the rule reads beta) ``+ K`` (o_norm).

    Args:
        d_model: model width.
        num_heads: H (default 4).
        head_dim: K, the width of q, k and v per head (default 32).
        rule: name of a ``rule`` plugin without a gate (default "hebbian"; "delta" also works).
        chunk_size: chunk length of the chunked rule (default 64).
        layer_idx: position in the stack (for messages).
    """

    carried_state: tuple[str, ...] = ("fast_weights",)

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int = 32, rule: str = "hebbian",
                 chunk_size: int = 64, layer_idx: int | None = None):
        super().__init__()
        where = f"linear_attention (layer {layer_idx})"
        if num_heads < 1 or head_dim < 1 or chunk_size < 1:
            raise SleepzooError(f"{where}: num_heads={num_heads}, head_dim={head_dim} and chunk_size={chunk_size} "
                                "must all be >= 1")
        self.rule_name = rule
        self.rule = registry.get("rule", rule)
        if self.rule.uses_gate:
            raise SleepzooError(f"{where}: rule {rule!r} needs a decay gate g, which linear attention does not "
                                f"compute; choose a rule without one, e.g. 'hebbian' or 'delta'")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.b_proj = nn.Linear(d_model, num_heads, bias=False) if self.rule.uses_beta else None
        self.o_norm = nn.RMSNorm(head_dim, eps=1e-5)
        self.o_proj = nn.Linear(inner, d_model, bias=False)

    def forward(self, x: Tensor, state: dict[str, Tensor] | None = None, *,
                span: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        q = feature_map(self.q_proj(x).view(B, T, H, K))  # (B, T, H, K)
        k = feature_map(self.k_proj(x).view(B, T, H, K))  # (B, T, H, K)
        v = self.v_proj(x).view(B, T, H, K)  # (B, T, H, K)
        beta = None if self.b_proj is None else self.b_proj(x).sigmoid()  # (B, T, H)
        S0 = None if state is None else state.get("fast_weights")  # (B, H, K, K)
        # (B, T, H, K), (B, H, K, K); the rule object decodes one token with its step form
        o, S = self.rule(q, k, v, None, beta, scale=K ** -0.5, initial_state=S0, chunk_size=self.chunk_size)
        o = self.o_norm(o.to(x.dtype))  # (B, T, H, K)
        return self.o_proj(o.reshape(B, T, H * K)), {"fast_weights": S}
