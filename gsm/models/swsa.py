"""Shifted-window 3-D self-attention (SWSA) group.

A stack of pre-LN transformer blocks attending inside (T, H, W) windows, with
every other block cyclically shifted by half a window so information crosses
window borders (Video Swin style). The input is padded once, at the end of each
axis, to a multiple of the effective window; padded tokens never act as keys, so
real outputs do not depend on what the padding holds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Size3 = tuple[int, int, int]


def effective_window(size: Size3, window: Size3) -> tuple[Size3, Size3]:
    """Shrink the window to the input along axes that fit in one window.

    Such axes hold a single window, so shifting them would only wrap the input
    onto itself; their shift is 0 (Video Swin's rule).
    """
    win = tuple(s if s <= w else w for s, w in zip(size, window))
    shift = tuple(0 if s <= w else w // 2 for s, w in zip(size, window))
    return win, shift  # type: ignore[return-value]


def padded_size(size: Size3, win: Size3) -> Size3:
    return tuple(math.ceil(s / w) * w for s, w in zip(size, win))  # type: ignore[return-value]


def _partition(x: Tensor, win: Size3) -> Tensor:
    """(..., Tp, Hp, Wp, C) -> (..., nW, N, C), windows in raster order."""
    *lead, tp, hp, wp, c = x.shape
    wt, wh, ww = win
    x = x.reshape(*lead, tp // wt, wt, hp // wh, wh, wp // ww, ww, c)
    n = len(lead)
    perm = (*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5, n + 6)
    return x.permute(perm).reshape(*lead, -1, wt * wh * ww, c)


def _merge(x: Tensor, win: Size3, size: Size3) -> Tensor:
    """Inverse of `_partition`: (B, nW, N, C) -> (B, Tp, Hp, Wp, C)."""
    b, _, _, c = x.shape
    (wt, wh, ww), (tp, hp, wp) = win, size
    x = x.reshape(b, tp // wt, hp // wh, wp // ww, wt, wh, ww, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, tp, hp, wp, c)


def build_attn_mask(
    size: Size3,
    win: Size3,
    shift: Size3,
    valid: Tensor | None,
    device: torch.device,
) -> Tensor | None:
    """Additive (nW, N, N) mask (0 / -inf) for one block type, or None if not needed.

    Tokens may attend to keys of the same pre-roll region that are valid. The
    region id marks, per axis, the first `shift` positions: after the roll they
    land in the last window next to the opposite border and must stay apart
    from it. Region and valid volumes are rolled exactly like the features.
    The diagonal is always allowed so padded queries never get an all -inf row
    (their outputs are discarded, but NaNs would poison the backward pass).
    """
    if valid is None and not any(shift):
        return None
    region = torch.zeros(size, dtype=torch.long, device=device)
    for axis, (length, s) in enumerate(zip(size, shift)):
        if s:
            ids = (torch.arange(length, device=device) < s).long() << axis
            view = [1, 1, 1]
            view[axis] = length
            region = region + ids.view(view)
    if valid is None:
        valid = torch.ones(size, dtype=torch.bool, device=device)
    dims = (0, 1, 2)
    neg = tuple(-s for s in shift)
    region = torch.roll(region, neg, dims)
    valid = torch.roll(valid.to(device=device, dtype=torch.bool), neg, dims)
    region = _partition(region[..., None], win)[..., 0]  # (nW, N)
    valid = _partition(valid[..., None], win)[..., 0]  # (nW, N)
    allowed = (region[:, :, None] == region[:, None, :]) & valid[:, None, :]
    n = allowed.shape[-1]
    allowed |= torch.eye(n, dtype=torch.bool, device=device)
    mask = torch.zeros(allowed.shape, device=device)
    return mask.masked_fill_(~allowed, float("-inf"))


def block_masks(size: Size3, win: Size3, shift: Size3, valid: Tensor | None,
                device: torch.device) -> dict[bool, Tensor | None]:
    """`build_attn_mask` of the plain (False) and the shifted (True) blocks of a padded volume."""
    return {False: build_attn_mask(size, win, (0, 0, 0), valid, device),
            True: build_attn_mask(size, win, shift, valid, device)}


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside 3-D windows with a relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: Size3) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window = window
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        wt, wh, ww = window
        self.rel_bias_table = nn.Parameter(
            torch.zeros((2 * wt - 1) * (2 * wh - 1) * (2 * ww - 1), num_heads)
        )
        nn.init.trunc_normal_(self.rel_bias_table, std=0.02)
        coords = torch.stack(
            torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij")
        ).flatten(1)  # (3, N), raster order as in _partition
        rel = coords[:, :, None] - coords[:, None, :]  # (3, N, N)
        rel = rel + torch.tensor([wt - 1, wh - 1, ww - 1])[:, None, None]
        index = (rel[0] * (2 * wh - 1) + rel[1]) * (2 * ww - 1) + rel[2]
        self.register_buffer("rel_index", index, persistent=False)  # (N, N)
        self.register_buffer("coords", coords, persistent=False)  # (3, N)

    def position_bias(self, win: Size3) -> Tensor:
        """(heads, n, n) bias for a possibly reduced window.

        Relative offsets inside a reduced window are a subset of the full
        window's, so its index is the full index restricted to the tokens
        whose coordinates fit in the reduced window.
        """
        index = self.rel_index
        if tuple(win) != tuple(self.window):
            limit = torch.tensor(win, device=index.device)[:, None]
            keep = (self.coords < limit).all(0).nonzero().squeeze(1)
            index = index[keep][:, keep]
        n = index.shape[0]
        bias = self.rel_bias_table[index.reshape(-1)].view(n, n, self.num_heads)
        return bias.permute(2, 0, 1)

    def forward(self, x: Tensor, win: Size3, mask: Tensor | None) -> Tensor:
        # x: (B, nW, N, C); mask: (nW, N, N) or None
        b, nw, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(b * nw, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B*nW, heads, N, hd)
        bias = self.position_bias(win)
        if mask is None:
            attn_mask = bias.to(q.dtype).unsqueeze(0)  # broadcast over windows
        else:
            attn_mask = (mask.to(bias.dtype)[:, None] + bias[None]).to(q.dtype)
            if b > 1:
                attn_mask = attn_mask.expand(b, -1, -1, -1, -1).reshape(b * nw, h, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, nw, n, c)
        return self.proj(out)


class GEGLU(nn.Module):
    """Gated-GELU MLP: GELU(fc11 x) * fc12 x, then back to dim."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc11 = nn.Linear(dim, hidden)
        self.fc12 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc11(x)) * self.fc12(x))


