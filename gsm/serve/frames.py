"""Streaming frame input (video file, frame folder, single image) and atomic output (video, PNG folder).

Inputs are read lazily, one frame at a time, so memory does not depend on the video's length.
Frames come out as H x W x 3 uint8 RGB with the documented conversions of `gsm.data.images`
(grey -> RGB, 16-bit -> 8-bit, alpha dropped). Outputs are built under a hidden temporary name
beside the final one and renamed into place only when complete and, for videos, verified: a
failure or interruption leaves nothing under the final name, and an existing output is only replaced
when asked to. Temporaries carry the writer's process id (`.<name>.gsm-<pid>-...`), so the next
writer of the same output removes those whose process is gone (killed with -9). Videos are H.264
with the input's audio (`gsm.serve.video_out`).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np

from gsm.data.images import read_image, to_rgb8, write_png
from gsm.io import default_mode, free_space, remove_orphans, temp_prefix
from gsm.serve.video_out import AudioTrack, H264Writer, Mp4vWriter, open_writer, probe_streams

# Containers written with H.264 (or, as the fallback, OpenCV's 'mp4v').
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".m4v")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
DEFAULT_FPS = 25.0


@dataclass(frozen=True)
class SourceInfo:
    """What `iter_frames` will stream, learned from the first frame without reading the rest."""

    path: Path
    kind: str  # "video" | "folder" | "image"
    width: int
    height: int
    fps: float | None  # the container's frame rate; None for frames and images, or when unknown
    count: int | None  # frame count if known up front (folders, images; a video's header is only a hint)
    frames: tuple[Path, ...] = ()  # a folder's frame files in natural order
    rate: Fraction | None = None  # a video's exact frame rate (30000/1001, not 29.97002997), when known
    audio: AudioTrack | str | None = None  # a video's audio track, copied into a video output; or why unknown

    @property
    def names(self) -> list[str] | None:
        """Output PNG names (stems) for folder input, so results line up with the input frames."""
        return [p.stem for p in self.frames] if self.kind == "folder" else None


def natural_key(name: str) -> tuple[tuple[object, ...], str]:
    """Sort `frame2` before `frame10`: digit runs compare as numbers (ties broken by the raw name)."""
    parts = re.split(r"(\d+)", name)  # text, digits, text, ...: same types at the same positions
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def list_frames(folder: Path) -> list[Path]:
    """Image files directly in `folder` (hidden files skipped: they are temporaries), naturally sorted."""
    files = [
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.is_file()
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


def _open_video(path: Path) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise ValueError(f"{path}: OpenCV cannot open it as a video (not a video, damaged, or no frames)")
    return cap


def probe_source(src: str | Path) -> SourceInfo:
    """Check the input exists and its first frame decodes; one-line errors name the path."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such video file or frame folder")
    if src.is_dir():
        frames = list_frames(src)
        if not frames:
            raise ValueError(f"{src}: no image frames ({', '.join(IMAGE_EXTS)}) in this folder")
        h, w = read_image(frames[0]).shape[:2]
        return SourceInfo(src, "folder", w, h, None, len(frames), tuple(frames))
    if src.suffix.lower() in IMAGE_EXTS:
        h, w = read_image(src).shape[:2]
        return SourceInfo(src, "image", w, h, None, 1)
    cap = _open_video(src)
    try:
        ok, first = cap.read()
        if not ok or first is None:
            raise ValueError(f"{src}: the video has no frames OpenCV can decode")
        h, w = to_rgb8(first, f"{src} frame 0").shape[:2]
        fps = cap.get(cv2.CAP_PROP_FPS)
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        cap.release()
    fps_known = math.isfinite(fps) and fps > 0
    rate, audio = probe_streams(src)
    return SourceInfo(src, "video", w, h, fps if fps_known else None, count if count > 0 else None,
                      rate=rate, audio=audio)


def _check_size(img: np.ndarray, info: SourceInfo, name: str) -> np.ndarray:
    if img.shape[:2] != (info.height, info.width):
        raise ValueError(
            f"{name}: frame is {img.shape[1]}x{img.shape[0]}, but the first frame is "
            f"{info.width}x{info.height}; all frames must share one size"
        )
    return img


