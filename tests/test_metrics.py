"""PSNR/SSIM against hand arithmetic and scikit-image; the MATLAB bicubic baseline against a literal,
one-pixel-at-a-time re-derivation of imresize's enlarging formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from gsm.data.degrade import imresize_taps
from gsm.eval.bicubic import bicubic_upsample
from gsm.eval.metrics import gaussian_window, psnr, rgb_to_y, ssim
from matlab_reference import matlab_cubic


def _pair(seed: int, h: int = 40, w: int = 52, noise: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-noise, noise + 1, a.shape), 0, 255).astype(np.uint8)
    return a, b


# --------------------------------------------------------------------------------------------------
# PSNR


def test_identical_images_give_inf_psnr_and_unit_ssim() -> None:
    a, _ = _pair(0)
    assert psnr(a, a) == math.inf
    assert psnr(a, a, y_channel=True) == math.inf
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_a_known_mse() -> None:
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[0, 0, 0] = 110  # one error of 10 among 192 values: MSE = 100 / 192
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 * 192 / 100), abs=1e-12)
    c = a + np.uint8(1)  # MSE 1 -> 20 log10(255) = 48.1308...
    assert psnr(a, c) == pytest.approx(48.13080360867909, abs=1e-9)


def test_y_channel_of_known_pixels() -> None:
    img = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0], [51, 102, 204]]], np.uint8)
    y = rgb_to_y(img)[0]
    expected = [16 + 65.481, 16 + 128.553, 16 + 24.966, 235.0, 16.0, 16 + 0.2 * 65.481 + 0.4 * 128.553 + 0.8 * 24.966]
    np.testing.assert_allclose(y, expected, atol=1e-9)
    # Y PSNR of a uniform +1 on every channel: Y moves by (65.481 + 128.553 + 24.966) / 255 = 219/255
    a = np.full((8, 8, 3), 100, np.uint8)
    assert psnr(a, a + np.uint8(1), y_channel=True) == pytest.approx(20 * math.log10(255 / (219 / 255)), abs=1e-9)


def test_crop_border_ignores_the_edges() -> None:
    a = np.full((20, 24, 3), 50, np.uint8)
    b = a.copy()
    b[:2], b[:, -2:] = 0, 255  # damage only a 2-pixel frame (top rows and right columns)
    assert psnr(a, b) < 20
    assert psnr(a, b, crop_border=2) == math.inf
    b[2, 2, 1] = 60  # one error of 10 inside the 16 x 20 x 3 cropped region
    assert psnr(a, b, crop_border=2) == pytest.approx(10 * math.log10(255**2 * 16 * 20 * 3 / 100), abs=1e-9)
    assert ssim(a, b, crop_border=2) < 1.0


@pytest.mark.parametrize("seed", [1, 2])
def test_psnr_agrees_with_skimage(seed: int) -> None:
    a, b = _pair(seed)
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-6)
    ya, yb = rgb_to_y(a), rgb_to_y(b)
    assert psnr(a, b, y_channel=True) == pytest.approx(peak_signal_noise_ratio(ya, yb, data_range=255), abs=1e-6)
    assert psnr(a, b, crop_border=3) == pytest.approx(
        peak_signal_noise_ratio(a[3:-3, 3:-3], b[3:-3, 3:-3], data_range=255), abs=1e-6
    )


# --------------------------------------------------------------------------------------------------
# SSIM


def test_gaussian_window_is_matlabs_fspecial() -> None:
    g = gaussian_window()
    assert g.shape == (11,)
    assert g.sum() == pytest.approx(1.0, abs=1e-15)
    assert g[5] / g[4] == pytest.approx(math.exp(1 / (2 * 1.5**2)), rel=1e-12)
    assert g[5] / g[0] == pytest.approx(math.exp(25 / (2 * 1.5**2)), rel=1e-12)


@pytest.mark.parametrize("seed", [3, 4])
def test_ssim_agrees_with_skimage(seed: int) -> None:
    """skimage with sigma 1.5 uses an 11-wide window (radius int(3.5 * 1.5 + 0.5) = 5), filters the
    whole image with reflected borders, then averages only the region 5 pixels in from every edge:
    exactly the 'valid' region, so the two must agree."""
    a, b = _pair(seed, 37, 45, noise=40)
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    ref_rgb = structural_similarity(a, b, channel_axis=2, **kw)
    assert ssim(a, b) == pytest.approx(ref_rgb, abs=1e-4)
    per_channel = [structural_similarity(a[..., c], b[..., c], **kw) for c in range(3)]
    assert ssim(a, b) == pytest.approx(np.mean(per_channel), abs=1e-10)
    ref_y = structural_similarity(rgb_to_y(a), rgb_to_y(b), **kw)
    assert ssim(a, b, y_channel=True) == pytest.approx(ref_y, abs=1e-4)
    ref_crop = structural_similarity(rgb_to_y(a)[4:-4, 4:-4], rgb_to_y(b)[4:-4, 4:-4], **kw)
    assert ssim(a, b, crop_border=4, y_channel=True) == pytest.approx(ref_crop, abs=1e-4)


def test_ssim_of_a_constant_pair_by_hand() -> None:
    """Flat images: variances vanish, SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)."""
    a, b = np.full((11, 11, 3), 100, np.uint8), np.full((11, 11, 3), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1), abs=1e-12)


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.zeros((16, 16, 3), np.uint8), np.zeros((16, 17, 3), np.uint8), "shapes differ"),
        (np.zeros((16, 16, 3), np.float32), np.zeros((16, 16, 3), np.float32), "uint8"),
        (np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8), "H x W x 3"),
        (np.zeros((16, 16, 4), np.uint8), np.zeros((16, 16, 4), np.uint8), "H x W x 3"),
        ([[1]], [[1]], "numpy array"),
    ],
)
def test_bad_inputs_fail_in_one_line(a: object, b: object, match: str) -> None:
    for fn in (psnr, ssim):
        with pytest.raises(ValueError, match=match) as exc:
            fn(a, b)  # type: ignore[arg-type]
        assert "\n" not in str(exc.value)


def test_bad_crop_and_tiny_images_fail() -> None:
    a = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="crop_border 5 leaves nothing"):
        psnr(a, a, crop_border=5)
    with pytest.raises(ValueError, match="crop_border must be"):
        psnr(a, a, crop_border=-1)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a, a)


# --------------------------------------------------------------------------------------------------
# Bicubic baseline: MATLAB imresize(img, scale, 'bicubic') enlarging, literally


def _ref_resize_axis(x: list[list[float]], scale: int) -> list[list[float]]:
    """Enlarge each row of x (a list of rows) by `scale`: MATLAB's formula, one output at a time,
    1-based coordinates, symmetric mirroring with the edge pixel repeated, weights normalised."""
    out = []
    for row in x:
        n = len(row)
        res = []
        for j in range(1, n * scale + 1):
            u = j / scale + 0.5 * (1 - 1 / scale)
            left = math.floor(u - 2)
            acc, total = 0.0, 0.0
            for p in range(6):
                i = left + p
                wgt = matlab_cubic(u - i)
                k = i  # mirror into 1..n: 0 -> 1, -1 -> 2, n+1 -> n, n+2 -> n-1
                while k < 1 or k > n:
                    k = 1 - k if k < 1 else 2 * n + 1 - k
                acc += wgt * row[k - 1]
                total += wgt
            res.append(acc / total)
        out.append(res)
    return out


def _ref_round(v: float) -> int:
    return int(min(255, max(0, math.floor(v + 0.5))))  # MATLAB's uint8(): half away from zero, saturate


def _ref_imresize_up(img: np.ndarray, scale: int) -> np.ndarray:
    """im2uint8(imresize(im2double(img), scale)): rows (dimension 1) first, double throughout."""
    h, w, c = img.shape
    out = np.zeros((h * scale, w * scale, c), np.uint8)
    for ch in range(c):
        cols = [[img[y, x, ch] / 255.0 for y in range(h)] for x in range(w)]  # each column as a row
        mid = _ref_resize_axis(cols, scale)  # w x (h*s)
        rows = [[mid[x][y] for x in range(w)] for y in range(h * scale)]
        res = _ref_resize_axis(rows, scale)
        out[:, :, ch] = np.array([[_ref_round(v * 255.0) for v in r] for r in res])
    return out


@pytest.mark.parametrize(("h", "w", "scale"), [(5, 7, 4), (1, 3, 4), (6, 4, 2), (4, 4, 3)])
def test_bicubic_upsample_matches_literal_matlab(h: int, w: int, scale: int) -> None:
    rng = np.random.default_rng(h * 100 + w)
    img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    img[0, 0] = (0, 255, 0)  # extremes: the cubic's overshoot must saturate, not wrap
    img[-1, -1] = (255, 0, 255)
    out = bicubic_upsample(img, scale)
    assert out.shape == (h * scale, w * scale, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _ref_imresize_up(img, scale))


def test_bicubic_upsample_keeps_constants_and_ramps() -> None:
    flat = np.full((6, 9, 3), 77, np.uint8)
    np.testing.assert_array_equal(bicubic_upsample(flat), np.full((24, 36, 3), 77, np.uint8))
    # Keys' cubic reproduces linear functions exactly away from the mirrored borders
    ramp = np.repeat((np.arange(12) * 8)[None, :, None], 3, axis=2).repeat(4, axis=0).astype(np.uint8)
    row = bicubic_upsample(ramp)[0, :, 0].astype(float)
    u = np.arange(1, 49) / 4 + 0.375  # 1-based input coordinate of each output pixel
    interior = (u >= 3) & (u <= 10)
    np.testing.assert_array_equal(row[interior], (u[interior] - 1) * 8)


def test_upscale_taps_shape_and_normalisation() -> None:
    w, idx = imresize_taps(5, 4, enlarge=True)
    assert w.shape == idx.shape == (20, 4)  # zero-weight tap columns dropped: 4 taps when enlarging
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert idx.min() == 0 and idx.max() == 4
    # output pixel 1 sits at input 0.625: taps at -1, 0, 1, 2 (1-based) mirror to 2, 1, 1, 2
    np.testing.assert_array_equal(idx[0], [1, 0, 0, 1])
    with pytest.raises(ValueError, match="scale must be a positive integer"):
        imresize_taps(5, 0, enlarge=True)
