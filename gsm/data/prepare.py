"""The data stage: from archives (paper profile) or bundled videos (quickstart) to packed LMDBs.

Both profiles end in the same place: a `manifest.json` naming, per dataset, its GT and LR frame
stores and its train/test clips. Training and evaluation read only the manifest (see
`gsm.data.catalog`), so they never care where the frames came from.

Layout under `data.root` (default `data/`):

* quickstart: `quickstart/{reds_like,vimeo_like}/{GT,BIx4}` (gsm.data.quickstart), LMDBs in
  `quickstart/lmdb/`, manifest `quickstart/manifest.json`.
* paper: archives in `downloads/`, unpacked in `raw/<source>/`; `paper/REDS/{GT,BIx4}` (270 clips,
  val merged as 240-269), Vimeo-90K GT in `raw/vimeo_septuplet/sequences` with BI LR degraded to
  `paper/Vimeo/BIx4`, `paper/Vid4/{GT,BIx4,BDx4}` (LR from their archives when a URL is set, else
  degraded from GT with our BI/BD), LMDBs in `paper/lmdb/`, manifest `paper/manifest.json`.

Every step is resumable (each writes a marker only when complete), so a rerun after a crash or a
Ctrl-C continues where it stopped and a finished stage costs seconds.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gsm.configs import from_mapping
from gsm.data.datasets import VID4_CLIPS, read_list
from gsm.data.download import fetch
from gsm.data.extract import extract
from gsm.data.lmdb_io import pack_lmdb
from gsm.data.reds import REDS_STRIP, regroup_reds, reds_partition
from gsm.data.sources import Source
from gsm.io import atomic_write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class QuickstartConfig:
    """How the bundled videos are cut (gsm.data.quickstart documents the splits)."""

    reds_clip_len: int = 25
    reds_test_frames: int = 26
    reds_gap: int = 6
    vimeo_test_frames: int = 40
    vimeo_gap: int = 5
    vimeo_train_stride: int = 3
    vimeo_test_stride: int = 7
    vimeo_crops: int = 3


@dataclass(frozen=True)
class DataConfig:
    profile: Literal["quickstart", "paper"] = "quickstart"
    root: str = "data"
    backend: Literal["lmdb", "folder"] = "lmdb"  # what training reads; folders stay for inspection
    png_level: int = 1  # PNG compression inside the LMDBs (BasicSR default)
    workers: int = 2  # processes for degradation and PNG encoding
    max_extract_gb: float = 200.0  # refuse archives that would unpack to more (zip bombs)
    download_retries: int = 3
    quickstart: QuickstartConfig = field(default_factory=QuickstartConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.png_level <= 9:
            raise ValueError(f"data.png_level must be 0..9, got {self.png_level}")
        if self.workers < 1:
            raise ValueError(f"data.workers must be >= 1, got {self.workers}")
        if self.max_extract_gb <= 0:
            raise ValueError(f"data.max_extract_gb must be > 0, got {self.max_extract_gb}")
        if self.download_retries < 0:
            raise ValueError(f"data.download_retries must be >= 0, got {self.download_retries}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "data") -> DataConfig:
        return from_mapping(cls, values, where)

    @property
    def profile_dir(self) -> Path:
        return Path(self.root) / self.profile

    @property
    def manifest_path(self) -> Path:
        return self.profile_dir / MANIFEST


def _pack(src: Path, dst: Path, cfg: DataConfig, progress: bool) -> str:
    # The frame trees are this stage's own derived data: an LMDB of older frames is repacked.
    pack_lmdb(src, dst, level=cfg.png_level, workers=cfg.workers, progress=progress, replace_stale=True)
    return str(dst)


def _stores(gt: Path, lr: Path, name: str, cfg: DataConfig, progress: bool) -> dict[str, str]:
    """Folder paths always; LMDB paths (packed now) when the backend is LMDB."""
    out = {"gt_folder": str(gt), "lr_folder": str(lr)}
    if cfg.backend == "lmdb":
        lmdb_dir = cfg.profile_dir / "lmdb"
        out["gt_lmdb"] = _pack(gt, lmdb_dir / f"{name}_GT.lmdb", cfg, progress)
        out["lr_lmdb"] = _pack(lr, lmdb_dir / f"{name}_BIx4.lmdb", cfg, progress)
    return out


def prepare_quickstart(cfg: DataConfig, *, progress: bool = True) -> dict[str, Any]:
    """Quickstart frames from the bundled videos, degraded and packed by the real datasets' code."""
    from gsm.data.quickstart import build_quickstart

    q = cfg.quickstart
    s = build_quickstart(
        cfg.profile_dir, reds_clip_len=q.reds_clip_len, reds_test_frames=q.reds_test_frames,
        reds_gap=q.reds_gap, vimeo_test_frames=q.vimeo_test_frames, vimeo_gap=q.vimeo_gap,
        vimeo_train_stride=q.vimeo_train_stride, vimeo_test_stride=q.vimeo_test_stride,
        vimeo_crops=q.vimeo_crops, workers=cfg.workers, progress=progress,
    )  # fmt: skip
    reds_meta = json.loads((s.reds.root / "meta.json").read_text())
    return {
        "profile": "quickstart",
        "reds": {
            "kind": "reds",
            **_stores(s.reds.gt, s.reds.lr, "reds_like", cfg, progress),
            "train": list(s.reds.train),
            "test": list(s.reds.test),
            "frames_per_clip": reds_meta["frames_per_clip"],
            "test_name": "quickstart-REDS",
            # Scored on Y, all frames (the vid4 rule): the quickstart is judged by Y-PSNR gain.
            "test_protocol": "vid4",
        },
        "vimeo": {
            "kind": "vimeo",
            **_stores(s.vimeo.gt, s.vimeo.lr, "vimeo_like", cfg, progress),
            "train": list(s.vimeo.train),
            "test": list(s.vimeo.test),
            "test_name": "quickstart-Vimeo",
        },
        "vid4": None,
    }


