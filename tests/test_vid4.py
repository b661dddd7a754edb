"""Vid4 mirrors at 1/4 size: layouts recognised, the shipped LR used, anything ambiguous refused."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from http_server import LoopbackServer, http_server, zip_bytes  # noqa: F401 - fixture

from gsm.data.datasets import VID4_CLIPS
from gsm.data.prepare import DataConfig, _download_vid4
from gsm.data.sources import sources_from_dict
from gsm.data.vid4 import VID4_SIZES, check_vid4, find_lr, find_vid4

SHRINK = 4  # GT: calendar 144x180, city 144x176, foliage and walk 120x180


def _png(h: int, w: int) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((h, w, 3), 128, np.uint8))
    assert ok
    return buf.tobytes()


def _frames(prefix: str, down: int = 1, frames: int = 2) -> dict[str, bytes]:
    """Archive members of one Vid4 tree at 1/SHRINK size, further divided by ``down`` (4: LR)."""
    out = {}
    for clip, (h, w) in VID4_SIZES.items():
        for f in range(frames):
            out[f"{prefix}{clip}/{f:04d}.png"] = _png(h // SHRINK // down, w // SHRINK // down)
    return out


def _tree(root: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


MIRROR = {**_frames("Vid4/GT/"), **_frames("Vid4/BIx4/", 4), **_frames("Vid4/BDx4/", 4)}


@pytest.mark.parametrize("prefix", ["", "Vid4/", "vid4_gt/GT/"])
def test_gt_only_layouts(tmp_path: Path, prefix: str) -> None:
    root = _tree(tmp_path, _frames(prefix))
    layout = find_vid4(root, "vid4_gt")
    assert layout.gt == root / prefix.rstrip("/") and layout.lr == {}
    check_vid4(layout.gt, {}, shrink=SHRINK)


def test_mirror_layout_gt_is_gt_not_the_first_folder(tmp_path: Path) -> None:
    root = _tree(tmp_path, MIRROR)
    layout = find_vid4(root, "vid4_gt")
    assert layout.gt == root / "Vid4" / "GT"  # sorted order would give Vid4/BDx4
    assert layout.lr == {"bi": root / "Vid4" / "BIx4", "bd": root / "Vid4" / "BDx4"}
    check_vid4(layout.gt, layout.lr, shrink=SHRINK)
    assert find_lr(root, "bd", "vid4_bdx4") == root / "Vid4" / "BDx4"


@pytest.mark.parametrize(
    ("members", "found"),
    [
        ({**_frames("a/"), **_frames("b/")}, "a, b"),
        ({**MIRROR, **_frames("Vid4/GT_old/")}, "Vid4/BDx4, Vid4/BIx4, Vid4/GT, Vid4/GT_old"),
        ({**_frames("x/GT/"), **_frames("y/GT/")}, "x/GT, y/GT"),
        (_frames("Vid4/BIx4/", 4), "Vid4/BIx4"),
    ],
    ids=["two-gt-only", "extra-folder", "two-mirrors", "lr-only"],
)
def test_ambiguous_layouts_are_one_line_errors(tmp_path: Path, members: dict[str, bytes], found: str) -> None:
    root = _tree(tmp_path, members)
    with pytest.raises(ValueError, match=r"^vid4_gt: cannot tell which folder .* is GT") as err:
        find_vid4(root, "vid4_gt")
    assert f"clips are in {found} (" in str(err.value) and "\n" not in str(err.value)


def test_frame_sizes_are_checked(tmp_path: Path) -> None:
    # LR frames passed off as GT (a GT-only archive of the BDx4 folder): refused, frame named.
    lr_as_gt = _tree(tmp_path / "a", _frames("Vid4/", 4))
    gt_sizes = r"calendar/0000\.png is 36x45 \(HxW\), Vid4's calendar GT frames are 144x180$"
    with pytest.raises(ValueError, match=r"^Vid4 GT: .*" + gt_sizes):
        check_vid4(find_vid4(lr_as_gt, "vid4_gt").gt, {}, shrink=SHRINK)
    root = _tree(tmp_path / "b", {**MIRROR, **_frames("Vid4/BIx4/", 2)})  # BIx4 at half size
    layout = find_vid4(root, "vid4_gt")
    with pytest.raises(ValueError, match=r"^Vid4 BIx4: .*is 72x90 \(HxW\), Vid4's calendar BIx4 frames are 36x45$"):
        check_vid4(layout.gt, layout.lr, shrink=SHRINK)
    (root / "Vid4" / "BDx4" / "walk" / "0001.png").unlink()
    frames = r"walk does not hold the frames of .*GT/walk \(1 vs 2, names must match\)$"
    with pytest.raises(ValueError, match=r"^Vid4 BDx4: .*" + frames):
        check_vid4(layout.gt, {"bd": layout.lr["bd"]}, shrink=SHRINK)
    with pytest.raises(ValueError, match=r"^Vid4 GT: .* is 144x180 \(HxW\), Vid4's calendar GT frames are 576x720$"):
        check_vid4(layout.gt, {}, shrink=1)  # the real sizes by default


def test_download_uses_the_mirrors_lr_and_says_so(
    http_server: LoopbackServer, tmp_path: Path, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    http_server.files["Vid4.zip"] = zip_bytes(MIRROR)
    http_server.files["BDx4.zip"] = zip_bytes(_frames("BDx4/", 4))
    cfg = DataConfig.from_dict({"profile": "paper", "root": str(tmp_path), "paper": {"vid4_shrink": SHRINK}})
    sources = sources_from_dict({"vid4_gt": {"url": http_server.url("Vid4.zip")}})
    raw = cfg.source_dir / "raw"
    with caplog.at_level(logging.INFO, logger="gsm.data.prepare"):
        out = _download_vid4(sources, cfg, progress=False)
    assert out == {"gt_folder": str(raw / "vid4_gt/Vid4/GT"), "bi_folder": str(raw / "vid4_gt/Vid4/BIx4"),
                   "bd_folder": str(raw / "vid4_gt/Vid4/BDx4")}  # fmt: skip
    assert "Vid4 BIx4: " in caplog.text and "shipped in the vid4_gt archive" in caplog.text

    # A BDx4 source of its own wins over the archive's, and the log says so.
    sources = sources_from_dict({"vid4_gt": {"url": http_server.url("Vid4.zip")},
                                 "vid4_bdx4": {"url": http_server.url("BDx4.zip")}})  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gsm.data.prepare"):
        out = _download_vid4(sources, cfg, progress=False)
    assert out["bd_folder"] == str(raw / "vid4_bdx4/BDx4") and out["bi_folder"].endswith("Vid4/BIx4")
    assert "from sources.vid4_bdx4 (not the one in the vid4_gt archive)" in caplog.text


def test_clip_names_are_the_known_ones() -> None:
    assert tuple(VID4_SIZES) == VID4_CLIPS
