"""One trial of the quickstart recipe search: train one stage with overrides, score it on validation.

    .venv/bin/python benchmarks/recipe_search.py NAME [--net gsm|cnn] [--stage reds|vimeo]
        [-m model.KEY=VALUE ...] [-t KEY=VALUE ...] [--init CKPT] [--curve N] [--out reports/recipe_search.jsonl]
    .venv/bin/python benchmarks/recipe_search.py --table [--out ...]   # the trials as reports/recipe_search.md

Why a separate harness: the recipe must be chosen on clips that are never reported, so a trial
scores only the validation split (the quickstart's frames between train and test); the test
clips stay for `gsm evaluate`. Each trial starts from params.yaml, overrides `model` (-m) and the
stage's training keys (-t), trains with the project's trainer (no checkpoints beyond the last,
no validation during training unless --curve), and appends one JSON line: the overrides, the measured seconds per
iteration, the validation PSNR of every set and its gain over MATLAB bicubic. Run trials one at a
time: on 2 cores two concurrent trials slow each other 2.5-3x, and s/it would mean nothing.

`--curve N` also records a learning curve: every N iterations, the gain over bicubic of the EMA
weights on fixed crops of the validation clips (`curve_crops`), against training seconds (cache
included, the curve's own scoring excluded). A final score says where a recipe ends; the curve
says whether it had stopped learning, which decides whether more steps or more width pay.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gsm import stages  # noqa: E402
from gsm.data.catalog import eval_sets  # noqa: E402
from gsm.data.prepare import read_manifest  # noqa: E402
from gsm.eval.bicubic import bicubic_upsample  # noqa: E402
from gsm.eval.metrics import psnr  # noqa: E402
from gsm.eval.protocols import evaluate_model, to_uint8  # noqa: E402
from gsm.io import atomic_write_text, cpu_name  # noqa: E402
from gsm.models.gsmamba import GSMamba  # noqa: E402
from gsm.models.plain_cnn import PlainCNN, PlainCNNConfig  # noqa: E402
from gsm.params import Params, load_params  # noqa: E402
from gsm.train.checkpoint import load_checkpoint, load_weights, weights_of  # noqa: E402
from gsm.train.trainer import train_stage  # noqa: E402
from plain_cnn import _iteration_times  # noqa: E402  (the trainer's metrics.jsonl reader)

KINDS = ("reds", "vimeo")
# --curve's crops: the centred LR window of at most this size of the REDS-like validation clip (all
# its frames), and the first CURVE_VIMEO Vimeo-like validation septuplets whole. About 3 s per point
# for the quickstart net.
CURVE_REDS_CROP = (80, 160)
CURVE_VIMEO = 2
CURVE_BORDER = 8  # GT pixels left out at each side


def parse_value(text: str) -> Any:
    """YAML-like scalars on the command line: 16 -> int, 1e-3 -> float, true/false/null, else str."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(text, text)


def overrides(pairs: list[str], flag: str) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {pair!r}: expected KEY=VALUE")
        out[key] = parse_value(value)
    return out


def trial_params(p: Params, stage: str, model: dict[str, Any], train: dict[str, Any]) -> Params:
    """params.yaml with the overrides; one checkpoint at the end, no validation during training."""
    cfg = replace(p.train.stage(stage), val_every=10**9, init_from=None, **train)
    cfg = replace(cfg, ckpt_every=cfg.iters)
    return replace(p, model=replace(p.model, **model), train=replace(p.train, **{stage: cfg}))


def network(net: str, p: Params) -> torch.nn.Module:
    return PlainCNN(PlainCNNConfig()) if net == "cnn" else GSMamba(p.model)


def seconds_per_iter(metrics: Path) -> float:
    """Median step time over the whole trial (plain_cnn's calibration also skips its warm-up steps)."""
    times = _iteration_times(metrics)
    steps = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(steps) if steps else float("nan")


