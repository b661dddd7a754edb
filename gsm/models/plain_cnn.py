"""The simple thing a VSR architecture must beat: a plain 3-frame residual CNN (no flow, no attention).

Each output frame is predicted from its LR frame and the two neighbours (edge frames repeated),
stacked on channels, through a few residual blocks and a x4 pixel shuffle, added to the bilinear
upscaling of the centre frame. It is a benchmark baseline (benchmarks/plain_cnn.py), trained by
the same trainer on the same data for the same wall-clock as the quickstart GSM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsm.models.blocks import ResBlock


@dataclass(frozen=True)
class PlainCNNConfig:
    channels: int = 32
    blocks: int = 6
    frames: int = 3  # odd: the frame and (frames - 1) / 2 neighbours on each side
    scale: int = 4

    def __post_init__(self) -> None:
        if self.frames < 1 or self.frames % 2 == 0:
            raise ValueError(f"frames must be a positive odd number, got {self.frames}")
        for name in ("channels", "blocks", "scale"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PlainCNN(nn.Module):
    def __init__(self, cfg: PlainCNNConfig = PlainCNNConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.channels
        self.head = nn.Conv2d(3 * cfg.frames, c, 3, padding=1)
        self.body = nn.Sequential(*(ResBlock(c) for _ in range(cfg.blocks)))
        self.tail = nn.Conv2d(c, 3 * cfg.scale**2, 3, padding=1)

    def forward(self, lqs: Tensor) -> Tensor:
        """(B, T, 3, h, w) in [0, 1] -> (B, T, 3, scale h, scale w), as GSMamba."""
        b, t, _, h, w = lqs.shape
        r = self.cfg.frames // 2
        index = (torch.arange(t)[:, None] + torch.arange(-r, r + 1)[None, :]).clamp(0, t - 1)  # (T, frames)
        stacks = lqs[:, index].reshape(b * t, 3 * self.cfg.frames, h, w)  # neighbours on channels
        feat = F.relu(self.head(stacks))
        feat = feat + self.body(feat)
        res = F.pixel_shuffle(self.tail(feat), self.cfg.scale)
        base = F.interpolate(lqs.reshape(b * t, 3, h, w), scale_factor=self.cfg.scale, mode="bilinear",
                             align_corners=False)  # fmt: skip
        return (base + res).view(b, t, 3, h * self.cfg.scale, w * self.cfg.scale)


__all__ = ["PlainCNN", "PlainCNNConfig"]
