"""Training-step speed of this tree against a baseline git ref, side by side in one run.

    .venv/bin/python benchmarks/train_speed.py [--baseline 9c91cb1] [--repeats 6] [--rounds 3]
        [--frames 4] [--size 24] [--batch 1] [--threads N] [--config paper|params|tiny] [--out reports]

The baseline is checked out as a temporary `git worktree` (removed afterwards, also on error or
Ctrl-C); `--baseline none` measures this tree alone. Both trees run the SAME measurement code (this
file) in child processes of the same interpreter, each with its tree's root first on sys.path, so
`import gsm` resolves to that tree (checked: the result records gsm.__file__).

One training step: forward of GSMamba on a (batch, frames, 3, size, size) clip, Charbonnier loss
against a (batch, frames, 3, 4*size, 4*size) target, backward, Adam step. Per tree:

- step time: median over `--repeats` timed steps, spread over `--rounds` child processes per tree
  that alternate between the trees in ABBA order (baseline, current, current, baseline, ...), so
  drift and noise of a shared machine fall on both. Every child first runs one untimed warm-up
  step (numba compilation, allocator and oneDNN caches).
- aten op counts of one forward + backward, taken in the first round with a TorchDispatchMode
  after the warm-up step (never during timed steps). Every aten call below autograd is counted and
  classified: views (aliasing schema: view, t, transpose, unbind, detach, ...), metadata ops
  that launch no kernel (empty*, _unsafe_view, set_, resize_, size/stride queries), and
  kernel-launching ops (the rest). Ops a kernel runs inside itself (clone's copy_, conv2d's
  mkldnn call) are not seen, so each counted op is one dispatch, roughly one GPU launch; the torch
  profiler, which records nested calls too, gives larger numbers. The Adam step is counted apart.

Writes <out>/train_speed.json and <out>/train_speed.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
DEFAULT_BASELINE = "9c91cb1"  # the commit before the training-speed work
TOP_OPS = 15
# The target this benchmark supports, for the paper network on a 1 x 4 x 3 x 24 x 24 clip.
TARGET = {"config": "paper", "batch": 1, "frames": 4, "size": 24,
          "kernel_ops_ratio_max": 0.25, "step_time_ratio_max": 1.0}
# A network small enough for the tests: same structure as the paper's.
TINY = {"embed_dim": 8, "num_heads": 2, "prop_layers": 1, "attn_depth": 1, "window": 3, "d_state": 4,
        "expand": 1, "ffn_ratio": 1, "mid_channels": 8}

# ----------------------------------------------------------------------------- op counting

# Ops that return a fresh tensor but launch no kernel: allocation without a fill, reinterpretation
# of an existing buffer, and metadata queries. Matched by name without the overload.
NO_KERNEL_OPS = frozenset({
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
    "aten::new_empty_strided", "aten::_unsafe_view", "aten::set_", "aten::resize_",
    "aten::resize_as_", "aten::size", "aten::stride", "aten::sym_size", "aten::sym_stride",
    "aten::sym_numel", "aten::sym_storage_offset", "aten::is_contiguous", "aten::is_same_size",
    "aten::_has_compatible_shallow_copy_type", "aten::_reshape_alias", "aten::result_type",
    "aten::is_strides_like_format", "aten::is_non_overlapping_and_dense",
})
KINDS = ("kernel", "view", "meta")


def op_kind(func: Any) -> str:
    """'view' (output aliases an input, not written), 'meta' (no kernel) or 'kernel'."""
    if getattr(func, "is_view", False):
        return "view"
    schema = func._schema
    if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
        return "view"
    if schema.name in NO_KERNEL_OPS:
        return "meta"
    return "kernel"


class OpCounter(TorchDispatchMode):
    """Counts every aten op call while active; passes each call through unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.kinds: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func)  # e.g. aten.add.Tensor
        self.counts[name] += 1
        if name not in self.kinds:
            self.kinds[name] = op_kind(func)
        return func(*args, **(kwargs or {}))

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for name, n in self.counts.items():
            out[self.kinds[name]] += n
        return out

    def summary(self) -> dict[str, Any]:
        return {**self.totals(), "total": sum(self.counts.values()),
                "per_op": {name: {"kind": self.kinds[name], "count": n}
                           for name, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))}}


