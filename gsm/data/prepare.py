"""The data stage: from archives (paper profile) or bundled videos (quickstart) to packed LMDBs.

Both profiles end in the same place: a `manifest.json` naming, per dataset, its GT and LR frame
stores and its train/test clips. Training and evaluation read only the manifest (see
`gsm.data.catalog`), so they never care where the frames came from.

It runs as three steps, each a DVC stage with its own folder under `<data.root>/<profile>/`, and
each handing the next an `index.json` (the manifest in the making):

1. download -> `source/`: quickstart: the GT trees `source/{reds_like,vimeo_like}/GT` cut from the
   bundled videos (gsm.data.quickstart); paper: archives in `source/downloads/`, unpacked in
   `source/raw/<source>/`, REDS regrouped (hard links) into `source/REDS/{GT,BIx4}` (270 clips, val
   as 240-269; `data.paper` sets smaller counts for toy archives), Vimeo-90K GT in
   `source/raw/vimeo_septuplet/sequences`, Vid4 GT and the LR shipped with it or set as its own
   source (gsm.data.vid4 recognises the mirrors' layouts and checks the frame sizes).
2. degrade -> `lr/`: the LR frames no archive provides, with our MATLAB-exact BI (and BD for
   Vid4): quickstart `lr/{reds_like,vimeo_like}/BIx4`, paper `lr/Vimeo/BIx4`, `lr/Vid4/{BIx4,BDx4}`.
3. pack -> `lmdb/` and `manifest.json`: BasicSR-style LMDBs of every GT/LR tree training and
   evaluation read (Vid4's too), so the DVC-cached `lmdb/` is all they need after `dvc pull`.

Every step is resumable (markers are written only for finished work), so a rerun after a crash or
a Ctrl-C continues where it stopped and a finished step costs seconds. A step whose input index
changed starts its output over: derived frames of other data must not survive.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gsm.configs import from_mapping
from gsm.data.datasets import read_list
from gsm.data.download import check_source, digest_record, fetch
from gsm.data.extract import UnreadableArchive, extract, extraction_record
from gsm.data.lmdb_io import pack_lmdb
from gsm.data.reds import REDS4, REDS_STRIP, VAL_OFFSET, regroup_reds, reds_partition
from gsm.data.sources import Source, require_url
from gsm.data.vid4 import LR_FOLDERS, check_vid4, find_lr, find_vid4
from gsm.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INDEX = "index.json"  # what a step produced; written last, so it exists only for finished output


@dataclass(frozen=True)
class QuickstartConfig:
    """How the bundled videos are cut (gsm.data.quickstart documents the splits)."""

    reds_clip_len: int = 25
    reds_test_frames: int = 26
    reds_gap: int = 6
    reds_val_frames: int = 0  # a validation clip between train and test (0: none)
    vimeo_test_frames: int = 40
    vimeo_gap: int = 5
    vimeo_train_stride: int = 3
    vimeo_test_stride: int = 7
    vimeo_val_frames: int = 0  # a validation span between train and test (0: none)
    vimeo_crops: int = 3
    # Only to make tiny test profiles: fewer source frames, smaller (centred) REDS-like frames and
    # Vimeo-like windows, as [H, W]. null: the whole videos at full size.
    reds_max_frames: int | None = None
    reds_crop: tuple[int, int] | None = None
    vimeo_max_frames: int | None = None
    vimeo_crop: tuple[int, int] = (256, 448)


@dataclass(frozen=True)
class PaperConfig:
    """Only to make tiny test profiles of the paper data; the defaults are the real datasets."""

    # REDS archives holding train clips 000..N-1 and val clips 000..M-1 (val becomes 240..): the
    # regroup step demands exactly these, so a toy archive is checked as strictly as the real one.
    reds_train_clips: int = 240
    reds_val_clips: int = 30
    vid4_shrink: int = 1  # Vid4 GT frames expected at 1/N of their real sizes (LR still exactly 1/4)

    def __post_init__(self) -> None:
        last_reds4 = int(max(REDS4)) + 1  # REDS4 must stay complete, and out of training
        if not last_reds4 <= self.reds_train_clips <= VAL_OFFSET:
            raise ValueError(f"data.paper.reds_train_clips must be {last_reds4}..{VAL_OFFSET} "
                             f"(REDS4 is clips {', '.join(REDS4)}), got {self.reds_train_clips}")  # fmt: skip
        if not 0 <= self.reds_val_clips <= 30:
            raise ValueError(f"data.paper.reds_val_clips must be 0..30, got {self.reds_val_clips}")
        if self.vid4_shrink not in (1, 2, 4):  # every Vid4 side is a multiple of 16: GT/4 stays whole
            raise ValueError(f"data.paper.vid4_shrink must be 1, 2 or 4, got {self.vid4_shrink}")


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
    paper: PaperConfig = field(default_factory=PaperConfig)

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

    @property
    def source_dir(self) -> Path:
        """Output of the download step: GT (and published LR) frames, archives."""
        return self.profile_dir / "source"

    @property
    def downloads_dir(self) -> Path:
        """Where the paper's archives are fetched to, by the pipeline and by `gsm download` alike."""
        return self.source_dir / "downloads"

    @property
    def lr_dir(self) -> Path:
        """Output of the degrade step: LR frames made here."""
        return self.profile_dir / "lr"

    @property
    def lmdb_dir(self) -> Path:
        """Output of the pack step (with the manifest)."""
        return self.profile_dir / "lmdb"


