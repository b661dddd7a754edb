"""Vid4 as its mirrors ship it: which folder is GT, which LR came with it, and proof by frame size.

Vid4 has no official archive. Mirrors ship GT alone (the clip folders at the archive root or under
one folder) or BasicSR/MMagic's ``Vid4/{GT,BIx4,BDx4}/<clip>``. Every one of those folders holds
the same four clip folders, so a folder cannot be picked by order (that took BDx4 for GT): the
layout is recognised by its folder names, anything else holding the clips more than once is
refused, and the frame sizes are checked against the known Vid4 sizes (SPEC section 2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import cv2

from gsm.data.datasets import VID4_CLIPS, clip_frames

# (H, W) of the GT frames (SPEC section 2); LR x4 is a quarter of each side.
VID4_SIZES = {"calendar": (576, 720), "city": (576, 704), "foliage": (480, 720), "walk": (480, 720)}
LR_FOLDERS = {"bi": "BIx4", "bd": "BDx4"}  # the BasicSR/MMagic folder names
_KNOWN = {"gt", "bix4", "bdx4"}
_PNG = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Vid4Layout:
    """GT's folder and the LR folders shipped beside it ("bi"/"bd" -> folder)."""

    gt: Path
    lr: dict[str, Path] = field(default_factory=dict)


def _candidates(root: Path) -> list[Path]:
    """Every folder under ``root`` (itself included) holding all four clip folders."""
    folders = [root, *sorted(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]
    return [p for p in folders if all((p / c).is_dir() for c in VID4_CLIPS)]


def _describe(root: Path, folders: list[Path]) -> str:
    return ", ".join(str(p.relative_to(root)) if p != root else "." for p in folders)


def find_vid4(root: Path, what: str) -> Vid4Layout:
    """The layout of an extracted GT archive; a one-line error when it is none of the known ones."""
    cands = _candidates(root)
    if not cands:
        raise FileNotFoundError(f"{what}: no folder under {root} holds the clip folders {', '.join(VID4_CLIPS)}")
    names = [p.name.lower() for p in cands]
    if names.count("gt") == 1 and set(names) <= _KNOWN and len({p.parent for p in cands}) == 1:
        lr = {mode: p for p in cands for mode, name in LR_FOLDERS.items() if p.name.lower() == name.lower()}
        return Vid4Layout(next(p for p in cands if p.name.lower() == "gt"), lr)
    if len(cands) == 1 and names[0] not in _KNOWN - {"gt"}:
        return Vid4Layout(cands[0])
    raise ValueError(
        f"{what}: cannot tell which folder under {root} is GT: the Vid4 clips are in {_describe(root, cands)} "
        "(known layouts: the clip folders alone, at the root or under one folder, or Vid4/{GT,BIx4,BDx4})"
    )


def find_lr(root: Path, mode: str, what: str) -> Path:
    """The LR folder of an extracted LR archive: the only one holding the clips, else the one named BIx4/BDx4."""
    cands = _candidates(root)
    if not cands:
        raise FileNotFoundError(f"{what}: no folder under {root} holds the clip folders {', '.join(VID4_CLIPS)}")
    named = [p for p in cands if p.name.lower() == LR_FOLDERS[mode].lower()]
    if len(cands) == 1 or len(named) == 1:
        return cands[0] if len(cands) == 1 else named[0]
    raise ValueError(f"{what}: cannot tell which folder under {root} is {LR_FOLDERS[mode]}: "
                     f"the Vid4 clips are in {_describe(root, cands)}")  # fmt: skip


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from a PNG header (no decoding: Vid4 is checked frame by frame), else by decoding."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] == _PNG and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return h, w
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{path}: cannot decode image")
    return img.shape[0], img.shape[1]


def _check_sizes(root: Path, frames: dict[str, list[str]], sizes: dict[str, tuple[int, int]], label: str) -> None:
    for clip, keys in frames.items():
        for key in keys:
            h, w = image_size(root / f"{key}.png")
            if (h, w) != sizes[clip]:
                raise ValueError(f"Vid4 {label}: {root / key}.png is {h}x{w} (HxW), Vid4's {clip} {label} "
                                 f"frames are {sizes[clip][0]}x{sizes[clip][1]}")  # fmt: skip


def _names(frames: list[str]) -> list[str]:
    return [k.rsplit("/", 1)[1] for k in frames]


def check_vid4(gt: Path, lr: dict[str, Path], *, shrink: int = 1) -> None:
    """GT frames have Vid4's sizes (divided by ``shrink``: toy archives only); each LR folder has
    the same frame names at a quarter of the size. Raises a one-line ValueError naming the frame."""
    gt_sizes = {c: (h // shrink, w // shrink) for c, (h, w) in VID4_SIZES.items()}
    frames = clip_frames(gt, VID4_CLIPS)
    _check_sizes(gt, frames, gt_sizes, "GT")
    for mode, folder in lr.items():
        label = LR_FOLDERS[mode]
        lr_frames = clip_frames(folder, VID4_CLIPS)
        for clip in VID4_CLIPS:
            if _names(lr_frames[clip]) != _names(frames[clip]):
                raise ValueError(f"Vid4 {label}: {folder / clip} does not hold the frames of {gt / clip} "
                                 f"({len(lr_frames[clip])} vs {len(frames[clip])}, names must match)")  # fmt: skip
        _check_sizes(folder, frames, {c: (h // 4, w // 4) for c, (h, w) in gt_sizes.items()}, label)
