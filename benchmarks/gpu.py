"""GPU runtime report of the paper network: CUDA tests, inference, training, profiles -> gpu_runtime.*

One command on a CUDA machine with the mamba-ssm / causal-conv1d kernels built:

    python benchmarks/gpu.py [--out reports] [--frames 10] [--repeats 5] [--time-budget 270]

Sections, run in this order. Each gets a share of --time-budget (time a section leaves unused goes
to the later ones), stops repeating when its share is spent and is cut off by an alarm if a single
run overshoots; each records its own error instead of ending the script, and the reports are
rewritten after every section, so a crash or a kill still leaves everything measured until then.

  tests           tests/test_cuda.py through pytest in a subprocess: pass / fail / skip counts
  inference_fp32  GSMConfig() (the paper network) on 1 x T x 3 x 180 x 320 under no_grad: median
  inference_bf16  ms per frame over repeats after warm-up, device synchronised, and peak memory;
                  the second under bf16 autocast
  train_kernel    the paper's training iteration on one GPU: batch 1, 16 frames, LR 64x64 (GT
                  256), bf16 autocast, grad_checkpoint=True, Charbonnier loss, Adam (lr 2e-4,
                  betas 0.9 / 0.99; SpyNet at 0.125x as the trainer does): median s / iteration
  train_torch     the same with scan_impl="torch", the pure-PyTorch fallback (fewer repeats); the
                  issue asks for it within 10x of the kernel path
  profile_infer   torch.profiler over one bf16 inference clip and one training iteration: the
  profile_train   top 20 ops by self CUDA time, the kernel count and launch calls, and CUDA time
                  per module type, forward / recompute / backward (see ModuleRanges)

Reports: <out>/gpu_runtime.json and <out>/gpu_runtime.md (atomic writes), with the GPU, versions,
kernel availability, command line, date, the issue's targets (training iteration <= 1.0 s;
inference <= 100 ms / frame at 180x320 in bf16) met or not, and the baseline measured on the same
kind of H200 before the speed-up work. --out may also name the .json file itself.

`--smoke` runs every section on CPU with a tiny network and input (profiles by CPU time) so the
script can be exercised without a GPU; its reports go to a temporary folder unless --out is given.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

T_START = time.monotonic()
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# gsm.ops.spynet imports tqdm (for weight downloads) at module level, and the GPU image need not
# have it. Nothing is downloaded here, so a stand-in will do; the pytest subprocess runs the same.
TQDM_FALLBACK = """
import importlib.util, sys, types
if importlib.util.find_spec("tqdm") is None:
    class _Bar:
        def __init__(self, iterable=None, *args, **kwargs): self.iterable = iterable
        def __iter__(self): return iter(self.iterable or ())
        def __enter__(self): return self
        def __exit__(self, *exc): return False
        def __getattr__(self, name): return lambda *args, **kwargs: None
    _tqdm = types.ModuleType("tqdm")
    _tqdm.tqdm = _Bar
    sys.modules["tqdm"] = _tqdm
