"""REDS regrouping on a synthetic mini REDS built in the official archive layouts."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from gsm.data.extract import MARKER, extract
from gsm.data.reds import REDS4, REDS_STRIP, regroup_reds, reds_partition


def _png(value: int, size: tuple[int, int]) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((*size, 3), value, np.uint8))
    assert ok
    return buf.tobytes()


def _reds_zip(path: Path, prefix: str, clips: int, frames: int, size: tuple[int, int]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for c in range(clips):
            for f in range(frames):
                zf.writestr(f"{prefix}/{c:03d}/{f:08d}.png", _png(10 * c + f, size))
    return path


@pytest.fixture
def mini_reds(tmp_path: Path) -> dict[str, Path]:
    """Extracted mini REDS: 6 train clips and 2 val clips of 3 frames, GT 16x16 and LR 4x4."""
    layout = {
        "reds_train_sharp": ("train/train_sharp", 6, (16, 16)),
        "reds_val_sharp": ("val/val_sharp", 2, (16, 16)),
        "reds_train_sharp_bicubic": ("train/train_sharp_bicubic/X4", 6, (4, 4)),
        "reds_val_sharp_bicubic": ("val/val_sharp_bicubic/X4", 2, (4, 4)),
    }
    out = {}
    for name, (prefix, clips, size) in layout.items():
        archive = _reds_zip(tmp_path / f"{name}.zip", prefix, clips, 3, size)
        out[name] = extract(archive, tmp_path / "raw" / name, max_bytes=1 << 20, strip=REDS_STRIP[name], progress=False)
    return out


def test_regroup_merges_val_as_240_onwards(mini_reds: dict[str, Path], tmp_path: Path) -> None:
    gt = regroup_reds(mini_reds["reds_train_sharp"], mini_reds["reds_val_sharp"], tmp_path / "GT", n_train=6, n_val=2)
    lq = regroup_reds(
        mini_reds["reds_train_sharp_bicubic"], mini_reds["reds_val_sharp_bicubic"], tmp_path / "LQ", n_train=6, n_val=2
    )
    assert gt == lq == ["000", "001", "002", "003", "004", "005", "240", "241"]
    moved = tmp_path / "GT" / "241" / "00000002.png"
    src = mini_reds["reds_val_sharp"] / "001" / "00000002.png"
    assert moved.read_bytes() == src.read_bytes()
    assert moved.stat().st_ino == src.stat().st_ino  # hard link: no frame data duplicated
    assert cv2.imread(str(tmp_path / "LQ" / "240" / "00000000.png")).shape == (4, 4, 3)
    assert sorted(p.name for p in (tmp_path / "GT" / "003").iterdir()) == [f"{i:08d}.png" for i in range(3)]

    shutil.rmtree(tmp_path / "raw")  # idempotent: a completed regroup needs its sources no more
    assert regroup_reds(tmp_path / "raw" / "x", tmp_path / "raw" / "y", tmp_path / "GT", n_train=6, n_val=2) == gt

    train, test = reds_partition(gt, strict=False)
    assert test == ["000"] and not set(train) & set(REDS4)
    assert train == ["001", "002", "003", "004", "005", "240", "241"]


def test_partition_is_exactly_reds4() -> None:
    clips = [f"{i:03d}" for i in range(270)]
    train, test = reds_partition(clips)
    assert tuple(test) == REDS4
    assert len(train) == 266 and not set(train) & set(REDS4)
    with pytest.raises(ValueError, match="REDS4 clip 011 missing"):
        reds_partition(["000", "001"])
    with pytest.raises(ValueError, match="3-digit"):
        reds_partition(["0", "011"], strict=False)


def test_missing_clip_folder_is_named(mini_reds: dict[str, Path], tmp_path: Path) -> None:
    gap = mini_reds["reds_train_sharp"] / "003"
    shutil.rmtree(gap)
    with pytest.raises(FileNotFoundError, match=f"missing clip folder {gap}$"):
        regroup_reds(mini_reds["reds_train_sharp"], mini_reds["reds_val_sharp"], tmp_path / "GT", n_train=6, n_val=2)
    assert not (tmp_path / "GT").exists()


def test_frame_count_mismatch_is_named(mini_reds: dict[str, Path], tmp_path: Path) -> None:
    short = mini_reds["reds_val_sharp"] / "001"
    (short / "00000002.png").unlink()
    with pytest.raises(ValueError, match=f"clip folder {short} has 2 frames"):
        regroup_reds(mini_reds["reds_train_sharp"], mini_reds["reds_val_sharp"], tmp_path / "GT", n_train=6, n_val=2)
    assert not (tmp_path / "GT").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bicubic_root_hint_and_official_counts(mini_reds: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "lr"
    (root / "X4" / "000").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="X4 folder"):
        regroup_reds(root, mini_reds["reds_val_sharp"], tmp_path / "LQ")
    # Official counts by default: a 6-clip train set is incomplete, not silently accepted.
    with pytest.raises(FileNotFoundError, match="missing clip folder .*006"):
        regroup_reds(mini_reds["reds_train_sharp"], mini_reds["reds_val_sharp"], tmp_path / "GT")
    with pytest.raises(ValueError, match="unexpected clip folder .*005"):
        regroup_reds(mini_reds["reds_train_sharp"], mini_reds["reds_val_sharp"], tmp_path / "GT", n_train=5, n_val=2)
    assert (mini_reds["reds_train_sharp"] / MARKER).is_file()


def test_regroup_follows_its_archives(mini_reds: dict[str, Path], tmp_path: Path) -> None:
    """Hard links keep the old frames: new archives (another origin) or counts mean a new regroup."""
    train, val = mini_reds["reds_train_sharp"], mini_reds["reds_val_sharp"]
    out = tmp_path / "GT"
    regroup_reds(train, val, out, n_train=6, n_val=2, origin="a")
    frame = out / "000" / "00000000.png"
    stamp = frame.stat().st_ino
    regroup_reds(train, val, out, n_train=6, n_val=2, origin="a")
    assert frame.stat().st_ino == stamp
    src = train / "000" / "00000000.png"
    src.unlink()
    src.write_bytes(_png(200, (16, 16)))  # what a re-extraction from another archive leaves
    regroup_reds(train, val, out, n_train=6, n_val=2, origin="b")
    assert frame.read_bytes() == src.read_bytes()
    shutil.rmtree(val / "001")
    assert regroup_reds(train, val, out, n_train=6, n_val=1, origin="b")[-1] == "240"
    assert not (out / "241").exists()
