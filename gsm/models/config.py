"""The network's configuration. Defaults are the paper's; every ablation is a field."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

_CHOICES: dict[str, tuple[str, ...]] = {
    "anchor": ("center", "forward"),
    "align": ("implicit", "bilinear"),
    "scan_order": ("temporal_first", "spatial_first"),
    "scan_impl": ("auto", "cuda", "numba", "torch", "reference"),
    "upsampler": ("progressive", "direct"),
}
_MAY_BE_ZERO = ("recon_blocks", "attn_depth")


@dataclass(frozen=True)
class GSMConfig:
    embed_dim: int = 192  # C
    num_heads: int = 8  # SWSA and implicit-alignment heads
    prop_layers: int = 4  # alternating forward/backward propagation layers
    attn_depth: int = 4  # SWSA transformer blocks per layer (0: none, an ablation)
    window: int = 5  # K, frames per gather-scatter window (odd)
    d_state: int = 16  # Mamba state size N
    d_conv: int = 4  # Mamba causal conv width
    expand: int = 2  # Mamba d_inner = expand * C
    ffn_ratio: int = 4  # GSM block FFN hidden = ffn_ratio * C
    mid_channels: int = 64  # reconstruction width
    recon_blocks: int = 0  # residual blocks at LR before upsampling (paper: none)
    upsampler: str = "progressive"  # paper: 2 x [conv, shuffle x2], convs at HR; "direct": conv at LR, shuffle x4
    anchor: str = "center"  # "center": window centred on t; "forward": window starts at t
    scatter: bool = True  # False: only the anchor frame is updated
    align: str = "implicit"
    scan_order: str = "temporal_first"
    bidirectional: bool = True
    scan_impl: str = "auto"  # which selective-scan kernel; "auto" picks CUDA/numba/torch
    grad_checkpoint: bool = False  # recompute each window in backward (GPU memory saver)
    spynet_weights: str | None = None  # path or URL of a BasicSR SpyNet checkpoint
    spynet_sha256: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"GSMConfig.{name}: {why}, got {getattr(self, name)!r}")

        for f in fields(self):
            value = getattr(self, f.name)
            zero_ok = f.name in _MAY_BE_ZERO
            low = 0 if zero_ok else 1
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise bad(f.name, "must be a non-negative integer" if zero_ok else "must be a positive integer")
            if f.type == "bool" and not isinstance(value, bool):
                raise bad(f.name, "must be true or false")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise bad(name, f"must be one of {', '.join(choices)}")
        if self.window < 3 or self.window % 2 == 0:
            raise bad("window", "must be odd and >= 3")
        if self.embed_dim % self.num_heads:
            raise bad("embed_dim", f"must be divisible by num_heads ({self.num_heads})")
        if self.embed_dim % 4:
            raise bad("embed_dim", "must be divisible by 4 (sine position encoding)")

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def dt_rank(self) -> int:
        return -(-self.embed_dim // 16)  # ceil(C / 16)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "model") -> GSMConfig:
        """Build from a params mapping; unknown keys are an error naming the key."""
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise ValueError(f"unknown key {where}.{key} (known: {', '.join(sorted(known))})")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# A configuration small enough for CPU training and tests; same structure as the paper's.
SMALL = GSMConfig(embed_dim=32, num_heads=4, prop_layers=2, attn_depth=2, d_state=8)
