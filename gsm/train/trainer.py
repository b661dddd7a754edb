"""One training stage: data stream, Charbonnier/Adam/cosine steps, EMA, validation, checkpoints.

Resuming is automatic and exact: out_dir/checkpoints/last.pt holds the weights, EMA, optimiser,
RNG states and the data position (epoch, batch), and the data order is a pure function of
(seed, epoch), so a run killed at any point and restarted reproduces, on CPU, the weights of an
uninterrupted run bit for bit.

Multi-GPU and multi-node runs go through torchrun: with WORLD_SIZE > 1 each process trains a
DistributedDataParallel replica on batch_size // WORLD_SIZE clips of every global batch (the global
batch, and so the recipe, stays cfg.batch_size). Only rank 0 validates, logs and writes files;
out_dir must be on a filesystem every node sees, since all ranks resume from the same last.pt.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gsm.configs import to_mapping
from gsm.models.config import GSMConfig
from gsm.models.gsmamba import GSMamba
from gsm.ops.backend import resolve_device
from gsm.train.checkpoint import (
    FORMAT,
    build_model,
    check_compatible,
    load_checkpoint,
    load_weights,
    remove_stale_temps,
    rng_state,
    save_checkpoint,
    set_rng_state,
    weights_of,
)
from gsm.train.config import StageConfig, flat_params, stage_differences
from gsm.train.data import EpochSampler, batches_per_epoch, preload
from gsm.train.flow_cache import compute_pair_flows
from gsm.train.loss import charbonnier
from gsm.train.optim import (
    build_optimizer,
    ema_update,
    flow_frozen,
    group_lrs,
    make_ema,
    set_flow_trainable,
    set_lrs,
)
from gsm.tracking import MlflowRun, TrackingTarget, sha256_file, tracking_uri_from_env
from gsm.train.tracking import MetricsFile, truncate_metrics

log = logging.getLogger(__name__)

Validate = Callable[[nn.Module], dict[str, float]]


@dataclass(frozen=True)
class TrainResult:
    stage: str
    iterations: int  # completed iterations (== cfg.iters when the stage is done)
    resumed_from: int  # iteration the run started at (0: fresh)
    final_loss: float | None  # training loss of the last iteration
    best_psnr: float | None  # best validation PSNR (None without validation)
    last: Path  # checkpoints/last.pt
    best: Path | None  # checkpoints/best.pt, when validation ran
    metrics: Path  # metrics.jsonl
    mlflow_run_id: str | None


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> tuple[_Dist, torch.device]:
    """Join torchrun's process group (env://) when WORLD_SIZE > 1, or use one already set up."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return _Dist(), device
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Rank 0 validates alone while the others wait: allow a long validation.
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return _Dist(rank, world, owns), device


