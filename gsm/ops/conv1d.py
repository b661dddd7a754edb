"""Depthwise causal 1-D convolution, Mamba's short-range mixer before the scan.

CUDA tensors use causal-conv1d's fused kernel when it is installed (the `cuda` extra); every
other case uses PyTorch's conv1d, which is exact and fast enough on CPU.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from gsm.ops.backend import causal_conv1d_available


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None = "silu",
                  impl: str = "auto") -> Tensor:
    """x: (B, D, L); weight: (D, W); bias: (D,). Output (B, D, L); y_t sees x_{t-W+1..t} only."""
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    use_cuda = x.is_cuda and impl in ("auto", "cuda") and causal_conv1d_available()
    if use_cuda:
        from causal_conv1d import causal_conv1d_fn

        return causal_conv1d_fn(x.contiguous(), weight, bias, activation=activation)
    width = weight.shape[-1]
    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(y) if activation == "silu" else y
