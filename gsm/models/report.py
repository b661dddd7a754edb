"""Model size, FLOPs and CPU timing, written to reports/ (the efficiency facts of SPEC 4)."""

from __future__ import annotations

import platform
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from gsm.io import atomic_write_json, atomic_write_text, cpu_name
from gsm.models.config import GSMConfig
from gsm.models.flops import count_macs
from gsm.models.gsmamba import GSMamba


def parameter_breakdown(model: GSMamba) -> dict[str, int]:
    """Parameters per top-level part, and totals with and without SpyNet."""
    parts = {name: sum(p.numel() for p in mod.parameters()) for name, mod in model.named_children()}
    total = sum(p.numel() for p in model.parameters())
    return {**parts, "total": total, "without_spynet": total - parts["spynet"]}


def time_forward_backward(model: GSMamba, clip: tuple[int, int, int], repeats: int = 3) -> dict[str, float]:
    """Median seconds of a forward and of a forward+backward on a random (1, T, 3, H, W) clip."""
    t, h, w = clip
    x = torch.rand(1, t, 3, h, w, generator=torch.Generator().manual_seed(0))
    fwd, both = [], []
    for i in range(repeats + 1):  # first round warms up (kernel compilation, allocator)
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
        mid = time.perf_counter()
        model(x).square().mean().backward()
        end = time.perf_counter()
        if i:
            fwd.append(mid - start)
            both.append(end - mid)
    model.zero_grad(set_to_none=True)
    return {"forward_s": statistics.median(fwd), "forward_backward_s": statistics.median(both)}


def model_report(small: GSMConfig, out_dir: str | Path) -> dict[str, Any]:
    """Count the paper configuration and time `small` on CPU; write model.md and model.json."""
    out_dir = Path(out_dir)
    torch.manual_seed(0)
    paper_cfg = GSMConfig()
    with warnings.catch_warnings():  # random SpyNet is fine for counting and timing
        warnings.simplefilter("ignore")
        paper = GSMamba(paper_cfg)
        small_model = GSMamba(replace(small, spynet_weights=None, spynet_sha256=None))  # timing only
    paper_params = parameter_breakdown(paper)
    t, h, w = 100, 180, 320
    macs = count_macs(paper_cfg, t, h, w)
    per_frame = {k: v / t for k, v in {**macs.dense, **macs.other}.items()}
    small_clip = (5, 64, 64)
    small_macs = count_macs(small, *small_clip)
    timing = time_forward_backward(small_model, small_clip)
    result = {
        "paper": {
            "params": paper_params,
            "macs_per_frame_180x320": macs.total / t,
            "macs_per_frame_by_part": per_frame,
            "clip_frames_for_macs": t,
        },
        "small": {
            "config": small.to_dict(),
            "params": parameter_breakdown(small_model),
            "macs_per_frame_64x64": small_macs.total / small_clip[0],
            "cpu_clip": list(small_clip),
            "cpu_threads": torch.get_num_threads(),
            **timing,
        },
        "machine": {"cpu": cpu_name(), "torch": torch.__version__, "python": platform.python_version()},
    }
    atomic_write_json(out_dir / "model.json", result)
    atomic_write_text(out_dir / "model.md", _markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    p, s = r["paper"], r["small"]
    lines = [
        "# GSMamba: size, FLOPs, CPU timing",
        "",
        "Written by `gsm model-report` (`make repro` runs it). MACs are counted analytically",
        "(gsm/models/flops.py; the selective scan by formula), per frame of a 100-frame clip.",
        "",
        "## Paper configuration (GSMConfig defaults)",
        "",
        f"- parameters: **{p['params']['total']:,}** ({p['params']['total'] / 1e6:.3f}M; paper: 10.5M), "
        f"without SpyNet {p['params']['without_spynet']:,}, SpyNet {p['params']['spynet']:,}",
        f"- MACs per frame at 180x320 LR: **{p['macs_per_frame_180x320'] / 1e12:.3f} T** "
        f"(FLOPs = 2 x MACs = {2 * p['macs_per_frame_180x320'] / 1e12:.3f} T; the paper reports 1.52T 'FLOPs')",
        "",
        "| part | parameters |",
        "|---|---:|",
        *[f"| {k} | {v:,} |" for k, v in p["params"].items()],
        "",
        "| part | GMACs per frame |",
        "|---|---:|",
        *[f"| {k} | {v / 1e9:.1f} |" for k, v in p["macs_per_frame_by_part"].items()],
        "",
        "## CPU configuration (params.yaml `model`)",
        "",
        f"- parameters: {s['params']['total']:,} (without SpyNet {s['params']['without_spynet']:,})",
        f"- MACs per frame at 64x64: {s['macs_per_frame_64x64'] / 1e9:.2f} G",
        f"- clip {s['cpu_clip'][0]} frames of {s['cpu_clip'][1]}x{s['cpu_clip'][2]} on {r['machine']['cpu']}, "
        f"{s['cpu_threads']} threads: forward {s['forward_s']:.2f} s, forward+backward "
        f"{s['forward_backward_s']:.2f} s (median of 3 after a warm-up)",
        "",
    ]
    return "\n".join(lines)