class SWSABlock(nn.Module):
    """Pre-LN block; `shifted` blocks roll the volume by the half-window shift."""

    def __init__(
        self, dim: int, num_heads: int, window: Size3, mlp_ratio: float, shifted: bool
    ) -> None:
        super().__init__()
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = GEGLU(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, win: Size3, shift: Size3, mask: Tensor | None) -> Tensor:
        # x: (B, Tp, Hp, Wp, C) already padded to multiples of win
        size = tuple(x.shape[1:4])
        h = self.norm1(x)
        rolled = self.shifted and any(shift)
        if rolled:
            h = torch.roll(h, tuple(-s for s in shift), (1, 2, 3))
        h = _merge(self.attn(_partition(h, win), win, mask), win, size)  # type: ignore[arg-type]
        if rolled:
            h = torch.roll(h, shift, (1, 2, 3))
        x = x + h
        return x + self.mlp(self.norm2(x))


class SWSA(nn.Module):
    """Group of `depth` window-attention blocks, odd ones shifted by half a window."""

    def __init__(
        self,
        dim: int,
        depth: int = 4,
        num_heads: int = 8,
        window: Size3 = (2, 8, 8),
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        self.window: Size3 = tuple(window)  # type: ignore[assignment]
        self.blocks = nn.ModuleList(
            SWSABlock(dim, num_heads, self.window, mlp_ratio, shifted=i % 2 == 1)
            for i in range(depth)
        )
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        # Swin convention; the bias table is initialised in WindowAttention3D.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, masks: dict[bool, Tensor | None] | None = None) -> Tensor:
        """x: (B, T, H, W, C) -> same. masks: `attention_masks` of this size, if already built."""
        if not self.blocks:  # depth 0: no attention at all
            return x
        t, h, w = x.shape[1:4]
        win, shift = effective_window((t, h, w), self.window)
        tp, hp, wp = padded_size((t, h, w), win)
        if masks is None:
            masks = self.attention_masks((t, h, w), x.device)
        padded = (tp, hp, wp) != (t, h, w)
        if padded:
            x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h, 0, tp - t))
        y = self.run_blocks(x, win, shift, masks)
        return y[:, :t, :h, :w].contiguous() if padded else y

    def attention_masks(self, size: Size3, device: torch.device) -> dict[bool, Tensor | None]:
        """Masks of the plain (False) and shifted (True) blocks for a (T, H, W) input. They depend
        on the size alone, so a network whose layers share it builds them once. Empty without blocks."""
        if not self.blocks:
            return {}
        win, shift = effective_window(size, self.window)
        padded = padded_size(size, win)
        valid = None
        if padded != tuple(size):
            valid = torch.zeros(padded, dtype=torch.bool, device=device)
            valid[: size[0], : size[1], : size[2]] = True
        return block_masks(padded, win, shift, valid, device)

    def forward_padded(
        self, x: Tensor, valid: Tensor | None, win: Size3, shift: Size3
    ) -> Tensor:
        """Run the blocks on an already padded volume.

        x: (B, Tp, Hp, Wp, C) with each of Tp, Hp, Wp a multiple of `win`;
        valid: (Tp, Hp, Wp) bool, False where tokens are padding (None: all real).
        Exposed so tests can show that padded content never reaches real tokens.
        """
        size = tuple(x.shape[1:4])
        if any(s % w for s, w in zip(size, win)):
            raise ValueError(f"padded size {size} not a multiple of window {win}")
        masks = block_masks(size, win, shift, valid, x.device)  # type: ignore[arg-type]
        return self.run_blocks(x, win, shift, masks)

    def run_blocks(self, x: Tensor, win: Size3, shift: Size3, masks: dict[bool, Tensor | None]) -> Tensor:
        for blk in self.blocks:
            x = blk(x, win, shift, masks[blk.shifted])
        return x


def swsa_macs_split(
    dim: int,
    T: int,
    H: int,
    W: int,
    depth: int = 4,
    window: Size3 = (2, 8, 8),
    mlp_ratio: float = 2.0,
) -> tuple[int, int]:
    """(linear-layer, attention-matmul) multiply-accumulates of one SWSA forward on (1, T, H, W, dim).

    Counted over the padded volume (padding is computed, so it is paid for); norms, softmax,
    GELU, the gating product and bias additions are ignored. Kept apart because profilers do
    not see the fused attention kernel.
    """
    win, _ = effective_window((T, H, W), tuple(window))  # type: ignore[arg-type]
    tokens = math.prod(padded_size((T, H, W), win))
    hidden = int(dim * mlp_ratio)
    linear = 3 * dim * dim + dim * dim + 2 * dim * hidden + hidden * dim
    attn = 2 * math.prod(win) * dim  # QK^T and AV per query token
    return depth * tokens * linear, depth * tokens * attn
