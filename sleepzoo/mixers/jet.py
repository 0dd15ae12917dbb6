"""JetBlock mixer (Jet-Nemotron's linear-attention block): Gated DeltaNet with a dynamic convolution on v.

Paper: Gu, Hu, Hatamizadeh, et al., *Jet-Nemotron: Efficient Language Model with Post Neural Architecture
Search* (NVIDIA, 2025, arXiv 2508.15884). Parameter names are those of the released Jet-Nemotron checkpoints
under ``model.layers.{i}.self_attn.``: q_proj k_proj v_proj b_proj a_proj A_log dt_bias
dynamic_conv1d.kernel_generator.w1 dynamic_conv1d.kernel_generator.w2 g_proj o_norm o_proj (SPEC 3).
"""

from __future__ import annotations

from .gated_deltanet import GatedDeltaMixer


class JetBlock(GatedDeltaMixer):
    """Jet-Nemotron's JetBlock (registered as ``jet``): :class:`GatedDeltaMixer` without convs on q, k and with
    a dynamic conv on v.

    The dynamic conv on v: ``v = silu(DConv(v_proj x))``, where DConv is a causal depthwise conv of width W
    whose kernel is generated from x_t: ``kernel_t = w2(silu(w1 x_t))`` reshaped to (H*V channels, W taps),
    channel-major, and ``DConv(u)_t[c] = sum_j kernel_t[c, j] * u_{t-(W-1)+j}[c]`` (tap W-1 is the token
    itself). Its history (the last W - 1 values of v_proj x) is the cache ``conv_v``.

    Kernel layout, from NVlabs/Jet-Nemotron (``jetai/modeling/hf/dynamic_conv.py``, read for facts): the
    generator reads the block input x (not v_proj x); w2's flat output is ``(channel, tap)`` with the tap
    fastest (einops ``'b t (d w) -> b t d w'``); the conv is the left-padded unfold, i.e. the sum above; no
    activation on the generated kernel; silu on the conv output. The generator width is ``value_dim //
    dconv_generator_reduction`` (Jet-Nemotron-2B: 3072 // 8 = 384).

    Initialisation (ours; a pretrained checkpoint overwrites it): A_log, dt_bias as in Mamba2 / fla; the
    dynamic conv starts as a static short conv (w2.weight zero, see
    :class:`sleepzoo.mixers.parts.DynamicShortConvolution`), so the block starts as Gated DeltaNet with a short
    conv on v and learns the dynamic part from there.

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

    mixer_name = "jet"
    head_gate_order = ("b_proj", "a_proj")  # as Jet-Nemotron registers them

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int = 64, expand_v: float = 2.0,
                 conv_size: int = 4, dconv_generator_reduction: int = 8, rule: str = "gated_delta",
                 chunk_size: int = 64, norm_eps: float = 1e-5, layer_idx: int | None = None):
        super().__init__(d_model, num_heads=num_heads, head_dim=head_dim, expand_v=expand_v, q_conv="none",
                         k_conv="none", v_conv="dynamic", conv_size=conv_size,
                         dconv_generator_reduction=dconv_generator_reduction, use_gate=True, rule=rule,
                         chunk_size=chunk_size, norm_eps=norm_eps, layer_idx=layer_idx)
