"""Evaluation outputs under one folder (normally `reports/`), every file written atomically.

* ``metrics.json``: DVC metrics. ``test_sets.<name>.{psnr, ssim, bicubic_psnr, bicubic_ssim,
  psnr_gain, ssim_gain, clips, frames}`` and ``model`` (the caller's model_info). A non-finite
  score (``inf`` PSNR of a perfect frame, ``nan`` of a skipped baseline) is ``null``, since JSON
  has no such numbers. Nothing timed goes here, so two runs of the same pipeline give the same file.
* ``runtime.json``: inference seconds per test set (and per frame), the timed part.
* ``curves/train.csv`` (step, stage, iter, loss, lr) and ``curves/val.csv`` (step, stage, iter,
  val_*): the training logs as DVC plot data; `step` counts on across stages.
* ``per_clip.csv``: test_set, clip, frames, psnr, ssim, bicubic_psnr, bicubic_ssim.
* ``benchmark.md``: this run's numbers, then the SPEC 5 table of published numbers with ours and
  bicubic beside them, then the plots.
* ``plots/``: ``train_loss.png`` and ``val_psnr.png`` from the trainer's metrics.jsonl files,
  ``per_clip_<set>.png`` (ours vs bicubic PSNR per clip) and ``crops_<set>.png`` (bicubic / ours /
  GT crops of the showcase frame; the crop is where ours and bicubic differ most, the centre if
  they never differ).

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas: no pyplot global state.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gsm.eval.protocols import Showcase, TestResult
from gsm.io import atomic_write_json, atomic_write_text

# SPEC 5: published x4 BI numbers (PSNR / SSIM) and sizes. None = not given in SPEC 5 (see the paper).
PAPER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("REDS4", "REDS4 (RGB)"),
    ("Vimeo-90K-T", "Vimeo-90K-T (Y)"),
    ("Vid4-BI", "Vid4 BI (Y)"),
)
PAPER_ROWS: tuple[tuple[str, dict[str, tuple[float, float] | None], str], ...] = (
    ("GSM (paper)", {"REDS4": None, "Vimeo-90K-T": (38.25, 0.9534), "Vid4-BI": None}, "10.5M"),
    ("IART", {"REDS4": (32.90, 0.9138), "Vimeo-90K-T": (38.14, 0.9528), "Vid4-BI": (28.26, 0.8517)}, "~13.4M"),
    ("RVRT", {"REDS4": (32.75, 0.9113), "Vimeo-90K-T": (38.15, 0.9527), "Vid4-BI": (27.99, 0.8462)}, "10.8M"),
    ("VRT", {"REDS4": (32.19, 0.9006), "Vimeo-90K-T": (38.20, 0.9530), "Vid4-BI": (27.93, 0.8425)}, "35.6M"),
    ("BasicVSR++", {"REDS4": (32.39, 0.9069), "Vimeo-90K-T": (37.79, 0.9500), "Vid4-BI": (27.79, 0.8400)}, "7.3M"),
)


# --------------------------------------------------------------------------------------------------
# Small helpers


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _fmt(psnr: float, ssim: float) -> str:
    if math.isnan(psnr):
        return "n/a"
    return f"{psnr:.2f} / {ssim:.4f}"


def slug(name: str) -> str:
    """File-name-safe form of a test set name (`Vimeo-90K-T` -> `vimeo-90k-t`)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "set"


def save_figure(fig: Figure, path: Path, dpi: int = 100) -> Path:
    """PNG via the Agg canvas, written to a temp file beside `path` and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=dpi)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report image is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------------
# Tables


def metrics_dict(results: Mapping[str, TestResult], model_info: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics.json content (see the module docstring)."""
    sets = {}
    for name, r in results.items():
        sets[name] = {
            "psnr": _finite(r.psnr),
            "ssim": _finite(r.ssim),
            "bicubic_psnr": _finite(r.bicubic_psnr),
            "bicubic_ssim": _finite(r.bicubic_ssim),
            "psnr_gain": _finite(r.psnr - r.bicubic_psnr),
            "ssim_gain": _finite(r.ssim - r.bicubic_ssim),
            "clips": len(r.clips),
            "frames": r.frames,
        }
    return {"test_sets": sets, "model": dict(model_info)}


def runtime_dict(results: Mapping[str, TestResult]) -> dict[str, Any]:
    """The runtime.json content: wall seconds of inference, kept apart from the reproducible metrics."""
    return {name: {"seconds": round(r.seconds, 3), "frames": r.frames,
                   "seconds_per_frame": round(r.seconds / max(r.frames, 1), 4)} for name, r in results.items()}  # fmt: skip


