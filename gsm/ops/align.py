"""Aligning frames' features to an anchor frame, given the flows anchor -> frame.

Two modules share one interface, so the GSM block does not care which one it holds:

- `BilinearAlign`: plain backward warping (cheap; an exact identity for zero flow).
- `ImplicitAlign`: IART-style implicit resampling. Instead of interpolating features, each anchor
  pixel attends over the 2x2 integer neighbours of its flow target, with sine encodings of the
  geometry, so the network learns the resampling kernel (avoids bilinear blur of features).

The interface has two steps because the sampling geometry depends only on the flows, never on
features: `prepare(flows)` turns a batch of flows into geometry once (for every window of a
layer at a time), and `align(ref, srcs, geometry)` aligns the M frames of one window to their
anchor in one call. `forward_pair(ref, src, flow)` is the plain one-frame formulation, kept as
the tested reference for both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsm.ops.flow import flow_warp, grid_warp, warp_grid

# The 2x2 integer neighbours of a sampling position, as (dx, dy) from its floor.
_NEIGHBOURS = ((0, 0), (1, 0), (0, 1), (1, 1))


class BilinearAlign(nn.Module):
    """Bilinear backward warp; parameter-free."""

    def prepare(self, flow: Tensor) -> tuple[Tensor, Tensor]:
        """flow (N, 2, H, W) -> the warp's grid and still-pixel mask."""
        return warp_grid(flow)

    def forward(self, ref: Tensor, srcs: Tensor, geometry: tuple[Tensor, ...]) -> Tensor:  # noqa: ARG002
        """srcs (B, M, C, H, W), geometry of B*M flows -> (B, M, C, H, W)."""
        return grid_warp(srcs.flatten(0, 1), *geometry).view_as(srcs)

    def forward_pair(self, ref: Tensor, src: Tensor, flow: Tensor) -> Tensor:  # noqa: ARG002
        return flow_warp(src, flow)


def sine_frequencies(dim: int, device: torch.device | None = None) -> Tensor:
    """The dim // 4 frequencies of `sine_encoding`: geometric from pi to 64 pi, so both coarse and
    fine sub-pixel offsets are distinguishable."""
    n_freq = dim // 4
    exponents = torch.arange(n_freq, device=device, dtype=torch.float32) * (6.0 / max(n_freq, 1))
    return math.pi * torch.pow(2.0, exponents)


