"""Analytic multiply-accumulate counts for GSMamba.

Profilers cannot see inside the selective scan (a custom kernel), grid sampling or fused
attention, so the whole network is counted by formula. `dense` terms are the matmul/conv layers a
profiler also sees (tests hold them against torch's FlopCounterMode); `other` terms (scan, warps,
SWSA attention matmuls) are counted by formula only. Norms, activations and softmax are not counted, as is customary.
"""

from __future__ import annotations

from dataclasses import dataclass

from gsm.models.config import GSMConfig
from gsm.models.gsmamba import plan_windows
from gsm.models.swsa import swsa_macs_split

_SPYNET_CHANNELS = (8, 32, 64, 32, 16, 2)
_SPYNET_LEVELS = 6


@dataclass(frozen=True)
class MacCount:
    dense: dict[str, int]
    other: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.dense.values()) + sum(self.other.values())


def spynet_macs(h: int, w: int) -> int:
    """One SpyNet call on an (h, w) pair, after resizing to multiples of 32."""
    h32, w32 = -(-h // 32) * 32, -(-w // 32) * 32
    per_pixel = sum(a * b for a, b in zip(_SPYNET_CHANNELS, _SPYNET_CHANNELS[1:])) * 49
    pixels = sum((h32 >> lvl) * (w32 >> lvl) for lvl in range(_SPYNET_LEVELS))
    return per_pixel * pixels


def count_macs(cfg: GSMConfig, t: int, h: int, w: int) -> MacCount:
    """MACs of one forward on a (1, t, 3, h, w) clip."""
    c, p, k = cfg.embed_dim, h * w, cfg.window
    d, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
    mid = cfg.mid_channels
    dirs = 2 if cfg.bidirectional else 1
    windows = t * cfg.prop_layers  # one GSM block call per frame per layer
    # Slots that need alignment / scatter warps: those not holding the anchor frame itself.
    per_window = [win.hi - win.lo - 1 for win in plan_windows(t, cfg)]  # slots the block aligns
    moving = sum(per_window) * cfg.prop_layers
    aligning = sum(m > 0 for m in per_window) * cfg.prop_layers  # windows

    swsa_linear, swsa_attention = swsa_macs_split(c, t, h, w, depth=cfg.attn_depth)
    length = k * p  # Mamba sequence length per window
    if cfg.align == "implicit":
        # q once per window (the anchor's), k, v and out proj per aligned slot; the 4-neighbour
        # attention (q.k and the weighted sum of v, 8 MACs per channel) is elementwise.
        align_dense = (aligning * c * c + moving * 3 * c * c) * p
        align_other = moving * 8 * c * p
    else:
        align_dense, align_other = 0, moving * 4 * c * p  # bilinear: 4 taps per value
    dense = {
        "spynet": 2 * max(t - 1, 0) * spynet_macs(h, w),
        "embed": t * p * 27 * c,
        "swsa": cfg.prop_layers * swsa_linear,
        "align": align_dense,
        "mamba_proj": windows * length * (c * 2 * d + d * c + dirs * (d * (r + 2 * n) + r * d)),
        "mamba_conv": windows * (length + cfg.d_conv - 1) * dirs * d * cfg.d_conv,  # causal padding
        "ffn": windows * length * (2 * c * cfg.ffn_ratio * c + 27 * cfg.ffn_ratio * c),
        "fuse": t * p * c * c,
        "recon": t * p * 9 * (c * mid + 2 * cfg.recon_blocks * mid * mid + (
            mid * 4 * mid + 4 * mid * 4 * mid + 16 * mid * mid + 16 * mid * 3 if cfg.upsampler == "progressive"
            else mid * 48)),
    }
    other = {
        "swsa_attention": cfg.prop_layers * swsa_attention,
        # h = exp(dA) h + dB u (2 MACs per state element) and y = C h (1 MAC), plus D u and the gate.
        "scan": windows * length * dirs * d * (3 * n + 2),
        "align_attention" if cfg.align == "implicit" else "align_warp": align_other,
        "scatter_warp": moving * 4 * c * p if cfg.scatter else 0,
    }
    return MacCount(dense, other)
