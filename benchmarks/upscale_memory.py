"""Peak memory of streaming upscaling: a 200-frame video against a 50-frame one (target: within 15%).

Each run is a fresh Python process, so its peak resident set (ru_maxrss, cross-checked with VmHWM)
belongs to that run alone. The process imports torch and builds the model before the baseline is
taken; the increase above that baseline is what upscaling itself holds, and VmHWM after every chunk
shows whether the peak climbs as the video goes on.

glibc's heap makes single peaks noisy (about +-10% between identical runs: freeing large blocks
raises its mmap threshold, and where later tensors land decides the fragmentation), so each length
runs `--repeats` times and the medians are compared. One more pair runs with the threshold fixed
(MALLOC_MMAP_THRESHOLD_=1 MiB in the child's environment), which takes the allocator out of the
measurement and shows what streaming itself holds. A contrast pair runs each video as a single
chunk (the whole clip at once), the growth with length that streaming avoids.

    .venv/bin/python benchmarks/upscale_memory.py [--out reports] [--repeats 3] [--no-contrast]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gsm.io import atomic_write_json, atomic_write_text, cpu_name  # noqa: E402

SIZE = 64  # LR frames are SIZE x SIZE, upscaled to 4 * SIZE
SHORT, LONG = 50, 200
FPS = 25.0
# Small enough for CPU minutes, same structure as the paper's network (window 5: radius 2).
MODEL = {"embed_dim": 16, "num_heads": 2, "prop_layers": 2, "attn_depth": 1, "d_state": 4, "mid_channels": 16}
TARGET = 1.15
FIXED_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _status_kb(field: str) -> int:
    """A `VmRSS` / `VmHWM` line of /proc/self/status, in KiB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _write_video(path: Path, frames: int) -> None:
    """A smooth pattern drifting diagonally: motion for the flow network, compressible like video."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (SIZE, SIZE))
    for t in range(frames):
        img = np.stack([128 + 100 * np.sin((xs + 1.3 * t) / 6 + c) * np.cos((ys + 0.7 * t) / 9) for c in range(3)], 2)
        writer.write(np.clip(img, 0, 255).astype(np.uint8))
    writer.release()


def child(src: Path, dst: Path, chunk: int, overlap: int) -> dict[str, Any]:
    """One measured run (in its own process): build the model, note the baseline, upscale."""
    import torch

    from gsm.models.config import GSMConfig
    from gsm.models.gsmamba import GSMamba
    from gsm.serve.upscale import upscale_video

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random SpyNet: memory, not quality, is measured
        model = GSMamba(GSMConfig(**MODEL)).eval()
    baseline_kb = _status_kb("VmRSS")
    hwm_after_chunk: list[int] = []
    model.register_forward_hook(lambda *_: hwm_after_chunk.append(round(_status_kb("VmHWM") / 1024)))
    summary = upscale_video(model, src, dst, chunk=chunk, chunk_overlap=overlap, progress=False, device="cpu")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "frames": summary.frames,
        "chunks": len(hwm_after_chunk),
        "seconds": round(summary.seconds, 2),
        "frames_per_s": round(summary.frames_per_s, 2),
        "baseline_rss_mb": round(baseline_kb / 1024, 1),
        "peak_rss_mb": round(peak_mb, 1),
        "vm_hwm_mb": round(_status_kb("VmHWM") / 1024, 1),
        "upscale_mb": round(peak_mb - baseline_kb / 1024, 1),
        "vm_hwm_mb_after_each_chunk": hwm_after_chunk,
    }


def _measure(src: Path, dst: Path, chunk: int, overlap: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    dst.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", str(src), str(dst), str(chunk), str(overlap)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"measured run failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(long: float, short: float) -> float:
    return round(long / short, 3)


def _output_kind() -> str:
    """What the runs wrote: H.264 unless PyAV lacks the encoder (then OpenCV's mp4v)."""
    from gsm.serve.video_out import h264_missing

    return "mp4v video (no H.264 encoder)" if h264_missing() else "H.264 video"


def run(out: Path, chunk: int, overlap: int, repeats: int, contrast: bool) -> dict[str, Any]:
    load_start = os.getloadavg()[0]
    groups: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="gsm-upscale-memory-") as tmp:
        video = {n: Path(tmp) / f"{n}.mp4" for n in (SHORT, LONG)}
        for n, path in video.items():
            _write_video(path, n)
        plan: list[tuple[str, int, int, dict[str, str] | None]] = []
        for _ in range(repeats):  # interleaved, so slow drift in machine load hits both lengths
            plan += [(f"streaming {n}", n, chunk, None) for n in (SHORT, LONG)]
        plan += [(f"streaming {n}, fixed mmap threshold", n, chunk, FIXED_THRESHOLD) for n in (SHORT, LONG)]
        if contrast:
            plan += [(f"one chunk {n}", n, n, None) for n in (SHORT, LONG)]
        for name, n, run_chunk, env in plan:
            result = _measure(video[n], Path(tmp) / "out.mp4", run_chunk, overlap, env)
            groups.setdefault(name, []).append(result)
            print(f"{name}: peak {result['peak_rss_mb']} MB, {result['seconds']} s", flush=True)

    def median_peak(name: str) -> float:
        return statistics.median(r["peak_rss_mb"] for r in groups[name])

    def median_upscale(name: str) -> float:
        return statistics.median(r["upscale_mb"] for r in groups[name])

    s, lg = f"streaming {SHORT}", f"streaming {LONG}"
    import torch

    result: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "benchmarks/upscale_memory.py", *sys.argv[1:]]),
        "machine": {
            "cpu": cpu_name(),
            "cpus_available": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "opencv": cv2.__version__,
            "load_average_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        },
        "settings": {"frame_size": f"{SIZE}x{SIZE} -> {4 * SIZE}x{4 * SIZE}", "model": MODEL, "chunk": chunk,
                     "chunk_overlap": overlap, "repeats": repeats, "device": "cpu", "output": _output_kind()},
        "runs": groups,
        "median_peak_mb": {name: median_peak(name) for name in groups},
        "peak_ratio_long_vs_short": _ratio(median_peak(lg), median_peak(s)),
        "upscale_ratio_long_vs_short": _ratio(median_upscale(lg), median_upscale(s)),
        "worst_peak_ratio_long_vs_short": _ratio(max(r["peak_rss_mb"] for r in groups[lg]),
                                                 min(r["peak_rss_mb"] for r in groups[s])),
        "fixed_threshold_peak_ratio": _ratio(median_peak(f"{lg}, fixed mmap threshold"),
                                             median_peak(f"{s}, fixed mmap threshold")),
        "target_peak_ratio": TARGET,
    }
    result["meets_target"] = result["peak_ratio_long_vs_short"] <= TARGET
    if contrast:
        result["one_chunk_peak_ratio"] = _ratio(median_peak(f"one chunk {LONG}"), median_peak(f"one chunk {SHORT}"))
    atomic_write_json(out / "upscale_memory.json", result)
    atomic_write_text(out / "upscale_memory.md", _markdown(result))
    return result


