"""The FFN's depthwise 3x3x3 conv on a GPU: its forms side by side, alone and in the paper network.

    python benchmarks/dwconv_gpu.py [--out reports] [--network]

Why: on an H200 the 2-D form with three outputs per channel (cuDNN runs its backward as one GEMM
per channel group) took 95% of the paper's training iteration (reports/gpu_runtime.md). Forms:

  conv3d      F.conv3d on the channels-last view (inference's form, and the CPU's)
  mult3       the earlier training form: one depthwise 2-D conv with 3 outputs per channel
  taps        gsm.models.gsm_block's 2-D form: three depthwise 2-D convs, one per temporal tap
  taps_nchw   the same on a contiguous NCHW copy of the frames
  shift_add   27 shifted multiply-adds, no convolution at all

For each, at the paper's shapes (hidden 768 channels; training window 5 x 64 x 64, inference
5 x 180 x 320): forward ms (no grad) and forward + backward ms, bf16 and fp32, CUDA events, median
of repeats; the largest deviation from conv3d in fp32. --network also times the paper network's
training iteration and bf16 inference with each fast form patched in (needs the mamba-ssm kernels to
be meaningful). Writes <out>/dwconv_gpu.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gsm.models import gsm_block  # noqa: E402
from gsm.models.config import GSMConfig  # noqa: E402

Form = Callable[[Tensor, Tensor, Tensor | None], Tensor]
LIBRARY = gsm_block.depthwise_conv3d_k3  # bound now: network() patches the module's name


def conv3d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return LIBRARY(x, weight, bias, as_2d=False)


def taps(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return LIBRARY(x, weight, bias, as_2d=True)


def mult3(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    b, k, h, w, d = x.shape
    t = F.conv2d(x.permute(0, 1, 4, 2, 3).flatten(0, 1), weight.view(3 * d, 1, 3, 3), None, padding=1, groups=d)
    t = F.pad(t.view(b, k, d, 3, h, w), (0, 0, 0, 0, 0, 0, 0, 0, 1, 1))
    out = t[:, :-2, :, 0] + t[:, 1:-1, :, 1] + t[:, 2:, :, 2]
    if bias is not None:
        out = out + bias.view(1, 1, d, 1, 1)
    return out.permute(0, 1, 3, 4, 2)


def taps_nchw(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    b, k, h, w, d = x.shape
    frames = x.permute(0, 1, 4, 2, 3).reshape(b * k, d, h, w).contiguous()
    out = F.conv2d(frames, weight[:, :, 1], bias, padding=1, groups=d).view(b, k, d, h, w)
    if k > 1:
        t0 = F.conv2d(frames, weight[:, :, 0], None, padding=1, groups=d).view(b, k, d, h, w)
        t2 = F.conv2d(frames, weight[:, :, 2], None, padding=1, groups=d).view(b, k, d, h, w)
        out = out + F.pad(t0[:, :-1], (0, 0, 0, 0, 0, 0, 1, 0)) + F.pad(t2[:, 1:], (0, 0, 0, 0, 0, 0, 0, 1))
    return out.permute(0, 1, 3, 4, 2)


def shift_add(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    b, k, h, w, d = x.shape
    xp = F.pad(x, (0, 0, 1, 1, 1, 1, 1, 1))  # (B, K+2, H+2, W+2, D)
    wt = weight.view(d, 27).t()  # (27, D), tap index kt*9 + kh*3 + kw
    out = xp[:, :k, :h, :w] * wt[0]
    for i in range(1, 27):
        kt, kh, kw = i // 9, i // 3 % 3, i % 3
        out = out + xp[:, kt:kt + k, kh:kh + h, kw:kw + w] * wt[i]
    return out if bias is None else out + bias


FORMS: dict[str, Form] = {"conv3d": conv3d, "mult3": mult3, "taps": taps, "taps_nchw": taps_nchw,
                          "shift_add": shift_add}


def cuda_ms(fn: Callable[[], Any], repeats: int, deadline: float) -> float | None:
    """Median ms over repeats after two warm-ups; None if the warm-ups already overrun."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if time.monotonic() > deadline:
            break
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) if times else None


def time_forms(shape: tuple[int, ...], dtype: torch.dtype, repeats: int, budget: float) -> list[dict[str, Any]]:
    d = shape[-1]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=dtype, generator=g).requires_grad_()
    weight = (0.1 * torch.randn(d, 1, 3, 3, 3, device="cuda", dtype=dtype, generator=g)).requires_grad_()
    bias = torch.randn(d, device="cuda", dtype=dtype, generator=g).requires_grad_()
    grad = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    rows = []
    for name, form in FORMS.items():
        deadline = time.monotonic() + budget / len(FORMS)

        def fwd() -> None:
            with torch.no_grad():
                form(x, weight, bias)

        def fwd_bwd() -> None:
            torch.autograd.grad(form(x, weight, bias), (x, weight, bias), grad)

        row: dict[str, Any] = {"form": name, "shape": list(shape), "dtype": str(dtype).replace("torch.", "")}
        try:
            row["forward_ms"] = cuda_ms(fwd, repeats, deadline)
            row["forward_backward_ms"] = cuda_ms(fwd_bwd, repeats, deadline)
        except Exception as err:  # noqa: BLE001 - a form that fails is a result too
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def deviations() -> dict[str, float]:
    """Largest |form - conv3d| over values and gradients, relative to each one's scale, fp32."""
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 5, 19, 23, 64, device="cuda", generator=g, requires_grad=True)
    weight = torch.randn(64, 1, 3, 3, 3, device="cuda", generator=g, requires_grad=True)
    bias = torch.randn(64, device="cuda", generator=g, requires_grad=True)
    grad = torch.randn(2, 5, 19, 23, 64, device="cuda", generator=g)
    ref_out = conv3d(x, weight, bias)
    ref = [ref_out, *torch.autograd.grad(ref_out, (x, weight, bias), grad)]
    res = {}
    for name, form in FORMS.items():
        out = form(x, weight, bias)
        got = [out, *torch.autograd.grad(out, (x, weight, bias), grad)]
        res[name] = max(((a - e).abs().max() / e.abs().max()).item() for a, e in zip(got, ref))
    torch.backends.cudnn.allow_tf32 = True
    return res