def _pack(src: Path, dst: Path, cfg: DataConfig, progress: bool) -> str:
    # The frame trees are this stage's own derived data: an LMDB of older frames is repacked.
    pack_lmdb(src, dst, level=cfg.png_level, workers=cfg.workers, progress=progress, replace_stale=True)
    return str(dst)


def _read_step_output(path: Path, step: str, what: str = "index") -> dict[str, Any]:
    """A JSON file a data step writes last; its absence means the step has not finished."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {what}; run the {step} step first (`gsm prepare --step {step}`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt {what} ({exc.msg}); rerun `gsm prepare --step {step}`") from None


def _start_over_if_stale(out: Path, upstream: dict[str, Any]) -> None:
    """Record which upstream index `out` is made from; output made from another one is removed."""
    digest = hashlib.sha256(json.dumps(upstream, sort_keys=True).encode()).hexdigest()
    marker = out / ".upstream"
    if marker.is_file() and marker.read_text().strip() != digest:
        log.info("%s was made from other input: starting over", out)
        shutil.rmtree(out)
    (out / INDEX).unlink(missing_ok=True)  # an index only ever describes finished output
    if not marker.is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, digest + "\n")


# --- step 1: download ------------------------------------------------------------------------------


def _download_quickstart(cfg: DataConfig, progress: bool) -> dict[str, Any]:
    """GT trees cut from the bundled videos (gsm.data.quickstart documents the splits)."""
    from gsm.data.quickstart import build_quickstart

    q = cfg.quickstart
    s = build_quickstart(
        cfg.source_dir, reds_clip_len=q.reds_clip_len, reds_test_frames=q.reds_test_frames,
        reds_gap=q.reds_gap, reds_val_frames=q.reds_val_frames, reds_max_frames=q.reds_max_frames,
        reds_crop=q.reds_crop, vimeo_test_frames=q.vimeo_test_frames, vimeo_gap=q.vimeo_gap,
        vimeo_train_stride=q.vimeo_train_stride, vimeo_test_stride=q.vimeo_test_stride,
        vimeo_val_frames=q.vimeo_val_frames, vimeo_crop=q.vimeo_crop, vimeo_crops=q.vimeo_crops,
        vimeo_max_frames=q.vimeo_max_frames, workers=cfg.workers, progress=progress,
    )  # fmt: skip
    reds_meta = json.loads((s.reds.root / "meta.json").read_text())
    vimeo_meta = json.loads((s.vimeo.root / "meta.json").read_text())
    return {
        "profile": "quickstart",
        # What the frames were made from: a change here flows through every later index, so DVC and
        # the steps' staleness checks rerun exactly what depends on it.
        "made_from": {"reds_like": reds_meta["params"], "vimeo_like": vimeo_meta["params"]},
        "reds": {
            "kind": "reds", "name": "reds_like", "gt_folder": str(s.reds.gt),
            "train": list(s.reds.train), "val": list(s.reds.val), "test": list(s.reds.test),
            "frames_per_clip": reds_meta["frames_per_clip"], "test_name": "quickstart-REDS",
            # Scored on Y, all frames (the vid4 rule): the quickstart is judged by Y-PSNR gain.
            "test_protocol": "vid4",
        },
        "vimeo": {
            "kind": "vimeo", "name": "vimeo_like", "gt_folder": str(s.vimeo.gt),
            "train": list(s.vimeo.train), "val": list(s.vimeo.val), "test": list(s.vimeo.test),
            "test_name": "quickstart-Vimeo",
        },
        "vid4": None,
    }  # fmt: skip


# Leading folders of each paper archive above what is kept (gsm.data.extract's ``strip``).
STRIP = {**REDS_STRIP, "vimeo_septuplet": 1, "vid4_gt": 0, "vid4_bix4": 0, "vid4_bdx4": 0}


def _same_archive(rec: dict[str, Any], src: Source) -> bool:
    """Whether an extraction record is of ``src``'s archive: by the checksums params set, else
    (nothing known about the bytes) by URL."""
    known = {k: getattr(src, k) for k in ("sha256", "md5", "size") if getattr(src, k) is not None}
    if not (src.sha256 or src.md5) and rec.get("url") != src.url:
        return False
    return bool(rec.get("sha256")) and all(rec.get(k) == v for k, v in known.items())


def _kept(src: Source, cfg: DataConfig, strip: int) -> Path | None:
    """``raw/<source>`` when its archive was deleted after an extraction that records that archive:
    the extraction is what the pipeline needs, so no download."""
    dest = cfg.source_dir / "raw" / src.name
    if (cfg.downloads_dir / src.filename).exists():
        return None
    rec = extraction_record(dest)
    return dest if rec and rec.get("strip") == strip and _same_archive(rec, src) else None


def _fetch_extract(src: Source, cfg: DataConfig, strip: int, progress: bool) -> Path:
    """``raw/<source>``, extracted from the archive now on disk: one extracted from another archive
    (by sha256) is extracted again; a broken archive is a one-line error naming the file."""
    kept = _kept(src, cfg, strip)
    if kept is not None:
        log.info("%s: archive deleted, keeping %s (extracted from sha256 %s)", src.name, kept,
                 (extraction_record(kept) or {}).get("sha256"))  # fmt: skip
        return kept
    archive = fetch(src, cfg.downloads_dir, retries=cfg.download_retries, progress=progress)
    rec = digest_record(archive, url=src.url, progress=progress)
    origin = {k: rec.get(k) for k in ("sha256", "md5", "size", "url")}
    try:
        return extract(archive, cfg.source_dir / "raw" / src.name, max_bytes=int(cfg.max_extract_gb * 1e9),
                       strip=strip, progress=progress, origin=origin)  # fmt: skip
    except UnreadableArchive as exc:
        fix = (f"it matches sources.{src.name}.sha256, so the archive at {src.url} is broken" if src.sha256
               else f"delete {archive} to download it again")  # fmt: skip
        raise UnreadableArchive(f"{src.name}: {exc}; {fix}") from None


def _archive_digests(raw: dict[str, Path]) -> dict[str, str | None]:
    """Source -> sha256 of the archive its folder came from: the index changes with the bytes."""
    return {name: (extraction_record(folder) or {}).get("sha256") for name, folder in sorted(raw.items())}


VID4_SOURCES = ("vid4_gt", "vid4_bix4", "vid4_bdx4")


def _vid4_lr(sources: dict[str, Source], cfg: DataConfig, shipped: dict[str, Path], progress: bool) -> dict[str, Path]:
    """BI/BD LR folders: a set vid4_bix4/vid4_bdx4 source first, else the GT archive's; the rest
    the degrade step makes. The log says which is used."""
    lr = {}
    for mode, name in zip(("bi", "bd"), VID4_SOURCES[1:]):
        label = LR_FOLDERS[mode]
        if sources[name].url:
            lr[mode] = find_lr(_fetch_extract(sources[name], cfg, 0, progress), mode, name)
            log.info("Vid4 %s: %s from sources.%s%s", label, lr[mode], name,
                     " (not the one in the vid4_gt archive)" if mode in shipped else "")  # fmt: skip
        elif mode in shipped:
            lr[mode] = shipped[mode]
            log.info("Vid4 %s: %s, shipped in the vid4_gt archive", label, lr[mode])
        else:
            log.info("Vid4 %s: none shipped, the degrade step makes it from GT", label)
    return lr


def _download_vid4(sources: dict[str, Source], cfg: DataConfig, progress: bool) -> dict[str, str]:
    """Vid4 GT and the LR that came with it or from its own source (the degrade step makes the
    others), checked against Vid4's frame sizes."""
    layout = find_vid4(_fetch_extract(sources["vid4_gt"], cfg, 0, progress), "vid4_gt")
    lr = _vid4_lr(sources, cfg, layout.lr, progress)
    check_vid4(layout.gt, lr, shrink=cfg.paper.vid4_shrink)
    log.info("Vid4 GT: %s", layout.gt)
    return {"gt_folder": str(layout.gt), **{f"{mode}_folder": str(folder) for mode, folder in lr.items()}}