def validate(model: torch.nn.Module, p: Params) -> dict[str, float]:
    """PSNR and gain over bicubic on every validation set (the eval section's protocol and clip cap)."""
    manifest, e, scores = read_manifest(p.data), p.eval, {}
    for kind in KINDS:
        if not manifest.get(kind):
            continue
        for ts in eval_sets(manifest, kind, split="val"):  # type: ignore[arg-type]
            r = evaluate_model(model, ts, tile=e.tile, tile_overlap=e.tile_overlap, chunk=e.chunk,
                               chunk_overlap=e.chunk_overlap, device=torch.device("cpu"), keep=False,
                               max_clips=e.max_clips)  # fmt: skip
            scores[ts.name] = round(r.psnr, 3)
            scores[ts.name + " gain"] = round(r.psnr - r.bicubic_psnr, 3)
    return scores


Crop = tuple[str, torch.Tensor, list[np.ndarray], float]  # set, LR (T, 3, h, w), GT frames, bicubic Y-PSNR


def _y_psnr(outs: list[np.ndarray], gts: list[np.ndarray]) -> float:
    return statistics.mean(psnr(o, g, crop_border=CURVE_BORDER, y_channel=True) for o, g in zip(outs, gts))


def curve_crops(p: Params) -> list[Crop]:
    """The fixed validation crops `--curve` scores, each with its MATLAB bicubic Y-PSNR."""
    manifest, crops = read_manifest(p.data), []
    for kind in KINDS:
        if not manifest.get(kind):
            continue
        ts = eval_sets(manifest, kind, split="val")[0]  # type: ignore[arg-type]
        s = ts.dataset.scale
        for i in range(1 if kind == "reds" else min(CURVE_VIMEO, len(ts.dataset))):
            sample = ts.dataset[i]
            lq, gt = sample["lq"], sample["gt"]
            if kind == "reds":
                h, w = lq.shape[-2:]
                ch, cw = min(CURVE_REDS_CROP[0], h), min(CURVE_REDS_CROP[1], w)
                y, x = (h - ch) // 2, (w - cw) // 2
                lq, gt = lq[:, :, y:y + ch, x:x + cw], gt[:, :, y * s:(y + ch) * s, x * s:(x + cw) * s]
            gts = list(to_uint8(gt))
            crops.append((ts.name, lq, gts, _y_psnr([bicubic_upsample(f, s) for f in to_uint8(lq)], gts)))
    return crops


def curve_validator(crops: list[Crop], points: list[dict[str, float]], t0: float,
                    ) -> Callable[[torch.nn.Module], dict[str, float]]:
    """The trainer's `validate`: appends {"t": training s, "<set> gain": ...} to `points`.

    Returns the REDS-like gain as "psnr" (the trainer keeps a best.pt by it; the trial scores last).
    """
    scoring = [0.0]  # seconds spent here, left out of the curve's clock

    def score(model: torch.nn.Module) -> dict[str, float]:
        start = time.perf_counter()
        gains: dict[str, list[float]] = {}
        with torch.no_grad():
            for name, lq, gts, bicubic in crops:
                outs = list(to_uint8(model(lq[None])[0]))
                gains.setdefault(name + " gain", []).append(_y_psnr(outs, gts) - bicubic)
        point = {k: round(statistics.mean(v), 3) for k, v in gains.items()}
        scoring[0] += time.perf_counter() - start
        points.append({"t": round(time.perf_counter() - t0 - scoring[0], 3), **point})
        return {"psnr": next(iter(point.values()))}

    return score


