"""The project's one typed configuration, loaded from params.yaml (DVC's params file)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gsm.configs import from_mapping
from gsm.data.incoming import IncomingConfig
from gsm.data.prepare import DataConfig
from gsm.data.sources import DEFAULT_SOURCES, Source, sources_from_dict
from gsm.eval.config import EvalConfig
from gsm.models.config import GSMConfig
from gsm.tracking import MlflowConfig
from gsm.train.config import FlowInitConfig, TrainConfig


@dataclass(frozen=True)
class PrefectConfig:
    """The Prefect flows (pipelines/): the retrain schedule, download retries, stage caching."""

    retrain_cron: str = "0 3 * * 1"  # when the `retrain` deployment runs (cron, in `timezone`)
    timezone: str = "UTC"  # IANA name, e.g. Europe/Berlin
    deployment_name: str = "gsm-retrain"
    work_pool: str = "gsm-gpu"  # `make deploy`: the work pool whose workers (GPU machines) run the flows
    download_retries: int = 2  # task-level retries of the download stage (on top of data.download_retries)
    retry_delay_s: float = 60.0
    cache: bool = True  # skip stages whose params, inputs and code are unchanged since a run

    def __post_init__(self) -> None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        if len(self.retrain_cron.split()) != 5:
            raise ValueError(f"prefect.retrain_cron must have 5 fields (min hour day month weekday), "
                             f"got {self.retrain_cron!r}")  # fmt: skip
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"prefect.timezone: unknown time zone {self.timezone!r} (IANA, e.g. UTC)") from None
        if not self.deployment_name.strip():
            raise ValueError("prefect.deployment_name must not be empty")
        if not self.work_pool.strip():
            raise ValueError("prefect.work_pool must not be empty")
        if self.download_retries < 0:
            raise ValueError(f"prefect.download_retries must be >= 0, got {self.download_retries}")
        if self.retry_delay_s < 0:
            raise ValueError(f"prefect.retry_delay_s must be >= 0, got {self.retry_delay_s}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "prefect") -> PrefectConfig:
        return from_mapping(cls, values, where)


@dataclass(frozen=True)
class Params:
    model: GSMConfig = field(default_factory=GSMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sources: dict[str, Source] = field(default_factory=lambda: dict(DEFAULT_SOURCES))
    flow_init: FlowInitConfig = field(default_factory=FlowInitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prefect: PrefectConfig = field(default_factory=PrefectConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    incoming: IncomingConfig = field(default_factory=IncomingConfig)

    def __post_init__(self) -> None:
        # The retrain gate's tolerance is in dB: it must bound a dB score.
        if self.incoming.configured and self.mlflow.gate_metric not in ("psnr", "psnr_gain"):
            raise ValueError(f"incoming.tolerance_db is in dB: mlflow.gate_metric must be psnr or psnr_gain "
                             f"when an incoming source is set, got {self.mlflow.gate_metric!r}")  # fmt: skip


def _model(values: Any, where: str) -> GSMConfig:
    """Typed like every other section (`model.spynet_weights: 5` is a one-line error, not a TypeError later)."""
    return from_mapping(GSMConfig, values, where)


_SECTIONS: dict[str, Callable[[Any, str], Any]] = {
    "model": _model,
    "data": DataConfig.from_dict,
    "sources": sources_from_dict,
    "flow_init": FlowInitConfig.from_dict,
    "train": TrainConfig.from_dict,
    "eval": EvalConfig.from_dict,
    "prefect": PrefectConfig.from_dict,
    "mlflow": MlflowConfig.from_dict,
    "incoming": IncomingConfig.from_dict,
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
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if raw is None:
        # All defaults would be the paper's recipe (600k GPU iterations): never what an empty file meant.
        raise ValueError(f"{path}: empty params file; the defaults are the paper's 600k-iteration recipe, so "
                         f"an empty file is refused (start from the repository's params.yaml or configs/paper.yaml)")
    try:
        return parse_params(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def params_yaml(p: Params) -> str:
    """The params as YAML, every default filled in: what a run logs as its params.yaml artifact."""
    from gsm.configs import to_mapping

    return yaml.safe_dump(to_mapping(p), sort_keys=False)