def _regroup(raw: dict[str, Path], train: str, val: str, out: Path, counts: dict[str, int]) -> list[str]:
    """regroup_reds tied to the archives' digests: new archives mean new hard links."""
    origin = json.dumps(_archive_digests({k: raw[k] for k in (train, val)}), sort_keys=True)
    return regroup_reds(raw[train], raw[val], out, origin=origin, **counts)


def _check_sources(cfg: DataConfig, sources: dict[str, Source]) -> None:
    """Every source's settings before the first byte: a null Vid4 URL must not surface after
    hundreds of GB of REDS and Vimeo. The LR Vid4 sources are optional."""
    for name, strip in STRIP.items():
        src = sources[name]
        if name in VID4_SOURCES[1:] and not src.url:
            continue
        require_url(src)
        if not (cfg.downloads_dir / src.filename).exists() and _kept(src, cfg, strip) is None:
            check_source(src)


def _download_paper(cfg: DataConfig, sources: dict[str, Source], progress: bool) -> dict[str, Any]:
    """REDS, Vimeo-90K and Vid4 from their archives (downloads resume; finished ones are skipped)."""
    _check_sources(cfg, sources)
    raw = {name: _fetch_extract(sources[name], cfg, strip, progress) for name, strip in REDS_STRIP.items()}
    reds_dir = cfg.source_dir / "REDS"
    counts = {"n_train": cfg.paper.reds_train_clips, "n_val": cfg.paper.reds_val_clips}
    clips = _regroup(raw, "reds_train_sharp", "reds_val_sharp", reds_dir / "GT", counts)
    _regroup(raw, "reds_train_sharp_bicubic", "reds_val_sharp_bicubic", reds_dir / "BIx4", counts)
    train, test = reds_partition(clips)
    raw["vimeo_septuplet"] = vimeo_raw = _fetch_extract(sources["vimeo_septuplet"], cfg, STRIP["vimeo_septuplet"],
                                                        progress)  # fmt: skip
    lists = {k: read_list(vimeo_raw / f"sep_{k}list.txt") for k in ("train", "test")}
    vid4 = _download_vid4(sources, cfg, progress)
    raw.update({name: cfg.source_dir / "raw" / name for name in VID4_SOURCES if sources[name].url})
    return {
        "profile": "paper",
        # The archives' bytes, not their URLs or checks: a mirror with the same bytes is the same data,
        # so this index, and every stage and training run fingerprinting it, stays as it was.
        "made_from": {"archives": _archive_digests(raw)},
        "reds": {
            "kind": "reds", "name": "REDS", "gt_folder": str(reds_dir / "GT"), "lr_folder": str(reds_dir / "BIx4"),
            "train": train, "test": test, "test_name": "REDS4",
            "frames_per_clip": {c: sum(1 for _ in (reds_dir / "GT" / c).glob("*.png")) for c in clips},
        },
        "vimeo": {
            "kind": "vimeo", "name": "Vimeo", "gt_folder": str(vimeo_raw / "sequences"),
            "train": lists["train"], "test": lists["test"], "test_name": "Vimeo-90K-T",
        },
        "vid4": vid4,
    }  # fmt: skip


