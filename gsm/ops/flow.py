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

__all__ = ["flow_warp", "compose_flow", "window_flows"]


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
    h, w = x.shape[-2:]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(work)
    fl = flow.to(work)
    px = torch.arange(w, device=x.device, dtype=work).view(1, 1, w) + fl[:, 0]
    py = torch.arange(h, device=x.device, dtype=work).view(1, h, 1) + fl[:, 1]
    grid = torch.stack(
        (_normalise(px, w, align_corners), _normalise(py, h, align_corners)), dim=-1
    )
    out = F.grid_sample(
        xs, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners
    )
    still = (flow == 0).all(dim=1, keepdim=True)
    if torch.is_grad_enabled() and out.requires_grad:
        # Value is xs exactly (out - out.detach() == 0); gradient is grid_sample's.
        exact = xs.detach() + (out - out.detach())
    else:
        exact = xs
    out = torch.where(still, exact, out)
    return out.to(x.dtype)


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
