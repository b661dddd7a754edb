"""GSMamba: the full video super-resolution network (x4).

lqs (B, T, 3, H, W) in [0, 1]
  -> SpyNet flows between neighbours (once)
  -> 3x3 conv embedding (B, T, C, H, W)
  -> `prop_layers` x Stage, reversing time after each so layers alternate direction
  -> reconstruction (pixel shuffle x4) + bilinear x4 of the input  -> (B, T, 3, 4H, 4W)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gsm.models.blocks import ResBlock
from gsm.models.config import GSMConfig
from gsm.models.gsm_block import GSMBlock
from gsm.models.swsa import SWSA
from gsm.ops.align import make_align
from gsm.ops.flow import flow_tables, table_lookup, warp_grid, window_flows
from gsm.ops.spynet import SpyNet, compute_flows


def window_slots(t: int, cfg: GSMConfig) -> tuple[list[int], int]:
    """Frame ids of the window refined at step t (may run off the clip) and the anchor's slot."""
    anchor = cfg.window // 2 if cfg.anchor == "center" else 0
    return [t - anchor + k for k in range(cfg.window)], anchor


@dataclass(frozen=True)
class Window:
    """One sliding-window step of a layer, as index bookkeeping (no tensors).

    frames: the clip frame each slot reads (ids clamped into the clip); anchor: the anchor slot;
    slots [lo, anchor) and (anchor, hi) hold other frames than the anchor's (they are aligned),
    the rest are the anchor frame itself; written: (slot, frame) pairs written back.
    """

    ids: tuple[int, ...]
    frames: tuple[int, ...]
    anchor: int
    lo: int
    hi: int
    written: tuple[tuple[int, int], ...]


def plan_windows(t_len: int, cfg: GSMConfig) -> list[Window]:
    windows = []
    for t in range(t_len):
        ids, anchor = window_slots(t, cfg)
        frames = tuple(min(max(i, 0), t_len - 1) for i in ids)
        # Clamped ids never decrease, so the slots holding the anchor's frame form one run around
        # the anchor; the other frames lie on either side of it.
        lo, hi = anchor, anchor + 1
        while lo > 0 and frames[lo - 1] != frames[anchor]:
            lo -= 1
        while hi < len(ids) and frames[hi] != frames[anchor]:
            hi += 1
        written = range(len(ids)) if cfg.scatter else [anchor]
        windows.append(Window(tuple(ids), frames, anchor, lo, hi,
                              tuple((k, ids[k]) for k in written if 0 <= ids[k] < t_len)))
    return windows


@dataclass(frozen=True)
class LayerGeometry:
    """Sampling geometry of every window of a layer: for each window t and non-anchor slot j
    (slots 0..K-1 without the anchor), the alignment's `prepare` output and the scatter warp's
    grid and mask, each shaped (B, T, K-1, ...)."""

    gather: tuple[Tensor, ...]
    scatter: tuple[Tensor, ...]

    def windows(self) -> list[tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]:
        """Per window, (gather, scatter) of its K-1 non-anchor slots, each (B, K-1, ...). Unbound
        once per layer: its backward is one stack, where indexing per window would zero-fill a
        full copy per window."""
        per_t = lambda ts: list(zip(*(g.unbind(1) for g in ts)))  # noqa: E731
        return list(zip(per_t(self.gather), per_t(self.scatter)))


def moving_slots(geometry: tuple[Tensor, ...], win: Window, k: int) -> tuple[Tensor, ...]:
    """A window's geometry (B, K-1, ...) cut to its moving slots, flattened to (B*M, ...)."""
    full = win.lo == 0 and win.hi == k
    return tuple((g if full else g[:, win.lo:win.hi - 1]).flatten(0, 1) for g in geometry)