def download_data(cfg: DataConfig, sources: dict[str, Source], *, progress: bool = True) -> Path:
    """Step 1 of `cfg.profile`; returns its folder (`source/`, with `index.json` written last)."""
    out = cfg.source_dir
    (out / INDEX).unlink(missing_ok=True)
    index = _download_quickstart(cfg, progress) if cfg.profile == "quickstart" else _download_paper(cfg, sources, progress)
    atomic_write_json(out / INDEX, index)
    return out


# --- step 2: degrade -------------------------------------------------------------------------------


def degrade_data(cfg: DataConfig, sources: dict[str, Source], *, progress: bool = True) -> Path:
    """Step 2: every LR tree the download did not bring, BI x4 (Vid4 also BD); returns `lr/`."""
    from gsm.data.degrade import DEGRADATION_VERSION, degrade_tree

    index = _read_step_output(cfg.source_dir / INDEX, "download")
    out = cfg.lr_dir
    _start_over_if_stale(out, index)
    # Recorded in what pack and training fingerprint: new degradation code is new data downstream.
    index.setdefault("made_from", {})["degradation"] = DEGRADATION_VERSION

    def make(gt: str, lr: Path, mode: str) -> str:
        degrade_tree(Path(gt), lr, mode=mode, scale=4, workers=cfg.workers, progress=progress)  # type: ignore[arg-type]
        return str(lr)

    for kind in ("reds", "vimeo"):
        entry = index[kind]
        if "lr_folder" not in entry:
            entry["lr_folder"] = make(entry["gt_folder"], out / entry["name"] / "BIx4", "BI")
    if index.get("vid4"):
        for mode in ("BI", "BD"):
            key = f"{mode.lower()}_folder"
            if key not in index["vid4"]:
                index["vid4"][key] = make(index["vid4"]["gt_folder"], out / "Vid4" / f"{mode}x4", mode)
    atomic_write_json(out / INDEX, index)
    return out


