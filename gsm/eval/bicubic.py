"""The bicubic baseline: MATLAB ``imresize(im2double(lr), scale, 'bicubic')``, written as uint8.

Papers list "Bicubic" as the floor every VSR method must beat, computed with MATLAB; a different
cubic (OpenCV's a = -0.75) or border rule shifts it by tenths of a dB. MATLAB's ``contributions()``
when enlarging: the plain Keys cubic (a = -0.5, support [-2, 2]; no antialiasing stretch, which
applies only when shrinking); output pixel u (1-based) sits at input coordinate
u / scale + (1 - 1 / scale) / 2; taps beyond the edge mirror symmetrically (``[1..n, n..1]``,
edge pixel repeated); each row of weights is normalised to sum 1. As for the BI frames
(``gsm.data.degrade.imresize_double``, reused here), the resize runs in double precision and is
rounded once at the end.
"""

from __future__ import annotations

import numpy as np

from gsm.data.degrade import imresize_double
from gsm.eval.metrics import check_frame


def bicubic_upsample(img: np.ndarray, scale: int = 4) -> np.ndarray:
    """H x W x 3 uint8 -> (scale H) x (scale W) x 3 uint8, as MATLAB ``imresize(im2double(img), scale, 'bicubic')``."""
    check_frame(img, "LR frame")
    return imresize_double(img, scale, enlarge=True)


__all__ = ["bicubic_upsample"]
