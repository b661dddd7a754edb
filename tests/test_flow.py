"""Flow warping, composition and window flows against analytically known answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from gsm.ops.flow import compose_flow, flow_warp, window_flows


def _const_flow(n: int, h: int, w: int, dx: float, dy: float) -> Tensor:
    flow = torch.empty(n, 2, h, w)
    flow[:, 0] = dx
    flow[:, 1] = dy
    return flow


def _smooth(ys: Tensor, xs: Tensor) -> Tensor:
    """Long-wavelength test image so bilinear interpolation error stays small."""
    return torch.sin(2 * math.pi * xs / 37.0) + 0.5 * torch.cos(2 * math.pi * ys / 29.0 + 0.3)


def _pixel_grid(h: int, w: int) -> tuple[Tensor, Tensor]:
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    return ys, xs


@pytest.mark.parametrize(
    "h,w", [(1, 1), (1, 9), (9, 1), (5, 7), (6, 8), (37, 50), (64, 64), (101, 180)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_flow_is_exact_identity(h: int, w: int, dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, h, w, dtype=dtype)
    out = flow_warp(x, torch.zeros(2, 2, h, w, dtype=dtype))
    assert out.dtype == dtype
    assert torch.equal(out, x)


def test_zero_flow_identity_with_grad_keeps_flow_gradient() -> None:
    x = torch.randn(1, 3, 12, 15, requires_grad=True)
    flow = torch.zeros(1, 2, 12, 15, requires_grad=True)
    out = flow_warp(x, flow)
    assert torch.equal(out.detach(), x.detach())
    (out * torch.randn_like(out)).sum().backward()
    assert flow.grad is not None and x.grad is not None
    # A zero-initialised flow predictor must still be trainable through the warp.
    assert (flow.grad.abs() > 0).float().mean() > 0.9


def test_integer_translation_recovered() -> None:
    x_a = torch.randn(2, 3, 20, 24)
    dx, dy = 3, -2
    # Frame b is frame a moved by (dx, dy): x_b(q) = x_a(q - (dx, dy)), so f(a->b) = (dx, dy).
    x_b = torch.roll(x_a, shifts=(dy, dx), dims=(2, 3))
    out = flow_warp(x_b, _const_flow(2, 20, 24, dx, dy))
    inner = (slice(None), slice(None), slice(2, -2), slice(0, -3))
    torch.testing.assert_close(out[inner], x_a[inner], atol=1e-5, rtol=0)


def test_fractional_translation_recovered_on_smooth_image() -> None:
    h, w = 40, 48
    dx, dy = 2.5, -1.25
    ys, xs = _pixel_grid(h, w)
    x_a = _smooth(ys, xs).float().expand(1, 2, h, w)
    x_b = _smooth(ys - dy, xs - dx).float().expand(1, 2, h, w)
    out = flow_warp(x_b, _const_flow(1, h, w, dx, dy))
    inner = (slice(None), slice(None), slice(2, -2), slice(1, -3))
    err = (out[inner] - x_a[inner]).abs().max().item()
    # Bilinear error is t(1-t)/2 * |f''| per axis: 3.6e-3 (x, t=0.5) + 2.2e-3 (y, t=0.25).
    assert err < 6.5e-3


def test_bf16_input_keeps_dtype() -> None:
    x = torch.randn(1, 4, 9, 11).bfloat16()
    flow = torch.randn(1, 2, 9, 11)
    out = flow_warp(x, flow)
    assert out.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flow_warp(x, flow.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_shape_validation() -> None:
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="flow must be"):
        flow_warp(x, torch.zeros(2, 8, 8, 2))
    with pytest.raises(ValueError, match="does not match"):
        flow_warp(x, torch.zeros(2, 2, 8, 7))
    with pytest.raises(ValueError, match="does not match"):
        flow_warp(x, torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="x must be"):
        flow_warp(x[0], torch.zeros(2, 2, 8, 8))


def test_compose_constant_translations_is_sum() -> None:
    f_ab = _const_flow(2, 10, 13, 1.5, -0.75)
    f_bc = _const_flow(2, 10, 13, -3.25, 2.0)
    torch.testing.assert_close(compose_flow(f_ab, f_bc), f_ab + f_bc, atol=1e-5, rtol=0)


def test_compose_smooth_fields_matches_analytic() -> None:
    h, w = 48, 56
    ys, xs = _pixel_grid(h, w)

    def f_ab(y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return 2.0 * torch.sin(2 * math.pi * y / 40.0), 1.5 * torch.cos(2 * math.pi * x / 45.0)

    def f_bc(y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return 1.0 + 1.5 * torch.cos(2 * math.pi * (x + y) / 50.0), -0.5 + torch.sin(
            2 * math.pi * x / 42.0
        )

    ab_x, ab_y = f_ab(ys, xs)
    bc_x, bc_y = f_bc(ys, xs)
    # Exact chain: f_ac(p) = f_ab(p) + f_bc(p + f_ab(p)), evaluated analytically.
    tx, ty = f_bc(ys + ab_y, xs + ab_x)
    expected = torch.stack([ab_x + tx, ab_y + ty])[None].float()
    got = compose_flow(
        torch.stack([ab_x, ab_y])[None].float(), torch.stack([bc_x, bc_y])[None].float()
    )
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    err = (got[inner] - expected[inner]).abs().max().item()
    assert err < 1e-2


@pytest.mark.parametrize(
    "frame_ids,anchor_pos",
    [([0, 1, 2, 3, 4], 2), ([-2, -1, 0, 1, 2], 2), ([3, 4, 5, 6, 7], 2), ([1, 5, 3, 0], 2)],
)
def test_window_flows_constant_translation(frame_ids: list[int], anchor_pos: int) -> None:
    b, t, h, w = 2, 6, 7, 9
    fwd = _const_flow(b * (t - 1), h, w, 1.0, 0.0).view(b, t - 1, 2, h, w)
    bwd = -fwd
    gather, scatter = window_flows(fwd, bwd, frame_ids, anchor_pos)
    assert gather.shape == scatter.shape == (b, len(frame_ids), 2, h, w)
    c = frame_ids[anchor_pos]
    for k, i in enumerate(frame_ids):
        expected_dx = float(i - c) if 0 <= i < t else 0.0
        torch.testing.assert_close(
            gather[:, k], _const_flow(b, h, w, expected_dx, 0.0), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            scatter[:, k], _const_flow(b, h, w, -expected_dx, 0.0), atol=1e-5, rtol=0
        )
    assert torch.equal(gather[:, anchor_pos], torch.zeros(b, 2, h, w))
    assert torch.equal(scatter[:, anchor_pos], torch.zeros(b, 2, h, w))


def test_window_flows_single_frame_and_validation() -> None:
    empty = torch.zeros(1, 0, 2, 4, 5)
    gather, scatter = window_flows(empty, empty, [-1, 0, 1], 1)
    assert gather.shape == (1, 3, 2, 4, 5) and not gather.any() and not scatter.any()
    fwd = torch.zeros(1, 2, 2, 4, 5)
    with pytest.raises(ValueError, match="anchor frame"):
        window_flows(fwd, fwd, [2, 3, 4], 1)
    with pytest.raises(ValueError, match="must match"):
        window_flows(fwd, fwd[:, :1], [0, 1], 0)
    with pytest.raises(ValueError, match="fwd must be"):
        window_flows(fwd[0], fwd[0], [0, 1], 0)
