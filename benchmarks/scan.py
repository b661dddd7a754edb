"""Selective-scan CPU benchmark: reference loop vs the numba and torch implementations.

    python benchmarks/scan.py            # batch 1, dim 384, N 16, L 20480 (one 64x64x5 window)
    python benchmarks/scan.py --quick    # L 2048

Every (implementation, mode) runs in its own subprocess, so its peak-memory figure is that
process's ru_maxrss growth during the measured calls alone (baseline: after building the inputs
and compiling on a tiny problem). Forward is timed under no_grad; forward+backward with autograd.
Writes reports/scan_benchmark.{md,json} (--quick: reports/scan_benchmark_quick.{md,json}).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gsm.io import cpu_name  # noqa: E402
from gsm.ops.scan import selective_scan, selective_scan_reference  # noqa: E402

BATCH, DIM, N_STATE = 1, 384, 16
FULL_L, QUICK_L = 20480, 2048
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# Runs per measurement after warm-up (reference forward+backward: once, it is slow).
RUNS = {("reference", "fwd"): 3, ("reference", "fwdbwd"): 1, ("numba", "fwd"): 9,
        ("numba", "fwdbwd"): 5, ("torch", "fwd"): 3, ("torch", "fwdbwd"): 3}
SPEEDUP_TARGET = 20.0


def make_inputs(L: int, seed: int = 0) -> list[torch.Tensor]:
    """Mamba-like inputs: raw delta ~ N(0, 0.5^2) with softplus, S4D-real A = -(1..N)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(BATCH, DIM, L, generator=g)
    delta = torch.randn(BATCH, DIM, L, generator=g) * 0.5
    A = -torch.arange(1, N_STATE + 1, dtype=torch.float32).repeat(DIM, 1)
    B = torch.randn(BATCH, N_STATE, L, generator=g)
    C = torch.randn(BATCH, N_STATE, L, generator=g)
    D = torch.ones(DIM)
    z = torch.randn(BATCH, DIM, L, generator=g)
    delta_bias = torch.randn(DIM, generator=g) * 0.5
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]


def call(impl: str, inputs: list[torch.Tensor]) -> torch.Tensor:
    if impl == "reference":
        return selective_scan_reference(*inputs, delta_softplus=True)
    return selective_scan(*inputs, delta_softplus=True, impl=impl)


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(impl: str, mode: str, L: int, runs: int, save_to: str | None) -> dict[str, Any]:
    """One measurement in this (fresh) process; returns times and the peak-RSS growth."""
    inputs = make_inputs(L)
    grad_out = torch.randn(BATCH, DIM, L, generator=torch.Generator().manual_seed(1))
    if impl != "reference":  # compile (or load the numba cache) on a tiny problem
        tiny = make_inputs(8)
        call(impl, tiny).sum().backward()
    baseline = maxrss_mib()

    def once() -> torch.Tensor:
        for t in inputs:
            t.grad = None
        if mode == "fwd":
            with torch.no_grad():
                return call(impl, inputs)
        out = call(impl, inputs)
        out.backward(grad_out)
        return out.detach()

    warmups = 0 if impl == "reference" else 1
    for _ in range(warmups):
        out = once()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = once()
        times.append(time.perf_counter() - t0)
    peak = maxrss_mib()
    if save_to:
        payload = {"out": out}
        if mode == "fwdbwd":
            payload.update({name: t.grad for name, t in zip(GRAD_NAMES, inputs)})
        torch.save(payload, save_to)
    return {"impl": impl, "mode": mode, "L": L, "times_s": times, "warmup_runs": warmups,
            "median_s": statistics.median(times), "baseline_rss_mib": baseline,
            "peak_rss_mib": peak, "peak_rss_growth_mib": peak - baseline,
            "torch_threads": torch.get_num_threads()}


def run_worker(impl: str, mode: str, L: int, runs: int, save_to: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, mode, str(L), str(runs),
           save_to]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {impl}/{mode} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|: error relative to the tensor's scale."""
    diff = (actual.double() - expected.double()).abs().max()
    return (diff / expected.double().abs().max()).item()


def environment(command: str) -> dict[str, Any]:
    import numba

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "cpu_model": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer_env": os.environ.get("NUMBA_THREADING_LAYER", "default"),
        "load_avg_start": list(os.getloadavg()),
    }


def log(message: str) -> None:
    print(f"[scan benchmark] {message}", file=sys.stderr, flush=True)


