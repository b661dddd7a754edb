"""GSMamba: the full video super-resolution network (x4).

lqs (B, T, 3, H, W) in [0, 1]
  -> SpyNet flows between neighbours (once)
  -> 3x3 conv embedding (B, T, C, H, W)
  -> `prop_layers` x Stage, reversing time after each so layers alternate direction
  -> reconstruction (pixel shuffle x4) + bilinear x4 of the input  -> (B, T, 3, 4H, 4W)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gsm.models.config import GSMConfig
from gsm.models.gsm_block import GSMBlock
from gsm.models.swsa import SWSA
from gsm.ops.align import make_align
from gsm.ops.flow import window_flows
from gsm.ops.spynet import SpyNet, compute_flows


def window_slots(t: int, cfg: GSMConfig) -> tuple[list[int], int]:
    """Frame ids of the window refined at step t (may run off the clip) and the anchor's slot."""
    anchor = cfg.window // 2 if cfg.anchor == "center" else 0
    return [t - anchor + k for k in range(cfg.window)], anchor


class Stage(nn.Module):
    """One propagation layer: SWSA over the clip, then the sliding gather-scatter window."""

    def __init__(self, cfg: GSMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.swsa = SWSA(cfg.embed_dim, depth=cfg.attn_depth, num_heads=cfg.num_heads)
        self.block = GSMBlock(cfg)

    def forward(self, x: Tensor, fwd: Tensor, bwd: Tensor, align: nn.Module) -> Tensor:
        """x: (B, T, C, H, W); fwd / bwd: (B, T-1, 2, H, W) flows t -> t+1 and t+1 -> t."""
        shortcut = x
        x = self.swsa(x.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        t_len = x.shape[1]
        frames = list(x.unbind(1))  # written back window by window: later windows see updates
        for t in range(t_len):
            ids, anchor = window_slots(t, self.cfg)
            clamped = [min(max(i, 0), t_len - 1) for i in ids]
            gather, scatter = window_flows(fwd, bwd, ids, anchor)  # out-of-range slots: zero flow
            identity = [j == clamped[anchor] for j in clamped]
            win = torch.stack([frames[j] for j in clamped], dim=1)  # (B, K, C, H, W)
            if self.cfg.grad_checkpoint and torch.is_grad_enabled():
                out = checkpoint(self.block, win, gather, scatter, anchor, identity, align, use_reentrant=False)
            else:
                out = self.block(win, gather, scatter, anchor, identity, align)
            written = range(len(ids)) if self.cfg.scatter else [anchor]
            for k in written:
                if 0 <= ids[k] < t_len:
                    frames[ids[k]] = out[:, k]
        return torch.stack(frames, dim=1) + shortcut


class Reconstruction(nn.Module):
    """Features (B*T, C, H, W) -> RGB residual (B*T, 3, 4H, 4W)."""

    def __init__(self, dim: int, mid: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(dim, mid, 3, padding=1)
        self.up1 = nn.Conv2d(mid, mid * 4, 3, padding=1)
        self.up2 = nn.Conv2d(mid, mid * 4, 3, padding=1)
        self.conv_hr = nn.Conv2d(mid, mid, 3, padding=1)
        self.conv_last = nn.Conv2d(mid, 3, 3, padding=1)
        # Start close to the bilinear base: a default-initialised last conv adds a random residual
        # that training first has to unlearn (the paper does not specify this layer's init).
        with torch.no_grad():
            self.conv_last.weight.mul_(0.1)
            self.conv_last.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        act = lambda v: F.leaky_relu(v, 0.1)  # noqa: E731
        x = act(self.conv_in(x))
        x = act(F.pixel_shuffle(self.up1(x), 2))
        x = act(F.pixel_shuffle(self.up2(x), 2))
        # A non-linearity between the two last convs, as in BasicVSR-family upsamplers.
        return self.conv_last(act(self.conv_hr(x)))


class GSMamba(nn.Module):
    scale = 4

    def __init__(self, cfg: GSMConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or GSMConfig()
        c = cfg.embed_dim
        self.spynet = SpyNet(cfg.spynet_weights, sha256=cfg.spynet_sha256)
        self.embed = nn.Conv2d(3, c, 3, padding=1)
        self.align = make_align(cfg.align, c, cfg.num_heads)  # one module shared by all layers
        self.stages = nn.ModuleList(Stage(cfg) for _ in range(cfg.prop_layers))
        self.norm = nn.LayerNorm(c)
        self.fuse = nn.Linear(c, c)
        self.recon = Reconstruction(c, cfg.mid_channels)

    def forward(self, lqs: Tensor) -> Tensor:
        """lqs: (B, T, 3, H, W) in [0, 1] -> (B, T, 3, 4H, 4W)."""
        if lqs.dim() != 5 or lqs.shape[2] != 3:
            raise ValueError(f"GSMamba expects (B, T, 3, H, W) input, got {tuple(lqs.shape)}")
        b, t, _, h, w = lqs.shape
        fwd, bwd = compute_flows(self.spynet, lqs)
        feat = self.embed(lqs.flatten(0, 1)).view(b, t, -1, h, w)

        x = feat
        for stage in self.stages:
            x = stage(x, fwd, bwd, self.align)
            # Reverse time: the flow t -> t+1 of the reversed clip is the old flow t+1 -> t.
            x, fwd, bwd = x.flip(1), bwd.flip(1), fwd.flip(1)
        if len(self.stages) % 2:
            x = x.flip(1)

        x = feat + self.fuse(self.norm(x.permute(0, 1, 3, 4, 2))).permute(0, 1, 4, 2, 3)
        out = self.recon(x.flatten(0, 1))
        base = F.interpolate(lqs.flatten(0, 1), scale_factor=4, mode="bilinear", align_corners=False)
        return (out + base).view(b, t, 3, 4 * h, 4 * w)


def tile_weights(size: int, overlap: int, start: bool, end: bool, device: torch.device) -> Tensor:
    """1-D blending ramp: linear over the overlap on sides that meet a neighbouring tile."""
    w = torch.ones(size, device=device)
    if overlap > 0:
        ramp = torch.linspace(0, 1, overlap + 2, device=device)[1:-1]
        if not start:
            w[:overlap] = ramp
        if not end:
            w[-overlap:] = ramp.flip(0)
    return w


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


@torch.no_grad()
def upscale_tiled(model: nn.Module, lqs: Tensor, tile: int | None = None, overlap: int = 16) -> Tensor:
    """Run `model` over spatial tiles of lqs (B, T, 3, H, W) and blend them seamlessly.

    Tiles overlap by `overlap` LR pixels and are cross-faded with linear ramps, so no seam is
    visible; `tile=None` runs the whole frame at once. Memory then scales with tile**2, not H*W.
    """
    if tile is None or (lqs.shape[-2] <= tile and lqs.shape[-1] <= tile):
        return model(lqs)
    if overlap < 0 or overlap >= tile:
        raise ValueError(f"tile overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    b, t, c, h, w = lqs.shape
    s = model.scale if hasattr(model, "scale") else 4
    out = lqs.new_zeros(b, t, 3, h * s, w * s)
    weight = lqs.new_zeros(1, 1, 1, h * s, w * s)
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    for y0 in ys:
        for x0 in xs:
            th, tw = min(tile, h), min(tile, w)
            patch = model(lqs[..., y0:y0 + th, x0:x0 + tw])
            wy = tile_weights(th * s, overlap * s, y0 == 0, y0 + th >= h, lqs.device)
            wx = tile_weights(tw * s, overlap * s, x0 == 0, x0 + tw >= w, lqs.device)
            wgt = (wy[:, None] * wx[None, :]).to(out.dtype)
            out[..., y0 * s:(y0 + th) * s, x0 * s:(x0 + tw) * s] += patch * wgt
            weight[..., y0 * s:(y0 + th) * s, x0 * s:(x0 + tw) * s] += wgt
    return out / weight
