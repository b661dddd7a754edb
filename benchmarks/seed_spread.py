"""How far the seed moves the quickstart comparison: the GSM and each plain-CNN baseline trained again
with other seeds, on the same recipe and iterations, and scored on the test sets.

    .venv/bin/python benchmarks/seed_spread.py [--seeds 0 1 2] [--params params.yaml]
        [--runs runs/quickstart] [--out reports]

In one run the GSM and the lr-tuned CNN are a few hundredths of a dB apart, less than the seed alone
moves a CNN's score (up to 0.34 dB over five seeds, 2026-12-01). One run per model cannot say which
is ahead; the spread over seeds and the difference paired by seed can.

Each model keeps the iterations of its record: the GSM trains the recipe's `train.<stage>.iters`,
and each CNN entry of <out>/baselines.json (benchmarks/plain_cnn.py) trains the iterations it was
matched to and its own lrs. Only the seed changes (`train.seed`: initial weights, crops, flips).
The CNN's seconds are checked against the GSM's of the same seed (the equal-time rule of
benchmark.md). For the params' own seed the GSM run in `--runs` is scored as it is; the CNNs, whose
checkpoints plain_cnn.py does not keep, are trained again.

Every clip of each test set is scored, and the first eval.max_clips as benchmark.md does. Each
finished (model, seed) cell is saved at once in <out>/seed_spread.json; a rerun skips the cells done
on the same recipe, data, starting SpyNet, GSM config and iterations. Writes <out>/seed_spread.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import plain_cnn  # noqa: E402
from gsm import stages  # noqa: E402
from gsm.configs import to_mapping  # noqa: E402
from gsm.data.prepare import read_manifest  # noqa: E402
from gsm.eval.protocols import TestResult  # noqa: E402
from gsm.eval.report import EQUAL_TIME_TOLERANCE, equal_wall_clock  # noqa: E402
from gsm.io import atomic_write_json, atomic_write_text, cpu_name  # noqa: E402
from gsm.params import Params, load_params  # noqa: E402
from gsm.train.checkpoint import load_checkpoint, load_model  # noqa: E402
from gsm.train.config import STAGES, stage_differences  # noqa: E402

GSM = "gsm"


def set_scores(r: TestResult, first: int | None) -> dict[str, float]:
    """A test set's Y/RGB PSNR over every clip and over its first `first` clips (benchmark.md's
    eval.max_clips), each with the bicubic baseline's on the same clips."""
    def mean(clips: Any, attr: str) -> float:
        return round(statistics.fmean(getattr(c, attr) for c in clips), 4)

    head = r.clips[:first] if first else r.clips
    return {"clips": len(r.clips), "psnr": mean(r.clips, "mean_psnr"), "bicubic_psnr": mean(r.clips, "mean_bicubic_psnr"),
            "first_clips": len(head), "psnr_first": mean(head, "mean_psnr"),
            "bicubic_psnr_first": mean(head, "mean_bicubic_psnr")}  # fmt: skip


def score(p: Params, checkpoints: dict[str, Path], load: Callable[[Path], nn.Module]) -> dict[str, dict[str, float]]:
    """Each test family scored by its checkpoint, every clip (and the first eval.max_clips)."""
    return {name: set_scores(r, p.eval.max_clips)
            for name, r in plain_cnn.score_checkpoints(p, checkpoints, load, None, progress=False).items()}


def train_cell(p: Params, iters: dict[str, int], work: Path, cnn: bool) -> tuple[dict[str, float], dict[str, Path]]:
    """Both stages, the second from the first's last.pt; their seconds and the scoring checkpoints."""
    init, seconds = None, {}
    for stage in STAGES:
        init = plain_cnn._train(p, stage, iters[stage], work, init, cnn=cnn)
        seconds[stage] = round(plain_cnn.stage_seconds(work / stage / "metrics.jsonl"), 3)
    return seconds, stages.scoring_checkpoints(p, work, read_manifest(p.data))


