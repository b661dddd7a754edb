"""Training/test datasets on tiny synthetic stores whose GT is np.kron of LR, so pairing is checkable.

Pixel encoding of every LR frame: channel 0 = frame number, channel 1 = clip number, channel 2 =
random (unique windows: lets a test find where, and under which flip/transpose, a patch was cut).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gsm.data.datasets import (
    VIMEO_CENTER_INDEX,
    RecurrentClipDataset,
    SeptupletDataset,
    VideoTestDataset,
    clip_frames,
    read_list,
    reds4_clips,
    vid4_clips,
    vimeo_test_sequences,
)
from gsm.data.images import FolderStore, write_png

LR_H, LR_W, N_FRAMES = 12, 16, 10
CLIPS = ["000", "001", "002"]
SEQS = ["00001/0001", "00001/0002", "00002/0001"]


def _lr_frame(rng: np.random.Generator, frame: int, clip: int, h: int = LR_H, w: int = LR_W) -> np.ndarray:
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0], img[..., 1] = frame, clip
    img[..., 2] = rng.integers(0, 256, (h, w))
    return img


def _kron(lr: np.ndarray, s: int = 4) -> np.ndarray:
    return np.kron(lr, np.ones((s, s, 1), np.uint8))


def _put(root: Path, key: str, lr: np.ndarray, gt: np.ndarray | None = None) -> None:
    write_png(root / "LR" / f"{key}.png", lr)
    write_png(root / "GT" / f"{key}.png", _kron(lr) if gt is None else gt)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vsr")
    rng = np.random.default_rng(0)
    for c, clip in enumerate(CLIPS):
        for f in range(N_FRAMES):
            _put(root, f"{clip}/{f:08d}", _lr_frame(rng, f, c))
    for c, seq in enumerate(SEQS):
        for i in range(1, 8):
            _put(root, f"{seq}/im{i}", _lr_frame(rng, i, c))
    # bad/00000003: GT one LR pixel too narrow; badfirst/00000000: GT at 2x only
    for f in range(N_FRAMES):
        lr = _lr_frame(rng, f, 9)
        _put(root, f"bad/{f:08d}", lr, _kron(lr)[:, :-4] if f == 3 else None)
        _put(root, f"badfirst/{f:08d}", lr, _kron(lr, 2) if f == 0 else None)
    for clip, n in [("calendar", 3), ("city", 2), ("foliage", 2), ("walk", 4)]:
        for f in range(n):
            _put(root, f"vid4/{clip}/{f:08d}", _lr_frame(rng, f, 0, 8, 8))
    (root / "sep_testlist.txt").write_text("00001/0001\n00002/0001\n\n")
    return root


def _stores(tree: Path) -> tuple[FolderStore, FolderStore]:
    return FolderStore(tree / "GT"), FolderStore(tree / "LR")


def _to_u8(t: torch.Tensor) -> np.ndarray:
    """T x 3 x H x W float -> T x H x W x 3 uint8 (exact: values are k/255)."""
    return (t.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def _locate(patch: np.ndarray, frame: np.ndarray) -> tuple[int, int, int, int]:
    """(hflip, vflip, transpose, y, x): where and how `patch` was cut from `frame`; unique by randomness."""
    hits = []
    for hf in (0, 1):
        for vf in (0, 1):
            for tr in (0, 1):
                img = frame[:, ::-1] if hf else frame
                img = img[::-1] if vf else img
                img = img.transpose(1, 0, 2) if tr else img
                ph, pw = patch.shape[:2]
                for y in range(img.shape[0] - ph + 1):
                    for x in range(img.shape[1] - pw + 1):
                        if np.array_equal(img[y : y + ph, x : x + pw], patch):
                            hits.append((hf, vf, tr, y, x))
    assert len(hits) == 1, hits
    return hits[0]


def test_recurrent_shapes_range_key(tree: Path) -> None:
    ds = RecurrentClipDataset(*_stores(tree), CLIPS, frames_per_clip=N_FRAMES, num_frames=5, gt_size=16)
    assert len(ds) == 3
    s = ds[1]
    assert s["lq"].shape == (5, 3, 4, 4) and s["gt"].shape == (5, 3, 16, 16)
    assert s["lq"].dtype == torch.float32 and s["gt"].dtype == torch.float32
    assert 0 <= s["lq"].min() and s["gt"].max() <= 1
    clip, frames = ds.frame_indices(1)
    assert clip == "001" and s["key"] == f"001/{frames[0]:08d}"
    full = RecurrentClipDataset(*_stores(tree), CLIPS, frames_per_clip=N_FRAMES, num_frames=2, gt_size=None,
                                augment=False)  # fmt: skip
    assert full[0]["lq"].shape == (2, 3, LR_H, LR_W) and full[0]["gt"].shape == (2, 3, 4 * LR_H, 4 * LR_W)
    rep = RecurrentClipDataset(*_stores(tree), CLIPS, frames_per_clip=N_FRAMES, num_frames=2, gt_size=16, repeat=4)
    assert len(rep) == 12 and rep.frame_indices(4)[0] == "001"


def test_recurrent_crop_pairing_under_augmentation(tree: Path) -> None:
    gt_store, lr_store = _stores(tree)
    ds = RecurrentClipDataset(gt_store, lr_store, CLIPS, frames_per_clip=N_FRAMES, num_frames=3, gt_size=16)
    seen = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            lq, gt = _to_u8(s["lq"]), _to_u8(s["gt"])
            clip, frames = ds.frame_indices(i)
            places = set()
            for t, f in enumerate(frames):
                assert np.array_equal(gt[t], _kron(lq[t]))  # GT window at 4x the LR window
                assert (lq[t, ..., 0] == f).all() and (lq[t, ..., 1] == CLIPS.index(clip)).all()
                places.add(_locate(lq[t], lr_store.get(f"{clip}/{f:08d}")))
            assert len(places) == 1  # one crop and one flip/transpose for all frames of the sample
            seen |= places
    assert {p[:3] for p in seen} != {(0, 0, 0)}  # augmentation did happen
    plain = RecurrentClipDataset(gt_store, lr_store, CLIPS, frames_per_clip=N_FRAMES, num_frames=3, gt_size=16,
                                 augment=False)  # fmt: skip
    for i in range(len(plain)):
        clip, frames = plain.frame_indices(i)
        assert _locate(_to_u8(plain[i]["lq"])[0], lr_store.get(f"{clip}/{frames[0]:08d}"))[:3] == (0, 0, 0)


def test_recurrent_interval_start_and_reverse(tree: Path) -> None:
    def orders(**kw: object) -> list[list[int]]:
        ds = RecurrentClipDataset(*_stores(tree), ["000"], frames_per_clip=N_FRAMES, gt_size=4, repeat=40, **kw)
        out = []
        for i in range(len(ds)):
            got = _to_u8(ds[i]["lq"])[:, 0, 0, 0].tolist()
            assert got == ds.frame_indices(i)[1]
            out.append(got)
        return out

    fwd = orders(num_frames=4, interval_list=[2])
    assert all(np.diff(o).tolist() == [2, 2, 2] for o in fwd)
    assert {o[0] for o in fwd} == {0, 1, 2, 3}  # span 7 fits at starts 0..3, all reachable
    mixed = orders(num_frames=3, interval_list=[1, 3])
    assert {o[1] - o[0] for o in mixed} == {1, 3} and max(o[-1] for o in mixed) <= N_FRAMES - 1
    rev = orders(num_frames=4, interval_list=[1], random_reverse=True)
    assert {tuple(np.diff(o)) for o in rev} == {(1, 1, 1), (-1, -1, -1)}


def test_recurrent_construction_errors(tree: Path) -> None:
    stores = _stores(tree)
    with pytest.raises(ValueError, match="clip 001: 10 frames"):
        lengths = {"000": 13, "001": 10, "002": 13}
        RecurrentClipDataset(*stores, CLIPS, frames_per_clip=lengths, num_frames=4, interval_list=[1, 4])
    with pytest.raises(ValueError, match="clip 002: 5 frames"):
        RecurrentClipDataset(*stores, CLIPS, frames_per_clip={"000": 10, "001": 10, "002": 5}, num_frames=6)
    RecurrentClipDataset(*stores, CLIPS, frames_per_clip=N_FRAMES, num_frames=10, gt_size=16)  # exactly fits
    with pytest.raises(ValueError, match="does not fit"):
        RecurrentClipDataset(*stores, CLIPS, frames_per_clip=N_FRAMES, num_frames=2, gt_size=64)
    with pytest.raises(ValueError, match="multiple"):
        RecurrentClipDataset(*stores, CLIPS, frames_per_clip=N_FRAMES, num_frames=2, gt_size=18)
    with pytest.raises(ValueError, match="badfirst/00000000.*4x"):
        RecurrentClipDataset(*stores, ["badfirst"], frames_per_clip=N_FRAMES, num_frames=2, gt_size=16)
    bad = RecurrentClipDataset(*stores, ["bad"], frames_per_clip=N_FRAMES, num_frames=N_FRAMES, gt_size=16)
    with pytest.raises(ValueError, match="bad/00000003"):
        bad[0]


def test_septuplet_order_mirror_and_pairing(tree: Path) -> None:
    gt_store, lr_store = _stores(tree)
    ds = SeptupletDataset(gt_store, lr_store, SEQS, gt_size=16)
    s = ds[2]
    assert s["key"] == "00002/0001" and s["lq"].shape == (7, 3, 4, 4) and s["gt"].shape == (7, 3, 16, 16)
    lq = _to_u8(s["lq"])
    assert lq[:, 0, 0, 0].tolist() == list(range(1, 8)) and (lq[..., 1] == 2).all()
    assert np.array_equal(_to_u8(s["gt"]), np.stack([_kron(x) for x in lq]))
    assert len({_locate(lq[t], lr_store.get(f"00002/0001/im{t + 1}")) for t in range(7)}) == 1
    m = SeptupletDataset(gt_store, lr_store, SEQS, gt_size=16, mirror=True)[2]
    assert m["lq"].shape == (14, 3, 4, 4) and m["gt"].shape == (14, 3, 16, 16)
    assert _to_u8(m["lq"])[:, 0, 0, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 7, 6, 5, 4, 3, 2, 1]
    assert torch.equal(m["lq"][:7], s["lq"]) and torch.equal(m["gt"][7:], s["gt"].flip(0))
    with pytest.raises(ValueError, match="does not fit"):
        SeptupletDataset(gt_store, lr_store, SEQS, gt_size=68)


def test_determinism_across_workers_and_epochs(tree: Path) -> None:
    def batches(workers: int, epoch: int, seed: int = 7) -> list[dict[str, object]]:
        ds = RecurrentClipDataset(*_stores(tree), CLIPS, frames_per_clip=N_FRAMES, num_frames=3, gt_size=16,
                                  random_reverse=True, interval_list=[1, 2], seed=seed, repeat=2)  # fmt: skip
        ds.set_epoch(epoch)
        return list(DataLoader(ds, batch_size=2, num_workers=workers))

    def same(a: list[dict[str, object]], b: list[dict[str, object]]) -> bool:
        return len(a) == len(b) and all(
            torch.equal(x["lq"], y["lq"]) and torch.equal(x["gt"], y["gt"]) and x["key"] == y["key"]
            for x, y in zip(a, b)
        )

    b0 = batches(0, 1)
    assert len(b0) == 3 and same(b0, batches(2, 1))
    assert not same(b0, batches(0, 2)) and not same(b0, batches(0, 1, seed=8))


def test_video_test_dataset_and_listings(tree: Path) -> None:
    gt_store, lr_store = _stores(tree)
    clips = reds4_clips(tree / "GT", clips=["000", "002"])
    assert clips["002"] == [f"002/{f:08d}" for f in range(N_FRAMES)]
    keys = [f"{c}/{f:08d}" for c in ("002", "000", "001") for f in reversed(range(N_FRAMES))]
    assert reds4_clips(keys, clips=["000", "002"]) == clips
    ds = VideoTestDataset(gt_store, lr_store, clips)
    s = ds[1]
    assert s["clip"] == "002" and s["frames"] == [f"{f:08d}" for f in range(N_FRAMES)]
    assert s["lq"].shape == (N_FRAMES, 3, LR_H, LR_W) and s["gt"].shape == (N_FRAMES, 3, 4 * LR_H, 4 * LR_W)
    assert _to_u8(s["lq"])[:, 0, 0, 0].tolist() == list(range(N_FRAMES))
    assert torch.equal(s["gt"], s["lq"].repeat_interleave(4, 2).repeat_interleave(4, 3))
    with pytest.raises(ValueError, match="clip 011"):
        reds4_clips(tree / "GT")

    vimeo = vimeo_test_sequences(tree / "sep_testlist.txt")
    assert list(vimeo) == ["00001/0001", "00002/0001"] and vimeo["00002/0001"][VIMEO_CENTER_INDEX] == "00002/0001/im4"
    vds = VideoTestDataset(gt_store, lr_store, vimeo, center_index=VIMEO_CENTER_INDEX)
    assert vds.center_index == 3 and vds[0]["frames"] == [f"im{i}" for i in range(1, 8)]
    assert read_list(tree / "sep_testlist.txt") == ["00001/0001", "00002/0001"]

    vid4 = vid4_clips(tree / "GT" / "vid4")
    assert {c: len(k) for c, k in vid4.items()} == {"calendar": 3, "city": 2, "foliage": 2, "walk": 4}
    v = VideoTestDataset(FolderStore(tree / "GT" / "vid4"), FolderStore(tree / "LR" / "vid4"), vid4)[3]
    assert v["clip"] == "walk" and v["lq"].shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="bad/00000003"):
        VideoTestDataset(gt_store, lr_store, clip_frames(tree / "GT", ["bad"]))[0]


def test_lmdb_backend_gives_the_same_samples(tree: Path, tmp_path: Path) -> None:
    lmdb_io = pytest.importorskip("gsm.data.lmdb_io")
    for part in ("GT", "LR"):
        src = tmp_path / part
        for clip in CLIPS:
            (src / clip).mkdir(parents=True)
            for f in range(N_FRAMES):
                (src / clip / f"{f:08d}.png").write_bytes((tree / part / clip / f"{f:08d}.png").read_bytes())
        lmdb_io.pack_lmdb(src, tmp_path / f"{part}.lmdb", progress=False, workers=1)
    gt_db, lr_db = lmdb_io.LmdbStore(tmp_path / "GT.lmdb"), lmdb_io.LmdbStore(tmp_path / "LR.lmdb")
    kw = dict(frames_per_clip=N_FRAMES, num_frames=4, gt_size=16, random_reverse=True, seed=3)
    folder = RecurrentClipDataset(*_stores(tree), CLIPS, **kw)
    db = RecurrentClipDataset(gt_db, lr_db, CLIPS, **kw)
    for a, b in zip(DataLoader(folder, batch_size=3), DataLoader(db, batch_size=3, num_workers=2)):
        assert torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"]) and a["key"] == b["key"]
    clips = reds4_clips(tmp_path / "GT.lmdb", clips=["001"])  # listed from meta_info.txt
    assert clips == reds4_clips(tree / "GT", clips=["001"])
    t = VideoTestDataset(gt_db, lr_db, clips)[0]
    assert torch.equal(t["gt"], VideoTestDataset(*_stores(tree), clips)[0]["gt"])


def test_preload_gives_the_same_samples_and_refuses_what_does_not_fit(tree: Path) -> None:
    from gsm.data.images import MemoryStore
    from gsm.train.data import preload

    def reds() -> RecurrentClipDataset:
        return RecurrentClipDataset(*_stores(tree), CLIPS, frames_per_clip=N_FRAMES, num_frames=3, gt_size=16,
                                    random_reverse=True, interval_list=[1, 2], seed=3, repeat=2)  # fmt: skip

    for make in (reds, lambda: SeptupletDataset(*_stores(tree), SEQS, gt_size=16, seed=3)):
        streamed, loaded = make(), make()
        nbytes = preload(loaded, "train.reds.preload", progress=False)
        assert isinstance(loaded.gt_store, MemoryStore) and isinstance(loaded.lr_store, MemoryStore)
        assert len(loaded.gt_store.frames) == len(set(streamed.all_keys())) and nbytes > 0
        for i in range(len(streamed)):
            a, b = streamed[i], loaded[i]
            assert torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"]) and a["key"] == b["key"]
    small = reds()
    with pytest.raises(ValueError, match=r"^train\.reds\.preload: the 30 training frames need 0\.3 MiB decoded, more "
                                         r"than half of the 0\.0 MiB available; set it to false$"):  # fmt: skip
        preload(small, "train.reds.preload", progress=False, memory=1000)
    assert isinstance(small.gt_store, FolderStore)  # nothing half-loaded
