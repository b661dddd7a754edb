"""REDS as the video-SR field uses it: 270 training clips and the held-out REDS4 test clips.

The official release splits 240 train and 30 val clips; the field (BasicVSR onwards) merges val
000-029 in as clips 240-269 and tests on REDS4, four train clips that must never be trained on.
Regrouping hard-links frames (a copy only where links are impossible, e.g. across file systems),
so the extracted archives stay intact and no frame data is duplicated on disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gsm.data.extract import MARKER

log = logging.getLogger(__name__)

REDS4 = ("000", "011", "015", "020")
VAL_OFFSET = 240  # val clip i becomes clip 240 + i

# ``strip`` for gsm.data.extract.extract: leading folders of each official archive above the clips.
REDS_STRIP = {
    "reds_train_sharp": 2,  # train/train_sharp/000/00000000.png
    "reds_val_sharp": 2,  # val/val_sharp/000/...
    "reds_train_sharp_bicubic": 3,  # train/train_sharp_bicubic/X4/000/...
    "reds_val_sharp_bicubic": 3,  # val/val_sharp_bicubic/X4/000/...
}


def _frames(clip_dir: Path) -> list[str]:
    return sorted(p.name for p in clip_dir.iterdir() if p.suffix == ".png" and not p.name.startswith("."))


def _scan(root: Path, count: int, what: str) -> dict[str, Path]:
    """Clip folders 000..count-1 of ``root``; a gap or an extra numbered folder is an error."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"REDS {what}: missing folder {root}")
    clips = {f"{i:03d}": root / f"{i:03d}" for i in range(count)}
    for clip_dir in clips.values():
        if not clip_dir.is_dir():
            hint = " (the X4 folder of a bicubic archive holds the clips)" if (root / "X4").is_dir() else ""
            raise FileNotFoundError(f"REDS {what}: missing clip folder {clip_dir}{hint}")
    extra = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.isdigit() and p.name not in clips)
    if extra:
        raise ValueError(f"REDS {what}: unexpected clip folder {root / extra[0]} (expected {count} clips)")
    return clips


def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # cross-device or no hard links on this file system
        shutil.copy2(src, dst)


def _complete(out_dir: Path, want: dict[str, Any] | None) -> bool:
    """Whether ``out_dir`` is finished and made as ``want`` says; one made otherwise is removed."""
    marker = out_dir / MARKER
    if not marker.is_file():
        return False
    if want is None:
        return True
    try:
        rec = json.loads(marker.read_text())
    except json.JSONDecodeError:
        rec = {}
    if isinstance(rec, dict) and all(rec.get(k) == v for k, v in want.items()):
        return True
    log.info("%s was regrouped from other archives or counts: regrouping again", out_dir)
    shutil.rmtree(out_dir)
    return False


def regroup_reds(
    train_dir: Path, val_dir: Path, out_dir: Path, *, n_train: int = 240, n_val: int = 30, origin: str | None = None
) -> list[str]:
    """Build ``out_dir/<clip>/<frame>.png`` for train clips plus val clips renumbered from 240.

    Call once for the GT folders and once for the x4 bicubic folders (their X4 subfolders).
    Idempotent: a completed ``out_dir`` (``.complete`` marker) is returned as is, even after the
    source folders are deleted. ``origin`` names what the sources were extracted from (their
    archives' digests): a completed ``out_dir`` of another origin or other counts is made again,
    since its hard links still hold the old frames; None reuses any. ``n_train``/``n_val`` default
    to the official counts and are only smaller for synthetic test sets. Returns the sorted clips.
    """
    out_dir = Path(out_dir)
    want = {"origin": origin, "n_train": n_train, "n_val": n_val}
    if _complete(out_dir, want if origin is not None else None):
        return sorted(p.name for p in out_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: exists without a {MARKER} marker; remove it to regroup REDS there")
    if not 0 < n_train <= VAL_OFFSET or not 0 <= n_val <= 1000 - VAL_OFFSET:
        raise ValueError(f"REDS: n_train must be 1..{VAL_OFFSET} and n_val 0..{1000 - VAL_OFFSET}")
    plan = dict(_scan(train_dir, n_train, "train"))
    for name, clip_dir in _scan(val_dir, n_val, "val").items():
        plan[f"{int(name) + VAL_OFFSET:03d}"] = clip_dir

    expected: list[str] | None = None
    first = ""
    frames: dict[str, list[str]] = {}
    for name, clip_dir in plan.items():
        names = _frames(clip_dir)
        if expected is None:
            expected, first = [f"{i:08d}.png" for i in range(len(names))], str(clip_dir)
            if not names:
                raise ValueError(f"REDS: clip folder {clip_dir} holds no PNG frames")
        if len(names) != len(expected):
            raise ValueError(f"REDS: clip folder {clip_dir} has {len(names)} frames, {first} has {len(expected)}")
        if names != expected:
            raise ValueError(f"REDS: clip folder {clip_dir} frames are not numbered {expected[0]}..{expected[-1]}")
        frames[name] = names

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for name, clip_dir in plan.items():
            (tmp / name).mkdir()
            for frame in frames[name]:
                _place(clip_dir / frame, tmp / name / frame)
        (tmp / MARKER).write_text(json.dumps({**want, "clips": len(plan), "frames": len(expected or [])}) + "\n")
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(plan)


def reds_partition(clips: Iterable[str], *, strict: bool = True) -> tuple[list[str], list[str]]:
    """(train clips, test clips): test is REDS4, which is removed from training whatever happens.

    ``strict`` demands all four REDS4 clips be present, so a partial dataset cannot quietly shrink
    the benchmark; mini datasets pass ``strict=False`` and test on the REDS4 clips they have.
    """
    clips = list(clips)
    if len(set(clips)) != len(clips):
        raise ValueError("REDS: duplicate clip names in the clip list")
    bad = [c for c in clips if not (isinstance(c, str) and len(c) == 3 and c.isdigit())]
    if bad:
        raise ValueError(f"REDS: clip names are 3-digit strings like '000', got {bad[0]!r}")
    present = set(clips)
    missing = [c for c in REDS4 if c not in present]
    if strict and missing:
        raise ValueError(f"REDS: REDS4 clip {missing[0]} missing from the clip list")
    test = [c for c in REDS4 if c in present]
    train = sorted(present.difference(REDS4))
    return train, test
