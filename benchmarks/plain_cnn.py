"""The plain 3-frame CNN baseline, trained like the quickstart GSM and scored beside it.

    .venv/bin/python benchmarks/plain_cnn.py [--params params.yaml] [--runs runs/quickstart]
        [--out reports] [--calibrate 240] [--lr STAGE=LR ...]

Same trainer (gsm.train.trainer), same data, same recipe per stage (batch, clip length, patch, lr
schedule, EMA), same wall-clock: each stage gets the time the GSM run in `--runs` took for that stage
(its metrics.jsonl), counted in the GSM run's own steps (stage seconds / its steady step time, flow
cache included) and converted at the CNN : GSM step-time ratio measured side by side now: `--calibrate`
iterations of the CNN, of the GSM, of the CNN again, each through the trainer. The host's speed
drifts by up to 2x between hours here; a ratio taken in one run does not, while the GSM's seconds
from an earlier hour against the CNN's step time now gave the CNN 1.5x the GSM's time (2026-11-30).
Then the CNN is scored on the same test sets as `gsm evaluate`. `--lr reds=1e-3` gives the CNN
its own peak lr for a stage (the rest of the recipe kept) and saves the run as its own entry, so a
baseline tuned for itself sits beside the one on the GSM's recipe.

Writes <out>/baselines.json (read by `gsm evaluate`, which puts the row into benchmark.md beside
ours and bicubic; rerun `dvc repro` afterwards) and <out>/baselines.md.
"""

from __future__ import annotations

import argparse
import statistics
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gsm import stages  # noqa: E402
from gsm.configs import to_mapping  # noqa: E402
from gsm.data.catalog import eval_sets  # noqa: E402
from gsm.data.prepare import read_manifest  # noqa: E402
from gsm.eval.protocols import TestResult, evaluate_model  # noqa: E402
from gsm.eval.report import equal_wall_clock  # noqa: E402
from gsm.io import atomic_write_json, atomic_write_text, cpu_name  # noqa: E402
from gsm.models.plain_cnn import PlainCNN, PlainCNNConfig  # noqa: E402
from gsm.ops.backend import resolve_device  # noqa: E402
from gsm.params import Params, load_params  # noqa: E402
from gsm.train.checkpoint import load_checkpoint, load_weights, weights_of  # noqa: E402
from gsm.train.config import STAGES, StageConfig  # noqa: E402
from gsm.train.trainer import train_stage  # noqa: E402

NAME = "plain_cnn"
WARMUP = 10  # calibration steps left out of the step time
TITLE = "Plain 3-frame CNN (6 residual blocks, 32 channels)"


def _iteration_times(metrics: Path) -> list[float]:
    """The trainer's elapsed seconds at each iteration record of a metrics.jsonl."""
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no training log; train the quickstart first (`make repro`)")
    times = [float(r["time"]) for r in map(json.loads, metrics.read_text().splitlines()) if "time" in r]
    if not times:
        raise ValueError(f"{metrics}: no iteration records")
    return times


def stage_seconds(metrics: Path) -> float:
    """Wall-clock of a finished training stage: the `time` of its last iteration record."""
    return _iteration_times(metrics)[-1]


def run_config(stage_cfg: StageConfig, iters: int, cnn: bool) -> StageConfig:
    """The stage's recipe for `iters` iterations of one network, no validation. A SpyNet frozen for
    the whole stage stays so at any length: a GSM probe longer than the stage would otherwise time
    steps that train SpyNet, which the stage never runs (it made a Vimeo probe step 1.7x the run's)."""
    frozen = stage_cfg.fix_flow >= stage_cfg.iters
    return replace(stage_cfg, iters=iters, val_every=iters + 1, ckpt_every=iters, init_from=None,
                   cache_flows=stage_cfg.cache_flows and not cnn,
                   fix_flow=max(iters, stage_cfg.fix_flow) if frozen else stage_cfg.fix_flow)  # fmt: skip


