"""Datasets from the data stage's manifest: what training and evaluation read, whatever the profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from gsm.data.datasets import VIMEO_CENTER_INDEX, VideoTestDataset, clip_frames, vid4_clips, vimeo_test_sequences
from gsm.data.images import FolderStore, FrameStore
from gsm.data.lmdb_io import LmdbStore
from gsm.eval.protocols import TestSet


def _packed(entry: dict[str, Any], backend: str) -> bool:
    """Whether to read `entry` from its LMDBs: they are DVC-cached, so after `dvc pull` they are
    all there is (the frame trees are not pulled). Frame keys then come from their meta_info."""
    return backend == "lmdb" and "gt_lmdb" in entry


def _stores(entry: dict[str, Any], backend: str, lr: str = "lr") -> tuple[FrameStore, FrameStore]:
    if _packed(entry, backend):
        return LmdbStore(entry["gt_lmdb"]), LmdbStore(entry[f"{lr}_lmdb"])
    return FolderStore(Path(entry["gt_folder"])), FolderStore(Path(entry[f"{lr}_folder"]))


def _gt_source(entry: dict[str, Any], backend: str) -> str:
    """Where the GT frame keys are listed: the LMDB's meta_info when packed, else the folder tree."""
    return entry["gt_lmdb"] if _packed(entry, backend) else entry["gt_folder"]


def _entry(manifest: dict[str, Any], kind: str) -> dict[str, Any]:
    entry = manifest.get(kind)
    if not entry:
        raise ValueError(f"the {manifest.get('profile')} data has no {kind} dataset")
    return entry


def train_stores(manifest: dict[str, Any], kind: Literal["reds", "vimeo"]) -> tuple[FrameStore, FrameStore, dict[str, Any]]:
    """GT and LR stores of `kind`'s training data, and its manifest entry (train clips, lengths)."""
    entry = _entry(manifest, kind)
    gt, lr = _stores(entry, manifest.get("backend", "lmdb"))
    return gt, lr, entry


def _split(entry: dict[str, Any], split: Literal["test", "val"]) -> tuple[list[str], str]:
    """The clips of `split` and the set's name: the validation clips, "<test name> val", when the
    data has them, else the test clips under the test name."""
    if split == "val" and entry.get("val"):
        return entry["val"], f"{entry.get('test_name')} val"
    return entry.get("test", []), entry.get("test_name")


def split_name(manifest: dict[str, Any], kind: Literal["reds", "vimeo"], split: Literal["test", "val"]) -> str:
    """The name eval_sets gives `split` of `kind`, without opening any frames."""
    return _split(_entry(manifest, kind), split)[1]


def eval_sets(
    manifest: dict[str, Any], kind: Literal["reds", "vimeo", "vid4"], split: Literal["test", "val"] = "test"
) -> list[TestSet]:
    """The benchmark(s) of `kind`: REDS4, Vimeo-90K-T, Vid4 BI and BD (or their quickstart stand-ins).

    split "val": the data's validation clips under the test protocol, named "<test name> val" (the
    quickstart's, for training curves); data without them (the paper's) validates on its test set,
    as the field does with REDS4.
    """
    backend = manifest.get("backend", "lmdb")
    entry = _entry(manifest, kind)
    names, name = _split(entry, split)
    if kind == "reds":
        gt, lr = _stores(entry, backend)
        clips = clip_frames(_gt_source(entry, backend), names)
        protocol = entry.get("test_protocol", "reds4")
        return [TestSet(name, protocol, VideoTestDataset(gt, lr, clips))]
    if kind == "vimeo":
        gt, lr = _stores(entry, backend)
        seqs = vimeo_test_sequences(names)
        return [TestSet(name, "vimeo", VideoTestDataset(gt, lr, seqs, center_index=VIMEO_CENTER_INDEX))]
    clips = vid4_clips(_gt_source(entry, backend))
    return [TestSet(f"Vid4-{mode}", "vid4", VideoTestDataset(*_stores(entry, backend, lr), clips))
            for mode, lr in (("BI", "bi"), ("BD", "bd"))]  # fmt: skip
