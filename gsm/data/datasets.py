"""Paired LR/GT video datasets for training (random clips, crops, flips) and testing (whole clips).

Conventions follow BasicSR/BasicVSR so that numbers are comparable: frames are looked up by key
(relative path without extension) in a GT and an LR `FrameStore` holding the same keys, GT is exactly
`scale` times LR, and one set of crop/flip/transpose decisions is shared by every frame of a sample
(the recurrent network needs the frames to stay aligned).

Randomness: each training item draws from `np.random.default_rng([seed, epoch, index])`, never from
a global or per-worker generator, so a sample depends only on (seed, epoch, index) and not on which
worker loads it or in which order. Call `set_epoch` before creating each epoch's DataLoader
iterator (non-persistent workers receive a fresh copy of the dataset then; persistent workers do not
see it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from gsm.data.images import FrameStore, close_store
from gsm.data.reds import REDS4 as REDS4_CLIPS

VID4_CLIPS: tuple[str, ...] = ("calendar", "city", "foliage", "walk")
VIMEO_FRAMES = 7
VIMEO_CENTER_INDEX = 3  # im4: Vimeo-90K-T is scored on the centre frame only

Sample = dict[str, object]


def load_pair(gt_store: FrameStore, lr_store: FrameStore, key: str, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Both frames of a key; a GT that is not exactly `scale` x LR would silently misalign crops."""
    lq, gt = lr_store.get(key), gt_store.get(key)
    h, w = lq.shape[:2]
    if gt.shape[:2] != (h * scale, w * scale):
        raise ValueError(
            f"{key}: GT is {gt.shape[1]}x{gt.shape[0]} but LR is {w}x{h}; GT must be exactly {scale}x LR"
        )
    return lq, gt


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """T x H x W x 3 uint8 -> T x 3 x H x W float32 in [0, 1]."""
    # a fresh copy: ascontiguousarray keeps negative strides on size-1 axes, which torch rejects
    chw = np.array(frames.transpose(0, 3, 1, 2), order="C", copy=True)
    return torch.from_numpy(chw).float().div_(255.0)


@dataclass(frozen=True)
class View:
    """Where a sample was cut (LR pixels) and how it was flipped: what cached flows must follow."""

    y: int
    x: int
    h: int
    w: int
    hflip: bool
    vflip: bool
    transpose: bool


def view_flows(flows: np.ndarray, view: View) -> np.ndarray:
    """Whole-frame flows (..., 2, H, W), channels (dx, dy), cut and flipped like the sample's frames.

    A flip mirrors the field and negates its component along the flipped axis; a transpose swaps
    the axes and the two components.
    """
    out = flows[..., view.y:view.y + view.h, view.x:view.x + view.w]
    sign = np.array([-1.0 if view.hflip else 1.0, -1.0 if view.vflip else 1.0], dtype=out.dtype)
    out = out * sign[:, None, None]
    if view.hflip:
        out = out[..., ::-1]
    if view.vflip:
        out = out[..., ::-1, :]
    if view.transpose:
        out = out.swapaxes(-1, -2)[..., ::-1, :, :]
    return np.ascontiguousarray(out)


