"""New videos for scheduled retraining: fingerprinted, cut, degraded and packed as data versions.

Why: a retrain on the data the champion already saw can only reproduce it. New videos dropped in
`incoming.folder` (or listed in `incoming.urls`) become the next version `vNNNN/` of the store
`<incoming.store>/<profile>/`, which is `dvc add`-ed as one folder, so every ingest is a DVC data
version (the md5 in `<incoming.store>/<profile>.dvc`) that git can commit and `dvc push` can share.
(Not under `data.root`: that folder is git-ignored, and a `.dvc` file must be committable.)

* A video is known by the sha256 of its bytes; `ledger.json` records every video ingested, so a
  video is consumed once and a renamed copy is not new.
* Each video is cut in time into a train part, a gap and a held-out part at its end (no frame in
  two parts), both as Vimeo-like septuplets `<video sha[:12]>/<NNNN>/im1..7` (what the retrain
  recipe, `train.vimeo`, trains on), GT cropped to multiples of 4, degraded with the project's
  MATLAB-exact BI x4 and packed into LMDBs; `vNNNN/manifest.json` has the data manifest's shape
  (a `vimeo` entry), so gsm.data.catalog reads it as it reads the main data.
* A version is built in a hidden folder and renamed into place, then the ledger is replaced
  atomically: a failure (an unreadable video names its file) leaves the store as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from gsm.configs import from_mapping
from gsm.data.datasets import VIMEO_CENTER_INDEX, VideoTestDataset, vimeo_test_sequences
from gsm.data.images import FrameStore, close_store, write_png
from gsm.data.prepare import DataConfig
from gsm.data.quickstart import SEQ_LEN, split_vimeo_like
from gsm.eval.protocols import TestSet
from gsm.io import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

LEDGER = "ledger.json"
VIDEO_TYPES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
VERSION = re.compile(r"v\d{4,}")
BASE = "base"  # prefix of the main data's keys when trained beside incoming versions


@dataclass(frozen=True)
class IncomingConfig:
    """Where new videos come from and how they are split; no folder and no URLs: no incoming data."""

    folder: str | None = None  # new videos are dropped here (read, never modified)
    store: str = "incoming"  # the ingested versions: <store>/<profile>/, tracked by <store>/<profile>.dvc
    urls: tuple[str, ...] = ()  # fetched into <store>/downloads (http(s), file:// or a path)
    heldout_fraction: float = 0.25  # the last part of each video, for the gate only
    gap: int = 5  # frames between train and held-out parts, in neither
    train_stride: int = 3  # a train septuplet starts every N frames
    heldout_stride: int = 7  # a held-out septuplet starts every N frames
    crop: tuple[int, int] | None = None  # centred GT window [H, W] (null: the frame cut to multiples of 4)
    max_frames: int | None = None  # the first N frames of each video (null: all)
    tolerance_db: float = 0.05  # gate: the benchmark may drop by at most this (dB) ...
    dvc_add: bool = True  # `dvc add` the store after a new version (when in a DVC project)

    def __post_init__(self) -> None:
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"incoming.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        for key, least in (("gap", 0), ("train_stride", 1), ("heldout_stride", 1), ("tolerance_db", 0)):
            if getattr(self, key) < least:
                raise ValueError(f"incoming.{key} must be >= {least}, got {getattr(self, key)}")
        if self.crop is not None and (len(self.crop) != 2 or min(self.crop) < 4 or any(c % 4 for c in self.crop)):
            raise ValueError(f"incoming.crop must be [H, W], multiples of 4, got {list(self.crop)}")
        if self.max_frames is not None and self.max_frames < 2 * SEQ_LEN:
            raise ValueError(f"incoming.max_frames must be >= {2 * SEQ_LEN} or null, got {self.max_frames}")
        if not self.store.strip():
            raise ValueError("incoming.store must be a folder path, got an empty string")
        if self.folder is not None and not self.folder.strip():
            raise ValueError("incoming.folder must be a path or null, got an empty string")
        for i, url in enumerate(self.urls):
            if not url.strip():
                raise ValueError(f"incoming.urls[{i}] is empty")

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "incoming") -> IncomingConfig:
        return from_mapping(cls, values, where)

    @property
    def configured(self) -> bool:
        return self.folder is not None or bool(self.urls)

    def split_params(self) -> dict[str, Any]:
        """What a version's frames depend on besides the videos (in its digest)."""
        keys = ("heldout_fraction", "gap", "train_stride", "heldout_stride", "crop", "max_frames")
        return {k: list(v) if isinstance(v := getattr(self, k), tuple) else v for k in keys}


@dataclass(frozen=True)
class IngestResult:
    store: Path
    new_version: str | None  # the version made by this call (None: nothing new)
    versions: tuple[dict[str, Any], ...]  # every version in the ledger, oldest first
    videos_seen: int  # videos found in the folder and URLs
    dvc_md5: str | None  # the store's md5 in its .dvc file (None: not DVC-tracked)


