"""Layers shared by the networks."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ResBlock(nn.Module):
    """conv, (leaky) ReLU, conv, plus the input: the residual block without normalisation of
    EDSR / BasicVSR-family bodies. slope 0 is a plain ReLU."""

    def __init__(self, c: int, slope: float = 0.0) -> None:
        super().__init__()
        self.slope = slope
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.leaky_relu(self.conv1(x), self.slope))