# --- step 3: pack ----------------------------------------------------------------------------------


def pack_data(cfg: DataConfig, sources: dict[str, Source], *, progress: bool = True) -> Path:
    """Step 3: LMDBs of the training/test trees (LMDB backend) and the manifest; returns its path."""
    index = _read_step_output(cfg.lr_dir / INDEX, "degrade")
    cfg.manifest_path.unlink(missing_ok=True)  # a manifest only ever describes finished data
    _start_over_if_stale(cfg.lmdb_dir, index)
    if cfg.backend == "lmdb":  # the folder backend reads the trees as they are: lmdb/ holds the index only
        for kind in ("reds", "vimeo"):
            e = index[kind]
            e["gt_lmdb"] = _pack(Path(e["gt_folder"]), cfg.lmdb_dir / f"{e['name']}_GT.lmdb", cfg, progress)
            e["lr_lmdb"] = _pack(Path(e["lr_folder"]), cfg.lmdb_dir / f"{e['name']}_BIx4.lmdb", cfg, progress)
        if index.get("vid4"):  # packed too: evaluation must find everything it reads in `dvc pull`'s data
            v = index["vid4"]
            for key, label in (("gt", "GT"), ("bi", "BIx4"), ("bd", "BDx4")):
                v[f"{key}_lmdb"] = _pack(Path(v[f"{key}_folder"]), cfg.lmdb_dir / f"Vid4_{label}.lmdb", cfg, progress)
    atomic_write_json(cfg.lmdb_dir / INDEX, index)
    index["backend"] = cfg.backend
    atomic_write_json(cfg.manifest_path, index)
    return cfg.manifest_path


STEPS = ("download", "degrade", "pack")


def prepare_data(
    cfg: DataConfig, sources: dict[str, Source], *, steps: tuple[str, ...] = STEPS, progress: bool = True
) -> Path:
    """The data stage (all steps by default); returns the manifest's path, or the last step's folder."""
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown data step {unknown[0]!r} (steps: {', '.join(STEPS)})")
    run = {"download": download_data, "degrade": degrade_data, "pack": pack_data}
    result = cfg.profile_dir
    for step in STEPS:
        if step in steps:
            result = run[step](cfg, sources, progress=progress)
    return result


def read_manifest(cfg: DataConfig) -> dict[str, Any]:
    return _read_step_output(cfg.manifest_path, "pack", "manifest")