def models_to_run(p: Params, baselines: Path) -> dict[str, dict[str, Any]]:
    """name -> lrs and iterations: the GSM on the recipe, then each CNN entry of `baselines` trained
    on this recipe (gsm.stages.read_baselines; an entry trained on another one is left out, with its
    differences named)."""
    todo = {GSM: {"lr": {}, "iters": {s: p.train.stage(s).iters for s in STAGES}}}
    for name, e in stages.read_baselines(baselines, read_manifest(p.data), p.eval.models, p.train).items():
        if e["recipe_changes"]:
            print(f"skipping {name}: trained on another recipe ({', '.join(e['recipe_changes'])})", file=sys.stderr)
            continue
        todo[name] = {"lr": e.get("lr", {}), "iters": e["iters"]}
    return todo


def check_run(p: Params, runs: Path) -> None:
    """The GSM run reused for the params' seed must have trained on the params' recipe and seed."""
    for stage in STAGES:
        ckpt = runs / stage / "checkpoints" / "last.pt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"{ckpt}: no GSM checkpoint; train the quickstart first (`make repro`)")
        state = load_checkpoint(ckpt)
        diffs = stage_differences(state.get("train_config") or {}, p.train.stage(stage))
        if state.get("seed") != p.train.seed:
            diffs.append(f"seed {state.get('seed')!r} != {p.train.seed!r}")
        if diffs:
            raise ValueError(f"{ckpt} was not trained on params' train.{stage}: {', '.join(diffs)}; "
                             "rerun `make repro` or pass --runs")


