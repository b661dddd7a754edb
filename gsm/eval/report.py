"""Evaluation outputs under one folder (normally `reports/`), every file written atomically.

* ``metrics.json``: DVC metrics, scores only. ``test_sets.<name>.{psnr, ssim, bicubic_psnr,
  bicubic_ssim, psnr_gain, ssim_gain, clips, frames}``. A non-finite score (``inf`` PSNR of a
  perfect frame, ``nan`` of a skipped baseline) is ``null``, since JSON has no such numbers. Nothing
  timed goes here, so two runs of the same pipeline give the same file.
* ``evaluated_model.json``: the caller's model_info (checkpoint path and serving digest, parameter
  counts, data profile): what metrics.json scores. A plain output, not a metric, so `dvc metrics
  show` stays a table of scores; `register` and the model card read it.
* ``runtime.json``: inference seconds per test set (and per frame), the timed part.
* ``curves/train.csv`` (step, stage, iter, loss, lr) and ``curves/val.csv`` (step, stage, set, iter,
  val_*): the training logs as DVC plot data; `step` counts on across stages.
* ``per_clip.csv``: test_set, clip, frames, psnr, ssim, bicubic_psnr, bicubic_ssim.
* ``per_frame.csv``: set, clip, frame, psnr, bicubic_psnr, every scored frame (a clip mean hides
  the frames where the model fails, e.g. at the start before propagation has context); drawn in
  ``plots/per_frame_<set>.png``.
* ``videos/<set>.mp4``: bicubic | ours | GT over the first scored frames (gsm.eval.video).
* ``benchmark.md``: this run's numbers, then the papers' published numbers (each paper cited by its
  arXiv id) with ours and bicubic beside them where we ran the same test set, then the plots.
* ``plots/``: ``train_loss.png`` (all stages on one continuing iteration axis) and ``val_psnr.png``
  (one panel per validation set) from the trainer's metrics.jsonl files, ``per_clip_<set>.png``
  (ours vs bicubic PSNR per clip, horizontal bars) and ``crops_<set>.png`` (LR / bicubic / ours /
  GT crops of the showcase frame, each with the crop's own PSNR; the crop is where ours and
  bicubic differ most, the centre if they never differ).

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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gsm.eval.metrics import psnr
from gsm.eval.protocols import Showcase, TestResult
from gsm.eval.video import write_side_by_side
from gsm.io import atomic_write_json, atomic_write_text

# Published x4 BI numbers (PSNR / SSIM) and sizes, as each method's paper (PAPERS) reports them.
# None = not copied here (read it in the paper).
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
# arXiv ids of the papers the numbers come from: what a reader can look up (no internal spec).
PAPERS: dict[str, str] = {"GSM (paper)": "2510.00862", "IART": "2305.00163", "RVRT": "2206.02146",
                          "VRT": "2201.12288", "BasicVSR++": "2104.13371"}  # fmt: skip
# Protocols as users know them: the channel scored and which frames (the code names are internal).
PROTOCOL_TEXT: dict[str, str] = {"reds4": "RGB, every frame (REDS4)", "vimeo": "Y channel, centre frame (im4)",
                                 "vid4": "Y channel, every frame"}  # fmt: skip


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

EVALUATED_MODEL = "evaluated_model.json"  # what metrics.json scores; beside it, a plain output


def metrics_dict(results: Mapping[str, TestResult]) -> dict[str, Any]:
    """The metrics.json content (see the module docstring): scores only, no model facts."""
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
    return {"test_sets": sets}


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


def per_frame_csv(results: Mapping[str, TestResult]) -> str:
    """One row per scored frame of every test set, ours and bicubic (empty without the baseline)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["set", "clip", "frame", "psnr", "bicubic_psnr"])
    for name, r in results.items():
        for c in r.clips:
            bic = c.bicubic_psnr or (math.nan,) * len(c.frames)
            for frame, p, b in zip(c.frames, c.psnr, bic):
                writer.writerow([name, c.clip, frame, f"{p:.4f}", f"{b:.4f}" if math.isfinite(b) else ""])
    return buf.getvalue()


def _params_text(model_info: Mapping[str, Any]) -> str:
    n = model_info.get("params")
    return f"{n / 1e6:.2f}M" if isinstance(n, (int, float)) and not isinstance(n, bool) else "?"


