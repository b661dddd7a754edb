"""Training throughput: seconds per iteration of `train_stage` for the params.yaml network.

Runs the real trainer (data loading, forward, Charbonnier, backward, Adam, EMA) on synthetic
frames, so the number is what a training job would see; per-iteration times come from the
metrics.jsonl the trainer writes, with the first iterations dropped as warm-up (kernel JIT, caches).

    .venv/bin/python benchmarks/train_speed.py [--iters 6] [--frames 5] [--gt-size 64] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gsm.data.images import FolderStore, write_png  # noqa: E402
from gsm.io import atomic_write_json, cpu_name  # noqa: E402
from gsm.params import load_params  # noqa: E402
from gsm.train.config import StageConfig  # noqa: E402
from gsm.train.data import reds_train_set  # noqa: E402
from gsm.train.tracking import read_metrics  # noqa: E402
from gsm.ops.backend import resolve_device  # noqa: E402
from gsm.train.trainer import train_stage  # noqa: E402

WARMUP = 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--frames", type=int, default=5, help="frames per clip")
    ap.add_argument("--gt-size", type=int, default=64, help="GT patch side (LR = /4)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=None, help="also write <out>/train_speed.json")
    a = ap.parse_args()
    if a.iters <= WARMUP:
        raise SystemExit(f"error: --iters must exceed the {WARMUP} warm-up iterations")

    model_cfg = load_params(a.params).model
    lr_side = max(a.gt_size // 4, 16)
    cfg = StageConfig(iters=a.iters, batch_size=a.batch, num_frames=a.frames, gt_size=a.gt_size, fix_flow=0,
                      workers=a.workers, ckpt_every=10**9, val_every=10**9, log_every=1)
    with tempfile.TemporaryDirectory(prefix="gsm-train-speed-") as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        clips = [f"{c:03d}" for c in range(max(a.batch, 2))]
        for clip in clips:
            for f in range(a.frames):
                lr = rng.integers(0, 256, (lr_side, lr_side, 3), dtype=np.uint8)
                write_png(root / "LR" / clip / f"{f:08d}.png", lr)
                write_png(root / "GT" / clip / f"{f:08d}.png", np.kron(lr, np.ones((4, 4, 1), np.uint8)))
        train_set = reds_train_set(cfg, FolderStore(root / "GT"), FolderStore(root / "LR"), clips,
                                   frames_per_clip=a.frames)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="SpyNet created without weights")
            train_stage("bench", cfg, model_cfg, train_set, root / "run", device=a.device, progress=True)
        times = [r["time"] for r in read_metrics(root / "run" / "metrics.jsonl") if "loss" in r]
    steps = [b - t for t, b in zip(times[WARMUP - 1:], times[WARMUP:])]
    device = resolve_device(a.device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "model": model_cfg.to_dict(), "batch": a.batch, "frames": a.frames, "gt_size": a.gt_size,
        "iterations_timed": len(steps), "s_per_iter_median": statistics.median(steps),
        "s_per_iter_min": min(steps),
    }
    print(json.dumps(result, indent=2))
    if a.out is not None:
        atomic_write_json(a.out / "train_speed.json", result)


if __name__ == "__main__":
    main()
