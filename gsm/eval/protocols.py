"""Scoring a model on a benchmark the way the papers do (SPEC 4), beside the bicubic baseline.

Protocols:

* ``reds4``: RGB, every frame of every clip.
* ``vimeo``: Y channel, the centre frame (``dataset.center_index``, im4) only. The 7 input frames
  are mirrored to 14 (frames, then the same frames reversed) and the two predictions of the centre
  frame, at c and 2T - 1 - c (3 and 10), are averaged in float before quantising, as BasicVSR++ /
  mmagic do.
* ``vid4``: Y channel, every frame (BI and BD are separate test sets).

Per frame -> per clip (mean) -> test set (mean of clip means). Model outputs are clamped to
[0, 1] and quantised with round(x * 255) to uint8 before scoring, like saving PNGs would.

Inference runs under ``torch.no_grad`` through ``upscale_tiled`` (spatial tiles, exact up to the
cross-fade at tile seams). ``chunk`` additionally splits a long clip in time: each run sees
``chunk`` frames plus ``chunk_overlap`` context frames on each side, and only its core frames are
kept. That is an approximation: GSMamba propagates information across the whole clip, so a chunked
frame loses whatever lay beyond its context; use it only when a whole clip does not fit in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from gsm.data.datasets import VideoTestDataset
from gsm.eval.bicubic import bicubic_upsample
from gsm.eval.metrics import psnr_ssim
from gsm.models.gsmamba import upscale_tiled

Protocol = Literal["reds4", "vimeo", "vid4"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
Y_CHANNEL: dict[str, bool] = {"reds4": False, "vimeo": True, "vid4": True}


@dataclass(frozen=True)
class TestSet:
    """One benchmark: its clips and the protocol that scores them."""

    __test__ = False  # not a pytest test class

    name: str
    protocol: Protocol
    dataset: VideoTestDataset
    crop_border: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("test set name must not be empty")
        where = f"test set {self.name}"
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"{where}: protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        border = self.crop_border
        if isinstance(border, bool) or not isinstance(border, int) or border < 0:
            raise ValueError(f"{where}: crop_border must be a non-negative integer, got {border!r}")
        center = getattr(self.dataset, "center_index", None)
        if self.protocol == "vimeo" and center is None:
            raise ValueError(f"{where}: the vimeo protocol needs a dataset with center_index (im4 = 3)")
        if self.protocol != "vimeo" and center is not None:
            raise ValueError(f"{where}: protocol {self.protocol} scores every frame, not center_index {center}")

    @property
    def y_channel(self) -> bool:
        return Y_CHANNEL[self.protocol]


def _mean(values: tuple[float, ...] | None) -> float:
    return float(np.mean(values)) if values else float("nan")


@dataclass(frozen=True)
class ClipResult:
    """Per-frame scores of one clip (bicubic ones are None when the baseline was skipped)."""

    clip: str
    frames: tuple[str, ...]
    psnr: tuple[float, ...]
    ssim: tuple[float, ...]
    bicubic_psnr: tuple[float, ...] | None = None
    bicubic_ssim: tuple[float, ...] | None = None

    @property
    def mean_psnr(self) -> float:
        return _mean(self.psnr)

    @property
    def mean_ssim(self) -> float:
        return _mean(self.ssim)

    @property
    def mean_bicubic_psnr(self) -> float:
        return _mean(self.bicubic_psnr)

    @property
    def mean_bicubic_ssim(self) -> float:
        return _mean(self.bicubic_ssim)


@dataclass(frozen=True)
class Showcase:
    """One scored frame kept for the side-by-side figure: uint8 H x W x 3 images."""

    clip: str
    frame: str
    bicubic: np.ndarray
    ours: np.ndarray
    gt: np.ndarray
    psnr: float
    bicubic_psnr: float
    lr: np.ndarray | None = None  # the LR input frame, for the figure's input panel


@dataclass(frozen=True)
class TestResult:
    """A test set's scores: per frame, per clip, and the mean of clip means (the reported number)."""

    __test__ = False

    name: str
    protocol: str
    y_channel: bool
    crop_border: int
    clips: tuple[ClipResult, ...]
    seconds: float  # wall time of model inference (tiling and chunking included), scoring excluded
    showcase: Showcase | None = field(default=None, compare=False)
    # (bicubic, ours, GT) centre crops of the first scored frames, for the side-by-side video
    video: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...] = field(default=(), compare=False)

    @property
    def frames(self) -> int:
        return sum(len(c.frames) for c in self.clips)

    @property
    def psnr(self) -> float:
        return _mean(tuple(c.mean_psnr for c in self.clips))

    @property
    def ssim(self) -> float:
        return _mean(tuple(c.mean_ssim for c in self.clips))

    @property
    def bicubic_psnr(self) -> float:
        return _mean(tuple(c.mean_bicubic_psnr for c in self.clips))

    @property
    def bicubic_ssim(self) -> float:
        return _mean(tuple(c.mean_bicubic_ssim for c in self.clips))