def baselines_markdown(results: Mapping[str, TestResult], baselines: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Rows of the baselines trained on this data (benchmarks/, reports/baselines.json) beside ours.

    An entry whose `same_data` is false was measured on other data, one whose `same_models` is false
    scored its sets with other stages' models (eval.models), one with `recipe_changes` was trained on
    another params.yaml recipe: shown, and marked stale.
    """
    if not baselines:
        return []
    lines = ["", "## Baselines trained here", ""]
    for b in baselines.values():
        lines += [
            f"{b['title']}: `{b['command']}`, trained by the same trainer on the same data and recipe for the "
            f"GSM run's wall-clock ({sum(b['gsm_train_seconds'].values()):.0f} s"
            f"{', at step-time ratios measured side by side' if 'calibration' in b else ''}"
            f"{_retrained(b)}"
            f"{_ran(b)}), on {b['machine']}, "
            f"commit {b['commit']}, {b['date']}; {b['params']:,} parameters.",
            "",
        ]
        if not b.get("same_data", True):
            lines += ["**Stale: measured on other data than this run's; rerun the command above.**", ""]
        elif not b.get("same_models", True):
            lines += [f"**Stale: its sets were scored as eval.models {b.get('eval_models', 'final')!r} says, not as "
                      f"this run's; rerun the command above.**", ""]  # fmt: skip
        elif b.get("recipe_changes"):
            lines += [f"**Stale: not trained on this run's recipe ({'; '.join(b['recipe_changes'])}); "
                      f"rerun the command above.**", ""]  # fmt: skip
        lines += ["| test set | ours (this run) | baseline | bicubic |", "|---|---|---|---|"]
        for name, sc in b["scores"].items():
            ours = _fmt(results[name].psnr, results[name].ssim) if name in results else "not run"
            lines.append(f"| {name} | {ours} | {_fmt(sc['psnr'], sc['ssim'])} "
                         f"| {_fmt(sc['bicubic_psnr'], sc['bicubic_ssim'])} |")  # fmt: skip
        lines.append("")
    return lines[:-1]


# A baseline that trained this much longer or shorter than the GSM run is flagged: its step-time
# probes misjudged the ratio (a noisy host), and the comparison is not at equal wall-clock.
EQUAL_TIME_TOLERANCE = 0.05


def equal_wall_clock(seconds: float, gsm_seconds: float) -> bool:
    """A baseline stage's seconds within EQUAL_TIME_TOLERANCE of the GSM stage's (gsm_seconds > 0)."""
    return abs(seconds / gsm_seconds - 1) <= EQUAL_TIME_TOLERANCE


def _retrained(b: Mapping[str, Any]) -> str:
    """The stages that plain_cnn trained again, at the rate of a first run that missed the GSM's seconds."""
    calibration = b.get("calibration") or {}
    again = [s for s, c in calibration.items() if isinstance(c, Mapping) and "first_run" in c]
    return f", {' and '.join(again)} retrained at a first run's own rate" if again else ""


def _ran(b: Mapping[str, Any]) -> str:
    """How long the baseline actually trained, when the entry says: the check on 'equal wall-clock'."""
    ran = b.get("train_seconds")
    if not (isinstance(ran, Mapping) and ran):
        return ""
    text = f"; it ran {sum(ran.values()):.0f} s"
    gsm = b.get("gsm_train_seconds") or {}
    off = {s: ran[s] / gsm[s] for s in ran if gsm.get(s) and not equal_wall_clock(ran[s], gsm[s])}
    if off:
        text += " (**not equal wall-clock**: " + ", ".join(f"{s} {r:.2f}x the GSM's" for s, r in off.items()) + ")"
    return text


def protocol_text(r: TestResult) -> str:
    """How the set was scored, in users' words ("Y channel, every frame"), with any border crop."""
    text = PROTOCOL_TEXT.get(r.protocol, f"{'Y channel' if r.y_channel else 'RGB'}, protocol {r.protocol}")
    return f"{text}, {r.crop_border} px border cropped" if r.crop_border else text


def _run_row(name: str, r: TestResult) -> str:
    """The "This run" table row of one test set."""
    gain = r.psnr - r.bicubic_psnr
    gain_text = f"{gain:+.2f}" if math.isfinite(gain) else "n/a"
    return (f"| {name} | {protocol_text(r)} | {len(r.clips)} | {r.frames} | {_fmt(r.psnr, r.ssim)} "
            f"| {_fmt(r.bicubic_psnr, r.bicubic_ssim)} | {gain_text} | {r.seconds:.1f} |")  # fmt: skip


def _paper_link(method: str) -> str:
    arxiv = PAPERS.get(method)
    return f"{method} ([arXiv {arxiv}](https://arxiv.org/abs/{arxiv}))" if arxiv else method


def papers_markdown(results: Mapping[str, TestResult], model_info: Mapping[str, Any]) -> list[str]:
    """The published numbers, each method linked to its paper; our and bicubic's rows only when this
    run evaluated one of the papers' test sets (rows of "not run" alone tell nothing)."""
    ran = [k for k, _ in PAPER_COLUMNS if k in results]
    lines = ["", "## Beside the papers", "",
             "Published x4 (bicubic degradation) numbers, PSNR / SSIM, as each paper reports them; "
             "*see paper* marks a number not copied here."]  # fmt: skip
    if ran:
        lines[-1] += " The *this run* rows are measured here, on the test sets of the same name."
    else:
        lines[-1] += (" This run evaluated none of these test sets (the quickstart's are stand-ins), so its "
                      "scores appear only above.")  # fmt: skip
    lines += ["", "| method | " + " | ".join(title for _, title in PAPER_COLUMNS) + " | params |",
              "|---|" + "---|" * len(PAPER_COLUMNS) + "---|"]  # fmt: skip
    if ran:
        ours = [_fmt(results[k].psnr, results[k].ssim) if k in results else "not run" for k, _ in PAPER_COLUMNS]
        bic = [_fmt(results[k].bicubic_psnr, results[k].bicubic_ssim) if k in results else "not run"
               for k, _ in PAPER_COLUMNS]  # fmt: skip
        lines.append(f"| GSM-VSR (ours, this run) | {' | '.join(ours)} | {_params_text(model_info)} |")
        lines.append(f"| Bicubic (this run) | {' | '.join(bic)} | - |")
    for method, numbers, params in PAPER_ROWS:
        cells = [f"{v[0]:.2f} / {v[1]:.4f}" if (v := numbers[k]) else "see paper" for k, _ in PAPER_COLUMNS]
        lines.append(f"| {_paper_link(method)} | {' | '.join(cells)} | {params} |")
    return lines


def _fact(key: str, value: Any) -> str:
    """A model fact as a list item; `scored_by` (set -> checkpoint facts) as one line, set by set."""
    if key == "scored_by" and isinstance(value, Mapping):
        who = "; ".join(f"{name}: {v.get('checkpoint') if isinstance(v, Mapping) else v}" for name, v in value.items())
        return f"- scored by: {who}"
    return f"- {key}: {value}"


def benchmark_markdown(
    results: Mapping[str, TestResult], model_info: Mapping[str, Any], plots: Sequence[Path], out_dir: Path,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """benchmark.md: this run, the baselines trained here, the papers' numbers, the plots."""
    lines = ["# Benchmark (x4 video super-resolution)", ""]
    if model_info:
        lines += ["## Model", ""]
        lines += [_fact(k, v) for k, v in model_info.items()]
        lines.append("")
    lines += [
        "## This run",
        "",
        "PSNR / SSIM on uint8 frames (float64, peak 255, crop border as listed); per frame -> per clip "
        "-> mean over clips. Bicubic is MATLAB `imresize(lr, 4, 'bicubic')` on the same frames.",
        "",
        "| test set | scored on | clips | frames | ours | bicubic | gain (dB) | inference s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_run_row(name, r) for name, r in results.items()]
    lines += baselines_markdown(results, baselines or {})
    lines += papers_markdown(results, model_info)
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


STAGE_TITLES = {"reds": "REDS stage", "vimeo": "Vimeo stage"}


def stage_title(stage: str) -> str:
    """How a figure names a training stage ("REDS stage"), rather than its log path."""
    return STAGE_TITLES.get(stage, f"{stage} stage")


def logged_steps(logs: Sequence[Path]) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(stage, step, record) of every record with an integer `iter`, in log order.

    `step` continues across stages (a stage's iterations go on from the previous stage's last one),
    so the Vimeo stage, which finetunes the REDS stage's weights, is drawn after it, not over it.
    """
    offset, last, current = 0, 0, None
    for path in logs:
        for rec in read_train_log(path):
            it = rec.get("iter")
            if not isinstance(it, int) or isinstance(it, bool):
                continue
            stage = str(rec.get("stage", Path(path).parent.name))
            if stage != current:
                offset, last, current = offset + last, 0, stage
            last = max(last, it)
            yield stage, offset + it, rec


def curves_csv(logs: Sequence[Path], val_sets: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(train.csv, val.csv) text of the logs for `dvc plots`: `step` continues across stages, as
    in train_loss.png, and val.csv names each row's validation set."""
    train, val = io.StringIO(), io.StringIO()
    tw, vw = csv.writer(train, lineterminator="\n"), csv.writer(val, lineterminator="\n")
    tw.writerow(["step", "stage", "iter", "loss", "lr"])
    val_keys: list[str] = []
    val_rows: list[tuple[int, str, Any, dict[str, Any]]] = []
    for stage, step, rec in logged_steps(logs):
        if isinstance(rec.get("loss"), (int, float)):
            tw.writerow([step, stage, rec["iter"], rec["loss"], rec.get("lr", "")])
        vals = {k: v for k, v in rec.items() if k.startswith("val_") and isinstance(v, (int, float))}
        if vals:
            val_keys += [k for k in sorted(vals) if k not in val_keys]
            val_rows.append((step, stage, rec["iter"], vals))
    vw.writerow(["step", "stage", "set", "iter", *val_keys])
    for step, stage, it, vals in val_rows:
        vw.writerow([step, stage, (val_sets or {}).get(stage, ""), it, *(vals.get(k, "") for k in val_keys)])
    return train.getvalue(), val.getvalue()


def _by_stage(logs: Sequence[Path], key: str) -> dict[str, tuple[list[int], list[int], list[float]]]:
    """stage -> (steps, stage iterations, values) of the records carrying a number under `key`."""
    out: dict[str, tuple[list[int], list[int], list[float]]] = {}
    for stage, step, rec in logged_steps(logs):
        value = rec.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps, iters, values = out.setdefault(stage, ([], [], []))
            steps.append(step)
            iters.append(int(rec["iter"]))
            values.append(float(value))
    return out


def _draw_loss(ax: Any, xs: list[int], ys: list[float], label: str) -> None:
    """A noisy per-iteration loss as a faint raw curve under its moving mean; a short one as is."""
    if len(ys) <= 100:
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 20 else None, markersize=3)
        return
    k = len(ys) // 50
    (raw,) = ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
    ax.plot(xs[k - 1 :], np.convolve(ys, np.ones(k) / k, mode="valid"), color=raw.get_color(),
            label=f"{label} (mean of {k})")  # fmt: skip


def train_loss_figure(logs: Sequence[Path]) -> Figure | None:
    """The training loss of all stages on one iteration axis, a dashed line where each later stage
    starts; None when no record has a loss."""
    series = _by_stage(logs, "loss")
    if not series:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for n, (stage, (steps, _, values)) in enumerate(series.items()):
        _draw_loss(ax, steps, values, stage_title(stage))
        if n:
            ax.axvline(steps[0] - 0.5, color="0.4", linestyle="--", linewidth=1)
    if all(v > 0 for _, _, ys in series.values() for v in ys):
        ax.set_yscale("log")
    ax.set_xlabel("iteration (each stage continues from the previous one's last)")
    ax.set_ylabel("training loss (Charbonnier)")
    ax.set_title("Training loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def val_figure(logs: Sequence[Path], val_sets: Mapping[str, str]) -> Figure | None:
    """Validation PSNR, one panel per validation set (each stage validates on its own set, whose
    scores are not comparable with the other's); None when no record has one."""
    series = _by_stage(logs, "val_psnr")
    if not series:
        return None
    fig = Figure(figsize=(3.5 * len(series) + 0.5, 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(series)))
    for ax, (stage, (_, iters, values)) in zip(axes, series.items()):
        ax.plot(iters, values, marker="o", markersize=4)
        ax.annotate(f"{values[-1]:.2f}", (iters[-1], values[-1]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)  # fmt: skip
        ax.set_title(val_sets.get(stage, f"{stage} validation"), fontsize=10)
        ax.set_xlabel(f"iteration of the {stage_title(stage)}")
        ax.set_ylabel("validation PSNR (dB)")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# Per-clip bars and crops

MAX_BARS = 40  # more clips than this: a histogram of the gains instead of unreadable bars


def _finite_or_zero(values: Sequence[float]) -> list[float]:
    """inf (a perfect clip) or nan (no baseline) cannot be drawn as a bar: 0, i.e. left out."""
    return [v if math.isfinite(v) else 0.0 for v in values]


def per_clip_figure(result: TestResult) -> Figure:
    """Mean PSNR per clip, ours beside bicubic, as horizontal bars so clip names stay readable;
    a histogram of our gain over bicubic when there are too many clips for bars."""
    if len(result.clips) > MAX_BARS:
        return _gain_histogram(result)
    names = [c.clip for c in result.clips]
    ours = _finite_or_zero([c.mean_psnr for c in result.clips])
    bic = _finite_or_zero([c.mean_bicubic_psnr for c in result.clips])
    y = np.arange(len(names))
    fig = Figure(figsize=(6.5, 1.2 + 0.4 * len(names)))
    ax = fig.subplots()
    ax.barh(y + 0.2, bic, 0.4, label="bicubic")
    ax.barh(y - 0.2, ours, 0.4, label="ours")
    finite = [v for v in ours + bic if v > 0]
    if finite:
        ax.set_xlim(max(0.0, min(finite) - 2.0), max(finite) + 1.0)
    ax.set_yticks(y, names)
    ax.invert_yaxis()  # first clip on top
    ax.set_xlabel(f"PSNR (dB, {'Y' if result.y_channel else 'RGB'})")
    ax.set_title(f"{result.name}: per-clip PSNR")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def _gain_histogram(result: TestResult) -> Figure:
    """Histogram over clips of ours minus bicubic PSNR (finite gains only)."""
    gains = [c.mean_psnr - c.mean_bicubic_psnr for c in result.clips]
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    ax.hist([g for g in gains if math.isfinite(g)], bins=30)
    ax.set_xlabel("PSNR gain over bicubic per clip (dB)")
    ax.set_ylabel("clips")
    ax.set_title(f"{result.name}: per-clip gain over bicubic ({len(gains)} clips)")
    fig.tight_layout()
    return fig


def per_frame_figure(result: TestResult) -> Figure:
    """PSNR of every scored frame along the test set, ours and bicubic, clips in order and
    separated by dotted lines: where along a clip the model gains, and where it does not."""
    ours, bic, starts = [], [], []
    for c in result.clips:
        starts.append(len(ours))
        ours += list(c.psnr)
        bic += list(c.bicubic_psnr or (math.nan,) * len(c.psnr))
    x = np.arange(len(ours))
    fig = Figure(figsize=(min(12.0, 5.0 + 0.05 * len(x)), 3.8))
    ax = fig.subplots()
    marker = "o" if len(x) <= 60 else None
    ax.plot(x, bic, marker=marker, markersize=3, label="bicubic")
    ax.plot(x, ours, marker=marker, markersize=3, label="ours")
    for s in starts[1:]:
        ax.axvline(s - 0.5, color="0.6", linestyle=":", linewidth=1)
    if len(result.clips) == 1:
        ax.set_xlabel(f"frame of clip {result.clips[0].clip} (scored frames, in order)")
    elif len(result.clips) <= 12:  # clip names at their first frame, while they fit
        ax.set_xticks(starts, [c.clip for c in result.clips], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("scored frames, clip by clip (ticks: each clip's first)")
    else:
        ax.set_xlabel(f"scored frames of {len(result.clips)} clips, in order")
    ax.set_ylabel(f"PSNR (dB, {'Y' if result.y_channel else 'RGB'})")
    ax.set_title(f"{result.name}: PSNR per frame")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


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


def nearest_upsample(lr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """LR pixels repeated to the GT size: the input as the network saw it, with no interpolation."""
    sy, sx = shape[0] // lr.shape[0], shape[1] // lr.shape[1]
    return np.repeat(np.repeat(lr, sy, axis=0), sx, axis=1)


def crop_panels(
    result: TestResult, showcase: Showcase, crop_size: int
) -> tuple[list[tuple[str, np.ndarray]], tuple[int, int, int, int]]:
    """(title, crop) of LR (nearest-upsampled, when kept) | bicubic | ours | GT, each titled with the
    PSNR of the crop itself on the protocol's channel, and the crop's (x, y, w, h)."""
    y, x = choose_crop(showcase.ours, showcase.bicubic, crop_size)
    h, w = min(crop_size, showcase.gt.shape[0]), min(crop_size, showcase.gt.shape[1])
    gt = showcase.gt[y : y + h, x : x + w]
    images = [("bicubic", showcase.bicubic), ("ours", showcase.ours)]
    if showcase.lr is not None:
        images.insert(0, ("LR (nearest)", nearest_upsample(showcase.lr, showcase.gt.shape)))
    panels = [(f"{label} {psnr(img[y : y + h, x : x + w], gt, 0, result.y_channel):.2f} dB",
               img[y : y + h, x : x + w]) for label, img in images]  # fmt: skip
    return panels + [("ground truth", gt)], (x, y, w, h)


def crops_figure(result: TestResult, showcase: Showcase, crop_size: int) -> Figure:
    """LR | bicubic | ours | GT crops of the showcase frame where ours and bicubic differ most."""
    panels, (x, y, w, h) = crop_panels(result, showcase, crop_size)
    fig = Figure(figsize=(3 * len(panels), 3.4))
    for ax, (title, img) in zip(fig.subplots(1, len(panels)), panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    channel = "Y" if result.y_channel else "RGB"
    fig.suptitle(f"{result.name} {showcase.clip}/{showcase.frame}: crop at ({x}, {y}), {w}x{h}, "
                 f"PSNR of the crop ({channel})", fontsize=10)  # fmt: skip
    fig.tight_layout()
    return fig


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
    val_sets: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write the files of the module docstring under out_dir; returns them by name.

    train_logs: the trainer's metrics.jsonl files (missing files are an error; files without loss or
    validation records just yield no curve). baselines: see baselines_markdown. crop_size: side of
    the crop figures in GT pixels (None: no crop figures; results without a showcase frame get none
    either). val_sets: stage -> the name of the set it validated on (titles and val.csv's `set`).
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
    figures: list[tuple[str, str, Figure | None]] = [
        ("train_loss", "train_loss", train_loss_figure(train_logs)),
        ("val_psnr", "val_psnr", val_figure(train_logs, val_sets or {})),
    ]
    for name, r in results.items():
        figures.append((f"per_clip_{name}", f"per_clip_{slug(name)}", per_clip_figure(r)))
        figures.append((f"per_frame_{name}", f"per_frame_{slug(name)}", per_frame_figure(r)))
        if crop_size is not None and r.showcase is not None:
            figures.append((f"crops_{name}", f"crops_{slug(name)}", crops_figure(r, r.showcase, crop_size)))
    for key, stem, fig in figures:
        if fig is not None:
            written[key] = save_figure(fig, plots_dir / f"{stem}.png")
            plots.append(written[key])

    atomic_write_json(out_dir / "metrics.json", metrics_dict(results))
    atomic_write_json(out_dir / EVALUATED_MODEL, dict(model_info))
    atomic_write_json(out_dir / "runtime.json", runtime_dict(results))
    train_csv, val_csv = curves_csv(list(train_logs), val_sets or {})
    atomic_write_text(out_dir / "curves" / "train.csv", train_csv)
    atomic_write_text(out_dir / "curves" / "val.csv", val_csv)
    atomic_write_text(out_dir / "per_clip.csv", per_clip_csv(results))
    atomic_write_text(out_dir / "per_frame.csv", per_frame_csv(results))
    for name, r in results.items():
        if r.video:
            written[f"video_{name}"] = write_side_by_side(r.video, out_dir / "videos" / f"{slug(name)}.mp4")
    atomic_write_text(out_dir / "benchmark.md", benchmark_markdown(results, model_info, plots, out_dir, baselines))
    written.update(metrics=out_dir / "metrics.json", evaluated_model=out_dir / EVALUATED_MODEL, per_clip=out_dir / "per_clip.csv",
                   per_frame=out_dir / "per_frame.csv", benchmark=out_dir / "benchmark.md",
                   runtime=out_dir / "runtime.json",
                   train_curve=out_dir / "curves" / "train.csv", val_curve=out_dir / "curves" / "val.csv")  # fmt: skip
    return written


__all__ = [
    "EVALUATED_MODEL",
    "PAPER_ROWS",
    "benchmark_markdown",
    "choose_crop",
    "curves_csv",
    "metrics_dict",
    "per_clip_csv",
    "runtime_dict",
    "crop_panels",
    "crops_figure",
    "logged_steps",
    "per_clip_figure",
    "per_frame_csv",
    "per_frame_figure",
    "train_loss_figure",
    "val_figure",
    "read_train_log",
    "slug",
    "write_reports",
]