def _fetch_extract(src: Source, cfg: DataConfig, strip: int, progress: bool) -> Path:
    root = Path(cfg.root)
    archive = fetch(src, root / "downloads", retries=cfg.download_retries, progress=progress)
    return extract(archive, root / "raw" / src.name, max_bytes=int(cfg.max_extract_gb * 1e9), strip=strip,
                   progress=progress)


def find_clip_parent(root: Path, clips: tuple[str, ...], what: str) -> Path:
    """The folder under `root` holding all of `clips` as sub-folders (mirrors nest Vid4 differently)."""
    for cand in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        if all((cand / c).is_dir() for c in clips):
            return cand
    raise FileNotFoundError(f"{what}: no folder under {root} holds the clip folders {', '.join(clips)}")


def _vid4(sources: dict[str, Source], cfg: DataConfig, progress: bool) -> dict[str, str]:
    """Vid4 GT from its archive; BI/BD LR from theirs when a URL is set, else degraded from GT here."""
    from gsm.data.degrade import degrade_tree

    out_root = cfg.profile_dir / "Vid4"
    gt_raw = find_clip_parent(_fetch_extract(sources["vid4_gt"], cfg, 0, progress), VID4_CLIPS, "vid4_gt")
    out = {"gt_folder": str(gt_raw)}
    for mode, name in (("BI", "vid4_bix4"), ("BD", "vid4_bdx4")):
        if sources[name].url:
            lr = find_clip_parent(_fetch_extract(sources[name], cfg, 0, progress), VID4_CLIPS, name)
        else:
            lr = out_root / f"{mode}x4"
            degrade_tree(gt_raw, lr, mode=mode, scale=4, workers=cfg.workers, progress=progress)
        out[f"{mode.lower()}_folder"] = str(lr)
    return out


def prepare_paper(cfg: DataConfig, sources: dict[str, Source], *, progress: bool = True) -> dict[str, Any]:
    """REDS, Vimeo-90K and Vid4 from their archives (downloads resume; every step is skipped when done)."""
    from gsm.data.degrade import degrade_tree

    raw = {name: _fetch_extract(sources[name], cfg, strip, progress) for name, strip in REDS_STRIP.items()}
    reds_dir = cfg.profile_dir / "REDS"
    clips = regroup_reds(raw["reds_train_sharp"], raw["reds_val_sharp"], reds_dir / "GT")
    regroup_reds(raw["reds_train_sharp_bicubic"], raw["reds_val_sharp_bicubic"], reds_dir / "BIx4")
    train, test = reds_partition(clips)

    vimeo_raw = _fetch_extract(sources["vimeo_septuplet"], cfg, 1, progress)  # vimeo_septuplet/...
    vimeo_gt, vimeo_lr = vimeo_raw / "sequences", cfg.profile_dir / "Vimeo" / "BIx4"
    degrade_tree(vimeo_gt, vimeo_lr, mode="BI", scale=4, workers=cfg.workers, progress=progress)
    lists = {k: read_list(vimeo_raw / f"sep_{k}list.txt") for k in ("train", "test")}

    return {
        "profile": "paper",
        "reds": {
            "kind": "reds",
            **_stores(reds_dir / "GT", reds_dir / "BIx4", "REDS", cfg, progress),
            "train": train,
            "test": test,
            "frames_per_clip": {c: sum(1 for _ in (reds_dir / "GT" / c).glob("*.png")) for c in clips},
            "test_name": "REDS4",
        },
        "vimeo": {
            "kind": "vimeo",
            **_stores(vimeo_gt, vimeo_lr, "Vimeo", cfg, progress),
            "train": lists["train"],
            "test": lists["test"],
            "test_name": "Vimeo-90K-T",
        },
        "vid4": _vid4(sources, cfg, progress),
    }


def prepare_data(cfg: DataConfig, sources: dict[str, Source], *, progress: bool = True) -> Path:
    """Run the data stage of `cfg.profile`; returns the manifest's path (written last, atomically)."""
    cfg.manifest_path.unlink(missing_ok=True)  # a manifest only ever describes finished data
    if cfg.profile == "quickstart":
        manifest = prepare_quickstart(cfg, progress=progress)
    else:
        manifest = prepare_paper(cfg, sources, progress=progress)
    manifest["backend"] = cfg.backend
    atomic_write_json(cfg.manifest_path, manifest)
    return cfg.manifest_path


def read_manifest(cfg: DataConfig) -> dict[str, Any]:
    path = cfg.manifest_path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no data manifest; run the data stage first (`gsm prepare`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt manifest ({exc.msg}); rerun `gsm prepare`") from None