# ----------------------------------------------------------------------------- worker (child)


def charbonnier(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return torch.sqrt((x - y) ** 2 + eps).mean()


def run_worker(a: argparse.Namespace) -> dict[str, Any]:
    """Build the tree's GSMamba, warm up, optionally count ops, time `a.steps` training steps."""
    tree = Path(a.tree).resolve()
    sys.path.insert(0, str(tree))
    if a.threads:
        with contextlib.suppress(ImportError):
            import numba  # first: launching its threading layer can reset OpenMP's thread count
            numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
        torch.set_num_threads(a.threads)
    import gsm
    from gsm.models.config import GSMConfig
    from gsm.models.gsmamba import GSMamba

    gsm_file = Path(gsm.__file__).resolve()
    if tree not in gsm_file.parents:
        raise RuntimeError(f"import gsm resolved to {gsm_file}, not into the tree {tree}")
    requested = json.loads(a.model_json)
    known = set(GSMConfig.__dataclass_fields__)
    ignored = sorted(k for k in requested if k not in known)
    cfg = GSMConfig(**{k: v for k, v in requested.items() if k in known})

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GSMamba(cfg)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)  # inputs do not depend on how the tree's init draws
    lq = torch.rand(a.batch, a.frames, 3, a.size, a.size, generator=gen)
    gt = torch.rand(a.batch, a.frames, 3, 4 * a.size, 4 * a.size, generator=gen)

    def step(fwd_bwd: contextlib.AbstractContextManager[Any] | None = None,
             optim: contextlib.AbstractContextManager[Any] | None = None) -> float:
        opt.zero_grad(set_to_none=True)
        with fwd_bwd or contextlib.nullcontext():
            loss = charbonnier(model(lq), gt)
            loss.backward()
        with optim or contextlib.nullcontext():
            opt.step()
        return loss.item()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = {"warmup": step()}
        counts = None
        if a.count:
            fb, op = OpCounter(), OpCounter()
            losses["counted"] = step(fb, op)
            counts = {"forward_backward": fb.summary(), "optimizer": op.summary()}
        times, timed_losses = [], []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            timed_losses.append(step())
            times.append(time.perf_counter() - t0)
    try:
        import numba
        numba_info = {"version": numba.__version__, "threads": numba.get_num_threads()}
    except ImportError:
        numba_info = None
    from gsm.ops.backend import resolve_impl
    return {
        "tree": str(tree), "gsm_file": str(gsm_file), "config": cfg.to_dict(), "ignored_keys": ignored,
        "scan_impl": resolve_impl(cfg.scan_impl, lq.device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "losses": {**losses, "timed": timed_losses}, "step_s": times, "ops": counts,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "numba": numba_info,
    }


# ----------------------------------------------------------------------------- orchestration


class BenchError(Exception):
    """A one-line error for the user."""


def git(*args: str, cwd: Path = ROOT) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except OSError as exc:
        raise BenchError(f"cannot run git: {exc}") from None
    if proc.returncode:
        msg = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise BenchError(f"git {' '.join(args)}: {msg}")
    return proc.stdout.strip()


def resolve_ref(ref: str) -> str:
    try:
        return git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except BenchError:
        raise BenchError(f"unknown git ref {ref!r} (--baseline)") from None


@contextlib.contextmanager
def baseline_worktree(commit: str):  # type: ignore[no-untyped-def]
    """A detached worktree of `commit` in a temporary folder, removed on exit whatever happens."""
    tmp = Path(tempfile.mkdtemp(prefix="gsm-train-speed-"))
    path = tmp / "baseline"
    try:
        git("worktree", "add", "--detach", "--quiet", str(path), commit)
        yield path
    finally:
        with contextlib.suppress(BenchError):
            git("worktree", "remove", "--force", str(path))
        with contextlib.suppress(BenchError):
            git("worktree", "prune")
        shutil.rmtree(tmp, ignore_errors=True)


def model_request(config: str) -> dict[str, Any]:
    """The GSMConfig fields both trees build: this tree's resolved configuration."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from gsm.models.config import GSMConfig

    if config == "paper":
        return GSMConfig().to_dict()
    if config == "tiny":
        return GSMConfig(**TINY).to_dict()
    from gsm.params import load_params
    try:
        return load_params(ROOT / "params.yaml").model.to_dict()
    except (OSError, ValueError) as exc:
        raise BenchError(str(exc)) from None


def run_child(tree: Path, a: argparse.Namespace, model: dict[str, Any], steps: int, count: bool,
              workdir: Path) -> dict[str, Any]:
    result = workdir / "result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(SCRIPT), "--worker", "--tree", str(tree), "--result", str(result),
           "--model-json", json.dumps(model), "--steps", str(steps), "--batch", str(a.batch),
           "--frames", str(a.frames), "--size", str(a.size)]
    cmd += (["--count"] if count else []) + (["--threads", str(a.threads)] if a.threads else [])
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    if proc.returncode or not result.is_file():
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise BenchError(f"measurement in {tree} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return json.loads(result.read_text())


def split_steps(repeats: int, rounds: int) -> list[int]:
    rounds = min(rounds, repeats)
    return [repeats // rounds + (i < repeats % rounds) for i in range(rounds)]


def measure(trees: dict[str, Path], a: argparse.Namespace, model: dict[str, Any],
            log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    per_round = split_steps(a.repeats, a.rounds)
    labels = list(trees)
    out: dict[str, dict[str, Any]] = {label: {"step_s": [], "rounds": []} for label in labels}
    with tempfile.TemporaryDirectory(prefix="gsm-train-speed-result-") as tmp:
        for r, steps in enumerate(per_round):
            order = labels if r % 2 == 0 else labels[::-1]  # ABBA: linear drift hits both alike
            for label in order:
                load = os.getloadavg()[0]  # others' work on a shared machine: read beside the times
                res = run_child(trees[label], a, model, steps, count=(r == 0), workdir=Path(tmp))
                if r == 0:
                    out[label].update({k: v for k, v in res.items() if k != "step_s"})
                out[label]["step_s"] += res["step_s"]
                out[label]["rounds"].append({"round": r + 1, "step_s": res["step_s"],
                                             "losses": res["losses"], "load_before": load,
                                             "load_after": os.getloadavg()[0]})
                log(f"round {r + 1}/{len(per_round)} {label:8s} "
                    + " ".join(f"{s:.3f}" for s in res["step_s"]) + f" s/step (load {load:.1f})")
    for rec in out.values():
        rec["step_s_median"] = statistics.median(rec["step_s"])
        rec["step_s_min"] = min(rec["step_s"])
    return out


def ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def build_report(a: argparse.Namespace, argv: list[str], trees: dict[str, dict[str, Any]],
                 refs: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    for rec in trees.values():
        fb = rec["ops"]["forward_backward"]
        fb["top"] = list(fb["per_op"].items())[:TOP_OPS]
    report: dict[str, Any] = {
        "command": " ".join(shlex.quote(x) for x in [Path(sys.executable).name, *argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__,
        "config": a.config, "model": model,
        "input": {"batch": a.batch, "frames": a.frames, "channels": 3, "size": a.size},
        "repeats": a.repeats, "rounds": len(split_steps(a.repeats, a.rounds)),
        "refs": refs, "trees": trees,
    }
    if "baseline" in trees:
        cur, base = trees["current"], trees["baseline"]
        kc, kb = cur["ops"]["forward_backward"]["kernel"], base["ops"]["forward_backward"]["kernel"]
        report["comparison"] = {
            "step_time_ratio": ratio(cur["step_s_median"], base["step_s_median"]),
            "min_step_time_ratio": ratio(cur["step_s_min"], base["step_s_min"]),
            "kernel_ops_ratio": ratio(kc, kb),
            "optimizer_kernel_ops_ratio": ratio(cur["ops"]["optimizer"]["kernel"],
                                                base["ops"]["optimizer"]["kernel"]),
        }
        keys = ("config", "batch", "frames", "size")
        applies = (a.config, a.batch, a.frames, a.size) == tuple(TARGET[k] for k in keys)
        comp = report["comparison"]
        report["target"] = {
            **TARGET, "applies": applies,
            "kernel_ops_met": comp["kernel_ops_ratio"] is not None
            and comp["kernel_ops_ratio"] <= TARGET["kernel_ops_ratio_max"],
            "step_time_met": comp["step_time_ratio"] is not None
            and comp["step_time_ratio"] <= TARGET["step_time_ratio_max"],
        }
    return report


def _cpu_name() -> str:
    from gsm.io import cpu_name
    return cpu_name()


def markdown(rep: dict[str, Any]) -> str:
    trees = rep["trees"]
    labels = list(trees)
    inp = rep["input"]
    lines = [
        "# Training-step speed" + (": this tree vs a baseline" if "comparison" in rep else ""), "",
        f"`{rep['command']}`, {rep['date']}", "",
        f"{rep['cpu']}; torch {rep['torch']}, python {rep['python']}. "
        f"Config `{rep['config']}`, input "
        f"{inp['batch']} x {inp['frames']} x 3 x {inp['size']} x {inp['size']}; "
        f"one step = forward, Charbonnier, backward, Adam. {rep['repeats']} timed steps per tree over "
        f"{rep['rounds']} alternating child process(es) each, after one warm-up step per process.", "",
    ]
    for label in labels:
        ref = rep["refs"][label]
        lines.append(f"- {label}: {ref['commit'][:12]}{' + uncommitted changes' if ref.get('dirty') else ''}"
                     f" ({ref['name']}), gsm from `{trees[label]['gsm_file']}`")
    lines += ["", "| | " + " | ".join(labels) + (" | current / baseline |" if "comparison" in rep else " |"),
              "|---|" + "---:|" * (len(labels) + ("comparison" in rep))]

    def row(name: str, values: list[str], comp: str = "") -> None:
        lines.append(f"| {name} | " + " | ".join(values) + (f" | {comp} |" if "comparison" in rep else " |"))

    def fmt_ratio(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    comp = rep.get("comparison", {})
    fb = {k: trees[k]["ops"]["forward_backward"] for k in labels}
    opt = {k: trees[k]["ops"]["optimizer"] for k in labels}
    row("median s/step", [f"{trees[k]['step_s_median']:.3f}" for k in labels],
        fmt_ratio(comp.get("step_time_ratio")))
    row("min s/step", [f"{trees[k]['step_s_min']:.3f}" for k in labels],
        fmt_ratio(comp.get("min_step_time_ratio")))
    row("kernel-launching ops, fwd+bwd", [f"{fb[k]['kernel']:,}" for k in labels],
        fmt_ratio(comp.get("kernel_ops_ratio")))
    row("view ops, fwd+bwd", [f"{fb[k]['view']:,}" for k in labels])
    row("metadata ops, fwd+bwd", [f"{fb[k]['meta']:,}" for k in labels])
    row("all aten ops, fwd+bwd", [f"{fb[k]['total']:,}" for k in labels])
    row("kernel-launching ops, Adam step", [f"{opt[k]['kernel']:,}" for k in labels],
        fmt_ratio(comp.get("optimizer_kernel_ops_ratio")))
    row("loss (warm-up step)", [f"{trees[k]['losses']['warmup']:.6f}" for k in labels])
    row("parameters", [f"{trees[k]['parameters']:,}" for k in labels])
    row("scan", [trees[k]["scan_impl"] for k in labels])
    row("torch threads", [str(trees[k]["torch_threads"]) for k in labels])
    row("numba", [f"{trees[k]['numba']['version']} ({trees[k]['numba']['threads']} threads)"
                  if trees[k]["numba"] else "not installed" for k in labels])
    if "target" in rep:
        t = rep["target"]
        lines += ["", f"Target (paper network, 1 x 4 x 3 x 24 x 24): kernel-launching ops <= "
                  f"{t['kernel_ops_ratio_max']} x baseline: {'met' if t['kernel_ops_met'] else 'not met'}; "
                  f"step time <= baseline: {'met' if t['step_time_met'] else 'not met'}"
                  + ("" if t["applies"] else " (this run's config/input differ from the target's)") + "."]
    for k in labels:
        ignored = trees[k]["ignored_keys"]
        if ignored:
            lines += ["", f"{k}: GSMConfig there lacks {', '.join(ignored)}; built without them."]
    lines += ["", f"Top {TOP_OPS} aten ops per tree (forward + backward):", ""]
    for k in labels:
        lines += [f"{k}:", "", "| op | kind | count |", "|---|---|---:|"]
        lines += [f"| `{name}` | {v['kind']} | {v['count']:,} |" for name, v in fb[k]["top"]]
        lines.append("")
    lines += [f"Per-step times (s), per child process, with the 1-minute load average before it "
              f"({os.cpu_count()} CPUs; a load above that means other work shared the machine):", ""]
    for k in labels:
        lines.append(f"- {k}: " + "; ".join(
            ", ".join(f"{s:.3f}" for s in rnd["step_s"]) + f" (load {rnd['load_before']:.1f})"
            for rnd in trees[k]["rounds"]))
    return "\n".join(lines) + "\n"


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=DEFAULT_BASELINE,
                    help=f"git ref to compare with (default {DEFAULT_BASELINE}); 'none': this tree only")
    ap.add_argument("--repeats", type=positive, default=6, help="timed steps per tree (default 6)")
    ap.add_argument("--rounds", type=positive, default=3,
                    help="child processes per tree, alternating between trees (default 3)")
    ap.add_argument("--frames", type=positive, default=4)
    ap.add_argument("--size", type=positive, default=24, help="LR side; the target is 4x")
    ap.add_argument("--batch", type=positive, default=1)
    ap.add_argument("--threads", type=positive, default=None,
                    help="torch and numba threads in each measurement (default: theirs, one per core); "
                    "on a machine shared with other work, 1 avoids OpenMP oversubscription stalls")
    ap.add_argument("--config", choices=("paper", "params", "tiny"), default="paper",
                    help="paper: GSMConfig defaults; params: params.yaml's model; tiny: for tests")
    ap.add_argument("--out", type=Path, default=ROOT / "reports")
    # Internal: one measurement in one tree.
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model-json", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.frames < 2:
        ap.error("--frames must be >= 2 (flows are computed between neighbours)")
    return a


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.worker:
        res = run_worker(a)
        tmp = a.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(res))
        os.replace(tmp, a.result)
        return 0

    signal.signal(signal.SIGTERM, _sigterm)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if a.out.exists() and not a.out.is_dir():
            raise BenchError(f"--out {a.out} exists and is not a folder")
        model = model_request(a.config)
        head = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        refs: dict[str, Any] = {"current": {"name": "working tree", "path": str(ROOT), "commit": head,
                                            "dirty": dirty}}
        with contextlib.ExitStack() as stack:
            trees: dict[str, Path] = {}
            if a.baseline.lower() != "none":
                commit = resolve_ref(a.baseline)
                path = stack.enter_context(baseline_worktree(commit))
                trees["baseline"] = path
                refs["baseline"] = {"name": a.baseline, "commit": commit, "dirty": False}
                log(f"baseline {a.baseline} = {commit[:12]} checked out in {path}")
            trees["current"] = ROOT
            results = measure(trees, a, model, log)
        report = build_report(a, ["benchmarks/train_speed.py", *argv], results, refs, model)
        from gsm.io import atomic_write_json, atomic_write_text
        try:
            atomic_write_json(a.out / "train_speed.json", report)
            atomic_write_text(a.out / "train_speed.md", markdown(report))
        except OSError as exc:
            raise BenchError(f"cannot write to {a.out}: {exc}") from None
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted" + ("; baseline worktree removed" if a.baseline.lower() != "none" else ""),
              file=sys.stderr)
        return 130
    fb = {k: v["ops"]["forward_backward"] for k, v in results.items()}
    for k, v in results.items():
        log(f"{k:8s} median {v['step_s_median']:.3f} s/step, {fb[k]['kernel']:,} kernel-launching ops "
            f"({fb[k]['view']:,} views, {fb[k]['meta']:,} metadata) per forward+backward")
    if "comparison" in report:
        c = report["comparison"]
        log(f"current / baseline: step time {c['step_time_ratio']:.3f} (median), "
            f"{c['min_step_time_ratio']:.3f} (min); kernel-launching ops {c['kernel_ops_ratio']:.3f}")
    log(f"wrote {a.out / 'train_speed.json'} and {a.out / 'train_speed.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
