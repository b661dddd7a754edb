"""Frame I/O shared by degradation, packing and datasets: RGB uint8 arrays, PNG on disk or in LMDB.

Conversions (documented, not errors): grayscale frames become RGB by repeating the channel;
16-bit frames become 8-bit by rounding v / 257; an alpha channel is dropped. Anything that does not
decode is a one-line ValueError naming the file or key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from gsm.io import atomic_write_bytes

cv2.setNumThreads(1)  # parallelism comes from worker processes; OpenCV threads would oversubscribe


def to_rgb8(img: np.ndarray, name: str) -> np.ndarray:
    """Normalise a decoded OpenCV image (BGR/BGRA/gray, 8 or 16 bit) to H x W x 3 uint8 RGB."""
    if img.dtype == np.uint16:
        img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ValueError(f"{name}: unsupported pixel type {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"{name}: unsupported image shape {img.shape}")
    if img.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(img, 3, axis=2))
    return np.ascontiguousarray(cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB))


def decode_png(data: bytes, name: str) -> np.ndarray:
    """PNG (or any OpenCV-readable) bytes -> H x W x 3 uint8 RGB."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{name}: cannot decode image")
    return to_rgb8(img, name)


def encode_png(img: np.ndarray, level: int = 1) -> bytes:
    """H x W x 3 uint8 RGB -> PNG bytes (level 0-9: BasicSR's LMDBs use 1)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not ok:
        raise ValueError("cannot encode image as PNG")
    return buf.tobytes()


def read_image(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such frame") from None
    return decode_png(data, str(path))


def write_png(path: str | Path, img: np.ndarray, level: int = 1) -> None:
    """Atomic: a crash never leaves a truncated PNG under the final name."""
    atomic_write_bytes(path, encode_png(img, level), durable=False)


class FrameStore(Protocol):
    """Frames by key (relative path without extension, e.g. `000/00000000`, `00001/0001/im4`)."""

    def get(self, key: str) -> np.ndarray: ...


class FolderStore:
    """Frames as `root/<key>.png` files."""

    def __init__(self, root: str | Path, ext: str = ".png") -> None:
        self.root, self.ext = Path(root), ext
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: frame folder not found")

    def get(self, key: str) -> np.ndarray:
        return read_image(self.root / f"{key}{self.ext}")


def close_store(store: FrameStore) -> None:
    """Close a store's handle if it keeps one (LMDB): none is left open in a parent that workers fork
    from, and a store replaced by its preloaded frames lets its file go."""
    close = getattr(store, "close", None)
    if callable(close):
        close()


class MemoryStore:
    """Frames decoded once and kept in memory: a small training set (the quickstart's) then costs a
    crop per sample instead of decoding a 1280x720 PNG, which on 2 cores competes with training."""

    def __init__(self, frames: dict[str, np.ndarray]) -> None:
        self.frames = frames

    def get(self, key: str) -> np.ndarray:
        try:
            return self.frames[key]
        except KeyError:
            raise KeyError(f"{key}: not among the preloaded frames") from None

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.frames.values())