def run_cell(p: Params, name: str, spec: dict[str, Any], seed: int, runs: Path) -> dict[str, Any]:
    ps = plain_cnn.with_lrs(replace(p, train=replace(p.train, seed=seed)), spec["lr"])
    if name == GSM and seed == p.train.seed:
        check_run(p, runs)
        seconds = {s: round(plain_cnn.stage_seconds(runs / s / "metrics.jsonl"), 3) for s in STAGES}
        scores = score(ps, stages.scoring_checkpoints(ps, runs, read_manifest(p.data)), load_model)
        return {"seconds": seconds, "scores": scores, "source": str(runs)}
    with tempfile.TemporaryDirectory(prefix="gsm-seed-spread-") as tmp:
        seconds, ckpts = train_cell(ps, spec["iters"], Path(tmp), cnn=name != GSM)
        scores = score(ps, ckpts, load_model if name == GSM else plain_cnn.load_cnn)
    return {"seconds": seconds, "scores": scores, "source": "trained here"}


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "-"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown(doc: dict[str, Any]) -> str:
    cells, models = doc["cells"], list(doc["models"])
    seeds = sorted({c["seed"] for c in cells.values()})
    sets = sorted({s for c in cells.values() for s in c["scores"]})
    lines = ["# Seed spread: the GSM against the plain CNN at equal wall-clock", "",
             f"`{doc['command']}` on {doc['machine']}; cells trained at commit(s) "
             f"{', '.join(sorted({c.get('commit') or '?' for c in cells.values()}))}, "
             f"{', '.join(sorted({c.get('date') or '?' for c in cells.values()}))}. Seeds {seeds}; "
             "each model trains its own iterations (the GSM the recipe's, each CNN those plain_cnn.py matched "
             "to the GSM's seconds). PSNR over every test clip; in brackets, over the first "
             "eval.max_clips clips as benchmark.md scores them.", ""]  # fmt: skip
    for ts in sets:
        lines += [f"## {ts}", "", "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
                  "|---|" + "---|" * (len(seeds) + 1)]  # fmt: skip
        for m in models:
            row = [cells.get(f"{m}/{s}", {}).get("scores", {}).get(ts) for s in seeds]
            text = [f"{r['psnr']:.2f} ({r['psnr_first']:.2f})" if r else "-" for r in row]
            lines.append(f"| {m} | " + " | ".join(text) + f" | {spread([r['psnr'] for r in row if r])} |")
        bic = next(c["scores"][ts] for c in cells.values() if ts in c["scores"])
        lines += ["", f"Bicubic: {bic['bicubic_psnr']:.2f} ({bic['bicubic_psnr_first']:.2f}) dB.", ""]
        for m in models[1:]:
            diffs = [cells[f"{GSM}/{s}"]["scores"][ts]["psnr"] - cells[f"{m}/{s}"]["scores"][ts]["psnr"]
                     for s in seeds if f"{GSM}/{s}" in cells and f"{m}/{s}" in cells]  # fmt: skip
            if diffs:
                lines.append(f"- GSM minus {m}, paired by seed: {spread(diffs)} dB "
                             f"(min {min(diffs):+.2f}, max {max(diffs):+.2f}, {len(diffs)} seeds)")  # fmt: skip
        lines.append("")
    lines += ["## Seconds (REDS-like + Vimeo-like stage)", "", "| model | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]  # fmt: skip
    for m in models:
        row = []
        for s in seeds:
            c, g = cells.get(f"{m}/{s}"), cells.get(f"{GSM}/{s}")
            if not c:
                row.append("-")
                continue
            text = " + ".join(f"{c['seconds'][st]:.0f}" for st in STAGES)
            off = [st for st in STAGES if g and not equal_wall_clock(c["seconds"][st], g["seconds"][st])]
            row.append(text + (f" (**not equal wall-clock**: {', '.join(off)})" if off and m != GSM else ""))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    reused = sorted(c["seed"] for c in cells.values() if c["model"] == GSM and c["source"] != "trained here")
    lines += ["", f"Equal wall-clock: each stage within {EQUAL_TIME_TOLERANCE:.0%} of the GSM's of the same seed. "
              "The CNNs keep the iterations matched to the GSM's seconds once (benchmarks/plain_cnn.py), so "
              "a flag here means the host ran at another speed for one of the two runs."
              + (f" The GSM of seed {', '.join(map(str, reused))} is the pipeline's run, timed when it ran." if reused else ""),
              ""]  # fmt: skip
    return "\n".join(lines)


def run(params: Path, runs: Path, out: Path, seeds: list[int]) -> dict[str, Any]:
    p = load_params(params)
    path = out / "seed_spread.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    todo = models_to_run(p, out / "baselines.json")
    # What a cell was made from, as stored: a cell made from anything else is trained again.
    manifest = read_manifest(p.data)
    made = json.loads(json.dumps({"recipe": {s: to_mapping(p.train.stage(s)) for s in STAGES},
                                  "inputs": {s: stages._inputs(p, manifest, s) for s in STAGES},  # type: ignore[arg-type]
                                  "network": to_mapping(p.model)}))  # fmt: skip
    cells = {k: c for k, c in doc.get("cells", {}).items() if all(c.get(f) == v for f, v in made.items())}

    def save() -> dict[str, Any]:
        d = {"models": list(todo), "cells": cells, "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
             "command": "python benchmarks/seed_spread.py " + " ".join(sys.argv[1:])}
        atomic_write_json(path, d)
        atomic_write_text(out / "seed_spread.md", markdown(d))
        return d

    for seed in seeds:
        for name, spec in todo.items():
            key = f"{name}/{seed}"
            if key in cells and cells[key]["iters"] == spec["iters"]:
                continue
            print(f"{key}: training", file=sys.stderr)
            cells[key] = {"model": name, "seed": seed, "lr": spec["lr"], "iters": spec["iters"], **made,
                          "commit": plain_cnn._commit(), "date": dt.date.today().isoformat(),
                          **run_cell(p, name, spec, seed, runs)}  # fmt: skip
            save()
    return save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--runs", type=Path, default=None, help="the GSM run of the params' seed (default runs/<profile>)")
    ap.add_argument("--out", type=Path, default=Path("reports"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = ap.parse_args(argv)
    try:
        runs = a.runs or Path("runs") / load_params(a.params).data.profile
        run(a.params, runs, a.out, a.seeds)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.out / 'seed_spread.json'} and {a.out / 'seed_spread.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
