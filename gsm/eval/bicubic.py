"""The bicubic baseline: MATLAB ``imresize(lr, scale, 'bicubic')`` upscaling on uint8 frames.

Papers list "Bicubic" as the floor every VSR method must beat, computed with MATLAB; a different
cubic (OpenCV's a = -0.75) or border rule shifts it by tenths of a dB. MATLAB's ``contributions()``
when enlarging: the plain Keys cubic (a = -0.5, support [-2, 2]; no antialiasing stretch, which
applies only when shrinking); output pixel u (1-based) sits at input coordinate
u / scale + (1 - 1 / scale) / 2; taps beyond the edge mirror symmetrically (``[1..n, n..1]``,
edge pixel repeated); each row of weights is normalised to sum 1. As in
``gsm.data.degrade.bicubic_downsample`` (whose kernel, tap application and MATLAB rounding are
reused here), rows are resized first and the intermediate is rounded to uint8, because MATLAB's
per-dimension pass preserves the uint8 class.

The upscaling taps could move into ``gsm.data.degrade`` beside the downscaling ones.
"""

from __future__ import annotations

import functools

import numpy as np

from gsm.data.degrade import _apply_taps, _cubic, _round_half_away
from gsm.eval.metrics import check_frame

KERNEL_WIDTH = 4  # the cubic's support, in input pixels, when not antialiasing


@functools.lru_cache(maxsize=64)
def upscale_taps(in_len: int, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights and 0-based input indices (in_len * scale x taps) of MATLAB's enlarging contributions().

    Cached: one pair per (frame size, scale); returned arrays are read-only.
    """
    if in_len < 1:
        raise ValueError(f"input length must be >= 1, got {in_len}")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    out_len = in_len * scale
    u = np.arange(1, out_len + 1, dtype=np.float64) / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - KERNEL_WIDTH / 2.0)
    idx = left[:, None] + np.arange(KERNEL_WIDTH + 2, dtype=np.float64)[None, :]
    weights = _cubic(u[:, None] - idx)
    weights = weights / weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    indices = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    keep = np.any(weights != 0, axis=0)
    weights, indices = weights[:, keep], indices[:, keep]
    weights.setflags(write=False)
    indices.setflags(write=False)
    return weights, indices


def bicubic_upsample(img: np.ndarray, scale: int = 4) -> np.ndarray:
    """H x W x 3 uint8 -> (scale H) x (scale W) x 3 uint8, as MATLAB ``imresize(img, scale, 'bicubic')``."""
    check_frame(img, "LR frame")
    w_rows, i_rows = upscale_taps(img.shape[0], scale)
    w_cols, i_cols = upscale_taps(img.shape[1], scale)
    mid = _round_half_away(_apply_taps(img, 0, w_rows, i_rows))
    out = _round_half_away(_apply_taps(mid, 1, w_cols, i_cols))
    return np.ascontiguousarray(out.astype(np.uint8))


__all__ = ["bicubic_upsample", "upscale_taps"]