"""
TQDM_STUBBED = importlib.util.find_spec("tqdm") is None
exec(TQDM_FALLBACK)  # noqa: S102 - fixed code above

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from gsm.io import atomic_write_json, atomic_write_text  # noqa: E402 - stdlib only

GIB = 2**30
# Measured on the same H200 kind with the code before this work (benchmarks/gpu.py of then).
BASELINE = {"train_s_per_iter": 21.6, "train_peak_gib": 14.5, "inference_bf16_ms_per_frame": 298.0,
            "inference_fp32_ms_per_frame": 332.0, "inference_peak_gib": 11.5}
TARGETS = {"train_s_per_iter": 1.0, "inference_bf16_ms_per_frame": 100.0, "torch_over_kernel": 10.0}
ADAM = {"lr": 2e-4, "betas": (0.9, 0.99), "flow_lr_mult": 0.125}

# (name, share weight): a section's budget is the time left x its weight / the weights left.
PLAN = [("tests", 0.22), ("inference_fp32", 0.09), ("inference_bf16", 0.09), ("train_kernel", 0.18),
        ("train_torch", 0.16), ("profile_infer", 0.08), ("profile_train", 0.18)]
MIN_SECTION_S = 5.0  # a section offered less than this is skipped


class SectionTimeout(BaseException):
    """Raised by the alarm; a BaseException so no `except Exception` on the way swallows it."""


class Terminated(BaseException):
    """SIGTERM (e.g. `timeout`): finish the reports with what exists and stop."""


# ----------------------------------------------------------------------------------- settings


@dataclasses.dataclass
class Bench:
    """What the sections run on: device, network config, shapes, loss, repeats."""

    smoke: bool
    device: torch.device
    cfg: Any  # GSMConfig
    infer_shape: tuple[int, int, int]  # T, H, W of the inference clip
    train_shape: tuple[int, int]  # T, LR side of the training clip
    repeats: int
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    loss_source: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def autocast(self, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / GIB if self.cuda else None

    def build(self, cfg: Any, device: torch.device | str | None = None) -> torch.nn.Module:
        from gsm.models.gsmamba import GSMamba

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="SpyNet created without weights")
            return GSMamba(cfg).to(device or self.device)


def load_charbonnier() -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """gsm/train/loss.py loaded as a lone file: importing it as gsm.train.loss runs gsm/train's
    __init__, which pulls the trainer and its data / tracking stack (cv2, mlflow, ...) that the GPU
    image does not have. The file itself needs only torch."""
    path = REPO / "gsm" / "train" / "loss.py"
    try:
        spec = importlib.util.spec_from_file_location("_gsm_train_loss_file", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.charbonnier, "gsm/train/loss.py:charbonnier (loaded as a file)"
    except Exception as err:  # the same formula inline: mean(sqrt((pred - gt)^2 + 1e-12)) in fp32
        def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
            diff = pred.float() - target.float()
            return torch.sqrt(diff * diff + eps).mean()

        return charbonnier, f"inline Charbonnier (gsm/train/loss.py failed: {type(err).__name__}: {err})"


def make_bench(args: argparse.Namespace) -> Bench:
    from gsm.models.config import GSMConfig

    loss, source = load_charbonnier()
    if args.smoke:
        cfg = GSMConfig(embed_dim=8, num_heads=2, prop_layers=2, attn_depth=1, d_state=4, mid_channels=8, window=3)
        return Bench(True, torch.device("cpu"), cfg, (4, 16, 16), (4, 16), min(args.repeats, 2), loss, source)
    return Bench(False, torch.device("cuda"), GSMConfig(), (args.frames, 180, 320),
                 (args.train_frames, args.train_lr_size), args.repeats, loss, source)


# ------------------------------------------------------------------------------------- timing


def run_once(step: Callable[[], Any], bench: Bench) -> tuple[float, Any]:
    bench.sync()
    start = time.perf_counter()
    out = step()
    bench.sync()
    return time.perf_counter() - start, out


def measure(step: Callable[[], Any], bench: Bench, *, repeats: int, deadline: float,
            max_warmup: int = 2) -> tuple[dict[str, Any], Any]:
    """Warm-up runs (a second only if time allows), then up to `repeats` timed runs while the next
    one is expected to end before `deadline`. Without time for a single timed run, the (slower)
    warm-up time stands in, flagged `warmup_only`. Returns the statistics and the last output."""
    warm: list[float] = []
    out = None
    for i in range(max_warmup):
        if i and time.monotonic() + 2 * warm[-1] > deadline:
            break
        t, out = run_once(step, bench)
        warm.append(t)
    times: list[float] = []
    while len(times) < repeats:
        if time.monotonic() + (times[-1] if times else warm[-1]) > deadline:
            break
        t, out = run_once(step, bench)
        times.append(t)
    used = times or warm[-1:]
    stats = {"median_s": statistics.median(used), "min_s": min(used), "timed_runs": len(times),
             "times_s": [round(t, 4) for t in times], "warmup_s": [round(t, 4) for t in warm],
             "warmup_only": not times}
    return stats, out


# ----------------------------------------------------------------------------------- sections


def section_tests(bench: Bench, deadline: float) -> dict[str, Any]:
    res = run_pytest(["tests/test_cuda.py"], timeout=max(deadline - time.monotonic(), 1.0))
    print(res["output_tail"][-3000:], flush=True)
    return res


def run_pytest(paths: list[str], timeout: float) -> dict[str, Any]:
    """pytest on `paths` in a subprocess, killed after `timeout` s; counts from its junit file, or
    from the -v lines when it was killed first. --noconftest: the suite's conftest imports yaml and
    manages MLflow stores, neither of which the CUDA tests need nor the GPU image has."""
    with tempfile.TemporaryDirectory(prefix="gsm-gpu-tests-") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-c", TQDM_FALLBACK + "\nimport pytest\nsys.exit(pytest.main(sys.argv[1:]))\n",
               *paths, "-v", "-rfE", "--noconftest", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1")
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
            output, returncode, timed_out = proc.stdout + proc.stderr, proc.returncode, False
        except subprocess.TimeoutExpired as err:
            output = _text(err.stdout) + _text(err.stderr)
            returncode, timed_out = None, True
        res: dict[str, Any] = {"command": f"pytest {' '.join(paths)} -v --noconftest", "returncode": returncode,
                               "timed_out": timed_out, "pytest_s": round(time.monotonic() - start, 1)}
        res.update(_parse_junit(junit) if junit.exists() else _parse_verbose(output))
    res["output_tail"] = output[-4000:]
    return res


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _parse_junit(path: Path) -> dict[str, Any]:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            kind = "failed" if "failure" in kinds else "errors"
            counts[kind] += 1
            node = case.find("failure") if kind == "failed" else case.find("error")
            message = (node.get("message") or node.text or "")[:600] if node is not None else ""
            failures.append({"test": name, "kind": kind, "message": message})
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "source": "junit"}


def _parse_verbose(output: str) -> dict[str, Any]:
    """Counts from `pytest -v` lines, for a run killed before it wrote its junit file."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped", "XFAIL": "skipped",
           "XPASS": "passed"}
    failures = []
    for test, outcome in re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", output, re.M):
        counts[key[outcome]] += 1
        if outcome in ("FAILED", "ERROR"):
            failures.append({"test": test, "kind": key[outcome], "message": ""})
    return {**counts, "failures": failures, "source": "pytest -v output (no junit file)"}


def section_inference(bench: Bench, deadline: float, dtype: torch.dtype | None) -> dict[str, Any]:
    t, h, w = bench.infer_shape
    model = bench.build(bench.cfg).eval()
    x = torch.rand(1, t, 3, h, w, device=bench.device, generator=torch.Generator(bench.device).manual_seed(0))
    bench.reset_peak()

    def step() -> torch.Tensor:
        with torch.no_grad(), bench.autocast(dtype):
            return model(x)

    stats, out = measure(step, bench, repeats=bench.repeats, deadline=deadline)
    if tuple(out.shape) != (1, t, 3, 4 * h, 4 * w) or not torch.isfinite(out).all():
        raise RuntimeError(f"inference output {tuple(out.shape)} wrong or not finite")
    return {"input": [1, t, 3, h, w], "precision": "bf16 autocast" if dtype else "fp32",
            "scan_impl": _resolved(bench.cfg.scan_impl, bench.device),
            "ms_per_frame": 1000 * stats["median_s"] / t, "ms_per_frame_min": 1000 * stats["min_s"] / t,
            "peak_gib": bench.peak_gib(), **stats}