def layer_geometry(tables: tuple[Tensor, Tensor], windows: list[Window], reverse: bool,
                   align: nn.Module) -> LayerGeometry:
    """Look every window's flows up in `flow_tables` output and prepare their sampling at once.

    reverse: the layer runs on the time-reversed clip, whose frame f is the clip's T-1-f; the
    tables are in the clip's own order, and reversing time maps f(a -> b) onto the same entry.
    """
    gather_table, scatter_table = tables
    b, t_len = gather_table.shape[0], gather_table.shape[2]
    clip = (lambda f: t_len - 1 - f) if reverse else (lambda f: f)  # noqa: E731
    gather, scatter = [], []
    for win in windows:
        c = clip(win.ids[win.anchor])
        for k, i in enumerate(win.ids):
            if k == win.anchor:
                continue
            valid = 0 <= i < t_len  # out-of-range slots: zero flow
            gather.append((clip(i) - c, c) if valid else (0, c))
            scatter.append((c - clip(i), clip(i)) if valid else (0, c))
    k1 = len(gather) // max(len(windows), 1)
    g = align.prepare(table_lookup(gather_table, gather).flatten(0, 1))
    s = warp_grid(table_lookup(scatter_table, scatter).flatten(0, 1))
    shape = lambda x: x.view(b, t_len, k1, *x.shape[1:])  # noqa: E731
    return LayerGeometry(tuple(map(shape, g)), tuple(map(shape, s)))


