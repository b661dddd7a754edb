"""The evaluation stage's knobs (params.yaml section `eval`), typed and validated up front."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gsm.configs import from_mapping
from gsm.ops.backend import resolve_device


@dataclass(frozen=True)
class EvalConfig:
    """How to run the benchmarks. Defaults score whole frames and whole clips (the exact protocol)."""

    sets: tuple[str, ...] = ()  # test set names to score (REDS4, Vimeo-90K-T, Vid4-BI, ...); () = all available
    tile: int | None = None  # LR tile side for spatial tiling; None = whole frames
    tile_overlap: int = 16  # LR pixels shared by neighbouring tiles (cross-faded)
    chunk: int | None = None  # frames per temporal chunk; None = whole clips (chunking is approximate)
    chunk_overlap: int = 2  # context frames on each side of a chunk, run but not kept
    max_clips: int | None = None  # score only the first clips of each set (smoke runs); None = all
    crop_size: int = 128  # side, in GT pixels, of the bicubic / ours / GT crops in the report
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    # Which weights score a set. "per_stage": the stage trained for it, as the paper's tables (and
    # BasicVSR++'s, RVRT's, IART's) are made: REDS4 by the REDS model, Vimeo-90K-T and Vid4 by the
    # Vimeo one. "final": the last trained stage's model scores every set.
    models: Literal["per_stage", "final"] = "per_stage"

    def __post_init__(self) -> None:
        if len(set(self.sets)) != len(self.sets):
            raise ValueError(f"sets: names repeat, got {list(self.sets)}")
        if self.tile is not None and self.tile < 8:
            raise ValueError(f"tile must be >= 8 LR pixels or null, got {self.tile}")
        if self.tile_overlap < 0 or (self.tile is not None and self.tile_overlap >= self.tile):
            raise ValueError(f"tile_overlap must be in [0, tile), got {self.tile_overlap}")
        if self.chunk is not None and self.chunk < 2:
            raise ValueError(f"chunk must be >= 2 frames or null, got {self.chunk}")
        if self.chunk_overlap < 0:
            raise ValueError(f"chunk_overlap must be >= 0, got {self.chunk_overlap}")
        if self.max_clips is not None and self.max_clips < 1:
            raise ValueError(f"max_clips must be >= 1 or null, got {self.max_clips}")
        if self.crop_size < 16:
            raise ValueError(f"crop_size must be >= 16, got {self.crop_size}")
        resolve_device(self.device, "eval.device")

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "eval") -> EvalConfig:
        """From a params mapping (the Params section builder's signature); errors name `where.key`."""
        return from_mapping(cls, values, where)


def eval_config(values: Mapping[str, Any] | None, where: str = "eval") -> EvalConfig:
    """EvalConfig from a params mapping or None (all defaults); a bad key or value names `where.key`."""
    if values is not None and not isinstance(values, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {values!r}")
    return EvalConfig.from_dict(dict(values or {}), where)


__all__ = ["EvalConfig", "eval_config"]