def _barrier(d: _Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def _wrap(model: nn.Module, device: torch.device, d: _Dist) -> nn.Module:
    """The module to call for training: DDP over `model` in distributed runs.

    Rebuilt whenever SpyNet's requires_grad changes: DDP fixes its gradient buckets at
    construction. Every parameter requiring grad is used in each forward (checked for all the
    ablation switches), so find_unused_parameters stays off.
    """
    if d.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def prepare_batch(batch: dict[str, Any], cfg: StageConfig, stage: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """(lq, gt) on `device`, checked against the stage config, mirrored in time when cfg.mirror."""
    lq, gt = batch["lq"], batch["gt"]
    if lq.dim() != 5 or gt.dim() != 5:
        raise ValueError(f"train set must give (T, 3, H, W) clips, got lq {tuple(lq.shape[1:])}")
    if lq.shape[1] != cfg.num_frames:
        raise ValueError(
            f"train.{stage}.num_frames is {cfg.num_frames} but the train set gives {lq.shape[1]}-frame clips "
            f"(build it unmirrored: the trainer mirrors when mirror is true)"
        )
    if tuple(gt.shape[-2:]) != (cfg.gt_size, cfg.gt_size):
        raise ValueError(f"train.{stage}.gt_size is {cfg.gt_size} but the train set gives "
                         f"{gt.shape[-1]}x{gt.shape[-2]} GT patches")
    if cfg.mirror:
        lq, gt = torch.cat([lq, lq.flip(1)], 1), torch.cat([gt, gt.flip(1)], 1)
    nb = device.type == "cuda"
    return lq.to(device, non_blocking=nb), gt.to(device, non_blocking=nb)


def batch_flows(batch: dict[str, Any], device: torch.device) -> tuple[Tensor, Tensor] | None:
    """(fwd, bwd), each (B, T-1, 2, h, w), of a batch from a dataset with cached flows, else None."""
    flows = batch.get("flows")
    if flows is None:
        return None
    flows = flows.to(device, non_blocking=device.type == "cuda")
    return flows[:, 0], flows[:, 1]


def _mean_loss(loss: Tensor, d: _Dist) -> float:
    """The loss averaged over processes (what the optimiser step actually follows)."""
    value = loss.detach().float().clone()
    if d.world_size > 1:
        dist.all_reduce(value)
        value /= d.world_size
    return float(value.item())


def _run_validation(validate: Validate, target: nn.Module, training: nn.Module) -> dict[str, float]:
    target.eval()
    try:
        with torch.no_grad():
            result = validate(target)
    finally:
        training.train()
    if not isinstance(result, dict) or "psnr" not in result:
        raise ValueError(f"validate must return a dict with a 'psnr' entry, got {result!r}")
    return {k: float(v) for k, v in result.items()}


def train_stage(
    stage: str,
    cfg: StageConfig,
    model_cfg: GSMConfig,
    train_set: Dataset[Any],
    out_dir: Path,
    *,
    seed: int = 0,
    validate: Validate | None = None,
    init_from: Path | None = None,
    device: str = "auto",
    progress: bool = True,
    tracking_uri: str | None = None,
    restart_on_change: bool = False,
    inputs: Mapping[str, str] | None = None,
    tracking: TrackingTarget | None = None,
    run_params: Mapping[str, str] | None = None,
    params_snapshot: str | None = None,
    network: Callable[[], nn.Module] | None = None,
) -> TrainResult:
    """Train (or resume, or just report a finished) stage into out_dir.

    out_dir gets checkpoints/last.pt (every ckpt_every iterations and at the end), checkpoints/
    best.pt (highest validation PSNR) and metrics.jsonl. `validate(model) -> {"psnr": ..., ...}`
    runs every val_every iterations and at the end, on the EMA weights when EMA is on; its entries
    are logged as val_<name>. `init_from` (a checkpoint, see config.resolve_init) seeds a fresh run
    with its EMA (else model) weights; a run with a last.pt resumes from it instead.
    `tracking` (a resolved store, see gsm.tracking.tracking_target), else `tracking_uri`, else
    $MLFLOW_TRACKING_URI turns on MLflow: one run per stage, resumed with the checkpoint, holding
    the model and stage config (plus `run_params`, e.g. the data profile) as params, every
    iteration's loss and lr, the validations, provenance tags (git commit, dvc.lock's sha256), and
    as artifacts `params_snapshot` (the whole params file as loaded) and metrics.jsonl.
    `inputs`: fingerprints of what the run is made from besides params (the data; `init_from`'s
    file is added here), stored in the checkpoint: a run only resumes on the same inputs.
    `restart_on_change`: a last.pt written with other settings (network, recipe, seed, inputs) is deleted
    and the stage starts over, instead of the default error. Pipelines use it: they rerun a stage
    precisely because its params changed, and the old run is then obsolete.
    `network`: builds another network to train instead of GSMamba(model_cfg), with the same recipe
    (benchmark baselines); its class name is stored and a run only resumes into the same class.
    """
    if tracking is None:
        uri = tracking_uri_from_env(tracking_uri)
        tracking = TrackingTarget.from_uri(uri) if uri is not None else None
    d, dev = _init_distributed(resolve_device(device, "train.device"))
    try:
        return _train(stage, cfg, model_cfg, train_set, Path(out_dir), seed=seed, validate=validate,
                      init_from=init_from, device=dev, progress=progress, tracking=tracking,
                      run_params=dict(run_params or {}), params_snapshot=params_snapshot,
                      restart_on_change=restart_on_change, inputs=inputs, d=d, network=network)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _train(
    stage: str, cfg: StageConfig, model_cfg: GSMConfig, train_set: Dataset[Any], out_dir: Path, *, seed: int,
    validate: Validate | None, init_from: Path | None, device: torch.device, progress: bool,
    tracking: TrackingTarget | None, run_params: dict[str, str], params_snapshot: str | None,
    restart_on_change: bool, inputs: Mapping[str, str] | None, d: _Dist,
    network: Callable[[], nn.Module] | None = None,
) -> TrainResult:
    ckpt_dir = out_dir / "checkpoints"
    last_path, best_path, metrics_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt", out_dir / "metrics.jsonl"
    n_items = len(train_set)  # type: ignore[arg-type]
    # Fail before any work on a batch the processes cannot share or a set smaller than a batch.
    EpochSampler(n_items, cfg.batch_size, seed=seed, epoch=0, rank=d.rank, world_size=d.world_size)
    n_batches = batches_per_epoch(n_items, cfg.batch_size)

    # What the run is made from besides params: a resumed run must have been made from the same.
    made_from = dict(inputs or {})
    arch = "GSMamba" if network is None else type(network()).__name__
    if init_from is not None:
        made_from["init_from"] = sha256_file(init_from)
    resume = load_checkpoint(last_path) if last_path.is_file() else None
    if resume is not None and restart_on_change and d.main:
        try:
            _check_resumable(resume, stage, cfg, model_cfg, seed, made_from, last_path, arch)
        except ValueError as exc:
            log.warning("%s; starting %s over", exc, out_dir)
            shutil.rmtree(ckpt_dir)
            metrics_path.unlink(missing_ok=True)
            resume = None
    _barrier(d)
    if restart_on_change and d.world_size > 1:  # the other ranks follow rank 0's decision
        resume = load_checkpoint(last_path) if last_path.is_file() else None
    if resume is not None:
        _check_resumable(resume, stage, cfg, model_cfg, seed, made_from, last_path, arch)
        if int(resume["data"].get("items", n_items)) != n_items:
            raise ValueError(f"{last_path} was written while training on {resume['data']['items']} items, "
                             f"the train set now has {n_items}: the data stream would not continue")
        model = build_model(model_cfg) if network is None else network()
        load_weights(model, resume["model"], last_path)
    elif init_from is not None:
        init = load_checkpoint(Path(init_from))
        check_compatible(init["config"], model_cfg, init_from)
        model = build_model(model_cfg) if network is None else network()
        load_weights(model, weights_of(init, use_ema=True), init_from)
    else:
        torch.manual_seed(seed)
        model = GSMamba(model_cfg) if network is None else network()
    model.to(device).train()
    if cfg.cache_flows and not isinstance(model, GSMamba):
        raise ValueError(f"train.{stage}.cache_flows: the {arch} network has no SpyNet; set it to false")

    start = int(resume["iter"]) if resume is not None else 0
    frozen = flow_frozen(start, cfg)
    set_flow_trainable(model, not frozen)
    optimizer = build_optimizer(model, cfg)
    ema = make_ema(model) if cfg.ema and d.main else None
    best: float | None = None
    loss_value: float | None = None
    epoch, batch_pos, elapsed0, run_id = 0, 0, 0.0, None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        if ema is not None:
            if not isinstance(resume.get("ema"), dict):
                raise ValueError(f"{last_path}: has no EMA weights but train.{stage}.ema_decay is {cfg.ema_decay}")
            load_weights(ema, resume["ema"], last_path)
        set_rng_state(resume["rng"])
        epoch, batch_pos = int(resume["data"]["epoch"]), int(resume["data"]["batch"])
        best, loss_value = resume.get("best"), resume.get("loss")
        elapsed0, run_id = float(resume.get("elapsed", 0.0)), resume.get("mlflow_run_id")
    net = _wrap(model, device, d)

    def result(it: int) -> TrainResult:
        return TrainResult(stage, it, start, loss_value, best, last_path,
                           best_path if best_path.is_file() else None, metrics_path, run_id)

    if start >= cfg.iters:
        _barrier(d)
        return result(start)

    metrics: MetricsFile | None = None
    mlrun: MlflowRun | None = None
    if d.main:
        remove_stale_temps(ckpt_dir)
        truncate_metrics(metrics_path, stage, start)
        metrics = MetricsFile(metrics_path)
        if tracking is not None:
            params = {**flat_params("model", model_cfg.to_dict()), **flat_params(f"train.{stage}", to_mapping(cfg)),
                      "train.seed": str(seed), "world_size": str(d.world_size), **run_params}
            if resume is None and init_from is not None:
                params["init_from"] = str(init_from)
            mlrun = MlflowRun(tracking, stage, params, run_id)
            if params_snapshot is not None and mlrun.run_id != run_id:  # a new run, not a resumed one
                mlrun.log_text(params_snapshot, "params.yaml")
            run_id = mlrun.run_id

    def state(it: int) -> dict[str, Any]:
        return {
            "format": FORMAT, "stage": stage, "iter": it, "loss": loss_value, "best": best,
            "elapsed": elapsed0 + time.monotonic() - t0, "seed": seed, "world_size": d.world_size,
            "network": arch, "config": model_cfg.to_dict(), "train_config": to_mapping(cfg),
            "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": {"kind": "cosine", "iters": cfg.iters, "lr": cfg.lr, "eta_min": cfg.eta_min,
                          "flow_lr_mult": cfg.flow_lr_mult, "fix_flow": cfg.fix_flow,
                          "lrs": [g["lr"] for g in optimizer.param_groups]},
            "rng": rng_state(), "data": {"epoch": epoch, "batch": batch_pos, "seed": seed, "items": n_items},
            "made_from": made_from,
            "mlflow_run_id": run_id,
        }

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda"
                else nullcontext())
    if cfg.preload and start < cfg.iters:
        preload(train_set, f"train.{stage}.preload", progress=progress and d.main)  # type: ignore[arg-type]
    t0 = time.monotonic()  # the flow cache is part of the stage's time: benchmarks match wall-clocks
    if cfg.cache_flows and start < cfg.iters:
        train_set.flows = compute_pair_flows(  # type: ignore[attr-defined]
            model.spynet, train_set, device, where=f"train.{stage}.cache_flows",  # type: ignore[arg-type]
            progress=progress and d.main)
    bar = tqdm(total=cfg.iters, initial=start, desc=f"train {stage}", unit="it", dynamic_ncols=True,
               disable=not (progress and d.main))
    it = start
    status = "FAILED"
    try:
        while it < cfg.iters:
            set_epoch = getattr(train_set, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
            sampler = EpochSampler(n_items, cfg.batch_size, seed=seed, epoch=epoch, start=batch_pos,
                                   rank=d.rank, world_size=d.world_size)
            loader = DataLoader(train_set, batch_size=cfg.batch_size // d.world_size, sampler=sampler,
                                num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(seed))  # leaves the global RNG alone
            for batch in loader:
                if frozen != flow_frozen(it, cfg):
                    frozen = flow_frozen(it, cfg)
                    set_flow_trainable(model, not frozen)
                    net = _wrap(model, device, d)
                lrs = group_lrs(it, cfg)
                set_lrs(optimizer, lrs)
                lq, gt = prepare_batch(batch, cfg, stage, device)
                flows = batch_flows(batch, device)
                with autocast:
                    out = net(lq) if flows is None else net(lq, flows=flows)
                loss = charbonnier(out, gt, cfg.charbonnier_eps)
                loss_value = _mean_loss(loss, d)
                if not math.isfinite(loss_value):
                    raise RuntimeError(
                        f"train.{stage}: loss is {loss_value} at iteration {it + 1}; resume restarts from the "
                        f"last checkpoint: try grad_clip: 1.0 or a lower lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                if ema is not None:
                    ema_update(ema, model, cfg.ema_decay)
                it += 1
                batch_pos += 1
                if batch_pos == n_batches:
                    epoch, batch_pos = epoch + 1, 0

                elapsed = elapsed0 + time.monotonic() - t0
                if metrics is not None:
                    metrics.write({"stage": stage, "iter": it, "loss": loss_value, "lr": lrs[0],
                                   "time": round(elapsed, 3)})
                if mlrun is not None:
                    mlrun.log(it, {"loss": loss_value, "lr": lrs[0], "lr_flow": lrs[1]})
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lrs[0]:.2e}", refresh=False)
                bar.update(1)
                if it % cfg.log_every == 0:
                    _flush(metrics, mlrun)

                done = it >= cfg.iters
                if validate is not None and (it % cfg.val_every == 0 or done):
                    if d.main:
                        scores = _run_validation(validate, ema if ema is not None else model, model)
                        row = {f"val_{k}" if not k.startswith("val_") else k: v for k, v in scores.items()}
                        if metrics is not None:
                            metrics.write({"stage": stage, "iter": it, **row})
                        if mlrun is not None:
                            mlrun.log(it, row)
                        if best is None or scores["psnr"] > best:
                            best = scores["psnr"]
                            _flush(metrics, mlrun)
                            save_checkpoint(best_path, state(it))
                    _barrier(d)
                if it % cfg.ckpt_every == 0 or done:
                    if d.main:
                        _flush(metrics, mlrun)  # metrics.jsonl must cover every saved iteration
                        snapshot = state(it)
                        save_checkpoint(last_path, snapshot)
                        if not cfg.keep_last:  # saved, not copied: atomic, and a full disk is one line
                            save_checkpoint(ckpt_dir / f"iter_{it:08d}.pt", snapshot)
                    _barrier(d)
                if done:
                    break
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        bar.close()
        if metrics is not None:
            metrics.flush()
            metrics.close()
        if mlrun is not None:
            mlrun.close(status, artifacts=(metrics_path,))
    return result(it)


def _flush(metrics: MetricsFile | None, mlrun: MlflowRun | None) -> None:
    if metrics is not None:
        metrics.flush()
    if mlrun is not None:
        mlrun.flush()


def _check_resumable(state: dict[str, Any], stage: str, cfg: StageConfig, model_cfg: GSMConfig, seed: int,
                     made_from: Mapping[str, str], path: Path, arch: str = "GSMamba") -> None:
    """A checkpoint only resumes the run that wrote it: same stage, network, recipe, seed and inputs."""
    if state.get("stage") != stage:
        raise ValueError(f"{path} belongs to stage {state.get('stage')!r}, not {stage!r}: use another out_dir")
    if state.get("network", "GSMamba") != arch:
        raise ValueError(f"{path} holds a {state.get('network')} run, not {arch}: use another out_dir")
    check_compatible(state["config"], model_cfg, path)
    diffs = stage_differences(state.get("train_config") or {}, cfg)
    if state.get("seed") != seed:
        diffs.append(f"seed {state.get('seed')!r} != {seed!r}")
    before = state.get("made_from") or {}
    diffs += [f"{k} changed" for k in sorted(set(before) | set(made_from)) if before.get(k) != made_from.get(k)]
    if diffs:
        raise ValueError(
            f"{path} was written with different train.{stage} settings: {', '.join(diffs)}; "
            f"restore them, or delete {path.parent} to start over"
        )
    for key in ("optimizer", "rng", "data", "iter"):
        if key not in state:
            raise ValueError(f"{path}: checkpoint has no {key!r} entry, cannot resume from it")