class Stage(nn.Module):
    """One propagation layer: SWSA over the clip, then the sliding gather-scatter window."""

    def __init__(self, cfg: GSMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.swsa = SWSA(cfg.embed_dim, depth=cfg.attn_depth, num_heads=cfg.num_heads)
        self.block = GSMBlock(cfg)

    def forward(self, x: Tensor, windows: list[Window], geometry: LayerGeometry, align: nn.Module,
                attn_masks: dict[bool, Tensor | None] | None = None) -> Tensor:
        """x: (B, T, C, H, W); windows and geometry of this layer's direction; attn_masks: the
        SWSA masks for this size (the same in every layer)."""
        shortcut = x
        x = self.swsa(x.permute(0, 1, 3, 4, 2), attn_masks).permute(0, 1, 4, 2, 3)
        frames = list(x.unbind(1))  # written back window by window: later windows see updates
        k = self.cfg.window
        decays = self.block.mamba.decays()
        for win, (gather, scatter) in zip(windows, geometry.windows()):
            args = (tuple(frames[j] for j in win.frames), moving_slots(gather, win, k),
                    moving_slots(scatter, win, k), win.anchor, win.lo, win.hi, align, decays)
            if self.cfg.grad_checkpoint and torch.is_grad_enabled():
                slots = checkpoint(self.block, *args, use_reentrant=False)
            else:
                slots = self.block(*args)
            for slot, f in win.written:
                frames[f] = slots[slot]
        return torch.stack(frames, dim=1) + shortcut

    def forward_reference(self, x: Tensor, fwd: Tensor, bwd: Tensor, align: nn.Module) -> Tensor:
        """The plain formulation: each window's flows composed on the spot, slot-by-slot block.
        fwd / bwd: (B, T-1, 2, H, W) flows t -> t+1 and t+1 -> t of this layer's direction."""
        shortcut = x
        x = self.swsa(x.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        t_len = x.shape[1]
        frames = list(x.unbind(1))
        for t in range(t_len):
            ids, anchor = window_slots(t, self.cfg)
            clamped = [min(max(i, 0), t_len - 1) for i in ids]
            gather, scatter = window_flows(fwd, bwd, ids, anchor)  # out-of-range slots: zero flow
            identity = [j == clamped[anchor] for j in clamped]
            win = torch.stack([frames[j] for j in clamped], dim=1)  # (B, K, C, H, W)
            out = self.block.forward_reference(win, gather, scatter, anchor, identity, align)
            written = range(len(ids)) if self.cfg.scatter else [anchor]
            for k in written:
                if 0 <= ids[k] < t_len:
                    frames[ids[k]] = out[:, k]
        return torch.stack(frames, dim=1) + shortcut


class Reconstruction(nn.Module):
    """Features (B*T, C, H, W) -> RGB residual (B*T, 3, 4H, 4W).

    upsampler "progressive" is the paper's: two [conv, x2 pixel shuffle] stages, then two convs at
    4H x 4W. "direct" stays at LR and shuffles one conv's 3*16 channels into x4 RGB, which skips the
    high-resolution convs that take a third of a small network's CPU step. `blocks` residual blocks
    at LR precede either (paper: none; BasicVSR++'s reconstruction has them). The CPU quickstart
    uses "direct" after 6 blocks of 32: with the paper's reconstruction at width 16 it stopped
    improving after ~800 steps (reports/recipe_search.md, learning curves).
    """

    def __init__(self, dim: int, mid: int, blocks: int = 0, upsampler: str = "progressive") -> None:
        super().__init__()
        self.upsampler = upsampler
        self.conv_in = nn.Conv2d(dim, mid, 3, padding=1)
        self.body = nn.Sequential(*(ResBlock(mid, slope=0.1) for _ in range(blocks)))
        if upsampler == "progressive":
            self.up1 = nn.Conv2d(mid, mid * 4, 3, padding=1)
            self.up2 = nn.Conv2d(mid, mid * 4, 3, padding=1)
            self.conv_hr = nn.Conv2d(mid, mid, 3, padding=1)
            self.conv_last = nn.Conv2d(mid, 3, 3, padding=1)
        else:
            self.conv_last = nn.Conv2d(mid, 3 * 16, 3, padding=1)
        # Start close to the bilinear base: a default-initialised last conv adds a random residual
        # that training first has to unlearn (the paper does not specify this layer's init).
        with torch.no_grad():
            self.conv_last.weight.mul_(0.1)
            self.conv_last.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        act = lambda v: F.leaky_relu(v, 0.1)  # noqa: E731
        x = self.body(act(self.conv_in(x)))
        if self.upsampler == "direct":
            return F.pixel_shuffle(self.conv_last(x), 4)
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
        self.recon = Reconstruction(c, cfg.mid_channels, cfg.recon_blocks, cfg.upsampler)

    def forward(self, lqs: Tensor, reference: bool = False, flows: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """lqs: (B, T, 3, H, W) in [0, 1] -> (B, T, 3, 4H, 4W).

        reference: run the plain per-window formulation (Stage.forward_reference) instead of the
        batched one; same result, kept for tests and for reading.
        flows: (fwd, bwd) as `compute_flows` returns them, when already known (a frozen SpyNet's
        flows cached by the trainer, gsm.train.flow_cache); SpyNet is not run then.
        """
        if lqs.dim() != 5 or lqs.shape[2] != 3:
            raise ValueError(f"GSMamba expects (B, T, 3, H, W) input, got {tuple(lqs.shape)}")
        b, t, _, h, w = lqs.shape
        if flows is None:
            fwd, bwd = compute_flows(self.spynet, lqs)
        else:
            fwd, bwd = flows
            if fwd.shape != (b, t - 1, 2, h, w) or bwd.shape != fwd.shape:
                raise ValueError(f"flows must be two (B, T-1, 2, H, W) = {(b, t - 1, 2, h, w)} tensors, "
                                 f"got {tuple(fwd.shape)} and {tuple(bwd.shape)}")
        feat = self.embed(lqs.flatten(0, 1)).view(b, t, -1, h, w)

        x = feat
        if reference:
            for stage in self.stages:
                x = stage.forward_reference(x, fwd, bwd, self.align)
                # Reverse time: the flow t -> t+1 of the reversed clip is the old flow t+1 -> t.
                x, fwd, bwd = x.flip(1), bwd.flip(1), fwd.flip(1)
        else:
            windows = plan_windows(t, self.cfg)
            reach = max(abs(i - win.ids[win.anchor]) for win in windows for i in win.ids if 0 <= i < t)
            tables = flow_tables(fwd, bwd, reach)  # every window's flows, both directions
            geometry: dict[bool, LayerGeometry] = {}
            masks = self.stages[0].swsa.attention_masks((t, h, w), lqs.device) if self.stages else None
            for n, stage in enumerate(self.stages):
                reverse = n % 2 == 1  # odd layers run on the time-reversed clip
                if reverse not in geometry:
                    geometry[reverse] = layer_geometry(tables, windows, reverse, self.align)
                x = stage(x, windows, geometry[reverse], self.align, masks).flip(1)
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
