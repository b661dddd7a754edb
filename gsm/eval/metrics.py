"""PSNR and SSIM exactly as the VSR field reports them (BasicSR / MATLAB conventions, SPEC 4).

Inputs are H x W x 3 uint8 RGB frames; everything is computed in float64 with peak 255.

* ``y_channel``: ITU-R BT.601 luma on the 0-255 scale, Y = 16 + 65.481 R + 128.553 G + 24.966 B
  with R, G, B in [0, 1]. It is *not* rounded (BasicSR keeps it as float before scoring).
* ``crop_border``: that many pixels are dropped on every side before scoring.
* PSNR = 10 log10(255^2 / MSE), MSE over all pixels and channels. Identical images give ``inf``
  (the mathematical value; averaging it stays ``inf``, which flags a degenerate test).
* SSIM: MATLAB ``ssim_index`` style, an 11 x 11 Gaussian window (sigma 1.5) applied 'valid' (only
  where the window fits, i.e. 5 pixels trimmed per side), C1 = (0.01 * 255)^2,
  C2 = (0.03 * 255)^2, population (not sample) covariances; for RGB the mean over channels of the
  per-channel SSIM.
"""

from __future__ import annotations

import cv2
import numpy as np

PEAK = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
C1 = (0.01 * PEAK) ** 2
C2 = (0.03 * PEAK) ** 2
Y_WEIGHTS = np.array([65.481, 128.553, 24.966])  # for R, G, B in [0, 1]


def check_frame(img: object, name: str) -> np.ndarray:
    """`img` if it is an H x W x 3 uint8 array, else a one-line ValueError naming `name`."""
    if not isinstance(img, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 pixels, got {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name}: expected an H x W x 3 RGB image, got shape {img.shape}")
    return img


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB -> H x W float64 luma on the 0-255 scale (16..235), unrounded."""
    check_frame(img, "image")
    return img.astype(np.float64) @ (Y_WEIGHTS / PEAK) + 16.0


def _prepare(a: np.ndarray, b: np.ndarray, crop_border: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validated, cropped float64 H x W x C copies (C = 1 for Y, 3 for RGB)."""
    check_frame(a, "first image")
    check_frame(b, "second image")
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    if isinstance(crop_border, bool) or not isinstance(crop_border, (int, np.integer)) or crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative integer, got {crop_border!r}")
    h, w = a.shape[:2]
    if 2 * crop_border >= min(h, w):
        raise ValueError(f"crop_border {crop_border} leaves nothing of a {w}x{h} image")
    if y_channel:
        x, y = rgb_to_y(a)[..., None], rgb_to_y(b)[..., None]
    else:
        x, y = a.astype(np.float64), b.astype(np.float64)
    if crop_border:
        c = crop_border
        x, y = x[c:-c, c:-c], y[c:-c, c:-c]
    return x, y


def psnr(a: np.ndarray, b: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """Peak signal-to-noise ratio in dB (peak 255); ``inf`` for identical images."""
    x, y = _prepare(a, b, crop_border, y_channel)
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(PEAK**2 / mse))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """1-D factor of MATLAB's ``fspecial('gaussian', size, sigma)`` (the 2-D window is its outer product)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """'Valid' correlation of H x W x C float64 `x` with the separable window g x g.

    OpenCV filters in float64 (about 7x faster than shifted numpy sums, equal to 1e-13); the
    border rule it needs is irrelevant because the border-affected margin is cropped off.
    """
    r = g.size // 2
    out = cv2.sepFilter2D(x, cv2.CV_64F, g, g, borderType=cv2.BORDER_REFLECT)
    return out.reshape(x.shape)[r:-r, r:-r]


def ssim(a: np.ndarray, b: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """Structural similarity, MATLAB style (Gaussian 11 x 11, sigma 1.5, valid region, channel mean)."""
    x, y = _prepare(a, b, crop_border, y_channel)
    if min(x.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {x.shape[1]}x{x.shape[0]}")
    g = gaussian_window()
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = _filter_valid(x * x, g) - mu_xx
    var_y = _filter_valid(y * y, g) - mu_yy
    cov = _filter_valid(x * y, g) - mu_xy
    ssim_map = ((2 * mu_xy + C1) * (2 * cov + C2)) / ((mu_xx + mu_yy + C1) * (var_x + var_y + C2))
    # every channel's map has the same size, so the overall mean is the mean of per-channel means
    return float(ssim_map.mean())


def psnr_ssim(a: np.ndarray, b: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> tuple[float, float]:
    """Both metrics of one frame pair (the evaluation loop's call)."""
    return psnr(a, b, crop_border, y_channel), ssim(a, b, crop_border, y_channel)


__all__ = ["check_frame", "gaussian_window", "psnr", "psnr_ssim", "rgb_to_y", "ssim"]