def sine_encoding(coords: Tensor, dim: int, omega: Tensor | None = None) -> Tensor:
    """Encode 2-D sub-pixel coordinates (values in about [-1, 1]) into `dim` channels.

    coords: (N, 2, ...) -> (N, dim, ...); omega: `sine_frequencies(dim)`, if already at hand.
    """
    n_freq = dim // 4
    if omega is None:
        omega = sine_frequencies(dim, coords.device)
    shape = (1, 1, n_freq) + (1,) * (coords.dim() - 2)
    phase = coords.float().unsqueeze(2) * omega.float().view(shape)  # (N, 2, n_freq, ...)
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
        self.register_buffer("omega", sine_frequencies(dim), persistent=False)

    @staticmethod
    def _project(layer: nn.Linear, x: Tensor) -> Tensor:
        """Linear over the channel axis of an (N, C, H, W) map."""
        return layer(x.movedim(1, -1)).movedim(-1, 1)

    def prepare(self, flow: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """flow (N, 2, H, W) -> where each anchor pixel samples, as
        index (N, 4*H*W) flat source pixel per neighbour (clamped), inside (N, 4, H*W) bool and
        coords (N, 5, 2, H, W): the fractional position (the query's encoding), then each
        neighbour's offset from the sampling position (the keys' and values' encoding)."""
        n, _, h, w = flow.shape
        ys, xs = torch.meshgrid(
            torch.arange(h, device=flow.device, dtype=torch.float32),
            torch.arange(w, device=flow.device, dtype=torch.float32),
            indexing="ij",
        )
        px = xs + flow[:, 0].float()  # (N, H, W) sampling position in the source frame
        py = ys + flow[:, 1].float()
        x0, y0 = px.floor(), py.floor()
        step = torch.tensor(_NEIGHBOURS, device=flow.device, dtype=torch.float32).view(1, 4, 2, 1, 1)
        nxy = torch.stack([x0, y0], dim=1).unsqueeze(1) + step  # (N, 4, 2, H, W) neighbours
        nx, ny = nxy.unbind(2)
        inside = ((nx >= 0) & (nx <= w - 1) & (ny >= 0) & (ny <= h - 1)).flatten(2)
        index = (ny.clamp(0, h - 1) * w + nx.clamp(0, w - 1)).long().flatten(1)
        pxy = torch.stack([px, py], dim=1)  # (N, 2, H, W)
        frac = pxy - torch.stack([x0, y0], dim=1)  # in [0, 1)
        coords = torch.cat([frac.unsqueeze(1), nxy - pxy.unsqueeze(1)], dim=1)
        return index, inside, coords

    def forward(self, ref: Tensor, srcs: Tensor, geometry: tuple[Tensor, ...]) -> Tensor:
        """ref (B, C, H, W), srcs (B, M, C, H, W), geometry of the B*M flows -> (B, M, C, H, W)."""
        b, m, c, h, w = srcs.shape
        n, hw, heads = b * m, h * w, self.num_heads
        hd = c // heads
        index, inside, coords = geometry
        pe = sine_encoding(coords.flatten(0, 1), c, self.omega).view(n, 5, c, hw)  # (N, 5, C, H*W)

        # Keys and values in one projection, then one gather of all 4 neighbours; projecting
        # before gathering costs H*W instead of 4*H*W projections (a linear map commutes with
        # picking pixels).
        weight = torch.cat([self.k.weight, self.v.weight])
        bias = torch.cat([self.k.bias, self.v.bias])
        kv = F.linear(srcs.flatten(0, 1).movedim(1, -1), weight, bias).movedim(-1, 1).flatten(2)  # (N, 2C, HW)
        kv = kv.gather(2, index.unsqueeze(1).expand(n, 2 * c, 4 * hw)).view(n, 2 * c, 4, hw)
        # split, not slicing: the backward of a split is one concatenation, a slice's a zero-fill.
        pe_q, pe_kv = pe.split([1, 4], dim=1)
        pe_kv = pe_kv.transpose(1, 2).to(kv.dtype)  # (N, C, 4, HW)
        k, v = (t.view(n, heads, hd, 4, hw) for t in (kv + pe_kv.repeat(1, 2, 1, 1)).chunk(2, dim=1))

        q = self._project(self.q, ref).flatten(2).unsqueeze(1)  # (B, 1, C, HW): shared by M frames
        q = (q + pe_q.view(b, m, c, hw).to(q.dtype)).view(n, heads, hd, 1, hw)
        logits = (q * k).sum(2) * hd**-0.5  # (N, heads, 4, HW)
        # Outside neighbours get weight 0, and where all four fall outside the frame the result is
        # zero (zero padding). The most negative finite logit and a mask multiply give exactly what
        # -inf and nan_to_num give (exp underflows to 0), with a one-op backward.
        inside = inside.unsqueeze(1)
        logits = logits.masked_fill(~inside, torch.finfo(logits.dtype).min)
        attn = torch.softmax(logits, dim=2) * inside
        out = (attn.unsqueeze(2) * v).sum(3).view(n, c, h, w)
        return self._project(self.proj, out).view(b, m, c, h, w)

    def forward_pair(self, ref: Tensor, src: Tensor, flow: Tensor) -> Tensor:
        """Reference: one frame src (N, C, H, W) aligned by flow (N, 2, H, W), written plainly."""
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
        attn = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        out = torch.einsum("nepk,nedpk->nedp", attn, v).reshape(n, c, h, w)
        return self._project(self.proj, out)


def make_align(kind: str, dim: int, num_heads: int) -> nn.Module:
    if kind == "implicit":
        return ImplicitAlign(dim, num_heads)
    if kind == "bilinear":
        return BilinearAlign()
    raise ValueError(f"align must be 'implicit' or 'bilinear', got {kind!r}")