# --------------------------------------------------------------------------------------------------
# Inference

VIDEO_CROP = (360, 640)  # (h, w) at most of each video panel: a small file, and memory for 48 frames


def centre_crop(img: np.ndarray, size: tuple[int, int] = VIDEO_CROP) -> np.ndarray:
    """The centred window of at most `size`, even-sized (H.264 yuv420p needs even sides)."""
    h, w = (min(size[0], img.shape[0]) // 2 * 2), (min(size[1], img.shape[1]) // 2 * 2)
    y, x = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[y : y + h, x : x + w].copy()


def to_uint8(x: Tensor) -> np.ndarray:
    """(..., 3, H, W) float in [0, 1] -> (..., H, W, 3) uint8: clamp, round(x * 255)."""
    q = (x.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()
    return np.ascontiguousarray(np.moveaxis(q, -3, -1))


def chunk_spans(length: int, chunk: int | None, overlap: int) -> list[tuple[int, int, int, int]]:
    """(run start, run end, keep start, keep end) per temporal chunk; the kept spans tile [0, length)."""
    if chunk is None or length <= chunk:
        return [(0, length, 0, length)]
    if chunk < 1 or overlap < 0:
        raise ValueError(f"chunk must be >= 1 and chunk_overlap >= 0, got chunk={chunk}, chunk_overlap={overlap}")
    spans = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        spans.append((max(0, start - overlap), min(length, end + overlap), start, end))
    return spans


def predict_clip(
    model: nn.Module,
    lq: Tensor,
    *,
    tile: int | None,
    tile_overlap: int,
    chunk: int | None = None,
    chunk_overlap: int = 2,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[int, Tensor]]:
    """Float predictions of clip lq (T, 3, H, W), chunk by chunk: (first frame index, (n, 3, sH, sW) on CPU).

    The model must already be on `device`; each chunk's input is moved there and its output back.
    """
    if lq.dim() != 4 or lq.shape[1] != 3:
        raise ValueError(f"expected a (T, 3, H, W) clip, got {tuple(lq.shape)}")
    for run0, run1, keep0, keep1 in chunk_spans(lq.shape[0], chunk, chunk_overlap):
        with torch.no_grad():
            out = upscale_tiled(model, lq[None, run0:run1].to(device), tile, tile_overlap)[0]
        yield keep0, out[keep0 - run0 : keep1 - run0].float().cpu()


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _scored_predictions(
    lq: Tensor, test_set: TestSet, infer: Callable[[Tensor], Iterator[tuple[int, Tensor]]]
) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, uint8 prediction) for each frame the protocol scores, as they are produced."""
    if test_set.protocol == "vimeo":
        c = test_set.dataset.center_index
        assert c is not None  # checked by TestSet
        t = lq.shape[0]
        mirrored = torch.cat([lq, lq.flip(0)])
        out = torch.cat([chunk for _, chunk in infer(mirrored)])
        yield c, to_uint8(0.5 * (out[c] + out[2 * t - 1 - c]))
        return
    for start, chunk in infer(lq):
        frames = to_uint8(chunk)
        for k in range(frames.shape[0]):
            yield start + k, frames[k]


def evaluate_model(
    model: nn.Module,
    test_set: TestSet,
    *,
    tile: int | None,
    tile_overlap: int = 16,
    chunk: int | None = None,
    chunk_overlap: int = 2,
    device: str | torch.device = "cpu",
    progress: bool = True,
    keep: bool = True,
    bicubic: bool = True,
    max_clips: int | None = None,
    video_frames: int = 0,
) -> TestResult:
    """Score `model` (already on `device`) on `test_set`, and the bicubic baseline on the same frames.

    keep: retain the scored frame where ours beats bicubic by the most PSNR (the first such frame
    on ties) for the side-by-side figure; it needs the baseline, so nothing is kept without it.
    bicubic=False skips the baseline (faster validation). max_clips: score only the first clips.
    video_frames: keep centre crops (bicubic, ours, GT) of the first that many scored frames of the
    set, in order, for a side-by-side video (needs the baseline too).
    The model is put in eval mode for the run and its training flag restored afterwards.
    """
    ds = test_set.dataset
    if max_clips is not None and max_clips < 1:
        raise ValueError(f"max_clips must be >= 1, got {max_clips}")
    names = ds.names[:max_clips] if max_clips is not None else ds.names
    scored_per_clip = {n: 1 if test_set.protocol == "vimeo" else len(ds.clips[n]) for n in names}
    y, border = test_set.y_channel, test_set.crop_border

    def infer(lq: Tensor) -> Iterator[tuple[int, Tensor]]:
        return predict_clip(model, lq, tile=tile, tile_overlap=tile_overlap, chunk=chunk,
                            chunk_overlap=chunk_overlap, device=device)  # fmt: skip

    clips: list[ClipResult] = []
    video: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    best: Showcase | None = None
    best_gain = -float("inf")
    seconds = 0.0
    was_training = model.training
    model.eval()
    bar = tqdm(total=sum(scored_per_clip.values()), desc=test_set.name, unit="frame", disable=not progress)
    try:
        for index, name in enumerate(names):
            sample = ds[index]
            lq, gt = sample["lq"], to_uint8(sample["gt"])
            lq_u8 = to_uint8(lq) if bicubic else None
            frame_names: list[str] = sample["frames"]  # type: ignore[assignment]
            frames, ps, ss, bps, bss = [], [], [], [], []
            stream = _scored_predictions(lq, test_set, infer)
            while True:
                _sync(device)
                t0 = time.perf_counter()
                item = next(stream, None)
                _sync(device)
                seconds += time.perf_counter() - t0
                if item is None:
                    break
                k, ours = item
                p, s = psnr_ssim(ours, gt[k], border, y)
                frames.append(frame_names[k])
                ps.append(p)
                ss.append(s)
                if lq_u8 is not None:
                    bic = bicubic_upsample(lq_u8[k], ds.scale)
                    bp, bs = psnr_ssim(bic, gt[k], border, y)
                    bps.append(bp)
                    bss.append(bs)
                    if keep and (best is None or p - bp > best_gain):
                        best_gain = p - bp
                        best = Showcase(name, frame_names[k], bic, ours, gt[k].copy(), p, bp, lq_u8[k].copy())
                    if len(video) < video_frames:
                        video.append((centre_crop(bic), centre_crop(ours), centre_crop(gt[k])))
                bar.update(1)
                bar.set_postfix(clip=name, psnr=f"{p:.2f}")
            clips.append(ClipResult(
                name, tuple(frames), tuple(ps), tuple(ss),
                tuple(bps) if bicubic else None, tuple(bss) if bicubic else None,
            ))  # fmt: skip
    finally:
        bar.close()
        model.train(was_training)
    return TestResult(test_set.name, test_set.protocol, y, border, tuple(clips), seconds, best, tuple(video))


def make_validator(
    test_set: TestSet,
    tile: int | None,
    tile_overlap: int,
    device: str | torch.device,
    *,
    chunk: int | None = None,
    chunk_overlap: int = 2,
    max_clips: int | None = None,
) -> Callable[[nn.Module], dict[str, float]]:
    """A callable for the trainer: model -> {"psnr", "ssim"} on `test_set` (no bicubic, no bars).

    The trainer logs each key as `val_<key>` and keeps best.pt by "psnr".
    """

    def validate(model: nn.Module) -> dict[str, float]:
        r = evaluate_model(model, test_set, tile=tile, tile_overlap=tile_overlap, chunk=chunk,
                           chunk_overlap=chunk_overlap, device=device, progress=False, keep=False,
                           bicubic=False, max_clips=max_clips)  # fmt: skip
        return {"psnr": r.psnr, "ssim": r.ssim}

    return validate


__all__ = [
    "PROTOCOLS",
    "ClipResult",
    "Protocol",
    "Showcase",
    "TestResult",
    "TestSet",
    "chunk_spans",
    "evaluate_model",
    "make_validator",
    "predict_clip",
    "to_uint8",
]
