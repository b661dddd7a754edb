"""BI/BD degradations against literal re-derivations and hand arithmetic; the tree stage's resume,
parallelism and error reporting."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from gsm.data.degrade import (
    MARKER,
    DegradeSummary,
    bicubic_downsample,
    imresize_taps,
    blur_downsample,
    degrade_tree,
    gaussian_kernel,
)
from gsm.data.images import read_image, write_png
from matlab_reference import matlab_cubic

# ----------------------------------------------------------------------------------------------
# Literal MATLAB imresize, one output pixel at a time (independent of the vectorised code)


def _ref_contributions(in_length: int, out_length: int, scale: float) -> tuple[list, list]:
    """MATLAB's contributions(), antialiased, with 1-based indices, step by step."""
    kernel_width = 4.0 / scale  # h(x) = scale * cubic(scale * x)
    p_taps = math.ceil(kernel_width) + 2
    aux = list(range(1, in_length + 1)) + list(range(in_length, 0, -1))
    weights, indices = [], []
    for x in range(1, out_length + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - kernel_width / 2)
        row_idx = [left + j for j in range(p_taps)]
        row_w = [scale * matlab_cubic(scale * (u - i)) for i in row_idx]
        total = sum(row_w)
        weights.append([w / total for w in row_w])
        indices.append([aux[(i - 1) % len(aux)] for i in row_idx])
    alive = [j for j in range(p_taps) if any(row[j] != 0 for row in weights)]
    weights = [[row[j] for j in alive] for row in weights]
    indices = [[row[j] for j in alive] for row in indices]
    return weights, indices


def _ref_to_uint8(v: float) -> int:
    r = math.floor(v + 0.5) if v >= 0 else math.ceil(v - 0.5)
    return min(255, max(0, r))


def _ref_imresize(img: np.ndarray, scale: int, uint8_path: bool = False) -> np.ndarray:
    """im2uint8(imresize(im2double(img), 1/scale, 'bicubic')): dim 1 then dim 2 in double, one
    rounding at the end. With uint8_path, MATLAB's imresize on the uint8 image instead: each
    pass casts back to uint8 (what no benchmark's LR was made with)."""
    h, w = img.shape[0] - img.shape[0] % scale, img.shape[1] - img.shape[1] % scale
    cur = img[:h, :w].astype(np.float64)
    if not uint8_path:
        cur = cur / 255.0
    if cur.ndim == 2:
        cur = cur[:, :, None]
    for dim in (0, 1):
        n_in = cur.shape[dim]
        n_out = math.ceil(n_in / scale)
        wts, idx = _ref_contributions(n_in, n_out, 1 / scale)
        shape = list(cur.shape)
        shape[dim] = n_out
        nxt = np.zeros(shape)
        for k in range(n_out):
            for a in range(cur.shape[1 - dim]):
                for c in range(cur.shape[2]):
                    acc = 0.0
                    for wt, i in zip(wts[k], idx[k]):
                        acc += wt * (cur[i - 1, a, c] if dim == 0 else cur[a, i - 1, c])
                    if uint8_path:
                        acc = _ref_to_uint8(acc)
                    if dim == 0:
                        nxt[k, a, c] = acc
                    else:
                        nxt[a, k, c] = acc
        cur = nxt
    if not uint8_path:
        cur = cur * 255.0
    out = np.vectorize(_ref_to_uint8)(cur).astype(np.uint8)
    return out if img.ndim == 3 else out[:, :, 0]


