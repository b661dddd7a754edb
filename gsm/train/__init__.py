"""Training: the paper's two-stage recipe (REDS, then Vimeo-90K), resumable, single or multi-GPU."""

from gsm.train.checkpoint import check_compatible, load_checkpoint, load_model, save_checkpoint
from gsm.train.config import StageConfig, TrainConfig, resolve_init
from gsm.train.trainer import TrainResult, train_stage

__all__ = [
    "StageConfig",
    "TrainConfig",
    "TrainResult",
    "check_compatible",
    "load_checkpoint",
    "load_model",
    "resolve_init",
    "save_checkpoint",
    "train_stage",
]