def truncation_error(path: Path, expected: int, decoded: int) -> str | None:
    """The complaint when a video decodes to fewer frames than its container declares, else None.

    Containers without a frame index (mkv, some avi) give duration x rate, which may be one frame
    off; a shortfall beyond that (1%, at least one frame) means the file is damaged or cut.
    """
    if decoded + max(1, expected // 100) >= expected:
        return None
    return (f"{path}: the container declares {expected} frames but only {decoded} decode (damaged or truncated "
            f"video); --allow-truncated upscales the {decoded} that decode")


def iter_frames(info: SourceInfo, allow_truncated: bool = False) -> Iterator[np.ndarray]:
    """RGB uint8 frames one at a time; a frame of another size is a one-line error naming it.

    A video that decodes to fewer frames than its container declares is an error at its end (the
    output, not yet committed, is dropped), or with `allow_truncated` a warning.
    """
    if info.kind == "folder":
        for path in info.frames:
            yield _check_size(read_image(path), info, str(path))
        return
    if info.kind == "image":
        yield _check_size(read_image(info.path), info, str(info.path))
        return
    cap = _open_video(info.path)
    try:
        index = 0
        while True:
            ok, bgr = cap.read()
            if not ok or bgr is None:
                break
            name = f"{info.path} frame {index}"
            yield _check_size(to_rgb8(bgr, name), info, name)
            index += 1
        if index == 0:
            raise ValueError(f"{info.path}: the video has no frames OpenCV can decode")
        problem = truncation_error(info.path, info.count, index) if info.count else None
        if problem and not allow_truncated:
            raise ValueError(problem)
        if problem:
            warnings.warn(problem.split(";")[0] + "; continuing (--allow-truncated)", stacklevel=2)
    finally:
        cap.release()


# --------------------------------------------------------------------------------------- output


def output_is_video(dst: str | Path) -> bool:
    """A video extension means a video file; anything else (or a trailing slash) a PNG folder."""
    raw = os.fspath(dst)
    return Path(raw).suffix.lower() in VIDEO_EXTS and not raw.endswith(("/", os.sep))


def _only_pngs(folder: Path) -> bool:
    return all(p.is_file() and p.suffix.lower() == ".png" for p in folder.iterdir())


def check_output(dst: str | Path, overwrite: bool, src: str | Path | None = None) -> Path:
    """Refuse, before any work, outputs that could not be written or would destroy something.

    `overwrite` replaces an existing video file, or a folder that holds nothing but PNG files (so
    a mistyped `--overwrite` cannot delete an unrelated folder).
    """
    video = output_is_video(dst)
    dst = Path(dst)
    if dst.suffix.lower() in IMAGE_EXTS:
        raise ValueError(
            f"{dst}: an image file name; the output is a video ({', '.join(VIDEO_EXTS)}) or a folder of PNG frames"
        )
    parent = dst.parent
    if not parent.exists():
        raise FileNotFoundError(f"{dst}: the output's folder {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"{dst}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{dst}: cannot write in {parent} (permission denied)")
    if dst.exists() or dst.is_symlink():
        if src is not None and dst.exists() and Path(src).exists() and os.path.samefile(src, dst):
            raise ValueError(f"{dst}: the output is the input")
        if not overwrite:
            raise ValueError(f"{dst}: already exists (overwrite=True / --overwrite replaces it)")
        if video and not (dst.is_file() and not dst.is_symlink()):
            raise ValueError(f"{dst}: exists and is not a video file; refusing to replace it")
        if not video and not (dst.is_dir() and not dst.is_symlink() and _only_pngs(dst)):
            raise ValueError(f"{dst}: exists and is not a folder of PNG frames; refusing to replace it")
    return dst


def _temp_error(dst: Path, err: OSError) -> ValueError:
    return ValueError(f"{dst}: cannot write in {dst.parent}: {err.strerror or err}")


def count_video_frames(path: Path) -> tuple[int, int, int]:
    """(frames, width, height) of a written video, by decoding it: what a player will get."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return 0, 0, 0
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        n = 0
        while cap.grab():
            n += 1
        return n, w, h
    finally:
        cap.release()


class FrameSink:
    """Writes upscaled frames under a temporary name; `commit` renames it into place.

    Use as a context manager: leaving the block with an exception removes the temporary output,
    so nothing ever appears under the final name unless every frame was written.
    """

    def __init__(
        self, dst: Path, width: int, height: int, rate: Fraction, names: Sequence[str] | None = None,
        overwrite: bool = False, audio: AudioTrack | None = None,
    ) -> None:
        self.dst, self.width, self.height, self.rate = dst, width, height, rate
        self.names, self.overwrite = names, overwrite
        self.video = output_is_video(dst)
        self.count = 0
        self._writer: H264Writer | Mp4vWriter | None = None
        prefix = temp_prefix(dst)
        try:
            remove_orphans(dst)
            if self.video:
                fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=f".part{dst.suffix}", dir=dst.parent)
                os.close(fd)
            else:
                tmp = tempfile.mkdtemp(prefix=prefix, suffix=".part", dir=dst.parent)
        except OSError as err:
            raise _temp_error(dst, err) from None
        self.tmp = Path(tmp)
        if self.video:
            try:
                self._writer = open_writer(self.tmp, dst, width, height, rate, audio)
            except BaseException:
                self.abort()
                raise

    def write(self, img: np.ndarray) -> None:
        """Append one H x W x 3 uint8 RGB frame."""
        if img.shape != (self.height, self.width, 3) or img.dtype != np.uint8:
            raise ValueError(f"{self.dst}: frame {self.count} is {img.shape} {img.dtype}, "
                             f"expected ({self.height}, {self.width}, 3) uint8")
        if self._writer is not None:
            self._writer.write(img)
        else:
            name = self.names[self.count] if self.names is not None else f"{self.count:08d}"
            try:
                write_png(self.tmp / f"{name}.png", img)
            except OSError as err:
                raise ValueError(f"{self.dst}: cannot write frame {self.count} ({err.strerror or err}; "
                                 f"{free_space(self.dst.parent)}); nothing written") from None  # fmt: skip
        self.count += 1

    def _verify(self) -> None:
        """A video counts as written once it decodes to every frame at the size encoded: OpenCV's
        writer (the fallback) only prints a warning when a frame fails (a full disk) and carries on."""
        frames, w, h = count_video_frames(self.tmp)
        if (frames, w, h) != (self.count, self.width, self.height):
            raise ValueError(
                f"{self.dst}: the written video decodes to {frames} frames of {w}x{h}, not the {self.count} "
                f"of {self.width}x{self.height} encoded (disk full? {free_space(self.dst.parent)}); nothing written")

    def commit(self) -> None:
        """Finish, verify and move the output under the final name (replacing an old one if allowed)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()
            if self.count == 0 or self.tmp.stat().st_size == 0:
                raise ValueError(f"{self.dst}: the video writer wrote an empty video")
            self._verify()
        os.chmod(self.tmp, default_mode(folder=not self.video))  # mkstemp/mkdtemp make 0600/0700
        exists = self.dst.exists() or self.dst.is_symlink()
        if exists and not self.overwrite:  # appeared while we worked: never clobber it silently
            raise ValueError(f"{self.dst}: already exists (overwrite=True / --overwrite replaces it)")
        if not exists:
            os.rename(self.tmp, self.dst)
        elif self.video:
            os.replace(self.tmp, self.dst)  # one atomic step for files
        else:
            # A non-empty folder cannot be replaced in one step: move the old one aside first and
            # put it back if the swap fails, so the final name always holds a complete output.
            aside = Path(tempfile.mkdtemp(prefix=temp_prefix(self.dst), suffix=".old", dir=self.dst.parent))
            os.rename(self.dst, aside / "old")
            try:
                os.rename(self.tmp, self.dst)
            except BaseException:
                os.rename(aside / "old", self.dst)
                raise
            shutil.rmtree(aside, ignore_errors=True)

    def abort(self) -> None:
        """Drop the temporary output (idempotent)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.abort()
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> FrameSink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
