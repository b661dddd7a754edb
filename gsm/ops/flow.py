"""Backward optical-flow warping and composition.

Convention (shared by the whole project): a flow ``f(a->b)`` lives on frame
a's pixel grid, shape (N, 2, H, W), channels (dx, dy) in pixels, and
``flow_warp(x_b, f(a->b)) ~= x_a``, i.e. ``out(p) = x_b(p + f(p))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["flow_warp", "compose_flow", "window_flows", "warp_grid", "grid_warp", "flow_tables", "table_lookup"]


def _normalise(coords: Tensor, size: int, align_corners: bool) -> Tensor:
    """Map pixel coordinates to grid_sample's [-1, 1] range.

    A size-1 axis has no extent under align_corners=True; dividing by 1
    instead of 0 keeps it finite (grid_sample then reads that single row).
    """
    if align_corners:
        return coords * (2.0 / max(size - 1, 1)) - 1.0
    return (coords * 2.0 + 1.0) / size - 1.0


def flow_warp(
    x: Tensor,
    flow: Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = True,
) -> Tensor:
    """Backward-warp ``x`` by ``flow``: ``out(p) = x(p + flow(p))``.

    Sampling runs in float32 (float64 for float64 inputs) whatever the input
    dtype: a half/bf16 grid has too few mantissa bits to address pixels of
    even modest frames, and grid_sample needs input and grid to match.

    grid_sample's own [-1, 1] round trip is not exact in float32 (for about a
    fifth of (size, pixel) pairs no float32 grid value maps back onto the
    integer pixel), so pixels whose flow is exactly zero are replaced by the
    input itself. The replacement keeps grid_sample's gradients, so a flow
    predictor initialised at zero still receives a training signal.
    """
    if x.dim() != 4:
        raise ValueError(f"flow_warp: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow_warp: flow must be (N, 2, H, W), got shape {tuple(flow.shape)}")
    if flow.shape[0] != x.shape[0] or flow.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"flow_warp: flow {tuple(flow.shape)} does not match x {tuple(x.shape)} "
            "in batch or spatial size"
        )
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    return grid_warp(x, *warp_grid(flow.to(work), align_corners), padding_mode, align_corners, mode)


def compose_flow(f_ab: Tensor, f_bc: Tensor, padding_mode: str = "border") -> Tensor:
    """Chain backward flows: ``f(a->c)(p) = f_ab(p) + f_bc(p + f_ab(p))``.

    Border padding extrapolates the nearest flow for samples that leave the
    frame; zero padding would pull composed flows towards zero at the edges.
    """
    return f_ab + flow_warp(f_bc, f_ab, padding_mode=padding_mode)


def window_flows(
    fwd: Tensor, bwd: Tensor, frame_ids: Sequence[int], anchor_pos: int
) -> tuple[Tensor, Tensor]:
    """Anchor-centred flows for a window of frames, from adjacent-frame flows.

    fwd[:, t] = f(t -> t+1) and bwd[:, t] = f(t+1 -> t), both (B, T-1, 2, H, W).
    Returns ``gather`` (B, K, 2, H, W) with gather[:, k] = f(c -> frame_ids[k])
    and ``scatter`` with scatter[:, k] = f(frame_ids[k] -> c), where
    ``c = frame_ids[anchor_pos]``. The anchor and out-of-range slots (which hold
    clamped copies of the first/last frame) get zero flow. Multi-hop flows are
    grown outward from c one hop at a time, so the cost is one warp per frame
    of the spanned range rather than one per (slot, hop) pair.
    """
    if fwd.dim() != 5 or fwd.shape[2] != 2:
        raise ValueError(f"window_flows: fwd must be (B, T-1, 2, H, W), got {tuple(fwd.shape)}")
    if bwd.shape != fwd.shape:
        raise ValueError(
            f"window_flows: bwd {tuple(bwd.shape)} must match fwd {tuple(fwd.shape)}"
        )
    ids = [int(i) for i in frame_ids]
    if not ids:
        raise ValueError("window_flows: frame_ids is empty")
    if not 0 <= anchor_pos < len(ids):
        raise ValueError(f"window_flows: anchor_pos {anchor_pos} outside 0..{len(ids) - 1}")
    num_frames = fwd.shape[1] + 1
    c = ids[anchor_pos]
    if not 0 <= c < num_frames:
        raise ValueError(f"window_flows: anchor frame {c} outside 0..{num_frames - 1}")

    b, _, _, h, w = fwd.shape
    zero = fwd.new_zeros(b, 2, h, w)
    gather: dict[int, Tensor] = {c: zero}
    scatter: dict[int, Tensor] = {c: zero}
    valid = [i for i in ids if 0 <= i < num_frames]

    for i in range(c + 1, max(valid) + 1):  # frames after the anchor
        if i == c + 1:
            gather[i], scatter[i] = fwd[:, c], bwd[:, c]
        else:
            gather[i] = compose_flow(gather[i - 1], fwd[:, i - 1])
            scatter[i] = compose_flow(bwd[:, i - 1], scatter[i - 1])
    for i in range(c - 1, min(valid) - 1, -1):  # frames before the anchor
        if i == c - 1:
            gather[i], scatter[i] = bwd[:, i], fwd[:, i]
        else:
            gather[i] = compose_flow(gather[i + 1], bwd[:, i])
            scatter[i] = compose_flow(fwd[:, i], scatter[i + 1])

    g = torch.stack([gather.get(i, zero) for i in ids], dim=1)
    s = torch.stack([scatter.get(i, zero) for i in ids], dim=1)
    return g, s


# ------------------------------------------------------------------------ batched (fast path)
#
# `window_flows` above builds one window's flows at a time: a few composed warps per window, T
# windows per layer. The flows depend only on SpyNet's output, never on features, so every
# window of every layer can take them from one table built once per forward pass. The table
# composes hops in exactly the order `window_flows` does, so each entry is the same computation.


def warp_grid(flow: Tensor, align_corners: bool = True) -> tuple[Tensor, Tensor]:
    """`flow_warp`'s sampling grid (N, H, W, 2) and its still-pixel mask (N, 1, H, W), built once
    so several warps by the same flow (or one warp of a precomputed flow) skip rebuilding it."""
    h, w = flow.shape[-2:]
    work = torch.float64 if flow.dtype == torch.float64 else torch.float32
    fl = flow.to(work)
    px = torch.arange(w, device=flow.device, dtype=work).view(1, 1, w) + fl[:, 0]
    py = torch.arange(h, device=flow.device, dtype=work).view(1, h, 1) + fl[:, 1]
    grid = torch.stack((_normalise(px, w, align_corners), _normalise(py, h, align_corners)), dim=-1)
    return grid, (flow == 0).all(dim=1, keepdim=True)


def grid_warp(x: Tensor, grid: Tensor, still: Tensor, padding_mode: str = "zeros",
              align_corners: bool = True, mode: str = "bilinear") -> Tensor:
    """`flow_warp` over a grid from `warp_grid`, sampled in the grid's dtype."""
    xs = x.to(grid.dtype)
    out = F.grid_sample(xs, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    # Value is xs exactly (out - out.detach() == 0); gradient is grid_sample's.
    exact = xs.detach() + (out - out.detach()) if torch.is_grad_enabled() and out.requires_grad else xs
    return torch.where(still, exact, out).to(x.dtype)


def _compose_many(pairs: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """`compose_flow` of several (f_ab, f_bc) pairs of shape (B, n_i, 2, H, W) in one warp call."""
    sizes = [a.shape[1] for a, _ in pairs]
    f_ab = torch.cat([a for a, _ in pairs], dim=1)
    f_bc = torch.cat([b for _, b in pairs], dim=1)
    out = f_ab + flow_warp(f_bc.flatten(0, 1), f_ab.flatten(0, 1), padding_mode="border").view_as(f_ab)
    return list(out.split(sizes, dim=1))


def flow_tables(fwd: Tensor, bwd: Tensor, reach: int) -> tuple[Tensor, Tensor]:
    """Every flow between frames at most `reach` apart, for gathering and for scattering.

    Returns (G, S), each (B, 2*reach + 1, T, 2, H, W) with G[:, reach + o, c] = f(c -> c + o) and
    S[:, reach + o, i] = f(i -> i + o) (zero where i + o is outside the clip). `window_flows`
    grows gather flows away from the anchor by appending the last hop, and scatter flows towards
    it by prepending the first hop; G and S follow those orders. The two differ only from three
    hops on, so S shares G's entries up to two hops.
    """
    b, n, _, h, w = fwd.shape
    t = n + 1
    zero = fwd.new_zeros(b, t, 2, h, w)
    g: dict[int, Tensor] = {0: zero}
    s: dict[int, Tensor] = {0: zero}
    if n:
        g[1] = s[1] = torch.cat([fwd, zero[:, :1]], dim=1)
        g[-1] = s[-1] = torch.cat([zero[:, :1], bwd], dim=1)
    for d in range(2, min(reach, n) + 1):
        # Rows with a valid target: c in [0, t-d) forwards, c in [d, t) backwards.
        pairs = [(g[d - 1][:, : t - d], fwd[:, d - 1:]),  # f(c->c+d-1), then hop c+d-1 -> c+d
                 (g[-(d - 1)][:, d:], bwd[:, : t - d])]  # f(c->c-d+1), then hop c-d+1 -> c-d
        if d >= 3:
            pairs += [(fwd[:, : t - d], s[d - 1][:, 1: t - d + 1]),  # hop i -> i+1, then f(i+1->i+d)
                      (bwd[:, d - 1:], s[-(d - 1)][:, d - 1: t - 1])]  # hop i -> i-1, then f(i-1->i-d)
        out = _compose_many(pairs)
        pad = zero[:, :d]
        g[d], g[-d] = torch.cat([out[0], pad], dim=1), torch.cat([pad, out[1]], dim=1)
        s[d], s[-d] = (torch.cat([out[2], pad], 1), torch.cat([pad, out[3]], 1)) if d >= 3 else (g[d], g[-d])
    offsets = range(-reach, reach + 1)
    return (torch.stack([g.get(o, zero) for o in offsets], dim=1),
            torch.stack([s.get(o, zero) for o in offsets], dim=1))


def table_lookup(table: Tensor, entries: Sequence[tuple[int, int]]) -> Tensor:
    """Rows (offset, frame) of a `flow_tables` table as one (B, len(entries), 2, H, W) tensor."""
    b, n_off, t = table.shape[:3]
    reach = n_off // 2
    index = torch.tensor([(o + reach) * t + f for o, f in entries], device=table.device, dtype=torch.long)
    return table.flatten(1, 2).index_select(1, index)
