"""GSMamba network: shapes, gradients, ablation switches, config errors, size, FLOPs, tiling."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from gsm.models.config import SMALL, GSMConfig
from gsm.models.flops import count_macs
from gsm.models.gsm_block import GSMBlock
from gsm.models.gsmamba import GSMamba, upscale_tiled
from gsm.ops.align import BilinearAlign, ImplicitAlign

TINY = GSMConfig(embed_dim=16, num_heads=2, prop_layers=2, attn_depth=2, d_state=4, mid_channels=8)


def build(cfg: GSMConfig, seed: int = 0) -> GSMamba:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random SpyNet
        return GSMamba(cfg)


def clip(t: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, t, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("t", "h", "w"), [(1, 9, 11), (2, 13, 7), (3, 17, 21)])
def test_output_shape_for_odd_sizes_and_short_clips(t: int, h: int, w: int) -> None:
    model = build(TINY)
    with torch.no_grad():
        out = model(clip(t, h, w))
    assert out.shape == (1, t, 3, 4 * h, 4 * w)
    assert torch.isfinite(out).all()


def test_batch_of_two_matches_single_items() -> None:
    model = build(TINY).eval()
    x = torch.cat([clip(3, 12, 10, seed=1), clip(3, 12, 10, seed=2)])
    with torch.no_grad():
        both = model(x)
        first = model(x[:1])
    torch.testing.assert_close(both[:1], first, rtol=1e-4, atol=1e-5)


def test_every_parameter_receives_a_gradient() -> None:
    model = build(TINY)
    model(clip(3, 16, 16)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_bad_input_shape_is_named() -> None:
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        build(TINY)(torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize(
    ("field", "value"),
    [("window", 4), ("window", 1), ("anchor", "middle"), ("align", "flow"), ("scan_order", "random"),
     ("embed_dim", 0), ("embed_dim", 30), ("scatter", "yes"), ("scan_impl", "gpu")],
)
def test_bad_config_value_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"GSMConfig\.{field}"):
        GSMConfig(**{field: value})


def test_unknown_config_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"model\.widht"):
        GSMConfig.from_dict({"widht": 3})


def test_paper_parameter_count_is_in_the_papers_range() -> None:
    model = build(GSMConfig())
    total = sum(p.numel() for p in model.parameters())
    spynet = sum(p.numel() for p in model.spynet.parameters())
    assert 10_400_000 <= total <= 10_550_000
    assert spynet == 1_440_300


@pytest.mark.parametrize(
    "change",
    [{"anchor": "forward"}, {"scatter": False}, {"align": "bilinear"}, {"scan_order": "spatial_first"},
     {"bidirectional": False}, {"window": 3}, {"window": 7}],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_each_ablation_changes_the_output_and_keeps_shapes(change: dict) -> None:
    x = clip(4, 12, 12)
    base = build(TINY).eval()
    ablated = build(dataclasses.replace(TINY, **change)).eval()
    # Share every weight the two variants have in common, so only the switch differs.
    ablated.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        a, b = base(x), ablated(x)
    assert a.shape == b.shape == (1, 4, 3, 48, 48)
    assert (a - b).abs().max() > 1e-4


def _block_inputs(k: int = 5, c: int = 16, h: int = 6, w: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    win = torch.randn(2, k, c, h, w, generator=torch.Generator().manual_seed(3))
    return win, torch.zeros(2, k, 2, h, w)


def test_zero_flow_gather_and_scatter_are_exact_identities_with_bilinear_alignment() -> None:
    torch.manual_seed(0)
    block = GSMBlock(TINY).eval()
    win, zero = _block_inputs()
    anchor = 2
    align = BilinearAlign()
    with torch.no_grad():
        out = block.forward_reference(win, zero, zero, anchor, [i == anchor for i in range(5)], align)
        geometry = align.prepare(zero[:, 1:].flatten(0, 1))  # the four moving slots
        fast = torch.stack(block(win.unbind(1), geometry, geometry, anchor, 0, 5, align), dim=1)
        # The same block with no alignment and no scatter warp at all:
        b, k, c, h, w = win.shape
        y = block.mamba(block.norm1(win.permute(0, 3, 4, 1, 2).reshape(b, h * w * k, c)))
        y = y.view(b, h, w, k, c).permute(0, 3, 4, 1, 2)
        x = (block.scale1.view(1, 1, c, 1, 1) * win + y).permute(0, 1, 3, 4, 2)
        expect = (block.scale2 * x + block.ffn(block.norm2(x))).permute(0, 1, 4, 2, 3)
    assert torch.equal(align.forward_pair(win[:, 0], win[:, 1], zero[:, 1]), win[:, 1])
    assert torch.equal(out, expect)
    assert torch.equal(fast, expect)


def test_implicit_alignment_attends_only_to_the_flow_targets_neighbours() -> None:
    torch.manual_seed(0)
    align = ImplicitAlign(16, num_heads=2).eval()
    ref = torch.randn(1, 16, 8, 8)
    src = torch.randn(1, 16, 8, 8)
    flow = torch.zeros(1, 2, 8, 8)
    flow[:, 0] = 2.3  # every pixel samples around x + 2.3: neighbours x + 2 and x + 3
    with torch.no_grad():
        base = align.forward_pair(ref, src, flow)
        # The batched form over the same geometry gives the same alignment.
        torch.testing.assert_close(align(ref, src.unsqueeze(1), align.prepare(flow))[:, 0], base)
        far = src.clone()
        far[..., 0] += 100.0  # column 0 is never a neighbour of x + 2.3
        near = src.clone()
        near[..., 4] += 100.0  # column 4 neighbours pixels at x = 1 and x = 2
        assert torch.equal(align.forward_pair(ref, far, flow), base)
        changed = (align.forward_pair(ref, near, flow) - base).abs().amax(dim=(0, 1, 2))  # per column
    assert torch.equal(changed > 0, torch.tensor([False, True, True, False, False, False, False, False]))
    # Columns 6 and 7 sample x + 8 and x + 9, outside the frame: zero padding, so only the output
    # projection's bias remains.
    bias = align.proj.bias.view(1, -1, 1, 1).expand(1, 16, 8, 2)
    torch.testing.assert_close(base[..., 6:], bias)
    assert (base[..., :6] - align.proj.bias.view(1, -1, 1, 1)).abs().max() > 1e-3


class _NearestUpscaler(torch.nn.Module):
    """Pixel-local stand-in network: tiling must reproduce it exactly."""

    scale = 4

    def forward(self, lqs: torch.Tensor) -> torch.Tensor:
        b, t = lqs.shape[:2]
        up = F.interpolate(lqs.flatten(0, 1), scale_factor=4, mode="nearest")
        return (up * 2 - 0.5).view(b, t, *up.shape[1:])


def test_tiling_is_seamless_for_a_local_model() -> None:
    x = clip(2, 37, 29)
    model = _NearestUpscaler()
    tiled = upscale_tiled(model, x, tile=16, overlap=4)
    torch.testing.assert_close(tiled, model(x), rtol=0, atol=1e-6)


def test_tiled_network_output_has_full_size_and_is_close_to_untiled_in_tile_interiors() -> None:
    model = build(TINY).eval()
    x = clip(2, 20, 24)
    with torch.no_grad():
        whole = model(x)
    tiled = upscale_tiled(model, x, tile=16, overlap=8)
    assert tiled.shape == whole.shape
    assert torch.isfinite(tiled).all()
    with pytest.raises(ValueError, match="overlap"):
        upscale_tiled(model, x, tile=8, overlap=8)


@pytest.mark.parametrize("cfg", [TINY, dataclasses.replace(TINY, align="bilinear", window=3, anchor="forward",
                                                            bidirectional=False),
                                 dataclasses.replace(TINY, recon_blocks=2, upsampler="direct"),
                                 dataclasses.replace(TINY, attn_depth=0)])
def test_dense_mac_count_matches_torch_flop_counter(cfg: GSMConfig) -> None:
    model = build(cfg).eval()
    t, h, w = 3, 16, 24
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(clip(t, h, w))
    analytic = count_macs(cfg, t, h, w)
    measured_macs = counter.get_total_flops() / 2
    # Exact, layer for layer: convs, linears and the alignment's attention matmuls.
    assert sum(analytic.dense.values()) == measured_macs



def test_reconstruction_variants_keep_the_paper_layout() -> None:
    """recon_blocks and upsampler add or swap layers; the paper's keys (its checkpoints) stay as they were."""
    paper = {k for k in build(TINY).state_dict() if k.startswith("recon.")}
    assert paper == {f"recon.{n}.{p}" for n in ("conv_in", "up1", "up2", "conv_hr", "conv_last") for p in ("weight", "bias")}
    direct = build(dataclasses.replace(TINY, recon_blocks=2, upsampler="direct"))
    keys = {k for k in direct.state_dict() if k.startswith("recon.")}
    assert keys == {f"recon.{n}.{p}" for n in ("conv_in", "body.0.conv1", "body.0.conv2", "body.1.conv1",
                                                 "body.1.conv2", "conv_last") for p in ("weight", "bias")}
    assert direct.recon.conv_last.out_channels == 48
    x = clip(3, 8, 12)
    with torch.no_grad():
        out = direct.eval()(x)
    assert out.shape == (1, 3, 3, 32, 48)
    # a zeroed last conv leaves exactly the bilinear base
    with torch.no_grad():
        direct.recon.conv_last.weight.zero_()
        base = torch.nn.functional.interpolate(x.flatten(0, 1), scale_factor=4, mode="bilinear", align_corners=False)
        torch.testing.assert_close(direct(x), base.view_as(out))
    for bad, match in (({"recon_blocks": -1}, "recon_blocks: must be a non-negative integer"),
                       ({"upsampler": "nearest"}, "upsampler: must be one of progressive, direct")):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(TINY, **bad)


def test_attn_depth_zero_drops_the_attention_and_nothing_else() -> None:
    """The no-SWSA ablation (reports/recipe_search.md): the stage's attention is the identity and
    has no weights; every other key of the network is as with attention."""
    cfg = dataclasses.replace(TINY, attn_depth=0)
    model = build(cfg)
    keys, full = set(model.state_dict()), set(build(TINY).state_dict())
    assert keys == {k for k in full if ".swsa." not in k} and keys != full
    x = torch.randn(1, 3, 4, 5, 16)
    assert model.stages[0].swsa(x) is x
    assert model.stages[0].swsa.attention_masks((3, 8, 12), torch.device("cpu")) == {}  # none built per forward
    out = model(clip(3, 8, 12))
    out.abs().mean().backward()
    assert out.shape == (1, 3, 3, 32, 48) and all(p.grad is not None for n, p in model.named_parameters()
                                                  if p.requires_grad and not n.startswith("spynet"))
    with pytest.raises(ValueError, match="attn_depth: must be a non-negative integer"):
        dataclasses.replace(TINY, attn_depth=-1)


def test_small_config_is_the_cpu_one() -> None:
    assert SMALL.embed_dim <= 48 and SMALL.prop_layers <= 2