def _fmt_load(load: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


def _fmt_err(err: float | None) -> str:
    return "-" if err is None else f"{err:.1e}"


def write_report(result: dict[str, Any], out_dir: Path, stem: str) -> None:
    env, rows, L = result["environment"], result["results"], result["L"]
    ref_fwd = rows["reference"]["fwd"]["median_s"]
    ref_fb = rows["reference"]["fwdbwd"]["median_s"]
    lines = [
        "# Selective scan benchmark (CPU)",
        "",
        f"Problem: batch {BATCH}, dim {DIM}, N {N_STATE}, L {L}"
        + (" (the paper's 64x64-pixel x 5-frame window)" if L == FULL_L else " (--quick)")
        + "; D, z, delta_bias and delta_softplus on, float32.",
        "",
        f"- Date: {env['date']}",
        f"- Command: `{env['command']}`",
        f"- CPU: {env['cpu_model']} ({env['cpu_count']} logical cores)",
        f"- torch {env['torch']} ({env['torch_threads']} threads), numba {env['numba']} "
        f"({env['numba_threads']} threads), Python {env['python']}",
        f"- Load average (1/5/15 min) at start: {_fmt_load(env['load_avg_start'])};"
        f" at end: {_fmt_load(env['load_avg_end'])}"
        " (the machine is shared; other load inflates times)",
        "",
        "Times are medians over the runs listed, after one warm-up call (none for the reference). "
        "Forward runs under `torch.no_grad()`; forward+backward with autograd and a random output "
        "gradient. Peak memory is the growth of the measuring subprocess's `ru_maxrss` over the "
        "measured calls (baseline: inputs built, kernels compiled on a tiny problem), so it "
        "includes inputs' gradients and every temporary. Errors are max |x - ref| / max |ref| "
        "against the reference loop (worst over the output and all 8 gradients for fwd+bwd).",
        "",
        "| impl | forward (s) | speed-up | fwd+bwd (s) | speed-up | peak mem fwd (MiB) "
        "| peak mem fwd+bwd (MiB) | max rel err fwd | max rel err fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for impl in ("reference", "numba", "torch"):
        fwd, fb = rows[impl]["fwd"], rows[impl]["fwdbwd"]
        err_f = result["errors"].get(impl, {}).get("fwd")
        err_b = result["errors"].get(impl, {}).get("fwdbwd")
        lines.append(
            f"| {impl} | {fwd['median_s']:.3f} (n={len(fwd['times_s'])}) "
            f"| {ref_fwd / fwd['median_s']:.1f}x "
            f"| {fb['median_s']:.3f} (n={len(fb['times_s'])}) | {ref_fb / fb['median_s']:.1f}x "
            f"| {fwd['peak_rss_growth_mib']:.0f} | {fb['peak_rss_growth_mib']:.0f} "
            f"| {_fmt_err(err_f)} | {_fmt_err(err_b)} |")
    targets = result["targets"]
    lines += [
        "",
        f"Target: numba at least {SPEEDUP_TARGET:.0f}x faster than the reference loop.",
        f"- forward: {targets['numba_fwd_speedup']:.1f}x -> "
        f"{'met' if targets['numba_fwd_met'] else 'NOT met'}",
        f"- forward+backward: {targets['numba_fwdbwd_speedup']:.1f}x -> "
        f"{'met' if targets['numba_fwdbwd_met'] else 'NOT met'}",
        "",
        f"Raw per-run times and memory figures: `{stem}.json`.",
        "",
    ]
    (out_dir / f"{stem}.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"L {QUICK_L} instead of {FULL_L}")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "reports")
    parser.add_argument("--worker", nargs=5, metavar=("IMPL", "MODE", "L", "RUNS", "SAVE_TO"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, mode, L, runs, save_to = args.worker
        print(json.dumps(worker(impl, mode, int(L), int(runs), save_to)))
        return

    L = QUICK_L if args.quick else FULL_L
    command = "python benchmarks/scan.py" + (" --quick" if args.quick else "")
    env = environment(command)
    rows: dict[str, dict[str, Any]] = {}
    errors: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in ("reference", "numba", "torch"):
            rows[impl] = {}
            for mode in ("fwd", "fwdbwd"):
                runs = RUNS[(impl, mode)]
                if args.quick:
                    runs = max(runs, 3) if impl != "reference" or mode == "fwd" else 1
                path = os.path.join(tmp, f"{impl}_{mode}.pt")
                log(f"{impl} {mode} L={L} runs={runs} ...")
                row = rows[impl][mode] = run_worker(impl, mode, L, runs, path)
                log(f"  median {row['median_s']:.3f} s, peak +{row['peak_rss_growth_mib']:.0f} MiB")
        for mode in ("fwd", "fwdbwd"):
            ref = torch.load(os.path.join(tmp, f"reference_{mode}.pt"))
            for impl in ("numba", "torch"):
                got = torch.load(os.path.join(tmp, f"{impl}_{mode}.pt"))
                errors.setdefault(impl, {})[mode] = max(
                    max_rel_error(got[key], ref[key]) for key in ref if ref[key] is not None)
    env["load_avg_end"] = list(os.getloadavg())
    ref_fwd = rows["reference"]["fwd"]["median_s"]
    ref_fb = rows["reference"]["fwdbwd"]["median_s"]
    fwd_speedup = ref_fwd / rows["numba"]["fwd"]["median_s"]
    fb_speedup = ref_fb / rows["numba"]["fwdbwd"]["median_s"]
    result = {
        "environment": env,
        "L": L,
        "shape": {"batch": BATCH, "dim": DIM, "N": N_STATE, "L": L},
        "options": {"D": True, "z": True, "delta_bias": True, "delta_softplus": True},
        "results": rows,
        "speedup_vs_reference": {impl: {"fwd": ref_fwd / rows[impl]["fwd"]["median_s"],
                                        "fwdbwd": ref_fb / rows[impl]["fwdbwd"]["median_s"]}
                                 for impl in rows},
        "errors": errors,
        "targets": {"speedup_target": SPEEDUP_TARGET,
                    "numba_fwd_speedup": fwd_speedup,
                    "numba_fwd_met": fwd_speedup >= SPEEDUP_TARGET,
                    "numba_fwdbwd_speedup": fb_speedup,
                    "numba_fwdbwd_met": fb_speedup >= SPEEDUP_TARGET},
    }
    # --quick gets its own files so a smoke check never replaces the full-size report.
    stem = "scan_benchmark_quick" if args.quick else "scan_benchmark"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, args.out_dir, stem)
    print((args.out_dir / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