def per_clip_csv(results: Mapping[str, TestResult]) -> str:
    """One row per clip of every test set (means over the clip's scored frames)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["test_set", "clip", "frames", "psnr", "ssim", "bicubic_psnr", "bicubic_ssim"])
    for name, r in results.items():
        for c in r.clips:
            writer.writerow([name, c.clip, len(c.frames), f"{c.mean_psnr:.4f}", f"{c.mean_ssim:.6f}",
                             f"{c.mean_bicubic_psnr:.4f}", f"{c.mean_bicubic_ssim:.6f}"])  # fmt: skip
    return buf.getvalue()


def _params_text(model_info: Mapping[str, Any]) -> str:
    n = model_info.get("params")
    return f"{n / 1e6:.2f}M" if isinstance(n, (int, float)) and not isinstance(n, bool) else "?"


def baselines_markdown(results: Mapping[str, TestResult], baselines: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Rows of the baselines trained on this data (benchmarks/, reports/baselines.json) beside ours.

    An entry whose `same_data` is false was measured on other data: shown, and marked stale.
    """
    if not baselines:
        return []
    lines = ["", "## Baselines trained here", ""]
    for b in baselines.values():
        lines += [
            f"{b['title']}: `{b['command']}`, trained by the same trainer on the same data and recipe for the "
            f"GSM run's wall-clock ({sum(b['gsm_train_seconds'].values()):.0f} s), on {b['machine']}, "
            f"commit {b['commit']}, {b['date']}; {b['params']:,} parameters.",
            "",
        ]
        if not b.get("same_data", True):
            lines += ["**Stale: measured on other data than this run's; rerun the command above.**", ""]
        lines += ["| test set | ours (this run) | baseline | bicubic |", "|---|---|---|---|"]
        for name, sc in b["scores"].items():
            ours = _fmt(results[name].psnr, results[name].ssim) if name in results else "not run"
            lines.append(f"| {name} | {ours} | {_fmt(sc['psnr'], sc['ssim'])} "
                         f"| {_fmt(sc['bicubic_psnr'], sc['bicubic_ssim'])} |")  # fmt: skip
        lines.append("")
    return lines[:-1]