def trial(a: argparse.Namespace) -> dict[str, Any]:
    model_kw, train_kw = overrides(a.m, "-m"), overrides(a.t, "-t")
    if a.net == "cnn":
        train_kw.setdefault("cache_flows", False)  # the CNN has no SpyNet
    p = trial_params(load_params(a.params), a.stage, model_kw, train_kw)
    cfg = p.train.stage(a.stage)
    if a.curve:
        cfg = replace(cfg, val_every=a.curve)
    dataset, _ = stages.train_inputs(p, read_manifest(p.data), a.stage)  # type: ignore[arg-type]
    crops, points = (curve_crops(p) if a.curve else []), []  # type: ignore[var-annotated]
    with tempfile.TemporaryDirectory(prefix="gsm-recipe-") as tmp:
        out = Path(tmp) / a.stage
        t0 = time.perf_counter()
        r = train_stage(a.stage, cfg, p.model, dataset, out, seed=p.train.seed, network=lambda: network(a.net, p),
                        progress=True, init_from=a.init, device="cpu",
                        validate=curve_validator(crops, points, t0) if a.curve else None)  # fmt: skip
        train_s = time.perf_counter() - t0
        model = network(a.net, p)
        load_weights(model, weights_of(load_checkpoint(r.last)), r.last)
        s_per_it = seconds_per_iter(out / "metrics.jsonl")
    model.eval()
    return {"name": a.name, "net": a.net, "stage": a.stage, "model": model_kw, "train": train_kw,
            "iters": cfg.iters, "train_s": round(train_s, 3), "s_per_it": round(s_per_it, 3),
            **validate(model, p), **({"curve": points} if a.curve else {}),
            "machine": f"{cpu_name()}, {torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    sets = sorted({k for r in rows for k in r if k.endswith(" val gain")})
    head = ["trial", "net", "stage", "overrides", "iters", "s/it", "train s", *sets, "note"]
    lines = ["# Quickstart recipe search (validation clips only)", "",
             "Each row: `benchmarks/recipe_search.py`, one trial at a time on this machine; gains are "
             "Y-PSNR over MATLAB bicubic on the validation clips (never the test clips).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    if any("harness" in r for r in rows):  # trials from before the script was committed
        lines[2:2] = ["Rows whose JSON line names a `harness` ran under that earlier form of this script "
                      "(the same training and validation scoring).", ""]  # fmt: skip
    for r in rows:
        over = " ".join(f"{k}={v}" for k, v in {**r["model"], **r["train"]}.items())
        cells = [r["name"], r["net"], r["stage"], f"`{over}`" if over else "", str(r["iters"]),
                 f"{r['s_per_it']:.3f}", f"{r['train_s']:.0f}", *(f"{r[s]:+.2f}" if s in r else "-" for s in sets), r.get("note", "")]
        lines.append("| " + " | ".join(cells) + " |")
    curves = [r for r in rows if r.get("curve")]
    if curves:
        lines += ["", "## Learning curves (`--curve`)", "",
                  "Gains of the EMA weights over bicubic (Y-PSNR) on fixed validation crops, against training "
                  "seconds (flow cache included, scoring excluded; the table's train s includes the scoring): one "
                  "cell per point, `seconds: gains` in the "
                  "order of the table's sets.", ""]  # fmt: skip
        for r in curves:
            cells = [f"{pt['t']:.0f} s: " + " / ".join(f"{pt[s]:+.2f}" for s in sets if s in pt) for pt in r["curve"]]
            lines.append(f"- **{r['name']}**: " + " · ".join(cells))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?")
    ap.add_argument("--net", choices=("gsm", "cnn"), default="gsm")
    ap.add_argument("--stage", choices=KINDS, default="reds")
    ap.add_argument("-m", action="append", default=[], metavar="KEY=VALUE", help="a model key")
    ap.add_argument("-t", action="append", default=[], metavar="KEY=VALUE", help="a train.<stage> key")
    ap.add_argument("--init", type=Path, default=None, metavar="CKPT", help="start from these weights")
    ap.add_argument("--curve", type=int, default=0, metavar="N", help="score the validation crops every N iterations")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=Path("reports/recipe_search.jsonl"))
    ap.add_argument("--table", action="store_true", help="write the trials of --out as a .md beside it")
    a = ap.parse_args(argv)
    try:
        if a.table:
            rows = [json.loads(line) for line in a.out.read_text().splitlines() if line.strip()]
            atomic_write_text(a.out.with_suffix(".md"), table(rows))
            print(f"wrote {a.out.with_suffix('.md')}")
            return 0
        if not a.name:
            raise ValueError("a trial needs a NAME")
        if a.curve < 0:
            raise ValueError(f"--curve must be a number of iterations >= 1 (0: no curve), got {a.curve}")
        row = trial(a)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