def _markdown(r: dict[str, Any]) -> str:
    m, st = r["machine"], r["settings"]
    lines = [
        "# Streaming upscaling: peak memory against video length",
        "",
        f"- Command: `{r['command']}`",
        f"- Machine: {m['cpu']}, {m['cpus_available']} CPUs available; Python {m['python']}, torch {m['torch']}, "
        f"OpenCV {m['opencv']}; 1-minute load average {m['load_average_1min']['start']} at start, "
        f"{m['load_average_1min']['end']} at end (shared machine: speeds are indicative only)",
        f"- Input: generated {st['frame_size']} mp4v videos of {SHORT} and {LONG} frames; model {st['model']} "
        f"(random weights), CPU; chunk {st['chunk']}, overlap {st['chunk_overlap']}; output: {st['output']}",
        f"- Each run is a fresh process: peak = ru_maxrss (VmHWM agrees); baseline = VmRSS after importing torch "
        f"and building the model; upscaling = peak - baseline. Streaming runs {st['repeats']} times per length "
        f"(interleaved); ratios compare medians",
        "",
        "| run | frames | chunks | baseline MB | peak MB | upscaling MB | VmHWM MB after each chunk | seconds "
        "| frames/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, results in r["runs"].items():
        for e in results:
            trace = " ".join(str(v) for v in e["vm_hwm_mb_after_each_chunk"])
            lines.append(f"| {name} | {e['frames']} | {e['chunks']} | {e['baseline_rss_mb']} | {e['peak_rss_mb']} "
                         f"| {e['upscale_mb']} | {trace} | {e['seconds']} | {e['frames_per_s']} |")
    verdict = "meets" if r["meets_target"] else "MISSES"
    lines += [
        "",
        f"- Streaming, median peak {LONG} / {SHORT} frames: **{r['peak_ratio_long_vs_short']}** ({verdict} the "
        f"target <= {r['target_peak_ratio']}); upscaling part alone: {r['upscale_ratio_long_vs_short']}; "
        f"worst pair (largest {LONG}-frame peak / smallest {SHORT}-frame peak): {r['worst_peak_ratio_long_vs_short']}",
        f"- Same with glibc's mmap threshold fixed at 1 MiB (allocator noise removed): "
        f"{r['fixed_threshold_peak_ratio']}",
    ]
    if "one_chunk_peak_ratio" in r:
        lines.append(f"- Whole video as one chunk, {LONG} / {SHORT} frames: {r['one_chunk_peak_ratio']}: the growth "
                     "chunking removes (the network's activations scale with the frames it is given)")
    lines += [
        "",
        "Streaming holds one chunk of input frames, one read-ahead frame and `chunk_overlap` output frames",
        "awaiting their cross-fade; every other frame is written as soon as it is final, so what is alive is",
        "set by the chunk length and frame size, not by the video's length. The spread between identical",
        "streaming runs comes from glibc's heap: freeing large blocks raises its mmap threshold, later",
        "chunk-sized tensors then land on the heap, and how they fragment it differs from run to run. With",
        "the threshold fixed at 1 MiB the peak is flat from the first chunk and lower, at the price of",
        "slower allocation (compare the seconds column).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        src, dst, chunk, overlap = sys.argv[2:6]
        print(json.dumps(child(Path(src), Path(dst), int(chunk), int(overlap))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("reports"))
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--overlap", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="streaming runs per length (medians are compared)")
    ap.add_argument("--no-contrast", dest="contrast", action="store_false",
                    help="skip the whole-video-as-one-chunk runs")
    args = ap.parse_args()
    t0 = time.perf_counter()
    r = run(args.out, args.chunk, args.overlap, args.repeats, args.contrast)
    print(f"median peak ratio {LONG}/{SHORT} frames: {r['peak_ratio_long_vs_short']} (target <= {TARGET}); "
          f"wrote {args.out / 'upscale_memory.md'} and .json in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
