"""The evaluate stage in one call: pick the configured test sets, score a model on each, write reports.

The command line loads the model (``gsm.train.checkpoint.load_model``) and the test sets
(``gsm.data.catalog.eval_sets``) and hands both here, so this module depends on neither.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from gsm.eval.config import EvalConfig
from gsm.ops.backend import resolve_device
from gsm.eval.protocols import TestResult, TestSet, evaluate_model
from gsm.eval.report import write_reports

log = logging.getLogger(__name__)

VIDEO_FRAMES = 48  # frames kept per test set for reports/videos/ (a few seconds, see report.video_fps)


def select_sets(available: Sequence[TestSet], names: Sequence[str]) -> list[TestSet]:
    """The test sets named in `names` (in that order), or all of `available` when `names` is empty."""
    sets = list(available)
    by_name = {s.name: s for s in sets}
    if len(by_name) != len(sets):
        raise ValueError(f"test set names repeat: {[s.name for s in sets]}")
    if not names:
        if not sets:
            raise ValueError("no test sets available")
        return sets
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"eval.sets: unknown test set {missing[0]!r} (available: {', '.join(by_name) or 'none'})")
    return [by_name[n] for n in names]


def model_info(model: nn.Module) -> dict[str, Any]:
    """Parameter counts (total, and without a `spynet` child if there is one) for the reports."""
    total = sum(p.numel() for p in model.parameters())
    info: dict[str, Any] = {"params": total}
    spynet = getattr(model, "spynet", None)
    if isinstance(spynet, nn.Module):
        info["params_without_spynet"] = total - sum(p.numel() for p in spynet.parameters())
    return info


def evaluate_sets(
    model: nn.Module, sets: Sequence[TestSet], cfg: EvalConfig, *, progress: bool = True
) -> dict[str, TestResult]:
    """Score `model` on each set with cfg's tiling/chunking; the model is moved to cfg.device."""
    device = resolve_device(cfg.device)
    model.to(device)
    results: dict[str, TestResult] = {}
    for ts in sets:
        r = evaluate_model(model, ts, tile=cfg.tile, tile_overlap=cfg.tile_overlap, chunk=cfg.chunk,
                           chunk_overlap=cfg.chunk_overlap, device=device, progress=progress,
                           keep=True, bicubic=True, max_clips=cfg.max_clips,
                           video_frames=VIDEO_FRAMES)  # fmt: skip
        log.info("%s: %.4f dB / %.4f (bicubic %.4f dB / %.4f) over %d frames",
                 ts.name, r.psnr, r.ssim, r.bicubic_psnr, r.bicubic_ssim, r.frames)  # fmt: skip
        results[ts.name] = r
    return results


def run_evaluation(
    scorers: Sequence[tuple[nn.Module, Sequence[TestSet]]],
    cfg: EvalConfig,
    out_dir: Path,
    *,
    train_logs: Sequence[Path] = (),
    info: Mapping[str, Any] | None = None,
    progress: bool = True,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
    val_sets: Mapping[str, str] | None = None,
) -> dict[str, TestResult]:
    """select_sets + evaluate_sets + write_reports. `scorers` pairs each model with the sets it scores
    (eval.models "per_stage": one model per training stage); `info` adds to the model facts in the
    reports, `baselines` (reports/baselines.json) go beside our scores in benchmark.md, `val_sets`
    (stage -> validation set name) title the validation curves."""
    if not scorers:
        raise ValueError("no model to score")
    chosen = select_sets([s for _, sets in scorers for s in sets], cfg.sets)
    names = {s.name for s in chosen}
    scored: dict[str, TestResult] = {}
    for model, sets in scorers:
        mine = [s for s in sets if s.name in names]
        if mine:
            scored.update(evaluate_sets(model, mine, cfg, progress=progress))
    results = {s.name: scored[s.name] for s in chosen}
    facts = {**model_info(scorers[0][0]), **dict(info or {})}
    write_reports(results, out_dir, model_info=facts, train_logs=train_logs, crop_size=cfg.crop_size,
                  baselines=baselines, val_sets=val_sets)
    return results


__all__ = ["evaluate_sets", "model_info", "run_evaluation", "select_sets"]