def _train(p: Params, stage: str, iters: int, out: Path, init: Path | None, cnn: bool = True) -> Path:
    """Train the CNN (else the GSM, for timing) for one stage with that stage's recipe, `iters`
    iterations, no validation. The GSM keeps its flow cache; the CNN has no flows to cache."""
    manifest = read_manifest(p.data)
    cfg = run_config(p.train.stage(stage), iters, cnn)
    dataset, _ = stages.train_inputs(replace(p, train=replace(p.train, **{stage: cfg})), manifest, stage)  # type: ignore[arg-type]
    network = (lambda: PlainCNN(PlainCNNConfig())) if cnn else None
    r = train_stage(stage, cfg, p.model, dataset, out / stage, seed=p.train.seed, init_from=init,
                    device=p.train.device, network=network, progress=True)  # fmt: skip
    return r.last


def step_ratio(p: Params, stage: str, calibrate: int, work: Path) -> dict[str, Any]:
    """CNN and GSM step seconds on this stage's recipe, measured side by side (CNN, GSM, CNN), and
    the CNN's iterations per GSM iteration. The GSM probe starts from random weights: a step costs
    the same whatever the weights."""
    def probe(name: str, cnn: bool) -> float:
        return _seconds_per_iter(_train(p, stage, calibrate, work / name, None, cnn).parent.parent / "metrics.jsonl")

    cnn = [probe("cnn0", True)]
    gsm = probe("gsm", False)
    cnn.append(probe("cnn1", True))
    cnn_step = statistics.mean(cnn)
    return {"gsm_step": gsm, "cnn_steps": cnn, "cnn_per_gsm_step": gsm / cnn_step}


