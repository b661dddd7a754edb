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

`GSMBlock.forward` aligns all frames of a window in one call and scatters them back in one warp,
over sampling geometry prepared for every window of a layer at once (gsm.models.gsmamba);
`GSMBlock.forward_reference` is the same computation written slot by slot, kept as the tested
reference (tests/test_fastpath.py holds the two together, values and gradients).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsm.models.config import GSMConfig
from gsm.ops.conv1d import causal_conv1d
from gsm.ops.flow import flow_warp, grid_warp
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

    def decay(self) -> Tensor:
        """A = -exp(A_log), (d_inner, N); constant over a layer's windows, so built once there."""
        return -torch.exp(self.A_log.float())

    def forward(self, x: Tensor, z: Tensor, scan_impl: str, A: Tensor | None = None) -> Tensor:
        """x, z: (B, d_inner, L) -> y: (B, d_inner, L). A: `decay()`, if already built."""
        x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu", scan_impl)
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt, b, c = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, d_inner, L), bias goes to the scan
        # Strided views: each scan backend copies into the layout its kernel reads, once.
        return selective_scan(
            x, dt, self.decay() if A is None else A, b.transpose(1, 2), c.transpose(1, 2),  # (B, N, L)
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

    def decays(self) -> list[Tensor]:
        return [d.decay() for d in self.directions]

    def forward(self, seq: Tensor, decays: list[Tensor] | None = None) -> Tensor:
        """seq: (B, L, C) -> (B, L, C). decays: `decays()`, if already built."""
        decays = decays or [None] * len(self.directions)  # type: ignore[list-item]
        xz = self.in_proj(seq)  # (B, L, 2 * d_inner)
        x, z = xz.transpose(1, 2).chunk(2, dim=1)  # each (B, d_inner, L)
        y = self.directions[0](x, z, self.scan_impl, decays[0])
        if len(self.directions) == 2:
            x_rev, z_rev = xz.flip(1).transpose(1, 2).chunk(2, dim=1)  # the sequence read backwards
            y = y + self.directions[1](x_rev, z_rev, self.scan_impl, decays[1]).flip(-1)
        return self.out_proj(y.transpose(1, 2))


def depthwise_conv3d_k3(x: Tensor, weight: Tensor, bias: Tensor | None, as_2d: bool) -> Tensor:
    """Depthwise 3x3x3 conv, zero padding 1, on channels-last x (B, K, H, W, D) -> same layout.

    as_2d computes it as three depthwise 2-D convs, one per temporal tap, summed over shifted
    frames. CUDA takes it for training and inference: cuDNN has no fast depthwise 3-D backward
    (pytorch/pytorch#37406; on an H200 it took 95% of the paper's training iteration), and even its
    forward is 3.4x slower at 180x320 (reports/dwconv_gpu.md). The CPU keeps the 3-D conv, which is
    faster there without grad.
    """
    b, k, h, w, d = x.shape
    if not as_2d:
        return F.conv3d(x.permute(0, 4, 1, 2, 3), weight, bias, padding=1, groups=d).permute(0, 2, 3, 4, 1)
    frames = x.permute(0, 1, 4, 2, 3).reshape(b * k, d, h, w)  # every frame as a 2-D image

    def tap(kt: int, b_: Tensor | None = None) -> Tensor:  # temporal tap kt on every frame: (B, K, D, H, W)
        return F.conv2d(frames, weight[:, :, kt], b_, padding=1, groups=d).view(b, k, d, h, w)

    out = tap(1, bias)
    if k > 1:  # frame j also sees j-1 through tap 0 and j+1 through tap 2; the missing ends are zeros
        out = out + F.pad(tap(0)[:, :-1], (0, 0, 0, 0, 0, 0, 1, 0)) + F.pad(tap(2)[:, 1:], (0, 0, 0, 0, 0, 0, 0, 1))
    return out.permute(0, 1, 3, 4, 2)


class WindowFFN(nn.Module):
    """Linear C -> rC, depthwise 3x3x3 conv over (K, H, W), GELU, Linear rC -> C."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        hidden = dim * ratio
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv3d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, as_2d: bool | None = None) -> Tensor:
        """x: (B, K, H, W, C) -> same. as_2d: the conv's form; None: the 2-D form on CUDA."""
        as_2d = x.is_cuda if as_2d is None else as_2d
        h = depthwise_conv3d_k3(self.fc1(x), self.dwconv.weight, self.dwconv.bias, as_2d)
        return self.fc2(F.gelu(h))


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

    def forward(self, slots: tuple[Tensor, ...], gather: tuple[Tensor, ...], scatter: tuple[Tensor, Tensor],
                anchor: int, lo: int, hi: int, align: nn.Module, decays: list[Tensor] | None = None,
                ) -> tuple[Tensor, ...]:
        """Refine one window (fast path).

        slots: the window's K frames, each (B, C, H, W). Slots [lo, anchor) and (anchor, hi) hold
        other frames than the anchor's and are aligned; the rest are the anchor frame itself (the
        anchor slot, or copies clamped at the clip's ends) and need no alignment. gather:
        `align.prepare` geometry and scatter: `warp_grid` grid and mask, of those M = hi - lo - 1
        slots in order, flattened to B*M. `align` is the network's single shared alignment module;
        decays: `self.mamba.decays()`, built once per layer. Returns the K refined slots.

        Slots travel as tuples, stacked only where a layer needs the window as one tensor:
        slicing a stacked window costs a zero-filled copy per slice in backward, stacking nothing.
        """
        k, c = len(slots), slots[0].shape[1]
        ref = slots[anchor]
        moving = [*range(lo, anchor), *range(anchor + 1, hi)]
        # 1. gather: every moving slot aligned to the anchor in one call (B, M, C, H, W)
        aligned = [ref] * k
        if moving:
            moved = align(ref, torch.stack([slots[i] for i in moving], dim=1), gather).unbind(1)
            for i, m in zip(moving, moved):
                aligned[i] = m
        # 2. temporal-first scan and bidirectional Mamba, in anchor coordinates
        y = self.scan(aligned, decays).unbind(1)  # K x (B, C, H, W)

        # 3. scatter: Mamba output warped back to each moving slot in one call, added as residual
        win = torch.stack(slots, dim=1)
        s = self.scale1.view(1, 1, c, 1, 1)
        if self.scatter:
            update = list(y)
            if moving:
                y_moving = torch.stack([y[i] for i in moving], dim=1)
                warped = grid_warp(y_moving.flatten(0, 1), *scatter).view_as(y_moving).unbind(1)
                for i, m in zip(moving, warped):
                    update[i] = m
            out = s * win + torch.stack(update, dim=1)
        else:  # ablation: only the anchor receives the Mamba output
            out = torch.stack([s[0] * ref + y[anchor] if i == anchor else slots[i] for i in range(k)], dim=1)
        return self.feed_forward(out).unbind(1)  # 4. FFN

    def scan(self, aligned: list[Tensor], decays: list[Tensor] | None = None) -> Tensor:
        """Bidirectional Mamba over the K aligned slots (B, C, H, W) -> (B, K, C, H, W)."""
        k, (b, c, h, w) = len(aligned), aligned[0].shape
        # Stacked straight into the scan order, channels last: one copy.
        if self.scan_order == "temporal_first":
            seq = torch.stack([a.permute(0, 2, 3, 1) for a in aligned], dim=3)  # (B, H, W, K, C)
        else:
            seq = torch.stack([a.permute(0, 2, 3, 1) for a in aligned], dim=1)  # (B, K, H, W, C)
        y = self.mamba(self.norm1(seq.view(b, -1, c)), decays)  # (B, L, C)
        if self.scan_order == "temporal_first":
            return y.view(b, h, w, k, c).permute(0, 3, 4, 1, 2)
        return y.view(b, k, h, w, c).permute(0, 1, 4, 2, 3)

    def feed_forward(self, out: Tensor, as_2d: bool | None = None) -> Tensor:
        x = out.permute(0, 1, 3, 4, 2)  # (B, K, H, W, C)
        x = self.scale2 * x + self.ffn(self.norm2(x), as_2d)
        return x.permute(0, 1, 4, 2, 3)  # (B, K, C, H, W)

    def forward_reference(self, win: Tensor, gather: Tensor, scatter: Tensor, anchor: int,
                          identity: list[bool], align: nn.Module) -> Tensor:
        """Refine one window, slot by slot: the plain formulation `forward` is tested against.

        gather / scatter: (B, K, 2, H, W) flows anchor -> slot and slot -> anchor; identity[k]:
        slot k holds the anchor frame itself (no alignment needed).
        """
        b, k, c, h, w = win.shape
        ref = win[:, anchor]
        aligned = torch.stack(
            [ref if identity[i] else align.forward_pair(ref, win[:, i], gather[:, i]) for i in range(k)], dim=1
        )  # (B, K, C, H, W), all in anchor coordinates
        y = self.scan(list(aligned.unbind(1)))

        s = self.scale1.view(1, c, 1, 1)
        if self.scatter:
            out = torch.stack([
                s * win[:, i] + (y[:, i] if identity[i] else flow_warp(y[:, i], scatter[:, i]))
                for i in range(k)
            ], dim=1)
        else:  # ablation: only the anchor receives the Mamba output
            out = torch.stack([s * win[:, i] + y[:, i] if i == anchor else win[:, i] for i in range(k)], dim=1)
        return self.feed_forward(out, as_2d=False)