def benchmark_markdown(
    results: Mapping[str, TestResult], model_info: Mapping[str, Any], plots: Sequence[Path], out_dir: Path,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """benchmark.md: this run, the baselines trained here, the SPEC 5 comparison, the plots."""
    lines = ["# Benchmark (x4 video super-resolution)", ""]
    if model_info:
        lines += ["## Model", ""]
        lines += [f"- {k}: {v}" for k, v in model_info.items()]
        lines.append("")
    lines += [
        "## This run",
        "",
        "PSNR / SSIM on uint8 frames (float64, peak 255, crop border as listed); per frame -> per clip "
        "-> mean over clips. Bicubic is MATLAB `imresize(lr, 4, 'bicubic')` on the same frames.",
        "",
        "| test set | protocol | channel | clips | frames | ours | bicubic | gain (dB) | inference s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        gain = r.psnr - r.bicubic_psnr
        gain_text = f"{gain:+.2f}" if math.isfinite(gain) else "n/a"
        lines.append(
            f"| {name} | {r.protocol} | {'Y' if r.y_channel else 'RGB'} (border {r.crop_border}) | {len(r.clips)} "
            f"| {r.frames} | {_fmt(r.psnr, r.ssim)} | {_fmt(r.bicubic_psnr, r.bicubic_ssim)} "
            f"| {gain_text} | {r.seconds:.1f} |"
        )
    lines += baselines_markdown(results, baselines or {})
    header = "| method | " + " | ".join(title for _, title in PAPER_COLUMNS) + " | params |"
    lines += [
        "",
        "## Beside the papers",
        "",
        "Only the two *this run* rows are measured here. The GSM (paper) row and the other methods' rows "
        "are published numbers (SPEC section 5: GSM from arXiv 2510.00862, the others as their own papers "
        "report them); *see paper* marks a number SPEC 5 does not give. Our rows fill a column only when a "
        "test set of exactly that name was evaluated; quickstart stand-ins are not the papers' test sets "
        "and appear only above.",
        "",
        header,
        "|---|" + "---|" * len(PAPER_COLUMNS) + "---|",
    ]
    ours = [_fmt(results[k].psnr, results[k].ssim) if k in results else "not run" for k, _ in PAPER_COLUMNS]
    bic = [_fmt(results[k].bicubic_psnr, results[k].bicubic_ssim) if k in results else "not run"
           for k, _ in PAPER_COLUMNS]  # fmt: skip
    lines.append(f"| GSM-VSR (ours, this run) | {' | '.join(ours)} | {_params_text(model_info)} |")
    lines.append(f"| Bicubic (this run) | {' | '.join(bic)} | - |")
    for method, numbers, params in PAPER_ROWS:
        cells = [f"{v[0]:.2f} / {v[1]:.4f}" if (v := numbers[k]) else "see paper" for k, _ in PAPER_COLUMNS]
        lines.append(f"| {method} | {' | '.join(cells)} | {params} |")
    lines += ["", "## Plots", ""]
    if plots:
        for p in plots:
            lines += [f"![{p.stem}]({os.path.relpath(p, out_dir)})", ""]
    else:
        lines.append("No plots were written.")
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------------
# Training curves


def read_train_log(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl file; blank lines are skipped, a bad line is an error."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: training log not found") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{lineno}: not a JSON object") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: not a JSON object")
        records.append(rec)
    return records


def _series(logs: Sequence[Path], key: str) -> dict[str, tuple[list[float], list[float]]]:
    """label -> (iterations, values) of every record carrying `key`, one series per (file, stage)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for path in logs:
        for rec in read_train_log(path):
            value, it = rec.get(key), rec.get("iter")
            if not isinstance(value, (int, float)) or not isinstance(it, (int, float)):
                continue
            stage = str(rec.get("stage", "train"))
            label = stage if len(logs) == 1 else f"{Path(path).parent.name}/{stage}"
            xs, ys = out.setdefault(label, ([], []))
            xs.append(float(it))
            ys.append(float(value))
    return out


def curves_csv(logs: Sequence[Path]) -> tuple[str, str]:
    """(train.csv, val.csv) text of the logs, stages in order, `step` continuing across stages."""
    train, val = io.StringIO(), io.StringIO()
    tw, vw = csv.writer(train, lineterminator="\n"), csv.writer(val, lineterminator="\n")
    tw.writerow(["step", "stage", "iter", "loss", "lr"])
    val_keys: list[str] = []
    val_rows: list[list[Any]] = []
    offset, last, current = 0, 0, None
    for path in logs:
        for rec in read_train_log(path):
            it = rec.get("iter")
            if not isinstance(it, int):
                continue
            stage = rec.get("stage", Path(path).parent.name)
            if stage != current:  # the next stage's iterations go on from the last one's end
                offset, last, current = offset + last, 0, stage
            last = max(last, it)
            if isinstance(rec.get("loss"), (int, float)):
                tw.writerow([offset + it, stage, it, rec["loss"], rec.get("lr", "")])
            vals = {k: v for k, v in rec.items() if k.startswith("val_") and isinstance(v, (int, float))}
            if vals:
                val_keys += [k for k in sorted(vals) if k not in val_keys]
                val_rows.append([offset + it, stage, it, vals])
    vw.writerow(["step", "stage", "iter", *val_keys])
    for step, stage, it, vals in val_rows:
        vw.writerow([step, stage, it, *(vals.get(k, "") for k in val_keys)])
    return train.getvalue(), val.getvalue()


def plot_curve(logs: Sequence[Path], key: str, ylabel: str, path: Path, log_y: bool = False) -> Path | None:
    """One line per (log, stage) of `key` against iterations; None (nothing written) if no record has it."""
    series = _series(logs, key)
    if not series:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for label, (xs, ys) in series.items():
        if len(ys) > 100:  # noisy per-iteration losses: faint raw curve under a moving average
            k = len(ys) // 50
            (raw,) = ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
            smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
            ax.plot(xs[k - 1 :], smooth, color=raw.get_color(), label=f"{label} (mean of {k})")
        else:
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 20 else None, markersize=3)
    if log_y and all(v > 0 for _, ys in series.values() for v in ys):
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# Per-clip bars and crops


def plot_per_clip(result: TestResult, path: Path) -> Path:
    """Grouped bars: mean PSNR per clip, ours beside bicubic."""
    names = [c.clip for c in result.clips]
    # inf (a perfect clip) or nan (no baseline) cannot be drawn: such bars are left out
    ours = [v if math.isfinite(v) else 0.0 for v in (c.mean_psnr for c in result.clips)]
    bic = [v if math.isfinite(v) else 0.0 for v in (c.mean_bicubic_psnr for c in result.clips)]
    x = np.arange(len(names))
    fig = Figure(figsize=(max(5.0, 0.6 * len(names) + 2), 4))
    ax = fig.subplots()
    finite = [v for v in ours + bic if v > 0]
    ax.bar(x - 0.2, bic, 0.4, label="bicubic")
    ax.bar(x + 0.2, ours, 0.4, label="ours")
    if finite:
        lo, hi = min(finite), max(finite)
        ax.set_ylim(max(0.0, lo - 2.0), hi + 1.0)
    ax.set_xticks(x, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    ax.set_ylabel(f"PSNR (dB, {'Y' if result.y_channel else 'RGB'})")
    ax.set_title(f"{result.name}: per-clip PSNR")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def choose_crop(ours: np.ndarray, bicubic: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left (y, x) of the size x size window where ours and bicubic differ most (first on ties).

    Deterministic: window sums of |ours - bicubic| from an integral image; the centred window when
    the two never differ. `size` is capped at the frame.
    """
    h, w = ours.shape[:2]
    ch, cw = min(size, h), min(size, w)
    diff = np.abs(ours.astype(np.int64) - bicubic.astype(np.int64)).sum(axis=2)
    if not diff.any():
        return (h - ch) // 2, (w - cw) // 2
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = diff.cumsum(0).cumsum(1)
    sums = integral[ch:, cw:] - integral[:-ch, cw:] - integral[ch:, :-cw] + integral[:-ch, :-cw]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(y), int(x)


def plot_crops(result: TestResult, showcase: Showcase, path: Path, crop_size: int) -> Path:
    """Bicubic / ours / GT crops side by side, each titled with its frame PSNR."""
    y, x = choose_crop(showcase.ours, showcase.bicubic, crop_size)
    h, w = min(crop_size, showcase.gt.shape[0]), min(crop_size, showcase.gt.shape[1])
    panels = [
        (f"bicubic {showcase.bicubic_psnr:.2f} dB", showcase.bicubic),
        (f"ours {showcase.psnr:.2f} dB", showcase.ours),
        ("ground truth", showcase.gt),
    ]
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 3)
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img[y : y + h, x : x + w], interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    fig.suptitle(f"{result.name} {showcase.clip}/{showcase.frame}, crop at ({x}, {y}) size {w}x{h}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# Everything


def write_reports(
    results: Mapping[str, TestResult],
    out_dir: Path,
    *,
    model_info: Mapping[str, Any],
    train_logs: Sequence[Path] = (),
    crop_size: int | None = 128,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write metrics.json, per_clip.csv, benchmark.md and plots/*.png under out_dir; returns them by name.

    train_logs: the trainer's metrics.jsonl files (missing files are an error; files without loss or
    validation records just yield no curve). baselines: see baselines_markdown. crop_size: side of the crop figures in GT pixels
    (None: no crop figures; results without a showcase frame get none either).
    """
    if not results:
        raise ValueError("no test results to report")
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    written: dict[str, Path] = {}
    for path in train_logs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: training log not found")

    plots: list[Path] = []
    for key, ylabel, log_y in (("loss", "training loss", True), ("val_psnr", "validation PSNR (dB)", False)):
        name = "train_loss" if key == "loss" else "val_psnr"
        p = plot_curve(list(train_logs), key, ylabel, plots_dir / f"{name}.png", log_y) if train_logs else None
        if p is not None:
            written[name] = p
            plots.append(p)
    for name, r in results.items():
        p = plot_per_clip(r, plots_dir / f"per_clip_{slug(name)}.png")
        written[f"per_clip_{name}"] = p
        plots.append(p)
        if crop_size is not None and r.showcase is not None:
            p = plot_crops(r, r.showcase, plots_dir / f"crops_{slug(name)}.png", crop_size)
            written[f"crops_{name}"] = p
            plots.append(p)

    atomic_write_json(out_dir / "metrics.json", metrics_dict(results, model_info))
    atomic_write_json(out_dir / "runtime.json", runtime_dict(results))
    train_csv, val_csv = curves_csv(list(train_logs))
    atomic_write_text(out_dir / "curves" / "train.csv", train_csv)
    atomic_write_text(out_dir / "curves" / "val.csv", val_csv)
    atomic_write_text(out_dir / "per_clip.csv", per_clip_csv(results))
    atomic_write_text(out_dir / "benchmark.md", benchmark_markdown(results, model_info, plots, out_dir, baselines))
    written.update(metrics=out_dir / "metrics.json", per_clip=out_dir / "per_clip.csv",
                   benchmark=out_dir / "benchmark.md", runtime=out_dir / "runtime.json",
                   train_curve=out_dir / "curves" / "train.csv", val_curve=out_dir / "curves" / "val.csv")  # fmt: skip
    return written


__all__ = [
    "PAPER_ROWS",
    "benchmark_markdown",
    "choose_crop",
    "curves_csv",
    "metrics_dict",
    "per_clip_csv",
    "runtime_dict",
    "plot_crops",
    "plot_curve",
    "plot_per_clip",
    "read_train_log",
    "slug",
    "write_reports",
]