def _seconds_per_iter(log: Path) -> float:
    """Steady step time: the mean of the middle 80% of the step times after the first quarter (at
    least WARMUP steps). Allocator and oneDNN warm-up made a mean over 10 steps 2.5x the steady rate
    (2026-11-30); a median of the trainer's millisecond-rounded times is itself rounded, 0.020 against
    0.021 s being 5% of a CNN step, and the CNN so got 6% and 15% more seconds than the GSM
    (2026-12-01); the trimmed mean of many rounded steps is not rounded."""
    times = _iteration_times(log)
    steps = [b - a for a, b in zip(times, times[1:])]
    if not steps:
        raise ValueError(f"{log}: too few iterations to time; raise --calibrate")
    steady = sorted(steps[min(max(WARMUP, len(steps) // 4), len(steps) // 2):])
    cut = len(steady) // 10
    return statistics.fmean(steady[cut:len(steady) - cut])


def load_cnn(path: Path) -> PlainCNN:
    model = PlainCNN(PlainCNNConfig())
    load_weights(model, weights_of(load_checkpoint(path)), path)
    return model.eval()


def score_checkpoints(p: Params, by_kind: dict[str, Path], load: Callable[[Path], nn.Module],
                      max_clips: int | None, progress: bool = True) -> dict[str, TestResult]:
    """Every test set of each family scored by its checkpoint in `by_kind` (gsm.stages.scoring_checkpoints,
    as `gsm evaluate` picks them), with eval's tiling and chunking; a checkpoint shared by families
    is loaded once."""
    manifest = read_manifest(p.data)
    device = resolve_device(p.eval.device, "eval.device")
    models: dict[Path, nn.Module] = {}
    results: dict[str, TestResult] = {}
    for kind, ckpt in by_kind.items():
        if ckpt not in models:
            models[ckpt] = load(ckpt).to(device)
        for ts in eval_sets(manifest, kind):  # type: ignore[arg-type]
            results[ts.name] = evaluate_model(models[ckpt], ts, tile=p.eval.tile, tile_overlap=p.eval.tile_overlap,
                                              chunk=p.eval.chunk, chunk_overlap=p.eval.chunk_overlap, device=device,
                                              keep=False, progress=progress, max_clips=max_clips)  # fmt: skip
    return results


def _score(p: Params, by_kind: dict[str, Path]) -> dict[str, Any]:
    """The CNN's scores on every test set, as benchmark.md scores ours (eval.max_clips)."""
    return {name: {"psnr": round(r.psnr, 4), "ssim": round(r.ssim, 4), "bicubic_psnr": round(r.bicubic_psnr, 4),
                   "bicubic_ssim": round(r.bicubic_ssim, 4)}
            for name, r in score_checkpoints(p, by_kind, load_cnn, p.eval.max_clips).items()}  # fmt: skip


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def rescaled_iters(iters: int, seconds: float, gsm_seconds: float, floor: int) -> int | None:
    """None when a CNN stage of `iters` iterations ran within gsm.eval.report's tolerance of the GSM's
    seconds; else the iterations that its measured rate fits into them. A GSM step's cost drifts
    over a stage (46-59 ms on 2026-12-01) and 240-step probes on a shared host can miss the ratio
    by 20 %; the whole run's rate does not depend on them."""
    if gsm_seconds <= 0 or equal_wall_clock(seconds, gsm_seconds):
        return None
    return max(floor, round(iters * gsm_seconds / seconds))


def with_lrs(p: Params, lrs: dict[str, float]) -> Params:
    """params with these stages' peak lr replaced: the CNN's own lr, the rest of the recipe kept.
    An unknown stage name is TrainConfig.stage's error."""
    stages_ = {s: replace(p.train.stage(s), lr=lr) for s, lr in lrs.items()}
    return replace(p, train=replace(p.train, **stages_))


def entry_name(lrs: dict[str, float]) -> tuple[str, str]:
    """The baselines.json key and title of a run, so runs at other lrs sit beside the recipe's."""
    if not lrs:
        return NAME, TITLE
    return (NAME + "".join(f"_{s}_lr{v:g}" for s, v in sorted(lrs.items())),
            TITLE + ", " + ", ".join(f"{s} lr {v:g}" for s, v in sorted(lrs.items())))


def run(params: Path, runs: Path, out: Path, calibrate: int, lrs: dict[str, float] | None = None) -> dict[str, Any]:
    lrs = lrs or {}
    base = load_params(params)
    p = with_lrs(base, lrs)  # a step costs the same at any lr: the GSM probe may share it
    gsm_seconds = {s: stage_seconds(runs / s / "metrics.jsonl") for s in STAGES}
    # Each stage's budget in the GSM run's own steps: its seconds, flow cache included, over its steady step.
    gsm_steps = {s: gsm_seconds[s] / _seconds_per_iter(runs / s / "metrics.jsonl") for s in STAGES}
    manifest = read_manifest(p.data)
    iters: dict[str, int] = {}
    seconds: dict[str, float] = {}
    calibration: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gsm-plain-cnn-") as tmp:
        work, init = Path(tmp), None
        for stage in STAGES:
            calibration[stage] = step_ratio(p, stage, calibrate, work / "calibrate" / stage)
            calibration[stage]["gsm_budget_steps"] = gsm_steps[stage]
            iters[stage] = max(calibrate, round(gsm_steps[stage] * calibration[stage]["cnn_per_gsm_step"]))
            last = _train(p, stage, iters[stage], work / "run", init)
            seconds[stage] = stage_seconds(work / "run" / stage / "metrics.jsonl")
            retry = rescaled_iters(iters[stage], seconds[stage], gsm_seconds[stage], calibrate)
            if retry is not None:  # the probes misjudged the ratio: the run's own rate is the better measure
                print(f"{stage}: the CNN ran {seconds[stage]:.0f} s against the GSM's {gsm_seconds[stage]:.0f} s; "
                      f"training it again for {retry} iterations instead of {iters[stage]}", file=sys.stderr)
                calibration[stage]["first_run"] = {"iters": iters[stage], "seconds": seconds[stage]}
                shutil.rmtree(work / "run" / stage)  # the trainer would resume from its checkpoint
                iters[stage] = retry
                last = _train(p, stage, retry, work / "run", init)
                seconds[stage] = stage_seconds(work / "run" / stage / "metrics.jsonl")
            init = last
        scores = _score(p, stages.scoring_checkpoints(p, work / "run", manifest))
    model = PlainCNN(PlainCNNConfig())
    name, title = entry_name(lrs)
    entry = {
        "title": title, "lr": lrs, "config": PlainCNNConfig().to_dict(), "params": sum(x.numel() for x in model.parameters()),
        "iters": iters, "train_seconds": seconds, "gsm_train_seconds": gsm_seconds, "calibration": calibration,
        "scores": scores, "eval_models": p.eval.models,
        # The params' recipe (the lrs are the entry's own key): evaluate marks the entry stale once it changes.
        "recipe": {s: to_mapping(base.train.stage(s)) for s in STAGES},
        "data": {s: stages.data_fingerprint(manifest, s) for s in STAGES},  # type: ignore[arg-type]
        "profile": p.data.profile, "commit": _commit(), "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "python": platform.python_version(), "torch": torch.__version__, "date": dt.date.today().isoformat(),
        "command": "python benchmarks/plain_cnn.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    path = out / "baselines.json"
    existing = json.loads(path.read_text()) if path.is_file() else {}
    entries = {**existing, name: entry}
    atomic_write_json(path, entries)
    atomic_write_text(out / "baselines.md", "\n".join(markdown(e, out) for e in entries.values()))
    return entry


def markdown(e: dict[str, Any], out: Path) -> str:
    gsm = json.loads((out / "metrics.json").read_text())["test_sets"] if (out / "metrics.json").is_file() else {}
    lines = [f"# Baseline: {e['title']}", "",
             f"`{e['command']}` on {e['machine']}, commit {e['commit']}, {e['date']}.", "",
             "Trained by gsm's trainer on the quickstart data with each stage's recipe, for the GSM run's "
             "wall-clock per stage, counted in the GSM run's steps and converted at the step-time ratio "
             "measured side by side (CNN, GSM, CNN probes in this run), so the host's drift between the two "
             "runs does not enter:", "",
             "| stage | GSM seconds | GSM budget (its steps) | GSM step, CNN step (probes, s) | CNN iterations "
             "| CNN seconds |", "|---|---|---|---|---|---|"]  # fmt: skip
    for s in e["iters"]:
        c = e.get("calibration", {}).get(s)
        probe = (f"{c['gsm_step']:.3f}, {'/'.join(f'{x:.3f}' for x in c['cnn_steps'])}" if c else "-")
        budget = f"{c['gsm_budget_steps']:.0f}" if c else "-"
        lines.append(f"| {s} | {e['gsm_train_seconds'][s]:.0f} | {budget} | {probe} | {e['iters'][s]} "
                     f"| {e['train_seconds'][s]:.0f} |")  # fmt: skip
    lines += ["", "| test set | plain CNN | GSM-VSR (reports/metrics.json) | bicubic |", "|---|---|---|---|"]
    for name, sc in e["scores"].items():
        ours = gsm.get(name, {})
        ours_text = f"{ours['psnr']:.2f} / {ours['ssim']:.4f}" if "psnr" in ours else "not run"
        lines.append(f"| {name} | {sc['psnr']:.2f} / {sc['ssim']:.4f} | {ours_text} "
                     f"| {sc['bicubic_psnr']:.2f} / {sc['bicubic_ssim']:.4f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_lr(item: str) -> tuple[str, float]:
    """One `--lr STAGE=LR` argument; errors name the argument as given."""
    stage, _, value = item.partition("=")
    if stage not in STAGES:
        raise ValueError(f"--lr {item}: no training stage {stage!r} (one of {', '.join(STAGES)})")
    try:
        lr = float(value)
    except ValueError:
        raise ValueError(f"--lr {item}: expected STAGE=LR, e.g. reds=1e-3") from None
    if not lr > 0:
        raise ValueError(f"--lr {item}: expected STAGE=LR with LR > 0, e.g. reds=1e-3")
    return stage, lr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--runs", type=Path, default=None, help="the GSM run to match (default runs/<profile>)")
    ap.add_argument("--out", type=Path, default=Path("reports"))
    ap.add_argument("--calibrate", type=int, default=240,
                    help="iterations run to time a step (see _seconds_per_iter)")
    ap.add_argument("--lr", action="append", default=[], metavar="STAGE=LR",
                    help="the CNN's peak lr for a stage instead of the recipe's (saved as its own entry)")
    a = ap.parse_args(argv)
    try:
        lrs = dict(parse_lr(item) for item in a.lr)
        runs = a.runs or Path("runs") / load_params(a.params).data.profile
        e = run(a.params, runs, a.out, a.calibrate, lrs)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, sc in e["scores"].items():
        print(f"{name}: plain CNN {sc['psnr']:.2f} dB (bicubic {sc['bicubic_psnr']:.2f} dB)")
    print(f"wrote {a.out / 'baselines.json'} and {a.out / 'baselines.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