def incoming_dir(cfg: IncomingConfig, data: DataConfig) -> Path:
    return Path(cfg.store) / data.profile


# --- finding and fingerprinting -------------------------------------------------------------------


def find_videos(cfg: IncomingConfig, store: Path, *, retries: int = 3, progress: bool = True) -> list[Path]:
    """The videos in `incoming.folder` (sorted by name) and those fetched from `incoming.urls`."""
    from gsm.data.download import fetch
    from gsm.data.sources import Source

    found: list[Path] = []
    if cfg.folder is not None:
        folder = Path(cfg.folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"incoming.folder: {folder}: no such folder")
        found = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_TYPES)
    for i, url in enumerate(cfg.urls):
        found.append(fetch(Source(f"incoming_{i}", url), store / "downloads", retries=retries, progress=progress))
    return found


def new_videos(videos: Sequence[Path], known: Mapping[str, Any], progress: bool = True) -> list[tuple[Path, str]]:
    """(path, sha256) of the videos whose content is not in `known`, first copy of each content only."""
    out: dict[str, Path] = {}
    for path in tqdm(videos, desc="fingerprint", unit="video", disable=not progress):
        sha = sha256_file(path)
        if sha not in known and sha not in out:
            out[sha] = path
    return [(path, sha) for sha, path in out.items()]


# --- the ledger -----------------------------------------------------------------------------------


def read_ledger(store: Path) -> dict[str, Any]:
    """{"videos": {sha256: record}, "versions": [version, ...]}; empty when nothing was ingested."""
    path = store / LEDGER
    if not path.is_file():
        return {"videos": {}, "versions": []}
    try:
        ledger = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt ledger ({exc.msg}); restore it with `dvc checkout {store}`") from None
    if not isinstance(ledger, dict) or not {"videos", "versions"} <= ledger.keys():
        raise ValueError(f"{path}: not an incoming ledger; restore it with `dvc checkout {store}`")
    return ledger


def next_version_id(ledger: Mapping[str, Any]) -> str:
    return f"v{len(ledger['versions']) + 1:04d}"


