"""Datasets from the data stage's manifest: what training and evaluation read, whatever the profile."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gsm.data.datasets import (
    VIMEO_CENTER_INDEX,
    VIMEO_FRAMES,
    RecurrentClipDataset,
    SeptupletDataset,
    VideoTestDataset,
    clip_frames,
    vid4_clips,
)
from gsm.data.images import FolderStore, FrameStore
from gsm.data.lmdb_io import LmdbStore

Protocol = Literal["reds4", "vimeo", "vid4"]


@dataclass(frozen=True)
class EvalSet:
    """One benchmark: its clips and how it is scored (gsm.eval applies the protocol)."""

    name: str
    protocol: Protocol
    dataset: VideoTestDataset


def _stores(entry: dict[str, Any], backend: str) -> tuple[FrameStore, FrameStore]:
    if backend == "lmdb" and "gt_lmdb" in entry:
        return LmdbStore(entry["gt_lmdb"]), LmdbStore(entry["lr_lmdb"])
    return FolderStore(Path(entry["gt_folder"])), FolderStore(Path(entry["lr_folder"]))


def _entry(manifest: dict[str, Any], kind: str) -> dict[str, Any]:
    entry = manifest.get(kind)
    if not entry:
        raise ValueError(f"the {manifest.get('profile')} data has no {kind} dataset")
    return entry


def train_dataset(
    manifest: dict[str, Any],
    kind: Literal["reds", "vimeo"],
    *,
    num_frames: int,
    gt_size: int,
    interval_list: Sequence[int] = (1,),
    random_reverse: bool = False,
    mirror: bool = False,
    seed: int = 0,
    repeat: int = 1,
) -> RecurrentClipDataset | SeptupletDataset:
    """The training clips of `kind`: REDS-style clips or Vimeo-style septuplets (`mirror`: 7 -> 14)."""
    entry = _entry(manifest, kind)
    gt, lr = _stores(entry, manifest.get("backend", "lmdb"))
    if kind == "reds":
        return RecurrentClipDataset(
            gt, lr, entry["train"], frames_per_clip=entry["frames_per_clip"], num_frames=num_frames,
            interval_list=interval_list, random_reverse=random_reverse, gt_size=gt_size, seed=seed,
            repeat=repeat,
        )  # fmt: skip
    if num_frames != VIMEO_FRAMES:
        raise ValueError(f"Vimeo septuplets have {VIMEO_FRAMES} frames, num_frames is {num_frames}")
    return SeptupletDataset(gt, lr, entry["train"], mirror=mirror, gt_size=gt_size, seed=seed, repeat=repeat)


def eval_sets(manifest: dict[str, Any], kind: Literal["reds", "vimeo", "vid4"]) -> list[EvalSet]:
    """The benchmark(s) of `kind`: REDS4, Vimeo-90K-T, Vid4 BI and BD (or their quickstart stand-ins)."""
    backend = manifest.get("backend", "lmdb")
    entry = _entry(manifest, kind)
    if kind == "reds":
        gt, lr = _stores(entry, backend)
        clips = clip_frames(entry["gt_folder"], entry["test"])
        return [EvalSet(entry["test_name"], "reds4", VideoTestDataset(gt, lr, clips))]
    if kind == "vimeo":
        gt, lr = _stores(entry, backend)
        seqs = {s: [f"{s}/im{i}" for i in range(1, VIMEO_FRAMES + 1)] for s in entry["test"]}
        return [EvalSet(entry["test_name"], "vimeo",
                         VideoTestDataset(gt, lr, seqs, center_index=VIMEO_CENTER_INDEX))]  # fmt: skip
    gt_folder = Path(entry["gt_folder"])
    clips = vid4_clips(gt_folder)
    return [
        EvalSet(f"Vid4-{mode}", "vid4", VideoTestDataset(FolderStore(gt_folder), FolderStore(Path(entry[key])), clips))
        for mode, key in (("BI", "bi_folder"), ("BD", "bd_folder"))
    ]
