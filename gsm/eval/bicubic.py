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
"""

from __future__ import annotations

import numpy as np

from gsm.data.degrade import apply_taps, imresize_taps, round_half_away
from gsm.eval.metrics import check_frame


def bicubic_upsample(img: np.ndarray, scale: int = 4) -> np.ndarray:
    """H x W x 3 uint8 -> (scale H) x (scale W) x 3 uint8, as MATLAB ``imresize(img, scale, 'bicubic')``."""
    check_frame(img, "LR frame")
    w_rows, i_rows = imresize_taps(img.shape[0], scale, enlarge=True)
    w_cols, i_cols = imresize_taps(img.shape[1], scale, enlarge=True)
    mid = round_half_away(apply_taps(img, 0, w_rows, i_rows))
    out = round_half_away(apply_taps(mid, 1, w_cols, i_cols))
    return np.ascontiguousarray(out.astype(np.uint8))


__all__ = ["bicubic_upsample"]
