"""Low-resolution frame synthesis: the two degradations VSR papers report on, and the tree stage.

* **BI** reproduces how the field's BI sets were made in MATLAB: ``im2double`` ->
  ``imresize(img, 1/scale, 'bicubic')`` -> ``imwrite``. The resize runs in double precision and is
  rounded once, when written (BasicSR's generate_LR_Vimeo90K.m and generate_bicubic_img.m). MATLAB's
  uint8 path would round the intermediate after the first axis and clip away the cubic's negative
  lobes; no benchmark was made that way, and it differs by up to several grey levels at dark pixels
  beside bright edges.
* **BD** reproduces the BasicVSR/DUF MATLAB script: ``imfilter(img, fspecial('gaussian', 12, 1.6),
  'replicate')`` (computed in double, rounded once) followed by ``img(scale/2:scale:end-scale/2)``.

Frames whose size is not a multiple of ``scale`` are cropped at the bottom/right first, so that LR
and GT frames align exactly (the usual convention for these benchmarks).
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from tqdm import tqdm

from gsm.data.images import read_image, write_png
from gsm.io import atomic_write_text

Mode = Literal["BI", "BD"]

MARKER = ".complete"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _crop_to_multiple(img: np.ndarray, scale: int) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError("expected an H x W or H x W x C uint8 array")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    h, w = img.shape[:2]
    if h < scale or w < scale:
        raise ValueError(f"image {h}x{w} is smaller than the scale factor {scale}")
    return img[: h - h % scale, : w - w % scale]


def round_half_away(x: np.ndarray) -> np.ndarray:
    """MATLAB's float -> uint8 cast: round half away from zero, then saturate.

    ``floor(x + 0.5)`` would misround 0.49999999999999994; ``x - floor(x)`` is exact.
    """
    r = np.floor(x)
    r += (x - r) >= 0.5
    return np.clip(r, 0, 255)


def apply_taps(x: np.ndarray, axis: int, weights: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """out[i] = sum_p weights[i, p] * x[indices[i, p]] along ``axis``, accumulated tap by tap.

    A gather per tap rather than a dense matmul: a fixed summation order makes results
    independent of BLAS threading (so worker counts cannot change output bytes), and 16 taps
    cost far fewer flops than a 720 x 180 dense matrix.
    """
    xm = np.moveaxis(x, axis, 0)
    out = np.zeros((weights.shape[0],) + xm.shape[1:], np.float64)
    w = weights.reshape(weights.shape + (1,) * (xm.ndim - 1))
    for p in range(weights.shape[1]):
        out += w[:, p] * xm[indices[:, p]]
    return np.moveaxis(out, 0, axis)


# ----------------------------------------------------------------------------------------------
# BI: MATLAB imresize, bicubic, antialiased


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic with a = -0.5 (MATLAB's ``cubic``), support [-2, 2]."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return inner + outer


@functools.lru_cache(maxsize=64)
def imresize_taps(in_len: int, scale: int, enlarge: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Weights and 0-based input indices (out_len x taps) of MATLAB's ``contributions()``.

    Resizing by 1/``scale`` (or by ``scale`` when ``enlarge``): output pixel u (1-based) sits at
    input coordinate u/f + (1 - 1/f)/2 for the factor f. Shrinking stretches the kernel
    (antialiasing): h(x) = f * cubic(f * x), support 4/f; enlarging uses the plain cubic.
    Out-of-range taps mirror (``[1..n, n..1]`` periodic); rows are normalised to sum 1; all-zero
    tap columns are dropped. Cached: one pair per frame size.
    """
    if in_len < 1:
        raise ValueError(f"input length must be >= 1, got {in_len}")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    f = float(scale) if enlarge else 1.0 / scale
    k = min(f, 1.0)
    width = 4.0 / k
    out_len = math.ceil(in_len * f)
    u = np.arange(1, out_len + 1, dtype=np.float64) / f + 0.5 * (1.0 - 1.0 / f)
    left = np.floor(u - width / 2.0)
    n_taps = math.ceil(width) + 2
    idx = left[:, None] + np.arange(n_taps, dtype=np.float64)[None, :]
    weights = k * _cubic(k * (u[:, None] - idx))
    weights = weights / weights.sum(axis=1, keepdims=True)
    aux = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    indices = aux[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    keep = np.any(weights != 0, axis=0)
    weights, indices = weights[:, keep], indices[:, keep]
    weights.setflags(write=False)
    indices.setflags(write=False)
    return weights, indices


def imresize_double(img: np.ndarray, scale: int, enlarge: bool = False) -> np.ndarray:
    """MATLAB ``im2uint8(imresize(im2double(img), f, 'bicubic'))`` with f = 1/scale or scale.

    Rows (dimension 1) first, as MATLAB orders equal scales; float64 throughout, so the second
    pass sees the first one's overshoot; one round-half-up and saturation at the end (im2uint8).
    """
    w_rows, i_rows = imresize_taps(img.shape[0], scale, enlarge)
    w_cols, i_cols = imresize_taps(img.shape[1], scale, enlarge)
    x = img.astype(np.float64) / 255.0
    out = apply_taps(apply_taps(x, 0, w_rows, i_rows), 1, w_cols, i_cols)
    return np.ascontiguousarray(round_half_away(out * 255.0).astype(np.uint8))


def bicubic_downsample(img: np.ndarray, scale: int = 4) -> np.ndarray:
    """BI degradation of a uint8 frame, cropped to a multiple of ``scale`` first.

    Returns uint8 of shape (H // scale, W // scale[, C]); see ``imresize_double``.
    """
    return imresize_double(_crop_to_multiple(img, scale), scale)


# ----------------------------------------------------------------------------------------------
# BD: Gaussian blur + subsample (BasicVSR / DUF MATLAB script)


def gaussian_kernel(sigma: float = 1.6) -> np.ndarray:
    """1-D factor of ``fspecial('gaussian', ceil(3*sigma)*2 + 2, sigma)`` (12 taps for 1.6).

    The size is even, so the taps sit between pixels: x_k = k - (size - 1)/2 for k = 0..size-1
    (-5.5 .. 5.5), w_k = exp(-x_k^2 / (2 sigma^2)) normalised to sum 1. The 2-D fspecial kernel is
    exactly the outer product of this with itself; fspecial's eps-truncation never triggers for
    sigma >= 0.5 (smaller sigmas are rejected rather than silently differing).
    """
    if not sigma >= 0.5:
        raise ValueError(f"sigma must be >= 0.5, got {sigma}")
    size = math.ceil(3 * sigma) * 2 + 2
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


@functools.lru_cache(maxsize=64)
def _blur_taps(in_len: int, scale: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Taps of the blurred samples that survive subsampling only; no need to blur the rest.

    MATLAB's imfilter correlates with the kernel origin at 1-based floor((size+1)/2), i.e.
    0-based c = (size+1)//2 - 1 = 5 for 12 taps: out[i] = sum_k g[k] * in[i + k - c], with
    'replicate' clamping. Kept samples: 0-based i = scale/2 - 1 + scale*j (1, 5, 9, ... for x4).
    """
    g = gaussian_kernel(sigma)
    size = g.size
    origin = (size + 1) // 2 - 1
    centres = np.arange(scale // 2 - 1, in_len, scale)
    indices = np.clip(centres[:, None] + np.arange(size)[None, :] - origin, 0, in_len - 1)
    weights = np.broadcast_to(g, indices.shape).copy()
    weights.setflags(write=False)
    indices.setflags(write=False)
    return weights, indices


def blur_downsample(img: np.ndarray, scale: int = 4, sigma: float = 1.6) -> np.ndarray:
    """BD degradation: Gaussian blur (sigma, 12 taps, replicate border) then every scale-th pixel.

    Blurring is separable and done in float64 on the uint8 values, rounded once at the end as
    MATLAB's imfilter does. Kept pixels are 0-based 1, 5, 9, ... for scale 4 (MATLAB's
    ``scale/2:scale:end-scale/2``), which is why only even scales are accepted.
    """
    if scale < 2 or scale % 2:
        raise ValueError(f"BD needs an even scale factor, got {scale}")
    img = _crop_to_multiple(img, scale)
    w_rows, i_rows = _blur_taps(img.shape[0], scale, float(sigma))
    w_cols, i_cols = _blur_taps(img.shape[1], scale, float(sigma))
    out = apply_taps(apply_taps(img, 0, w_rows, i_rows), 1, w_cols, i_cols)
    return np.ascontiguousarray(round_half_away(out).astype(np.uint8))


DEGRADATIONS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "BI": bicubic_downsample,
    "BD": blur_downsample,
}


# ----------------------------------------------------------------------------------------------
# The tree stage


@dataclass(frozen=True)
class DegradeSummary:
    """Counts for the caller's log line; rerunning a finished tree reports frames_written == 0."""

    clips_done: int
    clips_skipped: int
    frames_written: int


def _frame_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header, so validating a REDS-sized tree stays cheap.

    Files that are not PNG-shaped are decoded in full, which raises the one-line ValueError.
    """
    with path.open("rb") as fh:
        head = fh.read(24)
    if len(head) == 24 and head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    img = read_image(path)
    return img.shape[1], img.shape[0]


def _list_clips(gt_root: Path) -> dict[Path, list[Path]]:
    """Relative clip folder -> sorted relative frame paths; hidden files (temporaries) ignored."""
    clips: dict[Path, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(gt_root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(gt_root)
        frames = sorted(
            rel_dir / f for f in filenames if f.lower().endswith(".png") and not f.startswith(".")
        )
        if frames:
            clips[rel_dir] = frames
    return dict(sorted(clips.items()))


# What the degradations compute, by version: in every clip's marker (clips made by other code are
# redone) and in the data index (so packing and training see new frames as new data). Bump it
# whenever bicubic_downsample or blur_downsample change a single output value.
DEGRADATION_VERSION = "2: BI on MATLAB's im2double path (double precision, one rounding); BD as BasicVSR"


def _marker_text(mode: str, scale: int, n_frames: int) -> str:
    return f"mode={mode} scale={scale} frames={n_frames} version={DEGRADATION_VERSION.split(':')[0]}\n"


def _is_complete(marker: Path, expected: str) -> bool:
    """A marker from another mode/scale or frame count does not count: the clip is redone."""
    try:
        return marker.read_text() == expected
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return False


def _validate_clip(gt_root: Path, clip: Path, frames: list[Path], scale: int) -> None:
    sizes = {f: _frame_size(gt_root / f) for f in frames}
    common, _ = Counter(sizes.values()).most_common(1)[0]
    for f, (w, h) in sizes.items():
        if (w, h) != common:
            raise ValueError(
                f"{gt_root / clip}: mixed frame sizes; {gt_root / f} is {w}x{h}, "
                f"the other frames are {common[0]}x{common[1]}"
            )
    if common[0] < scale or common[1] < scale:
        raise ValueError(
            f"{gt_root / frames[0]}: {common[0]}x{common[1]} is smaller than scale {scale}"
        )


def _degrade_frame(src: str, dst: str, mode: str, scale: int) -> str | None:
    """Worker body. Returns an error line instead of raising, so that the parent reports one line
    naming the frame rather than a process-pool traceback."""
    try:
        write_png(dst, DEGRADATIONS[mode](read_image(src), scale))
    except Exception as exc:  # noqa: BLE001 - any failure is reported, by frame, in the parent
        msg = " ".join(str(exc).split()) or type(exc).__name__
        return msg if src in msg else f"{src}: {type(exc).__name__}: {msg}"
    return None


def degrade_tree(
    gt_root: Path,
    lr_root: Path,
    mode: Mode = "BI",
    scale: int = 4,
    workers: int = 2,
    progress: bool = True,
) -> DegradeSummary:
    """Write an LR PNG for every GT frame, mirroring ``gt_root``'s layout under ``lr_root``.

    A clip is a folder holding PNG frames (``000/00000000.png``, ``00001/0001/im1.png``).
    Resumable: a clip whose LR folder holds a ``.complete`` marker for the same mode, scale and
    frame count is skipped; an unfinished clip is redone from its first frame (frame writes are
    atomic and deterministic, so the result is byte-identical to an uninterrupted run). The marker
    is written only after all of a clip's frames are, so a failure never leaves a partial clip
    marked. All clips to be done are validated (frame sizes, from PNG headers) before any work.
    """
    gt_root, lr_root = Path(gt_root), Path(lr_root)
    if mode not in DEGRADATIONS:
        raise ValueError(f"mode must be 'BI' or 'BD', got {mode!r}")
    if scale < 1 or (mode == "BD" and scale % 2):
        raise ValueError(f"invalid scale {scale} for mode {mode}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not gt_root.is_dir():
        raise FileNotFoundError(f"{gt_root}: GT folder not found")
    gt_abs, lr_abs = gt_root.resolve(), lr_root.resolve()
    if lr_abs == gt_abs or gt_abs in lr_abs.parents:
        raise ValueError(f"{lr_root}: LR folder must not be inside the GT folder {gt_root}")

    clips = _list_clips(gt_root)
    if not clips:
        raise ValueError(f"{gt_root}: no PNG frames found")

    todo: dict[Path, list[Path]] = {}
    skipped = 0
    for clip, frames in clips.items():
        if _is_complete(lr_root / clip / MARKER, _marker_text(mode, scale, len(frames))):
            skipped += 1
        else:
            todo[clip] = frames
    for clip, frames in todo.items():
        _validate_clip(gt_root, clip, frames, scale)

    for clip in todo:
        out_dir = lr_root / clip
        (out_dir / MARKER).unlink(missing_ok=True)
        if out_dir.is_dir():  # temporaries of a crashed run
            for tmp in out_dir.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    tasks = [
        (clip, str(gt_root / f), str(lr_root / f)) for clip, frames in todo.items() for f in frames
    ]
    remaining = {clip: len(frames) for clip, frames in todo.items()}
    written = 0
    bar = tqdm(total=len(tasks), unit="frame", desc=f"{mode} x{scale}", disable=not progress)

    def finish(clip: Path, error: str | None) -> None:
        nonlocal written
        if error is not None:
            raise ValueError(error)
        written += 1
        bar.update(1)
        remaining[clip] -= 1
        if remaining[clip] == 0:
            atomic_write_text(lr_root / clip / MARKER, _marker_text(mode, scale, len(todo[clip])))

    try:
        if workers == 1 or len(tasks) <= 1:
            for clip, src, dst in tasks:
                finish(clip, _degrade_frame(src, dst, mode, scale))
        else:
            # fork, not spawn/forkserver: those re-import an unguarded calling script in every
            # worker. Workers only touch numpy, OpenCV (single-threaded) and files, never the
            # parent's thread pools, so the usual fork-with-threads hazards do not arise.
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures: dict[Future[str | None], Path] = {
                    pool.submit(_degrade_frame, src, dst, mode, scale): clip
                    for clip, src, dst in tasks
                }
                try:
                    for fut in as_completed(futures):
                        finish(futures[fut], fut.result())
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()
    return DegradeSummary(clips_done=len(todo), clips_skipped=skipped, frames_written=written)


__all__ = [
    "DEGRADATIONS",
    "MARKER",
    "DegradeSummary",
    "bicubic_downsample",
    "imresize_taps",
    "blur_downsample",
    "degrade_tree",
    "gaussian_kernel",
]