def version_digest(shas: Sequence[str], split: Mapping[str, Any]) -> str:
    """A version's identity: its videos' contents, how they were cut and how frames were degraded."""
    from gsm.data.degrade import DEGRADATION_VERSION

    text = json.dumps({"videos": sorted(shas), "split": split, "degradation": DEGRADATION_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _remove_leftovers(store: Path, ledger: Mapping[str, Any]) -> None:
    """Folders of a build that died (hidden) or of a version the ledger never got (killed in between)."""
    known = {v["id"] for v in ledger["versions"]}
    for path in store.glob("*") if store.is_dir() else ():
        if path.is_dir() and (path.name.startswith(".building-") or (VERSION.fullmatch(path.name) and path.name not in known)):
            log.info("removing %s: left by an unfinished ingest", path)
            shutil.rmtree(path)


# --- cutting --------------------------------------------------------------------------------------


def read_frames(path: Path) -> Iterator[np.ndarray]:
    """RGB uint8 frames of a video, in order; a file OpenCV cannot open is a one-line error."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"{path}: OpenCV cannot read it as a video")
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                return
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


def probe(path: Path, limit: int | None) -> tuple[int, tuple[int, int]]:
    """(frames, (H, W)) by decoding (container frame counts are unreliable), up to `limit` frames."""
    n, shape = 0, None
    for img in read_frames(path):
        if shape is None:
            shape = img.shape[:2]
        elif img.shape[:2] != shape:
            raise ValueError(f"{path}: frame {n} is {img.shape[1]}x{img.shape[0]}, the first {shape[1]}x{shape[0]}")
        n += 1
        if limit is not None and n >= limit:
            break
    if shape is None:
        raise ValueError(f"{path}: no frame decodes (not a video, or a codec OpenCV lacks)")
    return n, shape


def split_video(n: int, cfg: IncomingConfig, name: str) -> tuple[list[int], list[int]]:
    """Start frames of train and held-out septuplets: train first, `gap` frames, held-out last."""
    held = max(SEQ_LEN, round(n * cfg.heldout_fraction))
    try:
        train, _, heldout = split_vimeo_like(n, held, cfg.gap, cfg.train_stride, cfg.heldout_stride)
    except ValueError as exc:
        raise ValueError(f"{name}: {n} frames are too few to cut ({exc})") from None
    return train, heldout


def window(shape: tuple[int, int], crop: tuple[int, int] | None) -> tuple[slice, slice]:
    """The centred GT window: `crop`, else the largest multiple-of-4 frame (GT must be 4x its LR)."""
    h, w = shape
    ch, cw = crop if crop is not None else (h - h % 4, w - w % 4)
    if ch > h or cw > w or min(ch, cw) < 4:
        raise ValueError(f"incoming.crop {cw}x{ch} does not fit {w}x{h} frames")
    y, x = (h - ch) // 2, (w - cw) // 2
    return slice(y, y + ch), slice(x, x + cw)


def cut_video(path: Path, sha: str, cfg: IncomingConfig, gt: Path, progress: bool = True) -> dict[str, Any]:
    """Write `path`'s septuplets under `gt/<sha[:12]>/`; returns its ledger record."""
    n, shape = probe(path, cfg.max_frames)
    train, heldout = split_video(n, cfg, str(path))
    ys, xs = window(shape, cfg.crop)
    clip = sha[:12]
    starts = train + heldout
    members: dict[int, list[tuple[int, int]]] = {}
    for k, s in enumerate(starts):
        for i in range(SEQ_LEN):
            members.setdefault(s + i, []).append((k, i + 1))
    frames = read_frames(path)
    for f, img in enumerate(tqdm(frames, total=n, desc=path.name, unit="frame", disable=not progress)):
        if f >= n:
            break
        for k, im in members.get(f, []):
            write_png(gt / clip / f"{k + 1:04d}" / f"im{im}.png", np.ascontiguousarray(img[ys, xs]))
    names = [f"{clip}/{k + 1:04d}" for k in range(len(starts))]
    return {
        "name": path.name, "source": str(path), "size": path.stat().st_size, "frames": n,
        "train": names[: len(train)], "heldout": names[len(train):],
        "train_frames": [train[0], train[-1] + SEQ_LEN - 1], "heldout_frames": [heldout[0], heldout[-1] + SEQ_LEN - 1],
    }  # fmt: skip


# --- building a version ---------------------------------------------------------------------------


def build_version(
    videos: Sequence[tuple[Path, str]], cfg: IncomingConfig, data: DataConfig, tmp: Path, final: Path,
    *, progress: bool = True,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """GT septuplets, BI x4 LR, LMDBs and manifest of `videos` in `tmp` (paths naming `final`, where
    the caller renames it). Returns (video records by sha256, manifest)."""
    from gsm.data.degrade import DEGRADATION_VERSION, degrade_tree
    from gsm.data.lmdb_io import pack_lmdb

    records = {sha: cut_video(path, sha, cfg, tmp / "GT", progress) for path, sha in videos}
    degrade_tree(tmp / "GT", tmp / "BIx4", mode="BI", scale=4, workers=data.workers, progress=progress)
    entry: dict[str, Any] = {"kind": "vimeo", "name": final.name, "gt_folder": str(final / "GT"),
                             "lr_folder": str(final / "BIx4"), "val": [], "test_name": f"incoming-{final.name}",
                             "train": [s for r in records.values() for s in r["train"]],
                             "test": [s for r in records.values() for s in r["heldout"]]}  # fmt: skip
    if data.backend == "lmdb":
        for label in ("GT", "BIx4"):
            pack_lmdb(tmp / label, tmp / f"{label}.lmdb", level=data.png_level, workers=data.workers, progress=progress)
        entry.update(gt_lmdb=str(final / "GT.lmdb"), lr_lmdb=str(final / "BIx4.lmdb"))
    digest = version_digest(list(records), cfg.split_params())
    manifest = {"profile": data.profile, "backend": data.backend, "reds": None, "vid4": None, "vimeo": entry,
                "made_from": {"incoming": digest, "degradation": DEGRADATION_VERSION}}  # fmt: skip
    atomic_write_json(tmp / "manifest.json", manifest)
    return records, manifest


def ingest(cfg: IncomingConfig, data: DataConfig, *, retries: int = 3, progress: bool = True) -> IngestResult:
    """Turn the not-yet-seen videos into the store's next version; nothing new: nothing written."""
    store = incoming_dir(cfg, data)
    videos = find_videos(cfg, store, retries=retries, progress=progress)
    ledger = read_ledger(store)
    _remove_leftovers(store, ledger)
    todo = new_videos(videos, ledger["videos"], progress)
    if not todo:
        return IngestResult(store, None, tuple(ledger["versions"]), len(videos), dvc_md5(store))
    vid = next_version_id(ledger)
    tmp = store / f".building-{vid}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        records, manifest = build_version(todo, cfg, data, tmp, store / vid, progress=progress)
        os.replace(tmp, store / vid)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    version = {"id": vid, "digest": manifest["made_from"]["incoming"], "videos": list(records),
               "created": datetime.now(UTC).isoformat(timespec="seconds"), "split": cfg.split_params()}  # fmt: skip
    ledger["versions"].append(version)
    ledger["videos"].update({sha: {**rec, "version": vid} for sha, rec in records.items()})
    atomic_write_json(store / LEDGER, ledger)
    log.info("incoming %s: %d new video(s), %d train / %d held-out septuplets", vid, len(records),
             len(manifest["vimeo"]["train"]), len(manifest["vimeo"]["test"]))  # fmt: skip
    md5 = dvc_add(store) if cfg.dvc_add else dvc_md5(store)
    return IngestResult(store, vid, tuple(ledger["versions"]), len(videos), md5)


# --- DVC ------------------------------------------------------------------------------------------


def dvc_root(path: Path) -> Path | None:
    """The DVC project holding `path` (a folder with `.dvc/`), or None."""
    for folder in [path.resolve(), *path.resolve().parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def dvc_md5(store: Path) -> str | None:
    """The md5 DVC recorded for the store in `<store>.dvc` (None: not tracked)."""
    import yaml

    dvc_file = store.with_name(store.name + ".dvc")
    if not dvc_file.is_file():
        return None
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def dvc_add(store: Path) -> str | None:
    """`dvc add` the store (a new data version: commit `<store>.dvc`, `dvc push` the data); outside
    a DVC project nothing happens. A failing `dvc` is a one-line error with its own message."""
    root = dvc_root(store)
    if root is None:
        log.info("%s is not inside a DVC project: not tracked", store)
        return None
    dvc = Path(sys.executable).with_name("dvc")
    cmd = [str(dvc) if dvc.is_file() else "dvc", "add", "-q", str(store.resolve().relative_to(root))]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines() or ["no output"]
        raise RuntimeError(f"dvc add {store} failed: {lines[-1]}")
    return dvc_md5(store)


# --- reading versions for training and the gate ---------------------------------------------------


def version_manifest(store: Path, version: Mapping[str, Any]) -> dict[str, Any]:
    path = store / version["id"] / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; restore the store with `dvc checkout {store}`")
    return json.loads(path.read_text())


class RoutedStore:
    """Frames of several stores under one key space, `<prefix>/<key>`: one dataset over the main
    data and every incoming version (train.vimeo's septuplet dataset reads one store pair)."""

    def __init__(self, stores: Mapping[str, FrameStore]) -> None:
        self.stores = dict(stores)

    def get(self, key: str) -> np.ndarray:
        prefix, _, rest = key.partition("/")
        if prefix not in self.stores:
            raise KeyError(f"{key}: no data version {prefix!r}")
        return self.stores[prefix].get(rest)

    def close(self) -> None:
        for store in self.stores.values():
            close_store(store)


Parts = Mapping[str, tuple[FrameStore, FrameStore, Sequence[str]]]  # prefix -> (GT, LR, septuplet names)


def union(parts: Parts) -> tuple[RoutedStore, RoutedStore, list[str]]:
    """GT and LR stores and prefixed names over `parts` (prefix -> (gt, lr, names))."""
    gt = RoutedStore({k: v[0] for k, v in parts.items()})
    lr = RoutedStore({k: v[1] for k, v in parts.items()})
    return gt, lr, [f"{k}/{n}" for k, (_, _, names) in parts.items() for n in names]


def version_stores(manifests: Mapping[str, Mapping[str, Any]], split: str) -> Parts:
    """Version id -> (GT store, LR store, its `split` ("train" or "test") septuplets)."""
    from gsm.data.catalog import train_stores

    out = {}
    for vid, m in manifests.items():
        gt, lr, entry = train_stores(dict(m), "vimeo")
        out[vid] = (gt, lr, entry[split])
    return out


def heldout_set(manifests: Mapping[str, Mapping[str, Any]], name: str = "incoming-heldout") -> TestSet:
    """The held-out septuplets of `manifests` as one test set, scored as Vimeo-90K-T (Y, centre frame)."""
    gt, lr, names = union(version_stores(manifests, "test"))
    return TestSet(name, "vimeo", VideoTestDataset(gt, lr, vimeo_test_sequences(names), center_index=VIMEO_CENTER_INDEX))


def unseen(versions: Sequence[Mapping[str, Any]], seen: Collection[tuple[str, str]]) -> list[Mapping[str, Any]]:
    """The versions no registered model has seen (`seen`: (id, digest) pairs from the registry's tags;
    a store rebuilt with other videos under the same ids is new)."""
    return [v for v in versions if (v["id"], v["digest"]) not in seen]


def data_tags(versions: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]], base_manifest: Path,
              md5: str | None) -> dict[str, str]:  # fmt: skip
    """What a model version trained on: the main manifest's sha256, each incoming version's digest,
    which were new to the registry, and the store's DVC md5."""
    tags = {"data.manifest_sha256": sha256_file(base_manifest), "data.incoming.new": ",".join(v["id"] for v in new)}
    tags.update({f"data.incoming.{v['id']}": v["digest"] for v in versions})
    if md5:
        tags["data.incoming.dvc_md5"] = md5
    return tags
