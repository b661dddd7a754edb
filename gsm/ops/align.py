"""Aligning a frame's features to an anchor frame, given the flow anchor -> frame.

Two modules share one call signature, `align(ref, src, flow)`, so the GSM block does not care
which one it holds:

- `BilinearAlign`: plain backward warping (cheap; an exact identity for zero flow).
- `ImplicitAlign`: IART-style implicit resampling. Instead of interpolating features, each anchor
  pixel attends over the 2x2 integer neighbours of its flow target, with sine encodings of the
  geometry, so the network learns the resampling kernel (avoids bilinear blur of features).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gsm.ops.flow import flow_warp

# The 2x2 integer neighbours of a sampling position, as (dx, dy) from its floor.
_NEIGHBOURS = ((0, 0), (1, 0), (0, 1), (1, 1))


class BilinearAlign(nn.Module):
    """Bilinear backward warp; parameter-free."""

    def forward(self, ref: Tensor, src: Tensor, flow: Tensor) -> Tensor:  # noqa: ARG002
        return flow_warp(src, flow)


def sine_encoding(coords: Tensor, dim: int) -> Tensor:
    """Encode 2-D sub-pixel coordinates (values in about [-1, 1]) into `dim` channels.

    coords: (N, 2, ...) -> (N, dim, ...). Frequencies grow geometrically from pi to 64 pi so both
    coarse and fine sub-pixel offsets are distinguishable.
    """
    n_freq = dim // 4
    exponents = torch.arange(n_freq, device=coords.device, dtype=torch.float32) * (6.0 / max(n_freq, 1))
    omega = math.pi * torch.pow(2.0, exponents)  # (n_freq,)
    shape = (1, 1, n_freq) + (1,) * (coords.dim() - 2)
    phase = coords.float().unsqueeze(2) * omega.view(shape)  # (N, 2, n_freq, ...)
    enc = torch.cat([phase.sin(), phase.cos()], dim=2)  # (N, 2, 2*n_freq, ...)
    return enc.flatten(1, 2).to(coords.dtype)  # (N, 4*n_freq = dim, ...)


class ImplicitAlign(nn.Module):
    """Multi-head attention from each anchor pixel to the 4 integer neighbours of p + flow(p)."""

    def __init__(self, dim: int, num_heads: int = 8) -> None:
        super().__init__()
        if dim % num_heads or dim % 4:
            raise ValueError(f"ImplicitAlign: dim {dim} must be divisible by num_heads {num_heads} and by 4")
        self.dim, self.num_heads = dim, num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    @staticmethod
    def _project(layer: nn.Linear, x: Tensor) -> Tensor:
        """Linear over the channel axis of an (N, C, H, W) map."""
        return layer(x.movedim(1, -1)).movedim(-1, 1)

    def forward(self, ref: Tensor, src: Tensor, flow: Tensor) -> Tensor:
        n, c, h, w = src.shape
        heads, hd = self.num_heads, c // self.num_heads
        ys, xs = torch.meshgrid(
            torch.arange(h, device=src.device, dtype=torch.float32),
            torch.arange(w, device=src.device, dtype=torch.float32),
            indexing="ij",
        )
        px = xs + flow[:, 0].float()  # (N, H, W) sampling position in src
        py = ys + flow[:, 1].float()
        x0, y0 = px.floor(), py.floor()
        frac = torch.stack([px - x0, py - y0], dim=1)  # (N, 2, H, W) in [0, 1)

        # Project before gathering: a linear map commutes with picking pixels, and this costs
        # H*W instead of 4*H*W projections.
        k_src = self._project(self.k, src).flatten(2)  # (N, C, H*W)
        v_src = self._project(self.v, src).flatten(2)
        keys, vals, valid = [], [], []
        for dx, dy in _NEIGHBOURS:
            nx, ny = x0 + dx, y0 + dy
            inside = (nx >= 0) & (nx <= w - 1) & (ny >= 0) & (ny <= h - 1)  # (N, H, W)
            idx = (ny.clamp(0, h - 1) * w + nx.clamp(0, w - 1)).long().flatten(1)  # (N, H*W)
            idx = idx.unsqueeze(1).expand(n, c, h * w)
            rel = torch.stack([nx - px, ny - py], dim=1)  # (N, 2, H, W) in (-1, 1]
            pe = sine_encoding(rel, c).flatten(2).to(k_src.dtype)  # (N, C, H*W)
            keys.append(k_src.gather(2, idx) + pe)
            vals.append(v_src.gather(2, idx) + pe)
            valid.append(inside.flatten(1))
        k = torch.stack(keys, dim=-1)  # (N, C, H*W, 4)
        v = torch.stack(vals, dim=-1)
        inside = torch.stack(valid, dim=-1)  # (N, H*W, 4)

        q = self._project(self.q, ref).flatten(2) + sine_encoding(frac, c).flatten(2).to(k.dtype)  # (N, C, H*W)
        q = q.view(n, heads, hd, h * w)
        k = k.view(n, heads, hd, h * w, 4)
        v = v.view(n, heads, hd, h * w, 4)
        logits = torch.einsum("nedp,nedpk->nepk", q, k) * hd**-0.5  # (N, heads, H*W, 4)
        logits = logits.masked_fill(~inside.unsqueeze(1), float("-inf"))
        # Where all four neighbours fall outside the frame, the result is zero (zero padding).
        attn = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        out = torch.einsum("nepk,nedpk->nedp", attn, v).reshape(n, c, h, w)
        return self._project(self.proj, out)


def make_align(kind: str, dim: int, num_heads: int) -> nn.Module:
    if kind == "implicit":
        return ImplicitAlign(dim, num_heads)
    if kind == "bilinear":
        return BilinearAlign()
    raise ValueError(f"align must be 'implicit' or 'bilinear', got {kind!r}")