def network(forms: list[str], repeats: int, budget: float) -> list[dict[str, Any]]:
    """The paper network's training iteration (gpu.py's) and bf16 inference, per form."""
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = gpu  # dataclasses look their module up there
    spec.loader.exec_module(gpu)  # type: ignore[union-attr]
    args = argparse.Namespace(smoke=False, frames=10, train_frames=16, train_lr_size=64, repeats=repeats)
    bench = gpu.make_bench(args)
    rows = []
    for name in forms:
        form = FORMS[name]
        gsm_block.depthwise_conv3d_k3 = lambda x, w, b, as_2d, f=form: f(x, w, b)  # type: ignore[assignment]
        row: dict[str, Any] = {"form": name}
        try:
            deadline = time.monotonic() + budget / len(forms)
            model, step = gpu.train_setup(bench, bench.cfg.scan_impl)
            stats, _ = gpu.measure(step, bench, repeats=repeats, deadline=deadline)
            row["train"] = stats
            del model, step
            gpu.cleanup(bench)
            model = bench.build(bench.cfg).eval()
            clip = torch.rand(1, *bench.infer_shape[:1], 3, *bench.infer_shape[1:], device="cuda")

            def infer() -> Tensor:
                with torch.no_grad(), bench.autocast(torch.bfloat16):
                    return model(clip)

            stats, _ = gpu.measure(infer, bench, repeats=2, deadline=deadline + 30)
            row["infer_bf16_ms_per_frame"] = 1000 * stats["median_s"] / bench.infer_shape[0] \
                if stats.get("median_s") else stats
            del model
            gpu.cleanup(bench)
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {err}"[:500]
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    gsm_block.depthwise_conv3d_k3 = LIBRARY
    return rows


def render(res: dict[str, Any]) -> str:
    lines = ["# FFN depthwise 3x3x3 conv on GPU: forms side by side", "", res["device"], "",
             f"Command: `{res['command']}`", "", "Largest deviation from conv3d (fp32, values and gradients, "
             "relative to scale): " + ", ".join(f"{k} {v:.1e}" for k, v in res["deviation"].items()), "",
             "| form | input (B, K, H, W, D) | dtype | forward ms | forward + backward ms |",
             "|---|---|---|---:|---:|"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in res["ops"]:
        lines.append(f"| {r['form']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {fmt(r.get('forward_ms'))} | "
                     f"{fmt(r.get('forward_backward_ms')) if 'error' not in r else r['error']} |")
    if res.get("network"):
        lines += ["", "Paper network (gpu.py's training iteration: 1 x 16 x 64^2, bf16, grad ckpt; inference "
                  "1 x 10 x 180 x 320 bf16) with each form in every FFN, training and inference alike:", "",
                  "| form | train s / iter (median) | infer bf16 ms / frame |", "|---|---:|---:|"]
        for r in res["network"]:
            tr = r.get("train", {})
            lines.append(f"| {r['form']} | {fmt(tr.get('median_s'))} | {fmt(r.get('infer_bf16_ms_per_frame'))}"
                         f"{' ' + r['error'] if 'error' in r else ''} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "reports")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget", type=float, default=120.0, help="seconds for the op timings")
    ap.add_argument("--network", nargs="*", default=None, metavar="FORM",
                    help="also time the paper network with these forms (default: mult3 taps taps_nchw)")
    ap.add_argument("--network-budget", type=float, default=150.0)
    ap.add_argument("--network-only", action="store_true", help="skip the op timings")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/dwconv_gpu.py needs a CUDA GPU")
    hidden = GSMConfig().embed_dim * GSMConfig().ffn_ratio
    k = GSMConfig().window
    res: dict[str, Any] = {"device": f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
                                     f"cuDNN {torch.backends.cudnn.version()}",
                           "command": "python " + " ".join(sys.argv), "deviation": deviations(), "ops": []}
    print(json.dumps(res["deviation"]), flush=True)
    cases = [((1, k, 64, 64, hidden), torch.bfloat16), ((1, k, 64, 64, hidden), torch.float32),
             ((1, k, 180, 320, hidden), torch.bfloat16)]
    for shape, dtype in ([] if args.network_only else cases):
        res["ops"] += time_forms(shape, dtype, args.repeats, args.budget / len(cases))
    if args.network is not None:
        res["network"] = network(args.network or ["mult3", "taps", "taps_nchw"], 3, args.network_budget)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dwconv_gpu.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (args.out / "dwconv_gpu.md").write_text(render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