class _PairedClipBase(Dataset[Sample]):
    """Shared loading, validation, paired crop and augmentation of the training datasets."""

    def __init__(
        self,
        gt_store: FrameStore,
        lr_store: FrameStore,
        *,
        gt_size: int | None,
        augment: bool,
        seed: int,
        scale: int,
        repeat: int,
    ) -> None:
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        if gt_size is not None and (gt_size < scale or gt_size % scale):
            raise ValueError(f"gt_size {gt_size} must be a positive multiple of the scale {scale}")
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        self.gt_store, self.lr_store = gt_store, lr_store
        self.gt_size, self.augment, self.seed, self.scale, self.repeat = gt_size, augment, seed, scale, repeat
        self.epoch = 0
        # (key a, key b) -> whole-frame flow a -> b (2, H, W), set by gsm.train.flow_cache: samples
        # then carry "flows", their pairs' flows cut and flipped like the frames.
        self.flows: Mapping[tuple[str, str], np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        """New random draws per epoch while staying reproducible."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def _probe(self, key: str) -> None:
        """Fail at construction, not hours into training, on a bad scale pairing or a too-large patch."""
        lq, _ = load_pair(self.gt_store, self.lr_store, key, self.scale)
        self._check_patch_fits(key, lq.shape[0], lq.shape[1])
        close_store(self.gt_store)
        close_store(self.lr_store)

    def all_keys(self) -> list[str]:
        """Every frame key this dataset can load (what preloading must hold)."""
        raise NotImplementedError

    def flow_pairs(self) -> list[tuple[str, str]]:
        """Every (a, b) of adjacent frames a sample can hold, both ways (what a flow cache must hold)."""
        raise NotImplementedError

    def _sample(self, keys: Sequence[str], rng: np.random.Generator, mirror: bool = False) -> Sample:
        """The frames of `keys` (then reversed, when mirror) with, once a cache is set, their flows."""
        lq, gt, view = self._load(keys, rng)
        if mirror:
            lq, gt, keys = torch.cat([lq, lq.flip(0)]), torch.cat([gt, gt.flip(0)]), [*keys, *keys[::-1]]
        sample: Sample = {"lq": lq, "gt": gt}
        if self.flows is not None:
            pairs = list(zip(keys[:-1], keys[1:]))
            if pairs:  # each pair's flow cut to the sample before stacking, not the whole frames
                fwd = np.stack([view_flows(self.flows[a, b], view) for a, b in pairs])
                bwd = np.stack([view_flows(self.flows[b, a], view) for a, b in pairs])
                sample["flows"] = torch.from_numpy(np.stack([fwd, bwd]))  # (2, T-1, 2, h, w)
            else:  # a single frame: no pair, as compute_flows gives it
                sample["flows"] = lq.new_zeros(2, 0, 2, *lq.shape[-2:])
        return sample

    def _check_patch_fits(self, key: str, h: int, w: int) -> None:
        if self.gt_size is not None and self.gt_size // self.scale > min(h, w):
            raise ValueError(
                f"{key}: gt_size {self.gt_size} does not fit in a {w * self.scale}x{h * self.scale} GT frame"
            )

    def _load(self, keys: Sequence[str], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, View]:
        """Load, crop at one position for all frames, then flip/transpose all frames alike."""
        pairs = [load_pair(self.gt_store, self.lr_store, k, self.scale) for k in keys]
        h, w = pairs[0][0].shape[:2]
        for k, (lq, _) in zip(keys, pairs):
            if lq.shape[:2] != (h, w):
                raise ValueError(f"{k}: LR is {lq.shape[1]}x{lq.shape[0]}, other frames of the sample are {w}x{h}")
        s = self.scale
        if self.gt_size is None:
            y = x = 0
            ph, pw = h, w
        else:
            self._check_patch_fits(keys[0], h, w)
            ph = pw = self.gt_size // s
            y = int(rng.integers(0, h - ph + 1))
            x = int(rng.integers(0, w - pw + 1))
        lqs = np.stack([lq[y : y + ph, x : x + pw] for lq, _ in pairs])
        gts = np.stack([gt[s * y : s * (y + ph), s * x : s * (x + pw)] for _, gt in pairs])
        hflip, vflip, transpose = (bool(v) and self.augment for v in rng.random(3) < 0.5)  # always drawn
        if hflip:
            lqs, gts = lqs[:, :, ::-1], gts[:, :, ::-1]
        if vflip:
            lqs, gts = lqs[:, ::-1], gts[:, ::-1]
        if transpose:
            lqs, gts = lqs.transpose(0, 2, 1, 3), gts.transpose(0, 2, 1, 3)
        return _to_tensor(lqs), _to_tensor(gts), View(y, x, ph, pw, hflip, vflip, transpose)


class RecurrentClipDataset(_PairedClipBase):
    """REDS-style: `num_frames` frames at a random interval and start inside a longer clip.

    `frames_per_clip` is one length for all clips (REDS: 100) or a clip -> length mapping (the
    quickstart clips differ in length). Frames are numbered from 0. Unlike BasicSR, which requires
    num_frames * interval frames, a clip needs only the frames the sample spans:
    (num_frames - 1) * interval + 1. One item per clip and `repeat`; the key returned is that of the
    first frame loaded (after any reversal, the last in time).
    """

    def __init__(
        self,
        gt_store: FrameStore,
        lr_store: FrameStore,
        clips: Sequence[str],
        *,
        frames_per_clip: int | Mapping[str, int] = 100,
        num_frames: int = 16,
        interval_list: Sequence[int] = (1,),
        random_reverse: bool = False,
        gt_size: int | None = 256,
        augment: bool = True,
        seed: int = 0,
        key_format: str = "{clip}/{frame:08d}",
        scale: int = 4,
        repeat: int = 1,
    ) -> None:
        super().__init__(gt_store, lr_store, gt_size=gt_size, augment=augment, seed=seed, scale=scale, repeat=repeat)
        if not clips:
            raise ValueError("no clips given")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if not interval_list or any(int(i) < 1 for i in interval_list):
            raise ValueError(f"interval_list must hold positive intervals, got {list(interval_list)}")
        self.clips = list(clips)
        self.num_frames, self.interval_list = num_frames, [int(i) for i in interval_list]
        self.random_reverse, self.key_format = random_reverse, key_format
        if isinstance(frames_per_clip, Mapping):
            missing = [c for c in self.clips if c not in frames_per_clip]
            if missing:
                raise ValueError(f"clip {missing[0]}: no length in frames_per_clip")
            self.lengths = {c: int(frames_per_clip[c]) for c in self.clips}
        else:
            self.lengths = {c: int(frames_per_clip) for c in self.clips}
        span = (num_frames - 1) * max(self.interval_list) + 1
        for c in self.clips:
            if self.lengths[c] < span:
                raise ValueError(
                    f"clip {c}: {self.lengths[c]} frames, fewer than the {span} that {num_frames} frames "
                    f"at interval {max(self.interval_list)} span"
                )
        self._probe(self.key_format.format(clip=self.clips[0], frame=0))

    def __len__(self) -> int:
        return len(self.clips) * self.repeat

    def all_keys(self) -> list[str]:
        return [self.key_format.format(clip=c, frame=f) for c in self.clips for f in range(self.lengths[c])]

    def flow_pairs(self) -> list[tuple[str, str]]:
        key = lambda c, f: self.key_format.format(clip=c, frame=f)  # noqa: E731
        steps = sorted(set(self.interval_list)) if self.num_frames > 1 else []
        pairs = []
        for c in self.clips:
            for i in steps:
                for f in range(self.lengths[c] - i):
                    pairs += [(key(c, f), key(c, f + i)), (key(c, f + i), key(c, f))]
        return pairs

    def frame_indices(self, index: int) -> tuple[str, list[int]]:
        """The clip and frame numbers item `index` loads (exposed for tests and debugging)."""
        return self._pick(index, self._rng(index))

    def _pick(self, index: int, rng: np.random.Generator) -> tuple[str, list[int]]:
        clip = self.clips[index % len(self.clips)]
        interval = self.interval_list[int(rng.integers(len(self.interval_list)))]
        span = (self.num_frames - 1) * interval + 1
        start = int(rng.integers(0, self.lengths[clip] - span + 1))
        frames = list(range(start, start + span, interval))
        if rng.random() < 0.5 and self.random_reverse:
            frames.reverse()
        return clip, frames

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = self._rng(index)
        clip, frames = self._pick(index, rng)
        keys = [self.key_format.format(clip=clip, frame=f) for f in frames]
        return {**self._sample(keys, rng), "key": keys[0]}


class SeptupletDataset(_PairedClipBase):
    """Vimeo-90K-style: all 7 frames of a sequence (`<seq>/im1`..`im7`), optionally mirrored to 14.

    Mirroring (frames then the same frames reversed) is how BasicVSR-family models are trained and
    tested on Vimeo: the short clip gets both propagation directions over every frame.
    """

    def __init__(
        self,
        gt_store: FrameStore,
        lr_store: FrameStore,
        sequences: Sequence[str],
        *,
        mirror: bool = False,
        gt_size: int | None = 256,
        augment: bool = True,
        seed: int = 0,
        key_format: str = "{seq}/im{frame}",
        num_frames: int = VIMEO_FRAMES,
        scale: int = 4,
        repeat: int = 1,
    ) -> None:
        super().__init__(gt_store, lr_store, gt_size=gt_size, augment=augment, seed=seed, scale=scale, repeat=repeat)
        if not sequences:
            raise ValueError("no sequences given")
        self.sequences, self.mirror = list(sequences), mirror
        self.key_format, self.num_frames = key_format, num_frames
        self._probe(self.keys(0)[0])

    def __len__(self) -> int:
        return len(self.sequences) * self.repeat

    def all_keys(self) -> list[str]:
        return [k for i in range(len(self.sequences)) for k in self.keys(i)]

    def keys(self, index: int) -> list[str]:
        seq = self.sequences[index % len(self.sequences)]
        return [self.key_format.format(seq=seq, frame=i) for i in range(1, self.num_frames + 1)]

    def flow_pairs(self) -> list[tuple[str, str]]:
        pairs = []
        for i in range(len(self.sequences)):
            keys = self.keys(i)
            pairs += [p for a, b in zip(keys[:-1], keys[1:]) for p in ((a, b), (b, a))]
            if self.mirror:  # the mirrored clip meets its last frame twice
                pairs.append((keys[-1], keys[-1]))
        return pairs

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        sample = self._sample(self.keys(index), self._rng(index), mirror=self.mirror)
        return {**sample, "key": self.sequences[index % len(self.sequences)]}


class VideoTestDataset(Dataset[Sample]):
    """Whole clips, in frame order, uncropped: evaluation reports per frame and per clip.

    `center_index` records which frame the protocol scores (Vimeo-90K-T: 3, i.e. im4); None = all.
    """

    def __init__(
        self,
        gt_store: FrameStore,
        lr_store: FrameStore,
        clips: Mapping[str, Sequence[str]],
        *,
        scale: int = 4,
        center_index: int | None = None,
    ) -> None:
        if not clips:
            raise ValueError("no test clips given")
        for name, keys in clips.items():
            if not keys:
                raise ValueError(f"clip {name}: no frames")
            if center_index is not None and not 0 <= center_index < len(keys):
                raise ValueError(f"clip {name}: center_index {center_index} outside its {len(keys)} frames")
        self.gt_store, self.lr_store, self.scale, self.center_index = gt_store, lr_store, scale, center_index
        self.clips = {name: list(keys) for name, keys in clips.items()}
        self.names = list(self.clips)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Sample:
        name = self.names[index]
        keys = self.clips[name]
        pairs = [load_pair(self.gt_store, self.lr_store, k, self.scale) for k in keys]
        shape = pairs[0][0].shape
        for k, (lq, _) in zip(keys, pairs):
            if lq.shape != shape:
                raise ValueError(
                    f"{k}: LR is {lq.shape[1]}x{lq.shape[0]}, clip {name} starts at {shape[1]}x{shape[0]}"
                )
        return {
            "lq": _to_tensor(np.stack([p[0] for p in pairs])),
            "gt": _to_tensor(np.stack([p[1] for p in pairs])),
            "clip": name,
            "frames": [k.rsplit("/", 1)[-1] for k in keys],
        }


# --- clip listings --------------------------------------------------------------------------------


def read_list(path: str | Path) -> list[str]:
    """Non-empty stripped lines of a list file (sep_trainlist.txt, sep_testlist.txt, ...)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: list file not found") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _meta_keys(meta: Path) -> list[str]:
    """Keys of a BasicSR-style LMDB from its meta_info.txt (`000/00000000.png (720,1280,3) 1`)."""
    keys = []
    for line in read_list(meta):
        name = line.split(" ", 1)[0]
        keys.append(name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name)
    return keys


def clip_frames(source: str | Path | Iterable[str], clips: Sequence[str]) -> dict[str, list[str]]:
    """Clip -> its frame keys sorted by name, from a PNG folder tree, an LMDB folder or a key list.

    A folder with `meta_info.txt` is read as an LMDB (no image is opened); any other folder is
    listed (`<root>/<clip>/*.png`); anything else is taken as an iterable of keys.
    """
    if isinstance(source, (str, Path)):
        root = Path(source)
        if (root / "meta_info.txt").is_file():
            return clip_frames(_meta_keys(root / "meta_info.txt"), clips)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: frame folder not found")
        out = {}
        for c in clips:
            names = sorted(p.stem for p in (root / c).glob("*.png") if not p.name.startswith("."))
            if not names:
                raise ValueError(f"clip {c}: no PNG frames in {root / c}")
            out[c] = [f"{c}/{n}" for n in names]
        return out
    grouped: dict[str, list[str]] = {c: [] for c in clips}
    for key in source:
        clip = key.rsplit("/", 1)[0]
        if clip in grouped:
            grouped[clip].append(key)
    for c, keys in grouped.items():
        if not keys:
            raise ValueError(f"clip {c}: no frames among the keys")
        keys.sort()
    return grouped


def reds4_clips(source: str | Path | Iterable[str], clips: Sequence[str] = REDS4_CLIPS) -> dict[str, list[str]]:
    """REDS4 (000, 011, 015, 020), all frames, from a REDS GT/LR folder, LMDB or key list."""
    return clip_frames(source, clips)


def vid4_clips(root: str | Path | Iterable[str]) -> dict[str, list[str]]:
    """Vid4: frame names come from the listing because the distributions name frames differently."""
    return clip_frames(root, VID4_CLIPS)


def vimeo_test_sequences(
    sequences: str | Path | Iterable[str], num_frames: int = VIMEO_FRAMES
) -> dict[str, list[str]]:
    """`00001/0266` -> [`00001/0266/im1`, ..., `im7`] for each line of sep_testlist.txt (a path) or
    each given sequence name.

    The protocol scores frame VIMEO_CENTER_INDEX (im4) only: pass it as
    `VideoTestDataset(..., center_index=VIMEO_CENTER_INDEX)`.
    """
    names = read_list(sequences) if isinstance(sequences, (str, Path)) else list(sequences)
    return {seq: [f"{seq}/im{i}" for i in range(1, num_frames + 1)] for seq in names}
