"""Charbonnier loss, as the BasicVSR family (and the paper) train with it."""

from __future__ import annotations

import torch
from torch import Tensor


def charbonnier(pred: Tensor, target: Tensor, eps: float = 1e-12) -> Tensor:
    """mean(sqrt((pred - target)^2 + eps)), computed in float32.

    `eps` is added inside the square root as is (BasicSR's CharbonnierLoss convention, eps=1e-12),
    not squared: at pred == target each element contributes sqrt(eps) = 1e-6.
    """
    if pred.shape != target.shape:
        raise ValueError(f"charbonnier: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    diff = pred.float() - target.float()
    return torch.sqrt(diff * diff + eps).mean()
