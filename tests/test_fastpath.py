"""The batched fast path computes what the plain per-window formulation computes.

Every rewrite for speed (flow tables, one alignment and one scatter warp per window, per-layer
geometry, the 2-D form of the depthwise 3-D conv) is held against the reference kept beside it:
outputs and gradients to 1e-5 in float32 on CPU, and the state_dict is unchanged, so existing
checkpoints load.
"""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from gsm.models.config import GSMConfig
from gsm.models.gsm_block import WindowFFN, depthwise_conv3d_k3
from gsm.models.gsmamba import GSMamba, Stage, layer_geometry, plan_windows
from gsm.ops.align import ImplicitAlign
from gsm.ops.backend import resolve_impl
from gsm.ops.flow import flow_tables, table_lookup, window_flows

SMALL = dict(embed_dim=16, num_heads=2, prop_layers=2, attn_depth=1, d_state=4, mid_channels=8,
             scan_impl="torch")  # fmt: skip


def _flows(b: int, t: int, h: int, w: int, scale: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random flows of a few pixels (some samples leave the frame), as SpyNet gives."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(2 * b * (t - 1), 2, 3, 3, generator=g) * scale
    fine = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    fwd, bwd = fine.view(2, b, t - 1, 2, h, w).unbind(0)
    return fwd.contiguous(), bwd.contiguous()


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, floor: float = 1e-12) -> None:
    scale = max(expected.abs().max().item(), floor)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def _close_grads(fast: list[torch.Tensor | None], slow: list[torch.Tensor | None], names: list[str]) -> None:
    """Gradients to 1e-5 of their own scale. align.k.bias has a gradient that is zero up to
    round-off (softmax is shift invariant), so no scale goes below 1e-3 of the largest gradient."""
    top = max(g.abs().max().item() for g in slow if g is not None)
    for a, e, name in zip(fast, slow, names):
        assert (a is None) == (e is None), name
        if e is not None:
            scale = max(e.abs().max().item(), 1e-3 * top)
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("window,anchor", [(3, "center"), (5, "center"), (7, "center"), (5, "forward"), (7, "forward")])
@pytest.mark.parametrize("reverse", [False, True])
def test_flow_tables_give_every_windows_flows(window: int, anchor: str, reverse: bool) -> None:
    t, h, w = 8, 9, 11
    fwd, bwd = _flows(2, t, h, w)
    cfg = GSMConfig(**SMALL, window=window, anchor=anchor)
    windows = plan_windows(t, cfg)
    reach = window - 1 if anchor == "forward" else window // 2
    g_table, s_table = flow_tables(fwd, bwd, reach)
    # The layer's direction: reversed layers see the reversed clip and swapped flows.
    lf, lb = (bwd.flip(1), fwd.flip(1)) if reverse else (fwd, bwd)
    clip = (lambda f: t - 1 - f) if reverse else (lambda f: f)
    for win in windows:
        gather, scatter = window_flows(lf, lb, list(win.ids), win.anchor)
        c = clip(win.ids[win.anchor])
        valid = [0 <= i < t for i in win.ids]
        g = table_lookup(g_table, [(clip(i) - c, c) if v else (0, c) for i, v in zip(win.ids, valid)])
        s = table_lookup(s_table, [(c - clip(i), clip(i)) if v else (0, c) for i, v in zip(win.ids, valid)])
        _close(g, gather)
        _close(s, scatter)


def test_batched_implicit_alignment_matches_one_frame_at_a_time() -> None:
    torch.manual_seed(0)
    align = ImplicitAlign(16, num_heads=2)
    b, m, h, w = 2, 3, 7, 9
    ref = torch.randn(b, 16, h, w, requires_grad=True)
    srcs = torch.randn(b, m, 16, h, w, requires_grad=True)
    flows = (torch.randn(b, m, 2, h, w) * 4).requires_grad_()  # many samples fall outside
    fast = align(ref, srcs, align.prepare(flows.flatten(0, 1)))
    slow = torch.stack([align.forward_pair(ref, srcs[:, i], flows[:, i]) for i in range(m)], dim=1)
    _close(fast, slow)
    grad = torch.randn_like(fast)
    names = ["ref", "srcs", "flows", *(n for n, _ in align.named_parameters())]
    params = [ref, srcs, flows, *align.parameters()]
    _close_grads(list(torch.autograd.grad(fast, params, grad)), list(torch.autograd.grad(slow, params, grad)), names)


