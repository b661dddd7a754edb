"""Paper-config runtime per frame on a CUDA GPU (fp32 and bf16 autocast) -> reports/gpu_runtime.*

Run on a machine with the `cuda` extra built: `python benchmarks/gpu.py [--frames 10]`.
SPEC 4: runtime in ms per frame at a 180x320 LR input, after warm-up, device synchronised.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from gsm.io import atomic_write_json, atomic_write_text
from gsm.models.config import GSMConfig
from gsm.models.gsmamba import GSMamba
from gsm.ops.backend import causal_conv1d_available, mamba_ssm_available


def time_clip(model: GSMamba, x: torch.Tensor, dtype: torch.dtype | None, repeats: int) -> dict[str, float]:
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(repeats + 1):  # the first run warms up
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            model(x)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return {"ms_per_frame": 1000 * statistics.median(times) / x.shape[1],
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def time_train_step(model: GSMamba, x: torch.Tensor, dtype: torch.dtype | None, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(x).float().square().mean()
        loss.backward()
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("reports"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/gpu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GSMamba(GSMConfig()).cuda().eval()
    x = torch.rand(1, args.frames, 3, 180, 320, device="cuda")
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "mamba_ssm_kernels": mamba_ssm_available(),
        "causal_conv1d_kernels": causal_conv1d_available(),
        "frames": args.frames,
        "date": dt.date.today().isoformat(),
        "inference_fp32": time_clip(model, x, None, args.repeats),
        "inference_bf16": time_clip(model, x, torch.bfloat16, args.repeats),
    }
    model.train()
    train_x = torch.rand(1, 7, 3, 64, 64, device="cuda")  # one training clip's LR patch (Vimeo-like)
    result["train_step_7x64x64_s"] = {"fp32": time_train_step(model, train_x, None, args.repeats),
                                      "bf16": time_train_step(model, train_x, torch.bfloat16, args.repeats)}
    atomic_write_json(args.out / "gpu_runtime.json", result)
    lines = [
        "# Paper configuration on GPU", "",
        f"{result['gpu']}, torch {result['torch']} (CUDA {result['cuda']}), mamba-ssm kernels: "
        f"{result['mamba_ssm_kernels']}, causal-conv1d: {result['causal_conv1d_kernels']}, {result['date']}.",
        f"Command: `python benchmarks/gpu.py --frames {args.frames}`", "",
        "| mode | ms / frame at 180x320 | peak GiB |", "|---|---:|---:|",
        *[f"| {k} | {v['ms_per_frame']:.1f} | {v['peak_mem_gib']:.2f} |"
          for k, v in result.items() if k.startswith("inference_")],
        "", "| training step, 1 x 7 x 64x64 | seconds |", "|---|---:|",
        *[f"| {k} | {v:.3f} |" for k, v in result["train_step_7x64x64_s"].items()], "",
    ]
    atomic_write_text(args.out / "gpu_runtime.md", "\n".join(lines))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
