"""The Gather-Scatter Mamba block: the paper's core, in one file.

One call refines one temporal window of K frames (B x K x C x H x W, anchor slot c):

  1. gather   every frame is aligned to the anchor with the flow c -> i, so the K copies of an
              anchor pixel describe the same scene point;
  2. scan     the aligned window is flattened to a sequence (temporal-first puts the K copies of
              a pixel next to each other: L = H*W*K) and mixed by a bidirectional Mamba;
  3. scatter  the Mamba output, in anchor coordinates, is warped back to each frame (flow i -> c)
              and added as a residual, so every frame of the window is refined, not just the anchor;
  4. FFN      a channel MLP with a depthwise 3-D conv over (K, H, W).

The selective scan and the causal conv dispatch to mamba-ssm / causal-conv1d kernels on CUDA and
to our own kernels on CPU (gsm.ops).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsm.models.config import GSMConfig
from gsm.ops.conv1d import causal_conv1d
from gsm.ops.flow import flow_warp
from gsm.ops.scan import selective_scan


class ScanDirection(nn.Module):
    """Per-direction Mamba parameters: conv, x_proj, dt_proj, A_log, D (in/out proj are shared)."""

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int,
                 dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        # Mamba's initialisation: dt log-uniform in [dt_min, dt_max] (stored through softplus^-1),
        # A = -(1..N) per channel (stored as log so it stays negative), D = 1 (skip path).
        nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # (d_inner, N)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(d_inner))

    def forward(self, x: Tensor, z: Tensor, scan_impl: str) -> Tensor:
        """x, z: (B, d_inner, L) -> y: (B, d_inner, L)."""
        x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu", scan_impl)
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt, b, c = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, d_inner, L), bias goes to the scan
        return selective_scan(
            x, dt.contiguous(), -torch.exp(self.A_log.float()),
            b.transpose(1, 2).contiguous(), c.transpose(1, 2).contiguous(),  # (B, N, L)
            self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            impl=scan_impl,
        )


class BiMamba(nn.Module):
    """Mamba with a forward and a backward scan over the same projections; outputs summed."""

    def __init__(self, cfg: GSMConfig) -> None:
        super().__init__()
        c, d_inner = cfg.embed_dim, cfg.d_inner
        self.scan_impl = cfg.scan_impl
        self.in_proj = nn.Linear(c, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, c, bias=False)
        n_dirs = 2 if cfg.bidirectional else 1
        self.directions = nn.ModuleList(
            ScanDirection(d_inner, cfg.d_state, cfg.d_conv, cfg.dt_rank) for _ in range(n_dirs)
        )

    def forward(self, seq: Tensor) -> Tensor:
        """seq: (B, L, C) -> (B, L, C)."""
        x, z = self.in_proj(seq).transpose(1, 2).chunk(2, dim=1)  # each (B, d_inner, L)
        y = self.directions[0](x, z, self.scan_impl)
        if len(self.directions) == 2:
            y_rev = self.directions[1](x.flip(-1), z.flip(-1), self.scan_impl)
            y = y + y_rev.flip(-1)
        return self.out_proj(y.transpose(1, 2))


class WindowFFN(nn.Module):
    """Linear C -> rC, depthwise 3x3x3 conv over (K, H, W), GELU, Linear rC -> C."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        hidden = dim * ratio
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv3d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, K, H, W, C) -> same."""
        h = self.fc1(x).permute(0, 4, 1, 2, 3)  # (B, rC, K, H, W)
        h = F.gelu(self.dwconv(h)).permute(0, 2, 3, 4, 1)
        return self.fc2(h)


class GSMBlock(nn.Module):
    """Gather -> scan -> bidirectional Mamba -> scatter -> FFN over one window."""

    def __init__(self, cfg: GSMConfig) -> None:
        super().__init__()
        c = cfg.embed_dim
        self.scatter, self.scan_order = cfg.scatter, cfg.scan_order
        self.norm1 = nn.LayerNorm(c)
        self.mamba = BiMamba(cfg)
        self.scale1 = nn.Parameter(torch.ones(c))  # s: residual scale on the un-aligned frames
        self.norm2 = nn.LayerNorm(c)
        self.ffn = WindowFFN(c, cfg.ffn_ratio)
        self.scale2 = nn.Parameter(torch.ones(c))

    def forward(self, win: Tensor, gather: Tensor, scatter: Tensor, anchor: int,
                identity: list[bool], align: nn.Module) -> Tensor:
        """Refine one window.

        win: (B, K, C, H, W) features; gather / scatter: (B, K, 2, H, W) flows anchor -> slot and
        slot -> anchor; identity[k]: slot k holds the anchor frame itself (no alignment needed).
        `align` is the network's single shared alignment module. Returns (B, K, C, H, W).
        """
        b, k, c, h, w = win.shape
        ref = win[:, anchor]
        aligned = torch.stack(
            [ref if identity[i] else align(ref, win[:, i], gather[:, i]) for i in range(k)], dim=1
        )  # (B, K, C, H, W), all in anchor coordinates

        if self.scan_order == "temporal_first":
            seq = aligned.permute(0, 3, 4, 1, 2).reshape(b, h * w * k, c)  # (B, H*W*K, C)
        else:
            seq = aligned.permute(0, 1, 3, 4, 2).reshape(b, k * h * w, c)  # (B, K*H*W, C)
        y = self.mamba(self.norm1(seq))
        if self.scan_order == "temporal_first":
            y = y.view(b, h, w, k, c).permute(0, 3, 4, 1, 2)  # (B, K, C, H, W)
        else:
            y = y.view(b, k, h, w, c).permute(0, 1, 4, 2, 3)

        s = self.scale1.view(1, c, 1, 1)
        if self.scatter:
            out = torch.stack([
                s * win[:, i] + (y[:, i] if identity[i] else flow_warp(y[:, i], scatter[:, i]))
                for i in range(k)
            ], dim=1)
        else:  # ablation: only the anchor receives the Mamba output
            out = torch.stack([s * win[:, i] + y[:, i] if i == anchor else win[:, i] for i in range(k)], dim=1)

        x = out.permute(0, 1, 3, 4, 2)  # (B, K, H, W, C)
        x = self.scale2 * x + self.ffn(self.norm2(x))
        return x.permute(0, 1, 4, 2, 3)  # (B, K, C, H, W)
