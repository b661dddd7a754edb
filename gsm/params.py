"""The project's one typed configuration, loaded from params.yaml (DVC's params file)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gsm.data.prepare import DataConfig
from gsm.data.sources import DEFAULT_SOURCES, Source, sources_from_dict
from gsm.eval.config import EvalConfig
from gsm.models.config import GSMConfig
from gsm.train.config import TrainConfig


@dataclass(frozen=True)
class Params:
    model: GSMConfig = field(default_factory=GSMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sources: dict[str, Source] = field(default_factory=lambda: dict(DEFAULT_SOURCES))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_SECTIONS: dict[str, Callable[[Any, str], Any]] = {
    "model": GSMConfig.from_dict,
    "data": DataConfig.from_dict,
    "sources": sources_from_dict,
    "train": TrainConfig.from_dict,
    "eval": EvalConfig.from_dict,
}


def parse_params(raw: dict[str, Any]) -> Params:
    """Typed params from a mapping; unknown or ill-typed keys raise ValueError naming the key."""
    if not isinstance(raw, dict):
        raise ValueError("params: top level must be a mapping")
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _SECTIONS:
            raise ValueError(f"params: unknown key {key!r} (known: {', '.join(_SECTIONS)})")
        if not isinstance(value, dict):
            raise ValueError(f"params: {key} must be a mapping")
        try:
            sections[key] = _SECTIONS[key](value, key)
        except TypeError as exc:  # e.g. wrong argument shapes from YAML
            raise ValueError(f"params: {key}: {exc}") from None
    return Params(**sections)


def load_params(path: str | Path) -> Params:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        return parse_params(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
