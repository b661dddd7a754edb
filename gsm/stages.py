"""The pipeline's stages as functions of the typed params: what `gsm` commands, DVC and Prefect run.

Each stage reads what the previous one wrote (the data manifest, a stage's checkpoints) and
nothing else, so any of them can be rerun alone and a finished stage costs seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from gsm.data.catalog import eval_sets, train_stores
from gsm.data.prepare import read_manifest
from gsm.eval.protocols import TestResult, make_validator
from gsm.ops.backend import resolve_device
from gsm.params import Params
from gsm.train.config import STAGES, resolve_init
from gsm.train.data import reds_train_set, vimeo_train_set
from gsm.train.trainer import TrainResult, train_stage

Stage = Literal["reds", "vimeo"]


def train(p: Params, stage: Stage, runs: Path, *, progress: bool = True, tracking_uri: str | None = None) -> TrainResult:
    """Train (or resume, or skip when finished) one stage on the prepared data of `p.data.profile`.

    Validation (every `val_every` iterations and at the end) runs on the stage's own benchmark:
    REDS4 for REDS, Vimeo-90K-T for Vimeo, as the field reports them; `val_every` > `iters` skips it.
    """
    manifest = read_manifest(p.data)
    cfg = p.train.stage(stage)
    gt, lr, entry = train_stores(manifest, stage)
    if stage == "reds":
        dataset = reds_train_set(cfg, gt, lr, entry["train"], frames_per_clip=entry["frames_per_clip"], seed=p.train.seed)
    else:
        dataset = vimeo_train_set(cfg, gt, lr, entry["train"], seed=p.train.seed)
    e, validate = p.eval, None
    if cfg.val_every <= cfg.iters:  # a larger val_every means: no validation in this run
        validate = make_validator(eval_sets(manifest, stage)[0], e.tile, e.tile_overlap,
                                  resolve_device(e.device, "eval.device"), chunk=e.chunk,
                                  chunk_overlap=e.chunk_overlap, max_clips=e.max_clips)  # fmt: skip
    return train_stage(
        stage, cfg, p.model, dataset, Path(runs) / stage, seed=p.train.seed, validate=validate,
        init_from=resolve_init(cfg.init_from, runs), device=p.train.device, progress=progress,
        tracking_uri=tracking_uri,
    )  # fmt: skip


def final_checkpoint(runs: Path) -> Path:
    """The last stage that has trained: Vimeo's last.pt when it exists, else REDS's."""
    for stage in reversed(STAGES):
        path = Path(runs) / stage / "checkpoints" / "last.pt"
        if path.is_file():
            return path
    raise FileNotFoundError(f"{runs}: no trained stage (checkpoints/last.pt); run `gsm train` first")


def evaluate(
    p: Params, checkpoint: Path | None, runs: Path, out: Path, *, progress: bool = True
) -> dict[str, TestResult]:
    """Score a checkpoint (default: the final stage's) on every benchmark the data has; write reports/."""
    from gsm.eval.stage import run_evaluation
    from gsm.train.checkpoint import load_model

    manifest = read_manifest(p.data)
    ckpt = checkpoint or final_checkpoint(runs)
    model = load_model(ckpt)
    sets = [s for kind in ("reds", "vimeo", "vid4") if manifest.get(kind) for s in eval_sets(manifest, kind)]
    logs = [Path(runs) / s / "metrics.jsonl" for s in STAGES if (Path(runs) / s / "metrics.jsonl").is_file()]
    return run_evaluation(model, sets, p.eval, out, train_logs=logs,
                          info={"checkpoint": str(ckpt), "profile": p.data.profile}, progress=progress)  # fmt: skip