def _resolved(impl: str, device: torch.device) -> str:
    try:
        from gsm.ops.backend import resolve_impl

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return resolve_impl(impl, device)
    except Exception as err:
        return f"{impl} (unresolved: {type(err).__name__}: {err})"


def train_setup(bench: Bench, scan_impl: str) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """Model, optimiser and one training-iteration closure, as the trainer runs an iteration."""
    cfg = dataclasses.replace(bench.cfg, grad_checkpoint=True, scan_impl=scan_impl)
    model = bench.build(cfg).train()
    flow = [p for n, p in model.named_parameters() if n.split(".")[0] == "spynet"]
    main = [p for n, p in model.named_parameters() if n.split(".")[0] != "spynet"]
    opt = torch.optim.Adam([{"params": main}, {"params": flow, "lr": ADAM["lr"] * ADAM["flow_lr_mult"]}],
                           lr=ADAM["lr"], betas=ADAM["betas"])
    t, s = bench.train_shape
    g = torch.Generator(bench.device).manual_seed(0)
    lq = torch.rand(1, t, 3, s, s, device=bench.device, generator=g)
    gt = torch.rand(1, t, 3, 4 * s, 4 * s, device=bench.device, generator=g)

    def step() -> torch.Tensor:
        with record_function("bench::zero_grad"):
            opt.zero_grad(set_to_none=True)
        with bench.autocast(torch.bfloat16):
            out = model(lq)
        with record_function("bench::loss"):
            loss = bench.loss(out, gt)
        loss.backward()
        with record_function("bench::optimizer"):
            opt.step()
        return loss.detach()

    return model, step


def section_train(bench: Bench, deadline: float, scan_impl: str, repeats: int, max_warmup: int) -> dict[str, Any]:
    model, step = train_setup(bench, scan_impl)
    bench.reset_peak()
    stats, loss = measure(step, bench, repeats=repeats, deadline=deadline, max_warmup=max_warmup)
    if not torch.isfinite(loss):
        raise RuntimeError(f"training loss is {loss.item()}")
    t, s = bench.train_shape
    return {"input": [1, t, 3, s, s], "gt": [1, t, 3, 4 * s, 4 * s], "precision": "bf16 autocast",
            "grad_checkpoint": True, "scan_impl": scan_impl, "scan_impl_resolved": _resolved(scan_impl, bench.device),
            "loss": bench.loss_source, "optimizer": f"Adam lr {ADAM['lr']} betas {ADAM['betas']}, SpyNet x"
            f"{ADAM['flow_lr_mult']}", "last_loss": loss.item(), "s_per_iter": stats["median_s"],
            "s_per_iter_min": stats["min_s"], "peak_gib": bench.peak_gib(),
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6, **stats}


def section_profile(bench: Bench, deadline: float, kind: str, frames: int) -> dict[str, Any]:
    """One warm-up run, then one profiled run with the module ranges on, over `frames` frames:
    every window repeats the same kernels, and the event analysis is Python, so a 16-frame
    training iteration's ~10^5 events do not fit a short budget (seen on an H200)."""
    bench = dataclasses.replace(bench, infer_shape=(min(frames, bench.infer_shape[0]), *bench.infer_shape[1:]),
                                train_shape=(min(frames, bench.train_shape[0]), bench.train_shape[1]))
    if kind == "train":
        model, step = train_setup(bench, bench.cfg.scan_impl)
        what = f"one training iteration, 1 x {bench.train_shape[0]} x 3 x {bench.train_shape[1]}^2, bf16, grad ckpt"
    else:
        t, h, w = bench.infer_shape
        model = bench.build(bench.cfg).eval()
        x = torch.rand(1, t, 3, h, w, device=bench.device)

        def step() -> torch.Tensor:
            with torch.no_grad(), bench.autocast(torch.bfloat16):
                return model(x)

        what = f"one inference clip, 1 x {t} x 3 x {h} x {w}, bf16"
    warm_s, _ = run_once(step, bench)
    if time.monotonic() + 2 * warm_s > deadline:
        raise RuntimeError(f"no time to profile: a warm-up run took {warm_s:.1f} s, "
                           f"{deadline - time.monotonic():.0f} s left")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
    ranges = ModuleRanges(model)
    try:
        with profile(activities=activities) as prof:
            wall_s, _ = run_once(step, bench)
    finally:
        ranges.remove()
    post = time.monotonic()
    events = prof.events()
    sort_by = "self_cuda_time_total" if bench.cuda else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort_by, row_limit=20, max_name_column_width=60)
    except Exception:
        sort_by = sort_by.replace("cuda", "device")
        table = prof.key_averages().table(sort_by=sort_by, row_limit=20, max_name_column_width=60)
    res = {"what": what, "sort_by": sort_by, "warmup_s": round(warm_s, 4), "profiled_wall_ms": 1000 * wall_s,
           **launch_counts(events, bench.cuda), "modules": module_breakdown(events, bench.cuda),
           "table": table}
    if res.get("gpu_busy_ms") is not None:
        res["gpu_busy_fraction"] = res["gpu_busy_ms"] / res["profiled_wall_ms"]
    res["postprocess_s"] = round(time.monotonic() - post, 1)
    print(f"\n{what}, sorted by {sort_by}:\n{table}", flush=True)
    return res


# ---------------------------------------------------------------------------- profile analysis