@pytest.mark.parametrize("reverse", [False, True])
def test_stage_fast_path_matches_reference_values_and_gradients(reverse: bool) -> None:
    torch.manual_seed(0)
    cfg = GSMConfig(**SMALL)
    stage, align = Stage(cfg), ImplicitAlign(16, num_heads=2)
    t, h, w = 6, 8, 10
    x = torch.randn(1, t, 16, h, w, requires_grad=True)
    fwd, bwd = (f.requires_grad_() for f in _flows(1, t, h, w, seed=1))
    windows = plan_windows(t, cfg)
    geometry = layer_geometry(flow_tables(fwd, bwd, 2), windows, reverse, align)
    fast = stage(x, windows, geometry, align)
    lf, lb = (bwd.flip(1), fwd.flip(1)) if reverse else (fwd, bwd)
    slow = stage.forward_reference(x, lf, lb, align)
    _close(fast, slow)
    grad = torch.randn_like(fast)
    named = [("x", x), ("fwd", fwd), ("bwd", bwd), *stage.named_parameters(), *align.named_parameters()]
    params = [p for _, p in named]
    _close_grads(list(torch.autograd.grad(fast, params, grad, allow_unused=True)),
                 list(torch.autograd.grad(slow, params, grad, allow_unused=True)), [n for n, _ in named])


@pytest.mark.parametrize("change,frames", [
    ({}, 1), ({}, 2), ({}, 5), ({"window": 3}, 5), ({"window": 7}, 5), ({"anchor": "forward"}, 5),
    ({"anchor": "forward"}, 2), ({"scatter": False}, 5), ({"align": "bilinear"}, 5),
    ({"scan_order": "spatial_first"}, 4), ({"prop_layers": 3}, 4), ({"bidirectional": False}, 4),
    ({"grad_checkpoint": True}, 5),
], ids=str)
def test_network_fast_path_matches_reference(change: dict, frames: int) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GSMamba(GSMConfig(**{**SMALL, **change}))
    x = torch.rand(1, frames, 3, 12, 14)
    results = []
    for reference in (False, True):
        model.zero_grad(set_to_none=True)
        out = model(x, reference=reference)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (fast, g_fast), (slow, g_slow) = results
    _close(fast, slow)
    names = list(g_slow)
    _close_grads([g_fast[n] for n in names], [g_slow[n] for n in names], names)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_depthwise_conv3d_2d_form_matches_conv3d_values_and_gradients(k: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, k, 7, 6, 12, requires_grad=True)  # (B, K, H, W, D)
    weight = torch.randn(12, 1, 3, 3, 3, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    three = depthwise_conv3d_k3(x, weight, bias, as_2d=False)
    two = depthwise_conv3d_k3(x, weight, bias, as_2d=True)
    direct = F.conv3d(x.permute(0, 4, 1, 2, 3), weight, bias, padding=1, groups=12).permute(0, 2, 3, 4, 1)
    assert torch.equal(three, direct)
    _close(two, three)
    grad = torch.randn_like(two)
    for a, e in zip(torch.autograd.grad(two, (x, weight, bias), grad), torch.autograd.grad(three, (x, weight, bias), grad)):
        _close(a, e)


def test_window_ffn_keeps_the_3d_conv_on_cpu() -> None:
    """The 2-D form is CUDA's (reports/dwconv_gpu.md); on CPU, where it is slower without grad, the
    FFN's default must stay the 3-D conv bit for bit, so CPU-trained results do not move."""
    torch.manual_seed(0)
    ffn = WindowFFN(8, 2)
    x = torch.randn(1, 3, 5, 4, 8)
    assert torch.equal(ffn(x), ffn(x, as_2d=False))
    assert not torch.equal(ffn(x), ffn(x, as_2d=True))  # the forms differ in round-off, so this can tell


def _state_digest(cfg: GSMConfig) -> tuple[str, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = GSMamba(cfg).state_dict()
    keys = repr(sorted((k, tuple(v.shape)) for k, v in sd.items()))
    return hashlib.sha256(keys.encode()).hexdigest(), len(sd)


def test_state_dict_keys_and_shapes_are_those_of_earlier_checkpoints() -> None:
    # Digests of sorted (key, shape) pairs, computed on commit 9c91cb1 (before the fast path).
    assert _state_digest(GSMConfig()) == ("66759072e169c98c8362d9e9c9f108b3f9d7dca6abeb5f84594ef1c530525671", 420)
    assert _state_digest(GSMConfig(align="bilinear", window=3, bidirectional=False)) == (
        "27de8666dcc4662893debbd771b0d52b9ac466f60d6499099f72b25f6adf1f5b", 384)


def test_auto_scan_on_cuda_without_kernels_warns_in_one_line() -> None:
    # No CUDA here, so mamba-ssm is unavailable: exactly the fallback a GPU without kernels takes.
    with pytest.warns(RuntimeWarning, match="falling back") as record:
        assert resolve_impl("auto", torch.device("cuda")) == "torch"
    assert "\n" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_impl("torch", torch.device("cuda")) == "torch"  # asked for: no warning
