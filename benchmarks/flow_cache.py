"""What `train.<stage>.cache_flows` buys: the quickstart's training step with and without cached
flows, side by side in one process, and what building the cache costs.

    .venv/bin/python benchmarks/flow_cache.py [--params params.yaml] [--stage reds] [--rounds 6]
        [--frame 180x320] [--out reports]

A step is the trainer's: forward of the params.yaml network on a (batch, frames, 3, gt/4, gt/4)
clip of the stage, Charbonnier loss, backward, Adam, SpyNet frozen. The two variants alternate
within each round (noise of a shared machine falls on both); medians are reported with their
ratio. The cache costs one SpyNet call per frame pair on whole LR frames (`--frame`, the
quickstart's 320x180), timed here per pair; with the stage's pair count (read from the prepared
data: run `make data` first) that gives the steps after which the cache has paid for itself.
Writes <out>/flow_cache.json and <out>/flow_cache.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gsm import stages  # noqa: E402
from gsm.data.prepare import read_manifest  # noqa: E402
from gsm.io import atomic_write_text, cpu_name  # noqa: E402
from gsm.models.gsmamba import GSMamba  # noqa: E402
from gsm.ops.spynet import compute_flows  # noqa: E402
from gsm.params import load_params  # noqa: E402
from gsm.train.loss import charbonnier  # noqa: E402


def measure(params: Path, stage: str, rounds: int, frame: tuple[int, int]) -> dict[str, object]:
    p = load_params(params)
    cfg = p.train.stage(stage)
    with warnings.catch_warnings():  # timing only: the weights do not matter
        warnings.filterwarnings("ignore", message="SpyNet created without weights")
        model = GSMamba(replace(p.model, spynet_weights=None)).train()
    for q in model.spynet.parameters():
        q.requires_grad_(False)
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], 1e-4)
    s = cfg.gt_size // 4
    lq, gt = torch.rand(cfg.batch_size, cfg.num_frames, 3, s, s), torch.rand(cfg.batch_size, cfg.num_frames, 3, 4 * s, 4 * s)
    with torch.no_grad():
        flows = compute_flows(model.spynet, lq)

    def step(cached: bool) -> float:
        t = time.perf_counter()
        loss = charbonnier(model(lq, flows=flows) if cached else model(lq), gt, cfg.charbonnier_eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    times: dict[bool, list[float]] = {False: [], True: []}
    for cached in (False, True):  # warm-up: numba compilation, allocator and oneDNN caches
        step(cached)
    for _ in range(rounds):
        for cached in (False, True):
            times[cached].append(step(cached))
    a, b = torch.rand(4, 3, *frame), torch.rand(4, 3, *frame)
    with torch.no_grad():
        model.spynet(a[:1], b[:1])
        t = time.perf_counter()
        model.spynet(a, b)
        per_pair = (time.perf_counter() - t) / 4
    plain, cached = statistics.median(times[False]), statistics.median(times[True])
    dataset, _ = stages.train_inputs(p, read_manifest(p.data), stage)  # type: ignore[arg-type]
    pairs = len(set(dataset.flow_pairs()))  # type: ignore[attr-defined]
    return {"stage": stage, "batch": cfg.batch_size, "frames": cfg.num_frames, "lr_patch": s, "rounds": rounds,
            "step_s": round(plain, 4), "cached_step_s": round(cached, 4), "ratio": round(cached / plain, 3),
            "frame": list(frame), "spynet_s_per_pair": round(per_pair, 4),
            "pairs": pairs, "cache_s": round(pairs * per_pair, 1),
            "break_even_steps": round(pairs * per_pair / max(plain - cached, 1e-9)),
            "machine": f"{cpu_name()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}


def table(r: dict[str, object]) -> str:
    return "\n".join([
        "# Cached SpyNet flows (`train.<stage>.cache_flows`)", "",
        f"`python benchmarks/flow_cache.py --stage {r['stage']} --rounds {r['rounds']}`, {r['date']}, "
        f"{r['machine']}, torch {r['torch']}.", "",
        f"One training step of the params.yaml network (batch {r['batch']}, {r['frames']} frames, "
        f"{r['lr_patch']}x{r['lr_patch']} LR patches, SpyNet frozen), the two variants alternating; medians.", "",
        "| | s/step | ratio |", "|---|---:|---:|",
        f"| SpyNet per step (uncached) | {r['step_s']:.3f} | 1.00 |",
        f"| cached flows | {r['cached_step_s']:.3f} | {r['ratio']:.2f} |", "",
        f"Building the cache: {r['spynet_s_per_pair']:.3f} s per frame pair on whole {r['frame'][1]}x{r['frame'][0]} "  # type: ignore[index]
        f"LR frames; the stage's {r['pairs']} pairs (both directions) take about {r['cache_s']} s, paid back "
        f"after {r['break_even_steps']} steps.", "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--stage", choices=("reds", "vimeo"), default="reds")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--frame", default="180x320", help="whole LR frame HxW for the cache cost")
    ap.add_argument("--out", type=Path, default=ROOT / "reports")
    a = ap.parse_args()
    try:
        h, w = (int(v) for v in a.frame.lower().split("x"))
    except ValueError:
        sys.exit(f"--frame {a.frame!r}: expected HxW, e.g. 180x320")
    if a.rounds < 1:
        sys.exit(f"--rounds {a.rounds}: must be >= 1")
    r = measure(a.params, a.stage, a.rounds, (h, w))
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out / "flow_cache.json", json.dumps(r, indent=2) + "\n")
    atomic_write_text(a.out / "flow_cache.md", table(r))
    print(table(r))


if __name__ == "__main__":
    main()