def launch_counts(events: Any, cuda: bool) -> dict[str, Any]:
    """GPU kernels in the trace, the CPU-side launch calls behind them, and GPU busy time."""
    if not cuda:
        ops = [e for e in events if e.device_type == DeviceType.CPU and not _is_range(e.name)]
        return {"kernels": None, "launch_calls": None, "cpu_ops": len(ops), "gpu_busy_ms": None}
    device = [e for e in events if e.device_type == DeviceType.CUDA]
    kernels = [e for e in device if not e.name.startswith(("Memcpy", "Memset", "[memory]"))]
    launches = [e for e in events if e.device_type == DeviceType.CPU
                and ("LaunchKernel" in e.name or e.name.startswith("cuLaunch"))]
    return {"kernels": len(kernels), "launch_calls": len(launches), "device_events": len(device),
            "gpu_busy_ms": sum(_duration_us(e) for e in kernels) / 1000}


def _duration_us(e: Any) -> float:
    return float(e.time_range.end - e.time_range.start)


def _is_range(name: str) -> bool:
    return name.startswith((ModuleRanges.PREFIX, "bench::"))


# Module classes timed, by the label they are reported under; other direct children of the network
# (embed, norm, fuse, ...) are timed under their attribute name.
MODULE_LABELS = {"SpyNet": "spynet", "SWSA": "swsa", "Stage": "stage", "GSMBlock": "gsm_block",
                 "ImplicitAlign": "align", "BilinearAlign": "align", "BiMamba": "mamba",
                 "ScanDirection": "mamba_dir", "WindowFFN": "ffn", "Reconstruction": "recon"}
LABEL_NOTES = {
    "stage": "per-layer glue outside SWSA and the block (window stacking, write-back)",
    "gsm_block": "block glue outside align / mamba / ffn (gather/scatter warps, norms, residuals)",
    "mamba": "in/out projections, flips, sum of the two directions",
    "mamba_dir": "one scan direction: causal conv1d, x/dt projections, selective scan",
    "(outside modules)": "flows' sampling geometry, time flips, bilinear base, ...",
}


