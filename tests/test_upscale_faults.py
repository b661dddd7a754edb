"""Upscaling under faults: a full disk, a damaged input, a killed earlier run, the user's umask."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

import gsm.serve.frames as frames_mod
import gsm.serve.video_out as video_out
from gsm.io import remove_orphans
from gsm.models.gsmamba import GSMamba
from gsm.serve.frames import iter_frames, probe_source, truncation_error
from gsm.serve.upscale import upscale_video
from test_upscale import model  # noqa: F401 - the tiny network fixture

DEAD_PID = 2**22 + 7  # above Linux's largest pid_max: never a running process
REAL_WRITER = cv2.VideoWriter
REAL_H264_WRITE = video_out.H264Writer.write


def _video(path: Path, n: int, h: int = 16, w: int = 16) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (w, h))
    rng = np.random.default_rng(0)
    for _ in range(n):
        writer.write(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    writer.release()
    return path


class _DroppingWriter:
    """cv2.VideoWriter that, like OpenCV on a full disk, loses frames after the second and says
    nothing (OpenCV prints a warning and carries on)."""

    def __init__(self, *args: object) -> None:
        self.inner = REAL_WRITER(*args)  # type: ignore[call-overload]
        self.n = 0

    def isOpened(self) -> bool:  # noqa: N802
        return self.inner.isOpened()

    def write(self, frame: np.ndarray) -> None:
        self.n += 1
        if self.n <= 2:
            self.inner.write(frame)

    def release(self) -> None:
        self.inner.release()


def _dropping_h264_write(self: video_out.H264Writer, rgb: np.ndarray) -> None:
    """H264Writer.write that loses frames after the second, without a word."""
    if self.frames < 2:
        REAL_H264_WRITE(self, rgb)


@pytest.mark.parametrize("writer", ["h264", "mp4v"])
def test_a_video_is_committed_only_once_it_decodes_to_every_frame(
    tmp_path: Path, model: GSMamba, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    if writer == "mp4v":  # OpenCV's writer, the fallback, is the one known to drop frames silently
        monkeypatch.setattr(video_out, "H264_ENCODER", "no-such-h264-encoder")
    src = _video(tmp_path / "in.mp4", 4, 8, 8)
    good = tmp_path / "out.mp4"
    upscale_video(model, src, good, chunk=2, chunk_overlap=1, progress=False)
    before = good.read_bytes()
    if writer == "mp4v":
        monkeypatch.setattr(frames_mod.cv2, "VideoWriter", _DroppingWriter)
    else:
        monkeypatch.setattr(video_out.H264Writer, "write", _dropping_h264_write)
    with pytest.raises(ValueError) as info:
        upscale_video(model, src, good, chunk=2, chunk_overlap=1, progress=False, overwrite=True)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{good}: the written video decodes to 2 frames")
    assert "not the 4 of 32x32 encoded" in message and "MiB free" in message
    assert good.read_bytes() == before  # --overwrite did not replace a good video with a broken one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]


def test_a_full_disk_while_encoding_h264_is_one_line_and_leaves_nothing(
    tmp_path: Path, model: GSMamba, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = av.open

    def open_on_dev_full(file: object, mode: str = "r", **kwargs: object) -> object:
        """The temporary video goes to /dev/full, where every write fails with ENOSPC."""
        if mode == "w" and str(file).endswith(".part.mp4"):
            return real_open("/dev/full", "w", format="mp4", **kwargs)
        return real_open(file, mode, **kwargs)

    monkeypatch.setattr(av, "open", open_on_dev_full)
    src = _video(tmp_path / "in.mp4", 3, 8, 8)
    with pytest.raises(ValueError) as info:
        upscale_video(model, src, tmp_path / "out.mp4", progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'out.mp4'}: cannot write frame ")
    assert "(No space left on device; " in message and message.endswith(" MiB free); nothing written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_a_full_disk_while_writing_pngs_is_one_line_and_leaves_nothing(
    tmp_path: Path, model: GSMamba, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _video(tmp_path / "in.mp4", 3, 8, 8)
    real = frames_mod.write_png
    calls = []

    def full_after_one(path: Path, img: np.ndarray) -> None:
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, img)

    monkeypatch.setattr(frames_mod, "write_png", full_after_one)
    with pytest.raises(ValueError) as info:
        upscale_video(model, src, tmp_path / "pngs", chunk=2, chunk_overlap=1, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'pngs'}: cannot write frame 1 (No space left on device; ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_a_truncated_video_is_refused_unless_allowed(tmp_path: Path, model: GSMamba) -> None:
    whole = _video(tmp_path / "whole.mkv", 40)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    info = probe_source(cut)
    assert info.count == 40  # what the container declares
    with pytest.raises(ValueError) as err:
        list(iter_frames(info))
    message = str(err.value)
    assert message.startswith(f"{cut}: the container declares 40 frames but only ") and "\n" not in message
    decoded = int(message.split("only ")[1].split()[0])
    assert 0 < decoded < 40

    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--allow-truncated"):
        upscale_video(model, cut, out, chunk=8, chunk_overlap=1, progress=False)
    assert not out.exists()
    with pytest.warns(UserWarning, match=f"only {decoded} decode"):
        s = upscale_video(model, cut, out, chunk=8, chunk_overlap=1, progress=False, allow_truncated=True)
    assert s.frames == decoded == len(list(out.glob("*.png")))
    # An intact video, and the one-frame slack of containers without an index, pass.
    assert len(list(iter_frames(probe_source(whole)))) == 40
    assert truncation_error(cut, 40, 39) is None and truncation_error(cut, 40, 38) is not None


def test_a_rerun_removes_temporaries_of_killed_runs_only(tmp_path: Path, model: GSMamba) -> None:
    src = _video(tmp_path / "in.mp4", 2, 8, 8)
    dead_file = tmp_path / f".out.mp4.gsm-{DEAD_PID}-abc123.part.mp4"
    dead_dir = tmp_path / f".out.mp4.gsm-{DEAD_PID}-x1y2.old"
    live = tmp_path / f".out.mp4.gsm-{os.getpid()}-zzz.part.mp4"  # a writer still running
    other = tmp_path / f".other.mp4.gsm-{DEAD_PID}-abc.part.mp4"  # another output's: not ours to judge
    dead_file.write_bytes(b"half a video")
    dead_dir.mkdir()
    (dead_dir / "old").write_bytes(b"x")
    live.write_bytes(b"in progress")
    other.write_bytes(b"x")
    upscale_video(model, src, tmp_path / "out.mp4", chunk=2, chunk_overlap=1, progress=False)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["in.mp4", "out.mp4", live.name, other.name])
    assert remove_orphans(tmp_path / "other.mp4") == [other]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_get_the_users_umask(tmp_path: Path, model: GSMamba, mask: int) -> None:
    src = _video(tmp_path / "in.mp4", 2, 8, 8)
    old = os.umask(mask)
    try:
        upscale_video(model, src, tmp_path / "out.mp4", chunk=2, chunk_overlap=1, progress=False)
        upscale_video(model, src, tmp_path / "pngs", chunk=2, chunk_overlap=1, progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "out.mp4").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "pngs").stat().st_mode & 0o777 == 0o777 & ~mask
