"""Training configuration: one `StageConfig` per stage (REDS, then Vimeo), under `TrainConfig`.

`StageConfig()` is the paper's REDS recipe and `StageConfig.paper_vimeo()` its Vimeo stage, so a
params.yaml section only lists what it changes. Built with `gsm.configs.from_mapping`: a wrong key
or value fails before any work, naming the dotted key (`train.reds.lr`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gsm.configs import from_mapping, to_mapping

STAGES: tuple[str, ...] = ("reds", "vimeo")

# Fields that do not change what is computed: they may differ when a run resumes.
OPERATIONAL_FIELDS: frozenset[str] = frozenset(
    {"workers", "preload", "ckpt_every", "val_every", "log_every", "keep_last", "init_from"}
)


@dataclass(frozen=True)
class StageConfig:
    """One training stage. Defaults: the paper's REDS stage (SPEC section 3)."""

    iters: int = 600_000
    batch_size: int = 8  # global: each of N processes gets batch_size // N clips
    num_frames: int = 16  # frames per clip as loaded (before mirroring)
    gt_size: int = 256  # GT patch side (LR patch = gt_size / 4)
    interval_list: tuple[int, ...] = (1,)
    # Items per clip and epoch (BasicSR's dataset_enlarge_ratio): a small dataset otherwise ends an
    # epoch every few iterations, and each epoch restarts the loader's worker processes.
    repeat: int = 1
    random_reverse: bool = False
    mirror: bool = False  # clip -> clip + reversed clip (Vimeo: 7 -> 14 frames), done by the trainer
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    eta_min: float = 1e-7  # cosine annealing floor of the main group (the flow group's is scaled)
    fix_flow: int = 5000  # SpyNet frozen for this many iterations
    # SpyNet run once per training frame pair instead of per sample (gsm.train.flow_cache): needs
    # SpyNet frozen for the whole stage and small data (the flows stay in memory).
    cache_flows: bool = False
    flow_lr_mult: float = 0.125  # SpyNet lr = flow_lr_mult x main lr afterwards
    charbonnier_eps: float = 1e-12
    ema_decay: float = 0.999  # 0 disables the EMA copy
    grad_clip: float | None = None  # max global grad norm (paper ablations: 1.0 avoids NaN at K=3)
    bf16: bool = False  # bfloat16 autocast; CUDA only, ignored on CPU
    workers: int = 4  # DataLoader processes per training process (0: load in the main process)
    # Decode every training frame into memory once before training (small data only: refused when it
    # needs more than half the available memory). Same samples; no PNG decoding per iteration.
    preload: bool = False
    ckpt_every: int = 5000
    val_every: int = 5000
    log_every: int = 100  # metrics.jsonl flush and MLflow batch interval (every iteration is logged)
    keep_last: bool = True  # True: only checkpoints/last.pt; False: also keep iter_XXXXXXXX.pt
    # A checkpoint path, or a stage name ("reds"): that stage's last.pt under the runs folder.
    init_from: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        for name in ("iters", "batch_size", "num_frames", "gt_size", "repeat", "ckpt_every", "val_every", "log_every"):
            if getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        for name in ("fix_flow", "workers"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.gt_size % 4:
            raise bad("gt_size", "must be a multiple of the scale 4")
        if not self.interval_list or any(i < 1 for i in self.interval_list):
            raise bad("interval_list", "must hold positive intervals")
        for name in ("lr", "flow_lr_mult", "charbonnier_eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise bad(name, "must be a positive number")
        for name in ("eta_min", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise bad(name, "must be >= 0")
        if self.eta_min > self.lr:
            raise bad("eta_min", f"must not exceed lr ({self.lr})")
        if not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", "must be in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise bad("ema_decay", "must be in [0, 1)")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise bad("grad_clip", "must be a positive number or null")
        if self.cache_flows and self.fix_flow < self.iters:
            raise ValueError(f"cache_flows needs SpyNet frozen for the whole stage: fix_flow ({self.fix_flow}) "
                             f"must be >= iters ({self.iters})")
        if self.cache_flows and self.mirror:
            raise ValueError("cache_flows cannot follow the trainer's mirroring: set mirror false")
        if self.init_from is not None and not self.init_from.strip():
            raise bad("init_from", "must be a stage name, a checkpoint path or null")

    @classmethod
    def paper_vimeo(cls) -> StageConfig:
        """The paper's Vimeo-90K stage: 300k iterations, 7 frames mirrored to 14, from REDS."""
        return cls(iters=300_000, num_frames=7, mirror=True, init_from="reds")

    @property
    def ema(self) -> bool:
        return self.ema_decay > 0


def stage_default(stage: str) -> StageConfig:
    """The paper's recipe for a stage name."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r} (known: {', '.join(STAGES)})")
    return StageConfig.paper_vimeo() if stage == "vimeo" else StageConfig()


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # model init and data order (the datasets take their own seed)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    reds: StageConfig = field(default_factory=StageConfig)
    vimeo: StageConfig = field(default_factory=StageConfig.paper_vimeo)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "train") -> TrainConfig:
        """Stage sections override their own stage's paper recipe (vimeo keeps mirror etc.)."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a mapping, got {values!r}")
        merged = dict(values)
        for stage in STAGES:
            if stage in merged:
                given = merged[stage]
                if not isinstance(given, dict):
                    raise ValueError(f"{where}.{stage}: expected a mapping, got {given!r}")
                merged[stage] = from_mapping(StageConfig, {**to_mapping(stage_default(stage)), **given},
                                             f"{where}.{stage}")
        return from_mapping(cls, merged, where)

    def stage(self, name: str) -> StageConfig:
        if name not in STAGES:
            raise ValueError(f"unknown training stage {name!r} (known: {', '.join(STAGES)})")
        return getattr(self, name)


DIS_PRESETS: tuple[str, ...] = ("ultrafast", "fast", "medium")


@dataclass(frozen=True)
class FlowInitConfig:
    """SpyNet distilled from DIS flows (gsm.train.flow_init; params.yaml `flow_init`)."""

    iters: int = 200
    batch_size: int = 4
    patch: int = 64  # LR patch side (frames smaller than that are taken whole)
    lr: float = 1e-3  # Adam, cosine to lr / 100
    max_pairs: int = 150  # frame pairs drawn from the training clips (each gives both directions)
    preset: str = "medium"  # DIS preset: ultrafast | fast | medium
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iters", "batch_size", "patch", "max_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"flow_init.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"flow_init.lr must be a positive number, got {self.lr!r}")
        if self.preset not in DIS_PRESETS:
            raise ValueError(f"flow_init.preset must be one of {', '.join(DIS_PRESETS)}, got {self.preset!r}")


    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "flow_init") -> FlowInitConfig:
        return from_mapping(cls, values, where)


def stage_differences(old: dict[str, Any], new: StageConfig, *, ignore: frozenset[str] = OPERATIONAL_FIELDS
                      ) -> list[str]:
    """`name old != new` for each field that changes the training trajectory."""
    current = to_mapping(new)
    diffs = []
    for name, value in current.items():
        if name in ignore:
            continue
        before = old.get(name, "(absent)")
        if before != value:
            diffs.append(f"{name} {before!r} != {value!r}")
    return diffs


def resolve_init(init_from: str | None, runs_dir: str | Path) -> Path | None:
    """`init_from` as a checkpoint path: a stage name means `<runs_dir>/<stage>/checkpoints/last.pt`.

    last.pt, not best.pt: the paper starts the Vimeo stage from the end of the REDS stage (best.pt
    is picked on a validation set, which the next stage should not depend on).
    """
    if init_from is None:
        return None
    if init_from in STAGES:
        path = Path(runs_dir) / init_from / "checkpoints" / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"init_from {init_from!r}: no checkpoint at {path} (train that stage first)")
        return path
    path = Path(init_from).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init_from: checkpoint not found: {path}")
    return path


def flat_params(prefix: str, values: dict[str, Any]) -> dict[str, str]:
    """{"train.reds.lr": "0.0002", ...}: a config as flat string params (MLflow)."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flat_params(name, value))
        else:
            out[name] = str(value)
    return out