class ModuleRanges:
    """Per-module CUDA time, forward and backward, from profiler ranges opened by forward hooks.

    Forward pre / post hooks on the main submodules (MODULE_LABELS) open and close a
    `record_function` range `gsm::fwd:<label>`. The profiler ties each kernel to the CPU op that
    launched it; the innermost `gsm::` range around that op names the module of a forward kernel.
    Backward kernels run under autograd nodes (`AddmmBackward0`, ...) which carry the sequence
    number and thread of the forward op that created them: the node is matched to that op and
    inherits its module. Under grad checkpointing the block's forward runs again inside backward;
    the hooks fire again, see a backward graph task running, and open `gsm::recompute:<label>`
    instead, so recomputation is counted apart from forward and backward. Post hooks are
    always_call: non-reentrant checkpointing stops a recomputation early by raising, and the
    ranges must still close.

    Why not CUDA events in hooks, or full backward hooks: those add autograd nodes around module
    inputs and outputs (changing what is timed, failing on in-place ops), fire at recomputation
    as well as at backward, and misattribute the interleaved backward of checkpointed windows;
    here nothing enters the autograd graph. Times are kernel durations (GPU busy time, not wall
    time), summed per label over all calls (every stage and window), self time: a kernel counts
    for the innermost module only, so the rows add up to the total.
    """

    PREFIX = "gsm::"

    def __init__(self, model: torch.nn.Module) -> None:
        self.handles: list[Any] = []
        self.local = threading.local()
        for name, module in model.named_modules():
            label = MODULE_LABELS.get(type(module).__name__) or (name if name and "." not in name else None)
            if label is None:
                continue
            self.handles.append(module.register_forward_pre_hook(self._opener(label)))
            try:
                self.handles.append(module.register_forward_hook(self._close, always_call=True))
            except TypeError:  # torch without always_call
                self.handles.append(module.register_forward_hook(self._close))

    def _stack(self) -> list[tuple[int, Any]]:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def _opener(self, label: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            phase = "recompute" if _in_backward() else "fwd"
            rf = record_function(f"{self.PREFIX}{phase}:{label}")
            rf.__enter__()
            self._stack().append((id(module), rf))

        return hook

    def _close(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        stack = self._stack()
        while stack:  # pops ranges left open by a module that raised, up to this module's own
            owner, rf = stack.pop()
            rf.__exit__(None, None, None)
            if owner == id(module):
                break

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for _, rf in reversed(self._stack()):
            rf.__exit__(None, None, None)
        self._stack().clear()


def _in_backward() -> bool:
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # older torch: CUDA backward runs on autograd's own threads
        return threading.current_thread() is not threading.main_thread()


def module_breakdown(events: Any, cuda: bool) -> dict[str, Any]:
    """Self time (CUDA kernel time; CPU time on CPU) per module label and phase; see ModuleRanges."""
    cpu_events = [e for e in events if e.device_type == DeviceType.CPU and not getattr(e, "is_async", False)]

    def is_node(e: Any) -> bool:  # an autograd node (or the engine's wrapper around one)
        return getattr(e, "sequence_nr", -1) >= 0 and bool(getattr(e, "fwd_thread", 0))

    forward_ops: dict[tuple[int, int], Any] = {}
    by_seq: dict[int, set[int]] = defaultdict(set)
    for e in cpu_events:
        if getattr(e, "sequence_nr", -1) >= 0 and not is_node(e) and not _is_range(e.name):
            forward_ops.setdefault((e.thread, e.sequence_nr), e)
            by_seq[e.sequence_nr].add(e.thread)
    memo: dict[int, tuple[str, str] | None] = {}

    def own(e: Any) -> tuple[str, str] | None:
        name = e.name
        if name.startswith(ModuleRanges.PREFIX):
            phase, label = name[len(ModuleRanges.PREFIX):].split(":", 1)
            return label, "forward" if phase == "fwd" else "recompute"
        if name.startswith("bench::"):
            return name[len("bench::"):], "other"
        if "AccumulateGrad" in name:
            return "(grad accumulation)", "backward"
        if is_node(e):
            key = (e.fwd_thread, e.sequence_nr)
            if key not in forward_ops and len(by_seq.get(e.sequence_nr, ())) == 1:
                key = (next(iter(by_seq[e.sequence_nr])), e.sequence_nr)
            fwd_op = forward_ops.get(key)
            if fwd_op is None:
                return "(unmatched backward)", "backward"
            source = owner(fwd_op)
            return (source[0] if source else "(outside modules)"), "backward"
        return None

    def owner(e: Any) -> tuple[str, str] | None:
        chain, cur, found = [], e, None
        while cur is not None:
            if id(cur) in memo:
                found = memo[id(cur)]
                break
            found = own(cur)
            if found is not None:
                memo[id(cur)] = found
                break
            chain.append(cur)
            cur = getattr(cur, "cpu_parent", None)
        for c in chain:
            memo[id(c)] = found
        return found

    time_us: dict[tuple[str, str], float] = defaultdict(float)
    count: dict[tuple[str, str], int] = defaultdict(int)
    calls: dict[str, int] = defaultdict(int)
    for e in cpu_events:
        if e.name.startswith(ModuleRanges.PREFIX + "fwd:"):
            calls[e.name[len(ModuleRanges.PREFIX + "fwd:"):]] += 1
        if cuda:
            kernels = getattr(e, "kernels", None) or []
            if not kernels:
                continue
            spent, n = sum(float(k.duration) for k in kernels), len(kernels)
        else:
            spent, n = float(e.self_cpu_time_total), 1
        key = owner(e) or ("(outside modules)", "forward")  # loss / optimizer have bench:: ranges
        time_us[key] += spent
        count[key] += n
    total_us = (sum(_duration_us(e) for e in events if e.device_type == DeviceType.CUDA) if cuda
                else sum(float(e.self_cpu_time_total) for e in cpu_events))
    attributed_us = sum(time_us.values())
    phases = ("forward", "recompute", "backward", "other")
    rows = []
    for label in sorted({k[0] for k in time_us}, key=lambda lb: -sum(time_us[(lb, p)] for p in phases)):
        row: dict[str, Any] = {"module": label, "calls": calls.get(label, 0)}
        for p in phases:
            row[f"{p}_ms"] = time_us[(label, p)] / 1000
            row[f"{p}_n"] = count[(label, p)]
        row["total_ms"] = sum(time_us[(label, p)] for p in phases) / 1000
        row["share"] = row["total_ms"] * 1000 / attributed_us if attributed_us else 0.0
        rows.append(row)
    return {"unit": "CUDA kernel time" if cuda else "CPU self time", "rows": rows,
            "total_ms": total_us / 1000, "attributed_ms": attributed_us / 1000,
            "coverage": attributed_us / total_us if total_us else None,
            "phase_ms": {p: sum(time_us[(lb, q)] for lb, q in time_us if q == p) / 1000 for p in phases}}


# ------------------------------------------------------------------------------------- report


def environment(bench: Bench | None, args: argparse.Namespace, bench_error: str | None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "smoke": bool(args.smoke), "tqdm_stubbed": TQDM_STUBBED,
        "time_budget_s": args.time_budget,
        "packages": {p: _version(p) for p in ("mamba_ssm", "causal_conv1d", "triton", "numpy", "numba")},
        "git": _git(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        from gsm.io import cpu_name

        env["gpu"] = None
        env["cpu"] = cpu_name()
    env["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32,
                   "cudnn_benchmark": torch.backends.cudnn.benchmark}
    try:
        from gsm.ops.backend import causal_conv1d_available, mamba_ssm_available

        env["mamba_ssm_kernels"] = mamba_ssm_available()
        env["causal_conv1d_kernels"] = causal_conv1d_available()
    except Exception as err:
        env["kernel_probe_error"] = f"{type(err).__name__}: {err}"
    if bench is not None:
        env["device"] = str(bench.device)
        env["infer_shape"], env["train_shape"] = list(bench.infer_shape), list(bench.train_shape)
        env["scan_impl_auto"] = _resolved("auto", bench.device)
        env["config"] = bench.cfg.to_dict()
        env["loss"] = bench.loss_source
        try:
            from gsm.models.config import GSMConfig

            env["paper_params_M"] = sum(p.numel() for p in bench.build(GSMConfig(), "cpu").parameters()) / 1e6
        except Exception as err:
            env["paper_params_M"] = None
            env["model_error"] = f"{type(err).__name__}: {err}"
    if bench_error:
        env["setup_error"] = bench_error
    return env


def _version(dist: str) -> str | None:
    for name in (dist, dist.replace("_", "-")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _git() -> dict[str, Any] | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=5)
        if head.returncode:
            return None
        return {"commit": head.stdout.strip(), "changed_files": len(dirty.stdout.splitlines())}
    except Exception:
        return None


def summarize(sections: dict[str, dict[str, Any]], env: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets and the baseline beside this run's numbers."""
    t_train, side = env.get("train_shape") or (16, 64)
    t_inf, h, w = env.get("infer_shape") or (10, 180, 320)

    def value(section: str, key: str) -> Any:
        rec = sections.get(section, {})
        return rec.get(key) if rec.get("status") == "ok" else None

    def bound(section: str) -> bool:
        return bool(sections.get(section, {}).get("warmup_only"))

    train, torch_train = value("train_kernel", "s_per_iter"), value("train_torch", "s_per_iter")
    ratio: Any = torch_train / train if train and torch_train else None
    ratio_met = None if ratio is None else ratio <= TARGETS["torch_over_kernel"]
    cut = sections.get("train_torch", {})
    if ratio is None and train and cut.get("status") == "timeout":  # its first iteration was cut off
        lower = cut["elapsed_s"] / train
        ratio = f"> ~{lower:.0f} (torch iteration cut off after {cut['elapsed_s']:.0f} s)"
        ratio_met = False if lower > TARGETS["torch_over_kernel"] else None
    tests = sections.get("tests", {})
    tests_ok = None
    if tests.get("status") == "ok":
        tests_ok = tests.get("failed", 0) + tests.get("errors", 0) == 0 and tests.get("passed", 0) > 0 \
            and not tests.get("timed_out")
    rows = [
        (f"Training iteration (1 x {t_train} x {side}^2, bf16, grad ckpt), s", BASELINE["train_s_per_iter"], train,
         TARGETS["train_s_per_iter"], bound("train_kernel")),
        ("Training peak memory, GiB", BASELINE["train_peak_gib"], value("train_kernel", "peak_gib"), None, False),
        (f"Inference bf16 at {h}x{w} ({t_inf} frames), ms / frame", BASELINE["inference_bf16_ms_per_frame"],
         value("inference_bf16", "ms_per_frame"), TARGETS["inference_bf16_ms_per_frame"], bound("inference_bf16")),
        (f"Inference fp32 at {h}x{w} ({t_inf} frames), ms / frame", BASELINE["inference_fp32_ms_per_frame"],
         value("inference_fp32", "ms_per_frame"), None, bound("inference_fp32")),
        ("Inference peak memory (bf16 / fp32 max), GiB", BASELINE["inference_peak_gib"],
         max((v for v in (value("inference_bf16", "peak_gib"), value("inference_fp32", "peak_gib")) if v is not None),
             default=None), None, False),
        ("Torch-scan training / kernel training, x", None, ratio, TARGETS["torch_over_kernel"],
         bound("train_torch") or bound("train_kernel")),
    ]
    out = []
    for name, base, now, target, upper in rows:
        if isinstance(now, str):
            out.append({"metric": name, "baseline": base, "now": now, "target": target, "met": ratio_met,
                        "speedup_vs_baseline": None, "warmup_only": False})
            continue
        met = None if now is None or target is None else now <= target
        out.append({"metric": name, "baseline": base, "now": now, "target": target, "met": met,
                    "speedup_vs_baseline": base / now if base and now else None, "warmup_only": upper})
    out.append({"metric": "tests/test_cuda.py", "baseline": None,
                "now": f"{tests.get('passed', '?')} passed, {tests.get('failed', '?')} failed, "
                       f"{tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped"
                if tests.get("status") == "ok" else tests.get("status", "not run"),
                "target": "all pass", "met": tests_ok, "speedup_vs_baseline": None, "warmup_only": False})
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def render_md(result: dict[str, Any]) -> str:
    env, sections, smoke = result["environment"], result["sections"], result["environment"].get("smoke")
    pk = env.get("packages", {})
    git = env.get("git") or {}
    lines = ["# GSMamba on GPU: runtime report", ""]
    if smoke:
        lines += ["**Smoke run on CPU with a tiny network: the numbers say nothing about the GPU targets.**", ""]
    lines += [
        f"{env.get('gpu') or env.get('cpu')}, torch {env['torch']} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}), "
        f"Python {env['python']}. mamba-ssm {pk.get('mamba_ssm')} kernels: {env.get('mamba_ssm_kernels')}, "
        f"causal-conv1d {pk.get('causal_conv1d')} kernels: {env.get('causal_conv1d_kernels')}; "
        f"scan_impl 'auto' runs {env.get('scan_impl_auto')!r}. TF32 matmul {env['tf32']['matmul']}, "
        f"cuDNN TF32 {env['tf32']['cudnn']}.",
        f"Paper network GSMConfig(): {_fmt(env.get('paper_params_M'), 4)} M parameters. Loss: {env.get('loss')}.",
        f"{env['date']}, commit {git.get('commit', '?')[:12]} ({git.get('changed_files', '?')} files changed). "
        f"Command: `{env['command']}`",
        "",
        "## Targets",
        "",
        "| metric | baseline | now | target | met | vs baseline |",
        "|---|---:|---:|---:|:---:|---:|",
    ]
    for row in result["summary"]:
        now = _fmt(row["now"]) + (" (warm-up only: upper bound)" if row["warmup_only"] else "")
        met = {True: "met", False: "**not met**", None: "-"}[row["met"]]
        target = f"<= {_fmt(row['target'])}" if isinstance(row["target"], float) else _fmt(row["target"])
        speed = f"{row['speedup_vs_baseline']:.1f}x" if row["speedup_vs_baseline"] else "-"
        lines.append(f"| {row['metric']} | {_fmt(row['baseline'])} | {now} | {target} | {met} | {speed} |")
    lines += ["", "Baseline: the same H200 kind before this work (training 21.6 s / iteration at 14.5 GiB; "
              "inference 298 ms / frame bf16, 332 fp32, 11.5 GiB).", ""]

    inf = [(k, sections[k]) for k in ("inference_fp32", "inference_bf16") if sections.get(k, {}).get("status") == "ok"]
    if inf:
        lines += ["## Inference", "", "| precision | input | scan | ms / frame (median) | min | clip s | timed runs "
                  "| peak GiB |", "|---|---|---|---:|---:|---:|---:|---:|"]
        for _, r in inf:
            lines.append(f"| {r['precision']} | {'x'.join(map(str, r['input']))} | {r['scan_impl']} | "
                         f"{r['ms_per_frame']:.1f} | {r['ms_per_frame_min']:.1f} | {r['median_s']:.3f} | "
                         f"{r['timed_runs']}{' (warm-up only)' if r['warmup_only'] else ''} | {_fmt(r['peak_gib'])} |")
        lines.append("")
    tr = [(k, sections[k]) for k in ("train_kernel", "train_torch") if sections.get(k, {}).get("status") == "ok"]
    if tr:
        lines += ["## Training iteration", "", "| scan | input (GT) | s / iter (median) | min | timed runs | "
                  "warm-up s | peak GiB | loss |", "|---|---|---:|---:|---:|---|---:|---:|"]
        for _, r in tr:
            lines.append(f"| {r['scan_impl']} -> {r['scan_impl_resolved']} | {'x'.join(map(str, r['input']))} "
                         f"({'x'.join(map(str, r['gt'][-2:]))}) | {r['s_per_iter']:.3f} | {r['s_per_iter_min']:.3f} | "
                         f"{r['timed_runs']}{' (warm-up only)' if r['warmup_only'] else ''} | "
                         f"{', '.join(f'{t:.2f}' for t in r['warmup_s'])} | {_fmt(r['peak_gib'])} | "
                         f"{r['last_loss']:.4f} |")
        lines += ["", f"Batch 1, bf16 autocast, grad_checkpoint=True, {tr[0][1]['optimizer']}; {tr[0][1]['loss']}.",
                  ""]

    tests = sections.get("tests", {})
    if tests.get("status") == "ok":
        lines += ["## CUDA tests", "", f"`{tests['command']}`: {tests['passed']} passed, {tests['failed']} failed, "
                  f"{tests['errors']} errors, {tests['skipped']} skipped in {tests['pytest_s']} s"
                  f"{' (TIMED OUT)' if tests['timed_out'] else ''} (from {tests['source']}).", ""]
        for f in tests["failures"]:
            lines += [f"- {f['kind']}: `{f['test']}`: {f['message'].splitlines()[0] if f['message'] else ''}"]
        lines.append("")

    for key, title in (("profile_train", "One training iteration"), ("profile_infer", "One inference clip")):
        r = sections.get(key, {})
        if r.get("status") != "ok":
            continue
        m = r["modules"]
        unit, counted = ("ms of CPU self time", "ops") if smoke else ("ms of CUDA kernel time", "kernels")
        lines += [f"## Profile: {title.lower()}", "", f"{r['what']}. Profiled run {r['profiled_wall_ms']:.0f} ms wall"]
        if r.get("gpu_busy_ms") is not None:
            lines[-1] += (f", GPU busy {r['gpu_busy_ms']:.0f} ms ({100 * r['gpu_busy_fraction']:.0f} %), "
                          f"{r['kernels']} kernels from {r['launch_calls']} launch calls")
        else:
            lines[-1] += f", {r['cpu_ops']} CPU ops"
        lines[-1] += "."
        lines += ["", f"Per module type, self time ({unit}, all calls; {100 * (m['coverage'] or 0):.0f} % of the "
                  f"trace's total {m['total_ms']:.0f} ms attributed):", "",
                  f"| module | calls | forward | recompute | backward | other | total | share | {counted} f / r / b |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in m["rows"]:
            lines.append(f"| {row['module']} | {row['calls']} | {row['forward_ms']:.1f} | {row['recompute_ms']:.1f} | "
                         f"{row['backward_ms']:.1f} | {row['other_ms']:.1f} | {row['total_ms']:.1f} | "
                         f"{100 * row['share']:.1f} % | {row['forward_n']} / {row['recompute_n']} / "
                         f"{row['backward_n']} |")
        ph = m["phase_ms"]
        lines += [f"| **all** | | {ph['forward']:.1f} | {ph['recompute']:.1f} | {ph['backward']:.1f} | "
                  f"{ph['other']:.1f} | {m['attributed_ms']:.1f} | 100 % | |", ""]
        lines += [f"Top 20 ops by {r['sort_by']}:", "", "```", r["table"].rstrip(), "```", ""]
    lines += ["Module labels: " + "; ".join(f"{k}: {v}" for k, v in LABEL_NOTES.items()) + ".", ""]

    lines += ["## Sections", "", "| section | status | s | budget s | note |", "|---|---|---:|---:|---|"]
    for name, _ in PLAN:
        r = sections.get(name)
        if r is None:
            lines.append(f"| {name} | not reached | | | |")
            continue
        note = r.get("error", r.get("reason", ""))
        lines.append(f"| {name} | {r['status']} | {_fmt(r.get('elapsed_s'))} | {_fmt(r.get('budget_s'))} | "
                     f"{note.splitlines()[0][:200] if note else ''} |")
    lines.append("")
    for name, r in sections.items():
        if r.get("traceback"):
            lines += [f"`{name}` traceback:", "", "```", r["traceback"].rstrip(), "```", ""]
    if env.get("setup_error"):
        lines += ["Setup error:", "", "```", env["setup_error"], "```", ""]
    return "\n".join(lines)


def write_reports(result: dict[str, Any], json_path: Path, md_path: Path) -> None:
    result["summary"] = summarize(result["sections"], result["environment"])
    result["elapsed_s"] = round(time.monotonic() - T_START, 1)
    atomic_write_json(json_path, result)
    atomic_write_text(md_path, render_md(result))


# --------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """SIGALRM after `seconds`: raises SectionTimeout in the main thread at the next bytecode."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"cut off after {seconds:.0f} s (hard limit)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cleanup(bench: Bench | None) -> None:
    gc.collect()
    if bench is not None and bench.cuda:
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=10, help="frames of the inference clip (180x320)")
    ap.add_argument("--train-frames", type=int, default=16, help="frames of the training clip")
    ap.add_argument("--train-lr-size", type=int, default=64, help="LR side of the training patch (GT = 4x)")
    ap.add_argument("--profile-frames", type=int, default=4, help="frames of the profiled clips (fewer events)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (fewer if time runs out)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for gpu_runtime.json / .md, or the .json path (default reports/; smoke: a temp dir)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run tests/test_cuda.py")
    ap.add_argument("--skip", nargs="+", default=[], choices=[n for n, _ in PLAN], metavar="SECTION",
                    help="sections not to run (their budget goes to the others): " + ", ".join(n for n, _ in PLAN))
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for all sections together (default 270; smoke: 900, CPUs are slow)")
    ap.add_argument("--smoke", action="store_true", help="everything on CPU with a tiny network (no GPU needed)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    out = args.out or (Path(tempfile.mkdtemp(prefix="gsm-gpu-smoke-")) if args.smoke else REPO / "reports")
    json_path = out if out.suffix == ".json" else out / "gpu_runtime.json"
    md_path = json_path.with_suffix(".md")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/gpu.py needs a CUDA GPU (or --smoke for a CPU dry run)")
    # Matmuls in true fp32 as in the baseline measurement; bf16 autocast is unaffected.
    torch.backends.cuda.matmul.allow_tf32 = False

    def on_term(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    if args.time_budget is None:
        args.time_budget = 900.0 if args.smoke else 270.0
    deadline = T_START + args.time_budget
    bench, bench_error = None, None
    try:
        bench = make_bench(args)
    except Exception:
        bench_error = traceback.format_exc(limit=6)
    result: dict[str, Any] = {"environment": environment(bench, args, bench_error), "baseline": BASELINE,
                              "targets": TARGETS, "sections": {}}
    write_reports(result, json_path, md_path)
    print(f"reports: {json_path} and {md_path.name}", flush=True)

    runners: dict[str, Callable[[Bench, float], dict[str, Any]]] = {
        "tests": section_tests,
        "inference_fp32": lambda b, d: section_inference(b, d, None),
        "inference_bf16": lambda b, d: section_inference(b, d, torch.bfloat16),
        "train_kernel": lambda b, d: section_train(b, d, b.cfg.scan_impl, b.repeats, 2),
        "train_torch": lambda b, d: section_train(b, d, "torch", min(b.repeats, 2), 1),
        "profile_infer": lambda b, d: section_profile(b, d, "infer", args.profile_frames),
        "profile_train": lambda b, d: section_profile(b, d, "train", args.profile_frames),
    }
    code = 0
    skip = {n: f"--skip {n}" for n in args.skip} | ({"tests": "--skip-tests"} if args.skip_tests else {})
    plan = [(n, w) for n, w in PLAN if n not in skip]
    for name, reason in skip.items():
        result["sections"][name] = {"status": "skipped", "reason": reason, "budget_s": 0, "elapsed_s": 0}
    for i, (name, weight) in enumerate(plan):
        left = deadline - time.monotonic()
        budget = left * weight / sum(w for _, w in plan[i:])
        rec: dict[str, Any] = {"budget_s": round(budget, 1)}
        start = time.monotonic()
        if bench is None and name != "tests":
            rec.update(status="error", error="setup failed (see environment.setup_error)")
        elif budget < MIN_SECTION_S:
            rec.update(status="skipped", reason=f"time budget spent ({budget:.1f} s offered)")
        else:
            print(f"\n=== {name}: up to {budget:.0f} s", flush=True)
            torch.manual_seed(0)
            try:
                with hard_limit(budget + min(30.0, max(10.0, 0.25 * budget))):
                    rec.update(runners[name](bench, start + budget))
                rec["status"] = "ok"
            except SectionTimeout as err:
                rec.update(status="timeout", error=str(err))
            except Terminated as err:
                rec.update(status="terminated", error=str(err))
                code = 143
            except Exception as err:
                rec.update(status="error", error=f"{type(err).__name__}: {err}"[:2000],
                           traceback=traceback.format_exc(limit=-8)[-4000:])
            cleanup(bench)
        rec["elapsed_s"] = round(time.monotonic() - start, 1)
        result["sections"][name] = rec
        write_reports(result, json_path, md_path)
        brief = {k: rec[k] for k in ("ms_per_frame", "s_per_iter", "peak_gib", "passed", "failed", "skipped",
                                     "kernels", "launch_calls", "error", "reason") if rec.get(k) is not None}
        print(f"=== {name}: {rec['status']} in {rec['elapsed_s']} s {json.dumps(brief, default=str)[:600]}", flush=True)
        if code:
            break

    md = render_md(result)
    print("\n" + md, flush=True)
    print("\n=== summary (also in the report's Targets table)")
    for row in result["summary"]:
        print(f"  {row['metric']}: {_fmt(row['now'])} (baseline {_fmt(row['baseline'])}, target "
              f"{_fmt(row['target'])}, met: {row['met']})")
    states = ", ".join(f"{k}={v['status']}" for k, v in result["sections"].items())
    print(f"  sections: {states}; {time.monotonic() - T_START:.0f} s in all; reports: {json_path}, {md_path}",
          flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
