"""`gsm` command line. Each command wires one stage function; errors print one line, no traceback."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

# `gsm --help` lists the commands in the order a run uses them (typer lists them as defined).
PIPELINE_ORDER = ("prepare", "download", "degrade", "pack", "flow-init", "train", "evaluate", "register",
                  "model-report", "pipeline-run", "upscale", "info")


def _untyped_flags(params: list[Any]) -> list[Any]:
    """Flags lose typer's `<bool>` type column, which reads as if they took a value."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _PipelineGroup(TyperGroup):
    def list_commands(self, ctx: Any) -> list[str]:
        rank = {name: i for i, name in enumerate(PIPELINE_ORDER)}
        return sorted(super().list_commands(ctx), key=lambda name: rank.get(name, len(rank)))

    def get_command(self, ctx: Any, name: str) -> Any:
        command = super().get_command(ctx, name)
        if command is not None:
            _untyped_flags(command.get_params(ctx))  # with its --help, created once and kept
        return command

    def get_params(self, ctx: Any) -> list[Any]:
        return _untyped_flags(super().get_params(ctx))


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=_PipelineGroup,
                  help="GSM-VSR: Gather-Scatter Mamba video SR.")
_ERRNO = re.compile(r"^\[Errno -?\d+\] ")


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures (bad params, missing files, an unreachable server after its retries,
    a full disk) into `error: ...` and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, PermissionError, RuntimeError, ConnectionError, TimeoutError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # a fault of the machine (a full disk): its message, less "[Errno 28] "
            typer.echo("error: " + _ERRNO.sub("", str(exc)), err=True)
            raise typer.Exit(2) from None

    return wrapper


def package_version() -> str:
    """The installed distribution's version (what pip and MLflow see), or the source tree's."""
    try:
        return importlib.metadata.version("gsm-vsr")
    except importlib.metadata.PackageNotFoundError:
        from gsm import __version__

        return f"{__version__} (source tree, not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"gsm-vsr {package_version()}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log backend choices."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    # MLflow logs store migrations and model checks at INFO; commands print their own summary line.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")


@app.command("model-report")
@one_line_errors
def model_report_cmd(
    params: Path = typer.Option(Path("params.yaml"), metavar="FILE", help="params file; its `model` section is timed"),
    out: Path = typer.Option(Path("reports"), metavar="DIR", help="folder for model.md and model.json"),
) -> None:
    """Parameter and FLOP counts of the paper config; CPU timing of the params.yaml network."""
    from gsm.models.report import model_report
    from gsm.params import load_params

    result = model_report(load_params(params).model, out)
    p = result["paper"]
    typer.echo(f"paper config: {p['params']['total']:,} parameters, "
               f"{p['macs_per_frame_180x320'] / 1e12:.3f} TMACs/frame at 180x320")
    s = result["small"]
    typer.echo(f"params.yaml model: {s['params']['total']:,} parameters, forward {s['forward_s']:.2f} s, "
               f"forward+backward {s['forward_backward_s']:.2f} s on {s['cpu_clip']}")
    typer.echo(f"wrote {out / 'model.md'} and {out / 'model.json'}")


