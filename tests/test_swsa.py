import pytest
import torch

from gsm.models.swsa import SWSA, effective_window, padded_size, swsa_macs_split


def _model(dim: int = 32, depth: int = 2, heads: int = 4, seed: int = 0) -> SWSA:
    torch.manual_seed(seed)
    return SWSA(dim, depth=depth, num_heads=heads).double().eval()


@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (2, 3, 9, 13), (1, 2, 16, 16), (1, 5, 17, 8)])
def test_shape_preserved(shape: tuple[int, int, int, int]) -> None:
    torch.manual_seed(0)
    m = SWSA(32, depth=4, num_heads=4)
    x = torch.randn(*shape, 32)
    y = m(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_parameter_count() -> None:
    m = SWSA(192, depth=4, num_heads=8)
    # LN 2*192, qkv 192*576, proj 192*192+192, bias table (3*15*15)*8,
    # LN 2*192, fc11/fc12 192*384+384 each, fc2 384*192+192.
    per_block = 384 + 110_592 + 37_056 + 5_400 + 384 + 74_112 + 74_112 + 73_920
    assert per_block == 375_960
    assert sum(p.numel() for p in m.parameters()) == 4 * per_block == 1_503_840
    assert m.blocks[0].attn.rel_bias_table.shape == (3 * 15 * 15, 8)


def test_padding_does_not_leak() -> None:
    m = _model()
    size = (3, 10, 13)  # every axis padded: T 3->4, H 10->16, W 13->16
    win, shift = effective_window(size, m.window)
    assert (win, shift) == ((2, 8, 8), (1, 4, 4))
    pad = padded_size(size, win)
    valid = torch.zeros(pad, dtype=torch.bool)
    valid[: size[0], : size[1], : size[2]] = True

    torch.manual_seed(1)
    x = torch.randn(1, *pad, 32, dtype=torch.float64)
    x2 = torch.where(valid[..., None], x, 100 * torch.randn_like(x))
    with torch.no_grad():
        y = m.forward_padded(x, valid, win, shift)
        y2 = m.forward_padded(x2, valid, win, shift)
        y_plain = m(x[:, : size[0], : size[1], : size[2]])
    torch.testing.assert_close(y[:, valid], y2[:, valid], rtol=0, atol=1e-12)
    torch.testing.assert_close(y_plain.flatten(1, 3), y[:, valid], rtol=0, atol=1e-12)
    assert (y[:, ~valid] - y2[:, ~valid]).abs().max() > 1  # padded tokens did change


def test_shift_mask_blocks_wraparound() -> None:
    m = _model(dim=16, depth=2, heads=2)
    torch.manual_seed(2)
    x = torch.randn(1, 2, 16, 16, 16, dtype=torch.float64)

    def changed(out: tuple[int, int], src: tuple[int, int]) -> bool:
        x2 = x.clone()
        # A random direction: a constant offset would be erased by LayerNorm.
        x2[0, :, src[0], src[1]] += 5.0 * torch.randn(16, dtype=torch.float64)
        with torch.no_grad():
            a, b = m(x)[0, :, out[0], out[1]], m(x2)[0, :, out[0], out[1]]
        return not torch.allclose(a, b, rtol=0, atol=1e-12)

    # (0, 0) is rolled next to the far border: its cyclic shifted window also
    # holds rows/cols 12..15, which the mask must keep out.
    assert not changed((0, 0), (15, 15))
    assert not changed((0, 0), (0, 12))
    assert not changed((0, 0), (12, 0))
    assert changed((0, 0), (5, 5))  # same unshifted window
    # The shifted block does carry information across unshifted window borders.
    assert changed((4, 4), (11, 11))


def test_gradient_reaches_all_parameters() -> None:
    torch.manual_seed(3)
    m = SWSA(32, depth=2, num_heads=4)
    x = torch.randn(2, 3, 9, 13, 32, requires_grad=True)
    m(x).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bf16_autocast() -> None:
    torch.manual_seed(4)
    m = SWSA(32, depth=2, num_heads=4)
    x = torch.randn(1, 3, 9, 13, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.shape == x.shape and torch.isfinite(y.float()).all()
    torch.testing.assert_close(y.float(), m(x), rtol=0.05, atol=0.05)


def test_swsa_macs_small_case() -> None:
    # dim 4, (T, H, W) = (3, 10, 5), window (2, 8, 8):
    # effective window (2, 8, 5) (W fits in one window), padded volume (4, 16, 5) = 320 tokens,
    # window tokens 2*8*5 = 80, hidden 8.
    # linear per token: qkv 3*16 + proj 16 + fc11/fc12 2*4*8 + fc2 8*4 = 48 + 16 + 64 + 32 = 160
    # attention per token: 2 * 80 * 4 = 640
    # per block 320 * (160 + 640) = 256_000; depth 2 -> 512_000
    assert sum(swsa_macs_split(4, 3, 10, 5, depth=2)) == 512_000


def test_reduced_window_bias_uses_true_offsets() -> None:
    attn = SWSA(8, depth=1, num_heads=2).blocks[0].attn
    win = (1, 5, 3)
    coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in win), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    # Offsets index the full (2, 8, 8) table: strides (15*15, 15, 1), offsets shifted by (1, 7, 7).
    index = (rel[0] + 1) * 225 + (rel[1] + 7) * 15 + (rel[2] + 7)
    expected = attn.rel_bias_table[index.reshape(-1)].view(15, 15, 2).permute(2, 0, 1)
    torch.testing.assert_close(attn.position_bias(win), expected, rtol=0, atol=0)