def _smooth(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = [
        127.5
        + 120 * np.sin(x / rng.uniform(3, 9) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(3, 9))
        for _ in range(c)
    ]
    return np.clip(np.round(np.stack(chans, axis=2)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# BI


@pytest.mark.parametrize("h,w", [(17, 23), (21, 9), (36, 28), (13, 45), (8, 8)])
@pytest.mark.parametrize("kind", ["random", "smooth"])
def test_bi_matches_literal_matlab(h: int, w: int, kind: str) -> None:
    rng = np.random.default_rng(h * 100 + w)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if kind == "random" else _smooth(h, w)
    ours = bicubic_downsample(img, 4)
    ref = _ref_imresize(img, 4)
    assert ours.shape == ref.shape == (h // 4, w // 4, 3)
    assert ours.dtype == np.uint8
    assert int(np.abs(ours.astype(int) - ref).max()) == 0


def test_bi_keeps_the_overshoot_of_the_first_pass() -> None:
    # A bright 8 x 2 bar on black. The row pass overshoots above 255 inside the bar and below 0
    # beside it; the double path carries both into the column pass, MATLAB's uint8 path clips them
    # first. Where that was (the old code's path), pixels differed by 9 levels, and by 3 at dark ones.
    img = np.zeros((16, 16, 3), np.uint8)
    img[2:10, 4:6] = 255
    ours = bicubic_downsample(img)
    assert np.array_equal(ours, _ref_imresize(img, 4))
    assert ours[1, :2, 0].tolist() == [30, 117]
    uint8_path = _ref_imresize(img, 4, uint8_path=True)
    assert uint8_path[1, :2, 0].tolist() == [27, 108]


def test_bi_other_scales_match_literal() -> None:
    img = np.random.default_rng(5).integers(0, 256, (19, 14), dtype=np.uint8)
    for scale in (2, 3):
        ours = bicubic_downsample(img, scale)
        assert ours.shape == (19 // scale, 14 // scale)
        assert np.array_equal(ours, _ref_imresize(img, scale))


def test_bi_weights_by_hand() -> None:
    # scale 4: h(d) = cubic(d / 4) / 4 at tap distances d = 0.5, 1.5, ..., 7.5 (|d/4| < 2).
    # cubic(0.125) = 1.5*0.001953125 - 2.5*0.015625 + 1 = 0.9638671875, / 4 = 0.240966796875
    # cubic(0.375) = 0.7275390625 -> 0.181884765625;  cubic(0.625) = 0.3896484375 -> 0.097412109375
    # cubic(0.875) = 0.0908203125 -> 0.022705078125
    # cubic(1.125) = -0.5*1.423828125 + 2.5*1.265625 - 4.5 + 2 = -0.0478515625 -> -0.011962890625
    # cubic(1.375) = -0.0732421875 -> -0.018310546875
    # cubic(1.625) = -0.0439453125 -> -0.010986328125
    # cubic(1.875) = -0.0068359375 -> -0.001708984375
    # One side sums to 0.5, so the raw weights are already normalised.
    side = [0.240966796875, 0.181884765625, 0.097412109375, 0.022705078125,
            -0.011962890625, -0.018310546875, -0.010986328125, -0.001708984375]  # fmt: skip
    expected = np.array(side[::-1] + side)
    weights, indices = imresize_taps(64, 4)
    assert weights.shape == indices.shape == (16, 16)
    # Interior output j (0-based) is centred at input 4j + 1.5: taps 4j - 6 .. 4j + 9.
    assert np.array_equal(weights[8], expected)
    assert np.array_equal(indices[8], np.arange(26, 42))
    # Border: output 0 taps -6..9 (0-based) mirror as 5,4,3,2,1,0,0,1,... ([1..n, n..1]).
    assert indices[0].tolist() == [5, 4, 3, 2, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_bi_tiny_case_by_hand() -> None:
    # 8x8, every row [200, 100, 100, ...]: the row pass (dim 1) leaves columns unchanged exactly.
    # Output column 0 is centred at 1.5 (0-based); input column 0 is reached by the taps at
    # distance 1.5 and, mirrored from index -1, 2.5: w = 0.181884765625 + 0.097412109375
    # = 0.279296875, so 100 + 100 * 0.279296875 = 127.9296875 -> 128.
    # Output column 1 (centre 5.5) reaches column 0 at distances 5.5 and 6.5 (mirrored):
    # w = -0.018310546875 - 0.010986328125 = -0.029296875 -> 100 - 2.9296875 = 97.0703125 -> 97.
    img = np.full((8, 8, 3), 100, np.uint8)
    img[:, 0] = 200
    out = bicubic_downsample(img)
    assert out.shape == (2, 2, 3)
    assert (out[:, 0] == 128).all() and (out[:, 1] == 97).all()


def test_bi_properties() -> None:
    const = np.full((37, 50, 3), 173, np.uint8)
    assert (bicubic_downsample(const) == 173).all()

    small = _smooth(24, 30, seed=3)
    big = np.kron(small, np.ones((4, 4, 1), np.uint8))
    diff = np.abs(bicubic_downsample(big).astype(int) - small)
    assert diff.max() <= 3 and diff.mean() < 0.6

    # Ramp v(x) = 2x: output j is centred at 4j + 1.5 and the symmetric, normalised kernel
    # reproduces linear functions, so the interior is 8j + 3 (an integer: no rounding tie).
    ramp = np.tile(2 * np.arange(120, dtype=np.uint8), (12, 1))
    out = bicubic_downsample(ramp)
    assert out.shape == (3, 30) and out.dtype == np.uint8
    assert np.array_equal(out[:, 2:-2], np.tile(8 * np.arange(2, 28) + 3, (3, 1)))

    gray = np.random.default_rng(1).integers(0, 256, (22, 31), dtype=np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    expected = np.repeat(bicubic_downsample(gray)[:, :, None], 3, axis=2)
    assert np.array_equal(bicubic_downsample(rgb), expected)


def test_bad_arrays_rejected() -> None:
    with pytest.raises(ValueError):
        bicubic_downsample(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError):
        bicubic_downsample(np.zeros((3, 8, 3), np.uint8))
    with pytest.raises(ValueError):
        blur_downsample(np.zeros((8, 8, 3), np.uint8), scale=3)


# ----------------------------------------------------------------------------------------------
# BD


def _ref_bd(img: np.ndarray, scale: int = 4, sigma: float = 1.6) -> np.ndarray:
    """fspecial('gaussian', 12, sigma) as a 2-D table, imfilter(.., 'replicate') by literal
    correlation (origin at 1-based floor((12+1)/2) = 6), then img(2:4:end-2, 2:4:end-2)."""
    size = math.ceil(3 * sigma) * 2 + 2
    half = (size - 1) / 2
    kern = np.zeros((size, size))
    for r in range(size):
        for c in range(size):
            kern[r, c] = math.exp(-((r - half) ** 2 + (c - half) ** 2) / (2 * sigma**2))
    kern /= kern.sum()
    origin = (size + 1) // 2  # 1-based
    h, w = img.shape[0] - img.shape[0] % scale, img.shape[1] - img.shape[1] % scale
    src = img[:h, :w].astype(np.float64)
    out = np.zeros((h // scale, w // scale, src.shape[2]))
    for oy, y in enumerate(range(scale // 2 - 1, h, scale)):
        for ox, x in enumerate(range(scale // 2 - 1, w, scale)):
            for r in range(size):
                for c in range(size):
                    yy = min(h - 1, max(0, y + r - (origin - 1)))
                    xx = min(w - 1, max(0, x + c - (origin - 1)))
                    out[oy, ox] += kern[r, c] * src[yy, xx]
    return np.vectorize(_ref_to_uint8)(out).astype(np.uint8)


def test_bd_kernel() -> None:
    g = gaussian_kernel(1.6)
    assert g.shape == (12,)
    assert math.isclose(g.sum(), 1.0, abs_tol=1e-15)
    assert np.allclose(g, g[::-1], rtol=0, atol=0)
    # Taps sit at -5.5 .. 5.5: the ratio of neighbours is exp(-(x1^2 - x0^2) / (2 sigma^2)).
    assert math.isclose(g[6] / g[7], math.exp((1.5**2 - 0.5**2) / (2 * 1.6**2)))
    assert g.argmax() in (5, 6) and g[5] == g[6]


def test_bd_impulse_and_random_match_literal_convolution() -> None:
    img = np.zeros((48, 40, 3), np.uint8)
    img[22, 18] = 255
    ours = blur_downsample(img)
    ref = _ref_bd(img)
    assert ours.shape == (12, 10, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, ref)
    # Kept row 21 (j = 5) sees row 22 through tap 22 - 21 + 5 = 6; kept column 17 (j = 4)
    # sees column 18 through tap 6 as well.
    g = gaussian_kernel(1.6)
    assert ours[5, 4, 0] == round(255 * g[6] * g[6])
    assert ours[4, 4, 0] == round(255 * g[10] * g[6])  # kept row 17: tap 22 - 17 + 5 = 10
    assert ours[:, :, 0].sum() > 0 and (ours[0] == 0).all()  # far rows are untouched

    rng = np.random.default_rng(7)
    for h, w in [(23, 17), (16, 30)]:
        rand = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert int(np.abs(blur_downsample(rand).astype(int) - _ref_bd(rand)).max()) == 0


def test_bd_properties() -> None:
    assert (blur_downsample(np.full((29, 41, 3), 91, np.uint8)) == 91).all()
    out = blur_downsample(np.zeros((30, 42), np.uint8))
    assert out.shape == (7, 10) and out.dtype == np.uint8


# ----------------------------------------------------------------------------------------------
# The tree stage


def _make_tree(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    frames = {}
    for rel in ["000/00000000", "000/00000001", "000/00000002", "001/00000000", "001/00000001",
                "00001/0001/im1", "00001/0001/im2", "00001/0002/im1"]:  # fmt: skip
        img = rng.integers(0, 256, (26, 34, 3), dtype=np.uint8)  # not a multiple of 4: cropped
        write_png(root / f"{rel}.png", img)
        frames[rel] = img
    return frames


def _tree_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_tree_layout_and_values(tmp_path: Path) -> None:
    frames = _make_tree(tmp_path / "gt")
    summary = degrade_tree(tmp_path / "gt", tmp_path / "lr", "BI", workers=1, progress=False)
    assert summary == DegradeSummary(clips_done=4, clips_skipped=0, frames_written=8)
    for rel, img in frames.items():
        lr = read_image(tmp_path / "lr" / f"{rel}.png")
        assert lr.shape == (6, 8, 3)
        assert np.array_equal(lr, bicubic_downsample(img))
    for clip in ["000", "001", "00001/0001", "00001/0002"]:
        assert (tmp_path / "lr" / clip / MARKER).is_file()
    assert not (tmp_path / "lr" / "00001" / MARKER).exists()
    assert not list((tmp_path / "lr").rglob("*.tmp"))


def test_tree_resume_and_parallel_identical(tmp_path: Path) -> None:
    _make_tree(tmp_path / "gt")
    gt, lr = tmp_path / "gt", tmp_path / "lr"
    degrade_tree(gt, lr, "BI", workers=1, progress=False)
    fresh = _tree_bytes(lr)

    (lr / "001" / MARKER).unlink()
    (lr / "001" / "00000001.png").unlink()
    summary = degrade_tree(gt, lr, "BI", workers=1, progress=False)
    assert summary == DegradeSummary(clips_done=1, clips_skipped=3, frames_written=2)
    assert _tree_bytes(lr) == fresh

    again = degrade_tree(gt, lr, "BI", workers=2, progress=False)
    assert again == DegradeSummary(clips_done=0, clips_skipped=4, frames_written=0)

    parallel = tmp_path / "lr2"
    summary = degrade_tree(gt, parallel, "BI", workers=2, progress=False)
    assert summary.frames_written == 8
    assert _tree_bytes(parallel) == fresh

    # A clip made by an older version of the code (its marker has no or another version) is redone,
    # even though its mode, scale and frame count match.
    (lr / "001" / MARKER).write_text("mode=BI scale=4 frames=2\n")
    (lr / "001" / "00000000.png").write_bytes((lr / "000" / "00000000.png").read_bytes())  # stale pixels
    summary = degrade_tree(gt, lr, "BI", workers=1, progress=False)
    assert summary == DegradeSummary(clips_done=1, clips_skipped=3, frames_written=2)
    assert _tree_bytes(lr) == fresh

    # A marker from another degradation does not count: BD into the same folder redoes all.
    summary = degrade_tree(gt, lr, "BD", workers=1, progress=False)
    assert summary == DegradeSummary(clips_done=4, clips_skipped=0, frames_written=8)
    img = read_image(gt / "000" / "00000002.png")
    assert np.array_equal(read_image(lr / "000" / "00000002.png"), blur_downsample(img))


def test_tree_16bit_and_gray_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    deep = rng.integers(0, 65536, (16, 20, 3), dtype=np.uint16)
    gray = rng.integers(0, 256, (16, 20), dtype=np.uint8)
    (tmp_path / "gt" / "a").mkdir(parents=True)
    assert cv2.imwrite(str(tmp_path / "gt" / "a" / "0.png"), deep)
    assert cv2.imwrite(str(tmp_path / "gt" / "a" / "1.png"), gray)
    degrade_tree(tmp_path / "gt", tmp_path / "lr", workers=1, progress=False)
    as8 = ((deep.astype(np.uint32) + 128) // 257).astype(np.uint8)[:, :, ::-1]  # BGR on disk
    assert np.array_equal(read_image(tmp_path / "lr" / "a" / "0.png"), bicubic_downsample(as8))
    expected_gray = np.repeat(bicubic_downsample(gray)[:, :, None], 3, axis=2)
    assert np.array_equal(read_image(tmp_path / "lr" / "a" / "1.png"), expected_gray)


def _one_line_error(excinfo: pytest.ExceptionInfo[ValueError], *needles: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg


def test_tree_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "gt" / "clip").mkdir(parents=True)
    with pytest.raises(ValueError) as excinfo:
        degrade_tree(tmp_path / "gt", tmp_path / "lr", progress=False)
    assert str(excinfo.value) == f"{tmp_path / 'gt'}: no PNG frames found"


def test_tree_mixed_sizes(tmp_path: Path) -> None:
    _make_tree(tmp_path / "gt")
    odd = tmp_path / "gt" / "001" / "00000001.png"
    write_png(odd, np.zeros((30, 34, 3), np.uint8))
    with pytest.raises(ValueError) as excinfo:
        degrade_tree(tmp_path / "gt", tmp_path / "lr", workers=1, progress=False)
    _one_line_error(excinfo, str(tmp_path / "gt" / "001"), str(odd), "34x30")
    assert not list(tmp_path.rglob(MARKER))  # validated before any work


@pytest.mark.parametrize("workers", [1, 2])
def test_tree_corrupt_frame(tmp_path: Path, workers: int) -> None:
    _make_tree(tmp_path / "gt")
    bad = tmp_path / "gt" / "001" / "00000001.png"
    data = bytearray(bad.read_bytes())
    data[60] ^= 0xFF  # inside IDAT: the header still reads, decoding fails in the worker
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError) as excinfo:
        degrade_tree(tmp_path / "gt", tmp_path / "lr", workers=workers, progress=False)
    _one_line_error(excinfo, str(bad), "cannot decode")
    assert not (tmp_path / "lr" / "001" / MARKER).exists()
    assert not list((tmp_path / "lr").rglob("*.tmp"))

    bad.write_bytes(b"not an image at all")  # caught while reading sizes, before any work
    shutil.rmtree(tmp_path / "lr")
    with pytest.raises(ValueError) as excinfo:
        degrade_tree(tmp_path / "gt", tmp_path / "lr", workers=workers, progress=False)
    _one_line_error(excinfo, str(bad))
    assert not (tmp_path / "lr").exists()


def test_tree_argument_checks(tmp_path: Path) -> None:
    _make_tree(tmp_path / "gt")
    with pytest.raises(ValueError):
        degrade_tree(tmp_path / "gt", tmp_path / "gt" / "lr", progress=False)
    with pytest.raises(ValueError):
        bad_mode: Any = "XX"
        degrade_tree(tmp_path / "gt", tmp_path / "lr", mode=bad_mode, progress=False)
    with pytest.raises(FileNotFoundError):
        degrade_tree(tmp_path / "missing", tmp_path / "lr", progress=False)
