"""reports/videos/<set>.mp4: bicubic | ours | GT side by side over the first scored frames of a test set.

Why: a still crop hides flicker and temporal artefacts, which a practitioner judges by playing
the frames. The panels are centre crops (protocols.centre_crop) so each file stays small; the
frame rate is chosen so the video lasts about VIDEO_SECONDS, whatever the number of frames.
Written as H.264 (browser-playable) through gsm.serve.video_out, like `gsm upscale`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from gsm.serve.video_out import open_writer

VIDEO_SECONDS = 3
PANEL_LABELS = ("bicubic", "ours", "GT")


def video_fps(frames: int) -> int:
    """Frames per second that make `frames` last about VIDEO_SECONDS (1 to 25)."""
    return max(1, min(25, round(frames / VIDEO_SECONDS)))


def side_by_side(panels: Sequence[np.ndarray]) -> np.ndarray:
    """The panels (uint8 H x W x 3, same size) in a row, each labelled in its top-left corner."""
    labelled = []
    for label, img in zip(PANEL_LABELS, panels):
        img = np.ascontiguousarray(img)
        for colour, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):  # outlined: legible on any content
            cv2.putText(img, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, thickness, cv2.LINE_AA)
        labelled.append(img)
    return np.concatenate(labelled, axis=1)


def write_side_by_side(frames: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path) -> Path:
    """The (bicubic, ours, GT) frames as one video at `path`, written to a temp file and renamed."""
    if not frames:
        raise ValueError(f"{path}: no frames to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    first = side_by_side([p.copy() for p in frames[0]])
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        writer = open_writer(tmp, path, first.shape[1], first.shape[0], Fraction(video_fps(len(frames))), None)
        try:
            for triple in frames:
                writer.write(side_by_side([p.copy() for p in triple]))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = ["side_by_side", "video_fps", "write_side_by_side"]