@app.command()
def info() -> None:
    """Which kernels this machine will use."""
    import torch

    from gsm.ops.backend import causal_conv1d_available, mamba_ssm_available, numba_available

    typer.echo(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    typer.echo(f"mamba-ssm kernels: {mamba_ssm_available()}, causal-conv1d: {causal_conv1d_available()}, "
               f"numba CPU scan: {numba_available()}")


@app.command()
@one_line_errors
def pack(
    paths: list[Path] = typer.Argument(..., metavar="[SRC] DST", show_default=False,
                                       help="PNG frame folder and LMDB folder; with --verify, only DST"),
    verify: bool = typer.Option(False, "--verify", help="decode every frame of DST; with SRC, after packing, "
                                "and each must equal its source's pixels"),
    level: int = typer.Option(1, min=0, max=9, metavar="N", help="PNG compression level of the stored frames"),
    workers: int = typer.Option(2, min=1, metavar="N", help="encoding processes"),
    batch: int = typer.Option(500, min=1, metavar="FRAMES", help="frames per LMDB commit (the unit of resumption)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars on stderr"),
) -> None:
    """Pack PNG frames into a BasicSR-compatible LMDB (rerun to resume), or --verify one."""
    from gsm.data.lmdb_io import pack_lmdb, verify_lmdb

    if len(paths) > 2 or (len(paths) == 1 and not verify):
        raise ValueError("usage: gsm pack SRC DST [--verify]  or  gsm pack --verify DST")
    dst = paths[-1]
    if len(paths) == 2:
        s = pack_lmdb(paths[0], dst, level=level, workers=workers, batch=batch, progress=progress)
        mb = s.value_bytes / 1e6
        if s.status == "up-to-date":
            typer.echo(f"{dst}: up to date ({s.frames} frames, {mb:.1f} MB, level {s.level}); nothing to do")
        else:
            rate = s.encoded / s.seconds if s.seconds > 0 else 0.0
            typer.echo(f"{s.status} {dst}: {s.frames} frames ({s.encoded} encoded, {s.skipped} kept from an "
                       f"earlier run), {mb:.1f} MB at level {s.level}, {s.seconds:.1f} s ({rate:.1f} frames/s)")
    if verify:
        v = verify_lmdb(dst, src=paths[0] if len(paths) == 2 else None, progress=progress)
        typer.echo(f"verified {dst}: {v.frames} frames decode with their recorded shapes, "
                   f"{v.value_bytes / 1e6:.1f} MB, {v.seconds:.1f} s")


def _load(params: Path) -> Any:
    from gsm.params import load_params

    return load_params(params)


@app.command("pipeline-run")
@one_line_errors
def pipeline_run_cmd(
    command: list[str] = typer.Argument(..., help="the command, after `--` (dvc repro, dvc exp run ...)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file: its `mlflow` section (the store)"),
    name: str = typer.Option("pipeline", help="the parent run's name"),
) -> None:
    """Run COMMAND as one pipeline execution: the MLflow runs of its stages nest under one parent run
    (its id in $GSM_PARENT_RUN_ID). The store is the stages': $MLFLOW_TRACKING_URI, else the params'.
    Exits with COMMAND's status."""
    import sys

    from gsm.tracking import PARENT_RUN_ENV, pipeline_run, tracking_target

    target = tracking_target(_load(params).mlflow)
    with pipeline_run(target, name, {"command": " ".join(command)}) as parent:
        env = {**os.environ, **({PARENT_RUN_ENV: parent} if parent else {})}
        status = _wait(command, env)
        if status:
            sys.exit(status)  # SystemExit: not an error of gsm's to reword; the parent run ends FAILED


def _wait(command: list[str], env: dict[str, str]) -> int:
    """COMMAND's exit status. Ctrl-C reaches it too (one process group), so it is waited for, not
    killed: DVC releases its lock and keeps the stages it finished on the way out."""
    import subprocess

    with subprocess.Popen(command, env=env) as proc:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.wait()
            raise


@app.command()
@one_line_errors
def prepare(
    params: Path = typer.Option(Path("params.yaml"), metavar="FILE",
                                help="params file: its `data` and `sources` sections"),
    step: list[str] = typer.Option([], "--step", metavar="STEP",
                                   help="download, degrade or pack (repeatable; default: all three)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars on stderr"),
) -> None:
    """Data stage: quickstart frames or the paper's datasets, degraded and packed; writes the manifest."""
    from gsm.data.prepare import STEPS, prepare_data

    p = _load(params)
    path = prepare_data(p.data, p.sources, steps=tuple(step) or STEPS, progress=progress)
    typer.echo(f"{p.data.profile} data, {', '.join(step) or 'all steps'} done: {path}")


@app.command()
@one_line_errors
def download(
    names: list[str] = typer.Argument(..., help="source names from params.yaml `sources` (e.g. reds_val_sharp)"),
    params: Path = typer.Option(Path("params.yaml"), metavar="FILE",
                                help="params file: its `sources` and `data` sections"),
    dest: Path | None = typer.Option(None, metavar="DIR", help="download folder (default: the pipeline's, "
                                     "<data.root>/<data.profile>/source/downloads)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars on stderr"),
) -> None:
    """Fetch archives (resumable, verified, idempotent)."""
    from gsm.data.download import fetch
    from gsm.data.sources import require_url

    p = _load(params)
    unknown = [n for n in names if n not in p.sources]
    if unknown:
        raise ValueError(f"unknown source {unknown[0]!r} (known: {', '.join(p.sources)})")
    for name in names:  # every name's settings before the first byte
        require_url(p.sources[name])
    folder = dest or p.data.downloads_dir
    for name in names:
        path = fetch(p.sources[name], folder, retries=p.data.download_retries, progress=progress)
        typer.echo(f"{name}: {path}")


@app.command()
@one_line_errors
def degrade(
    gt: Path = typer.Argument(..., help="GT frame tree (clip/frame.png)"),
    lr: Path = typer.Argument(..., help="LR output tree"),
    mode: str = typer.Option("BI", metavar="BI|BD",
                             help="BI (MATLAB bicubic) or BD (Gaussian blur sigma 1.6 + subsample)"),
    scale: int = typer.Option(4, min=2, metavar="N", help="LR frames are 1/N of the GT's width and height"),
    workers: int = typer.Option(2, min=1, metavar="N", help="worker processes"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars on stderr"),
) -> None:
    """Write LR frames for a GT tree (parallel, resumable: finished clips are skipped)."""
    from gsm.data.degrade import degrade_tree

    if mode not in ("BI", "BD"):
        raise ValueError(f"--mode must be BI or BD, got {mode!r}")
    s = degrade_tree(gt, lr, mode=mode, scale=scale, workers=workers, progress=progress)  # type: ignore[arg-type]
    typer.echo(f"{lr}: {s.clips_done} clips degraded ({s.frames_written} frames), {s.clips_skipped} already done")


@app.command("flow-init")
@one_line_errors
def flow_init(
    params: Path = typer.Option(Path("params.yaml"), metavar="FILE",
                                help="params file: `data` and `flow_init` sections"),
    runs: Path = typer.Option(Path("runs"), metavar="DIR", help="runs folder: writes <runs>/flow/spynet.pth"),
    out: Path = typer.Option(Path("reports"), metavar="DIR",
                             help="folder for flow_init.json (held-out EPE) and flow_init_run.json (run facts)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars on stderr"),
) -> None:
    """Distil SpyNet from OpenCV's DIS flow on the training frames: a starting flow without downloads."""
    from gsm import stages

    r = stages.flow_init(_load(params), runs, out, progress=progress)
    typer.echo(f"flow_init: held-out EPE against DIS {r['heldout_epe_before']:.3f} -> {r['heldout_epe_after']:.3f} px "
               f"(zero flow {r['heldout_zero_flow_epe']:.3f}); wrote {runs / 'flow' / 'spynet.pth'}")


@app.command()
@one_line_errors
def train(
    stage: str = typer.Option(..., metavar="reds|vimeo", help="reds (pretraining) or vimeo (finetuning from reds)"),
    params: Path = typer.Option(Path("params.yaml"), metavar="FILE",
                                help="params file: `model`, `data`, `train`, `eval`"),
    runs: Path = typer.Option(Path("runs"), metavar="DIR",
                              help="runs folder: <runs>/<stage>/checkpoints, metrics.jsonl"),
    tracking_uri: str | None = typer.Option(None, metavar="URI", help="MLflow store (default: "
                                            "$MLFLOW_TRACKING_URI, else params' mlflow.tracking_uri)"),
    restart_on_change: bool = typer.Option(False, "--restart-on-change",
                                           help="start over when last.pt was written with other settings"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar on stderr"),
) -> None:
    """Train one stage (resumes from its last checkpoint; a finished stage returns at once)."""
    from gsm import stages

    if stage not in ("reds", "vimeo"):
        raise ValueError(f"--stage must be reds or vimeo, got {stage!r}")
    r = stages.train(_load(params), stage, runs, restart_on_change=restart_on_change, progress=progress,  # type: ignore[arg-type]
                     tracking_uri=tracking_uri)
    loss = "n/a" if r.final_loss is None else f"{r.final_loss:.5f}"
    typer.echo(f"{stage}: {r.iterations} iterations (resumed at {r.resumed_from}), last loss {loss}; {r.last}")


@app.command()
@one_line_errors
def evaluate(
    params: Path = typer.Option(Path("params.yaml"), metavar="FILE", help="params file: `data` and `eval` sections"),
    model: Path | None = typer.Option(None, "--model", metavar="CHECKPOINT",
                                      help="one checkpoint to score every set with (default: as eval.models "
                                           "says, each set by its stage's last.pt)"),
    runs: Path = typer.Option(Path("runs"), metavar="DIR",
                              help="runs folder (checkpoints and training logs for the plots)"),
    out: Path = typer.Option(Path("reports"), metavar="DIR",
                             help="folder for metrics.json, per_clip.csv, benchmark.md, plots/"),
    tracking_uri: str | None = typer.Option(None, metavar="URI", help="MLflow store (default: "
                                            "$MLFLOW_TRACKING_URI, else params' mlflow.tracking_uri)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars on stderr"),
) -> None:
    """Benchmarks (REDS4, Vimeo-90K-T, Vid4, or the quickstart's) with the bicubic baseline; reports."""
    from gsm import stages

    results = stages.evaluate(_load(params), model, runs, out, progress=progress, tracking_uri=tracking_uri)
    for name, r in results.items():
        typer.echo(f"{name}: {r.psnr:.2f} dB / {r.ssim:.4f} (bicubic {r.bicubic_psnr:.2f} dB / {r.bicubic_ssim:.4f})")
    typer.echo(f"wrote {out / 'metrics.json'}, {out / 'benchmark.md'}")


@app.command()
@one_line_errors
def upscale(
    input: Path = typer.Argument(..., help="video file, folder of frames, or a single image"),
    # str, not Path: a Path drops the trailing "/" that asks for a PNG folder.
    output: str = typer.Argument(..., help="video (.mp4 .avi .mkv .mov .m4v) or PNG folder (other names, or ending in /)"),
    model: str = typer.Option(..., "--model", "-m", metavar="CHECKPOINT|URI",
                              help="training checkpoint (runs/<stage>/checkpoints/last.pt) "
                                   "or registered model (models:/gsm-vsr@champion, models:/gsm-vsr/3, runs:/...)"),
    chunk: int = typer.Option(32, min=1, metavar="FRAMES",
                              help="frames the network sees at once (memory grows with it)"),
    chunk_overlap: int = typer.Option(4, min=0, metavar="FRAMES",
                                      help="frames shared by consecutive chunks, cross-faded"),
    tile: int | None = typer.Option(None, min=1, metavar="PIXELS",
                                    help="LR tile side in pixels (default: whole frames)"),
    tile_overlap: int = typer.Option(16, min=0, metavar="PIXELS", help="LR pixels shared by neighbouring tiles"),
    fps: float | None = typer.Option(None, metavar="FPS",
                                     help="output frame rate (default: the input's, 25 for frames; "
                                          "another rate leaves the input's audio out)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing video or PNG folder"),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="EMA weights when the checkpoint has them"),
    device: str | None = typer.Option(None, metavar="DEVICE",
                                      help="cpu, cuda, cuda:1 (default: CUDA when available)"),
    bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast (CUDA only)"),
    allow_truncated: bool = typer.Option(False, "--allow-truncated",
                                         help="upscale what decodes of a video shorter than its container says"),
    tracking_uri: str | None = typer.Option(None, metavar="URI", help="MLflow store resolving models:/ URIs "
                                            "(default: $MLFLOW_TRACKING_URI, else --params' mlflow.tracking_uri)"),
    params: Path = typer.Option(Path("params.yaml"), metavar="FILE",
                                help="params file, read for its `mlflow` section (models:/ URIs)"),
    retries: int = typer.Option(0, min=0, metavar="N", help="retries of an unreachable tracking server "
                                "(models:/ URIs; each waits up to 10 s)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar on stderr"),
) -> None:
    """Upscale a video or frame folder x4 with a checkpoint or a registered model, streaming in chunks."""
    kwargs: dict[str, Any] = dict(chunk=chunk, chunk_overlap=chunk_overlap, tile=tile, tile_overlap=tile_overlap,
                                  fps=fps, overwrite=overwrite, device=device, bf16=bf16, progress=progress,
                                  allow_truncated=allow_truncated)
    from gsm.registry.uri import is_model_uri

    if is_model_uri(model):
        from gsm.registry.uri import upscale_from_uri
        from gsm.tracking import MlflowConfig, tracking_target

        if not ema:
            raise ValueError("--no-ema applies to checkpoints: a registered model holds only its serving weights")
        cfg = _load(params).mlflow if params.is_file() else MlflowConfig()
        target = tracking_target(cfg, tracking_uri)
        if target is None:
            raise ValueError(f"{model}: no MLflow store to resolve it (mlflow.tracking_uri is null in {params}); "
                             f"pass --tracking-uri")  # fmt: skip
        s = upscale_from_uri(model, target.uri, input, output, retries=retries, **kwargs)
    else:
        from gsm.serve.upscale import upscale_from_checkpoint

        s = upscale_from_checkpoint(model, input, output, use_ema=ema, **kwargs)
    rate = f" at {s.fps:g} fps" if s.fps else ""
    typer.echo(f"wrote {s.output}: {s.frames} frames {s.output_size[0]}x{s.output_size[1]}{rate} "
               f"from {s.input_size[0]}x{s.input_size[1]} in {s.seconds:.1f} s: {s.seconds_per_frame:.2f} s per frame")


@app.command()
@one_line_errors
def register(
    params: Path = typer.Option(Path("params.yaml"), metavar="FILE",
                                help="params file: `mlflow` (store, model name, gate) and `data`"),
    runs: Path = typer.Option(Path("runs"), metavar="DIR",
                              help="runs folder (default checkpoint: the last trained stage's last.pt)"),
    reports: Path = typer.Option(Path("reports"), metavar="DIR",
                                 help="folder with metrics.json; registry.json is written there"),
    model: Path | None = typer.Option(None, "--model", metavar="CHECKPOINT",
                                      help="checkpoint to register (must be the one metrics.json scores)"),
    tracking_uri: str | None = typer.Option(None, metavar="URI", help="MLflow store (default: "
                                            "$MLFLOW_TRACKING_URI, else params' mlflow.tracking_uri)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars on stderr"),
) -> None:
    """Register the evaluated checkpoint in MLflow; `champion` moves to it only if it beats the champion."""
    from gsm import stages

    r = stages.register(_load(params), runs, reports, checkpoint=model, progress=progress, tracking_uri=tracking_uri)
    typer.echo(f"{r.model_name} version {r.version}: {r.alias or 'no alias'} ({r.reason}); {r.model_uri}")
