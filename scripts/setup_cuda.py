#!/usr/bin/env python3
"""Install the `cuda` extra's kernels (mamba-ssm, causal-conv1d) without the all-GPU build.

Why this exists: both projects ship sources only on PyPI, and their setup.py hard-codes nvcc
`-gencode` flags for about nine GPU architectures (ignoring TORCH_CUDA_ARCH_LIST), so a plain
`pip install` compiles for a long time. This script

1. picks the architectures: `--archs`, else $GSM_CUDA_ARCHS, else those of the visible GPUs;
2. gets the sdists pinned in pyproject.toml's `cuda` extra (`pip download`, or `--sdist-dir`);
3. unpacks them under build/cuda-kernels/ and rewrites setup.py's gencode list to exactly
   `arch=compute_XY,code=sm_XY` per chosen architecture (no PTX: a GPU of another architecture
   needs a rebuild; binaries still run on later minor versions of the same major one);
4. pip-installs each one, letting its setup.py fetch the project's prebuilt wheel from GitHub
   first (unless `--force-build`) and compile for the chosen architectures only when none
   matches this torch / CUDA / Python;
5. installs their runtime dependencies (torch held at its installed version) and checks that
   the kernels import and, on each kind of visible GPU, match a reference on a tiny input.

Reruns skip the work when the pinned versions are installed, cover the requested architectures
and pass the check (`--reinstall` to redo it). Errors are one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUILD_DIR = ROOT / "build" / "cuda-kernels"
EXTRA = "cuda"
MIN_ARCH = (7, 5)  # the oldest architecture in the projects' own gencode lists
# Their setup.py downloads the prebuilt wheel with urllib.request.urlretrieve: no timeout, and
# only HTTPError (no such wheel) falls back to compiling. Offline, it fails with a URLError
# (DNS) or hangs until the TCP connect gives up (minutes). So this reachability probe, with a
# timeout, decides first whether the download is tried at all.
PROBE_URL = "https://github.com"
PROBE_TIMEOUT_S = 10.0

Arch = tuple[int, int]


class SetupError(Exception):
    """A failure reported as one line: bad input, a missing prerequisite or a failed step."""


@dataclass(frozen=True)
class Kernel:
    """What this script knows of one kernel package: its env-var prefix and what to import."""

    env_prefix: str  # <prefix>_FORCE_BUILD, <prefix>_SKIP_CUDA_BUILD in its setup.py
    extension: str  # the compiled module
    module: str  # the Python module the project imports


KERNELS: dict[str, Kernel] = {
    "mamba-ssm": Kernel("MAMBA", "selective_scan_cuda", "mamba_ssm.ops.selective_scan_interface"),
    "causal-conv1d": Kernel("CAUSAL_CONV1D", "causal_conv1d_cuda", "causal_conv1d"),
}


def normalize(name: str) -> str:
    """PEP 503 project name, so `causal_conv1d` and `Causal-Conv1d` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def log(message: str) -> None:
    """Progress on stdout, flushed so it interleaves with pip's output in logs."""
    print(f"setup_cuda: {message}", flush=True)


# --- architectures -------------------------------------------------------------------------


def parse_archs(spec: str, source: str) -> list[Arch]:
    """`8.0,9.0` or `80 90` as sorted unique (major, minor); errors name `source`."""
    items = [item for item in re.split(r"[,;\s]+", spec.strip()) if item]
    if not items:
        raise SetupError(f"{source}: empty architecture list (expected e.g. 8.0,9.0)")
    archs: set[Arch] = set()
    for item in items:
        m = re.fullmatch(r"(\d{1,2})\.(\d)", item) or re.fullmatch(r"(\d{1,2})(\d)", item)
        if m is None:
            raise SetupError(f"{source}: {item!r} is not a compute capability "
                             "(expected e.g. 8.0,9.0 or 80,90)")
        arch = (int(m.group(1)), int(m.group(2)))
        if arch < MIN_ARCH:
            raise SetupError(f"{source}: {item} is older than {fmt_arch(MIN_ARCH)}, "
                             "the oldest the kernels support")
        archs.add(arch)
    return sorted(archs)


def fmt_arch(arch: Arch) -> str:
    """(9, 0) -> "9.0"."""
    return f"{arch[0]}.{arch[1]}"


def sm(arch: Arch) -> str:
    """(9, 0) -> "90", the digits nvcc's compute_/sm_ names use."""
    return f"{arch[0]}{arch[1]}"


def requested_archs(cli: str | None, env: str | None) -> list[Arch] | None:
    """The user's list (`--archs` wins over $GSM_CUDA_ARCHS), or None to use the GPUs'."""
    if cli is not None:
        return parse_archs(cli, "--archs")
    if env:
        return parse_archs(env, "GSM_CUDA_ARCHS")
    return None


def visible_gpus() -> list[tuple[int, str, Arch]]:
    """(index, name, compute capability) of each GPU torch sees; empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [(i, torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
            for i in range(torch.cuda.device_count())]


# --- pins and sdists -----------------------------------------------------------------------


def read_pins(pyproject: Path, extra: str = EXTRA) -> list[tuple[str, str]]:
    """(name, version) of each `name==version` in the optional-dependency group `extra`.

    Exact pins only: the build patches one known setup.py, so a range would be a surprise.
    """
    try:
        data = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SetupError(f"cannot read {pyproject}: {e}") from None
    reqs = data.get("project", {}).get("optional-dependencies", {}).get(extra)
    if not reqs:
        raise SetupError(f"{pyproject}: no [project.optional-dependencies] {extra} list")
    pins = []
    for req in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*", req)
        if m is None:
            raise SetupError(f"{pyproject}: {extra} extra: {req!r} is not an exact name==version pin")
        pins.append((m.group(1), m.group(2)))
    return pins


def find_sdist(directory: Path, name: str, version: str) -> Path:
    """The `name-version.tar.gz` in `directory`, whatever the name's separators and case."""
    for path in sorted(directory.glob("*.tar.gz")):
        dist, _, ver = path.name[: -len(".tar.gz")].rpartition("-")
        if normalize(dist) == normalize(name) and ver == version:
            return path
    raise SetupError(f"no sdist of {name}=={version} in {directory} (expected e.g. "
                     f"{name.replace('-', '_')}-{version}.tar.gz)")


def skip_build_env(names: list[str]) -> dict[str, str]:
    """Env so that preparing the packages' metadata does not compile (or need nvcc)."""
    env = dict(os.environ)
    for name in names:
        env[f"{KERNELS[normalize(name)].env_prefix}_SKIP_CUDA_BUILD"] = "TRUE"
    return env


def get_sdists(pins: list[tuple[str, str]], sdist_dir: Path | None, build_dir: Path) -> list[Path]:
    """The pinned sdists: from `sdist_dir`, else from build_dir/sdists (downloaded once)."""
    if sdist_dir is not None:
        if not sdist_dir.is_dir():
            raise SetupError(f"--sdist-dir: {sdist_dir} is not a directory")
        return [find_sdist(sdist_dir, n, v) for n, v in pins]
    cache = build_dir / "sdists"
    cache.mkdir(parents=True, exist_ok=True)
    missing = []
    for n, v in pins:
        try:
            find_sdist(cache, n, v)
        except SetupError:
            missing.append(f"{n}=={v}")
    if missing:
        log(f"downloading the sdists of {', '.join(missing)} into {rel(cache)}")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
               ":all:", "--no-build-isolation", "--dest", str(cache), *missing]
        # pip prepares metadata, which runs setup.py: without SKIP_CUDA_BUILD it would compile.
        if subprocess.run(cmd, check=False, env=skip_build_env([n for n, _ in pins])).returncode != 0:
            raise SetupError("pip download of the sdists failed (offline? use --sdist-dir DIR)")
    return [find_sdist(cache, n, v) for n, v in pins]


def extract(sdist: Path, dest: Path) -> Path:
    """Unpack `sdist` afresh under `dest`; returns its single top-level directory."""
    with tarfile.open(sdist) as tar:
        tops = {Path(m.name).parts[0] for m in tar.getmembers() if m.name not in ("", ".")}
        if len(tops) != 1:
            raise SetupError(f"{sdist.name}: expected one top-level directory, found {sorted(tops)}")
        top = dest / tops.pop()
        shutil.rmtree(top, ignore_errors=True)
        dest.mkdir(parents=True, exist_ok=True)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.11.4: no filters; the archive comes from PyPI or the user
            tar.extractall(dest)
    if not (top / "setup.py").is_file():
        raise SetupError(f"{sdist.name}: no setup.py in {top.name}/")
    return top


# --- the gencode rewrite -------------------------------------------------------------------

_GENCODE = re.compile(r'\s*cc_flag\.append\(\s*"-gencode"\s*\)\s*')
_ARCH_FLAG = re.compile(r'\s*cc_flag\.append\(\s*"arch=compute_\w+,code=\w+"\s*\)\s*')
_MARKER = "# gencode list rewritten by gsm's scripts/setup_cuda.py"
_GUARD = re.compile(r'\s*if\s+bare_metal_version\s*>=\s*Version\(\s*"[\d.]+"\s*\)\s*:\s*')


def rewrite_gencode(text: str, archs: list[Arch], where: str = "setup.py") -> str:
    """`text` with its gencode block replaced by exactly `archs` (SASS only).

    The block is the run of `cc_flag.append("-gencode")` / `cc_flag.append("arch=...")` lines
    and their `if bare_metal_version >= Version(...)` guards. Anything else in or around it, or
    a gencode flag elsewhere, is an error: a new upstream version must fail here, loudly, rather
    than quietly build for every architecture again.
    """
    if not archs:
        raise SetupError("no architectures to build for")
    lines = text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines)
            if _GENCODE.fullmatch(line) or _ARCH_FLAG.fullmatch(line)]
    if not hits:
        raise SetupError(f'{where}: the cc_flag.append("-gencode") list was not found '
                         "(new upstream layout? update scripts/setup_cuda.py)")
    first, last = hits[0], hits[-1]
    if first > 0 and lines[first - 1].strip() == _MARKER:  # rewritten before: replace the note too
        first -= 1
    indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
    gencodes = flags = 0
    for i in range(first, last + 1):
        line = lines[i]
        stripped = line.strip()
        if _GENCODE.fullmatch(line):
            gencodes += 1
        elif _ARCH_FLAG.fullmatch(line):
            flags += 1
        elif stripped and not stripped.startswith("#") and not _GUARD.fullmatch(line):
            raise SetupError(f"{where}:{i + 1}: unexpected line inside the gencode list: "
                             f"{stripped!r} (update scripts/setup_cuda.py)")
        if stripped and not line.startswith(indent):
            raise SetupError(f"{where}:{i + 1}: the gencode list is not one block "
                             "(update scripts/setup_cuda.py)")
    if gencodes != flags:
        raise SetupError(f"{where}: {gencodes} -gencode flags but {flags} arch values "
                         "(update scripts/setup_cuda.py)")
    before = next((lines[i].strip() for i in range(first - 1, -1, -1)
                   if lines[i].strip() and not lines[i].strip().startswith("#")), "")
    if before.endswith(":"):
        raise SetupError(f"{where}:{first + 1}: the gencode list opens a conditional block "
                         f"({before!r}; update scripts/setup_cuda.py)")
    for i, line in enumerate(lines):
        if (i < first or i > last) and ("-gencode" in line or "arch=compute_" in line):
            raise SetupError(f"{where}:{i + 1}: a gencode flag outside the list: "
                             f"{line.strip()!r} (update scripts/setup_cuda.py)")
    eol = "\r\n" if lines[first].endswith("\r\n") else "\n"
    block = [f"{indent}{_MARKER}{eol}"]
    for arch in archs:
        block.append(f'{indent}cc_flag.append("-gencode"){eol}')
        block.append(f'{indent}cc_flag.append("arch=compute_{sm(arch)},code=sm_{sm(arch)}"){eol}')
    new = "".join(lines[:first] + block + lines[last + 1:])
    try:
        compile(new, where, "exec")
    except SyntaxError as e:
        raise SetupError(f"{where}: the rewritten file does not compile ({e.msg}, line {e.lineno})") from None
    return new


def patch_setup_py(src: Path, archs: list[Arch]) -> None:
    """Rewrite src/setup.py in place (the unpacked copy), keeping setup.py.orig beside it."""
    setup_py = src / "setup.py"
    text = setup_py.read_text()
    new = rewrite_gencode(text, archs, where=f"{src.name}/setup.py")
    (src / "setup.py.orig").write_text(text)
    setup_py.write_text(new)


# --- install -------------------------------------------------------------------------------


def github_reachable(url: str = PROBE_URL, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when `url` answers within `timeout` (any HTTP status), else why not."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))
    return None


def install_outcome(log_text: str, forced: bool) -> str:
    """Which way the package's setup.py went, from the markers it prints (pip -v shows them)."""
    if forced:
        return "compiled"
    if "Raw wheel path" in log_text:
        return "prebuilt wheel"
    if "Precompiled wheel not found" in log_text:
        return "compiled"
    return "unknown (see the log)"


def cpu_count() -> int:
    """CPUs this process may use (affinity / cgroup-pinned sets count, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def fmt_secs(seconds: float) -> str:
    """95.2 -> "1m35s"."""
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def rel(path: Path) -> str:
    """`path` relative to the repo when inside it, for shorter messages."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def tail(path: Path, n: int = 25) -> str:
    """The last `n` lines of a log, to print above a failure."""
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-n:])
    except OSError:
        return ""


def pip(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """Run `python -m pip ARGS` with its output in `log_path`; returns the exit status."""
    with log_path.open("w") as out:
        return subprocess.run([sys.executable, "-m", "pip", *args], check=False, stdout=out,
                              stderr=subprocess.STDOUT, env=env).returncode


def build_requirements(srcs: list[Path]) -> list[str]:
    """The sdists' [build-system] requires that are not installed, torch excluded.

    --no-build-isolation (to build against the venv's torch) means pip installs none of them;
    without ninja, torch falls back to a serial build and MAX_JOBS does nothing. Only presence
    is checked, not version ranges.
    """
    missing: list[str] = []
    for src in srcs:
        pyproject = src / "pyproject.toml"
        if not pyproject.is_file():
            continue
        for req in tomllib.loads(pyproject.read_text()).get("build-system", {}).get("requires", []):
            name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
            if name is None or normalize(name.group(1)) == "torch":
                continue
            try:
                importlib.metadata.version(name.group(1))
            except importlib.metadata.PackageNotFoundError:
                if req not in missing:
                    missing.append(req)
    return missing


def install_kernel(name: str, version: str, src: Path, kernel: Kernel, archs: list[Arch],
                   force: bool, nvcc: bool, build_dir: Path) -> tuple[str, float]:
    """pip-install the unpacked package; returns (how it went, seconds)."""
    env = dict(os.environ)
    env["MAX_JOBS"] = env.get("MAX_JOBS") or str(cpu_count())
    env[f"{kernel.env_prefix}_FORCE_BUILD"] = "TRUE" if force else "FALSE"
    # Without nvcc their setup.py crashes before the download unless told to skip the CUDA
    # build; then a missing prebuilt wheel yields a kernel-less package, caught below.
    env[f"{kernel.env_prefix}_SKIP_CUDA_BUILD"] = "FALSE" if nvcc else "TRUE"
    log_path = build_dir / f"{normalize(name)}.log"
    targets = ",".join(f"sm_{sm(a)}" for a in archs)
    plan = (f"compiling for {targets}" if force
            else f"trying the prebuilt wheel, else compiling for {targets}" if nvcc
            else "trying the prebuilt wheel (no nvcc here to compile)")
    log(f"{name} {version}: {plan} (MAX_JOBS={env['MAX_JOBS']}; log: {rel(log_path)})")
    start = time.monotonic()
    rc = pip(["install", "-v", "--no-build-isolation", "--no-deps", "--force-reinstall", str(src)],
             log_path, env)
    seconds = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    if rc != 0:
        sys.stderr.write(tail(log_path))
        raise SetupError(f"{name} {version}: pip install failed after {fmt_secs(seconds)} "
                         f"(full log: {rel(log_path)})")
    how = install_outcome(text, force)
    if not nvcc and how == "compiled":
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "--quiet", "--yes", name], check=False)
        url = re.search(r"Guessing wheel URL:\s*(\S+)", text)
        raise SetupError(f"{name} {version}: no prebuilt wheel for this torch / CUDA / Python"
                         f"{' (' + url.group(1) + ')' if url else ''} and no nvcc to compile: "
                         "install the CUDA toolkit (or set CUDA_HOME) and rerun")
    log(f"{name} {version}: {how} ({fmt_secs(seconds)})")
    return how, seconds


def install_runtime_deps(pins: list[tuple[str, str]], build_dir: Path) -> None:
    """The kernels' own dependencies (einops, triton, ...), which `--no-deps` left out.

    The pins are installed now, so pip takes them as satisfied; `--only-binary` makes it fail
    rather than rebuild them should it disagree. torch stays at its installed version.
    """
    import torch

    names = [n for n, _ in pins]
    log_path = build_dir / "runtime-deps.log"
    log(f"installing the kernels' runtime dependencies (log: {rel(log_path)})")
    rc = pip(["install", "--no-build-isolation", "--only-binary", ",".join(names),
              *(f"{n}=={v}" for n, v in pins), f"torch=={torch.__version__}"], log_path)
    if rc != 0:
        sys.stderr.write(tail(log_path))
        raise SetupError(f"installing the kernels' runtime dependencies failed (log: {rel(log_path)})")


# --- verify --------------------------------------------------------------------------------

# Run in a fresh interpreter (the packages were installed after this one started). Arguments:
# extension modules, Python modules, devices (comma-separated; empty to skip the kernel calls).
_VERIFY = r"""
import importlib, sys
import torch
F = torch.nn.functional
extensions, modules, devices = ([x for x in a.split(",") if x] for a in sys.argv[1:4])
for name in extensions + modules:
    importlib.import_module(name)
for dev in devices:
    torch.manual_seed(0)
    if "causal_conv1d" in modules:
        from causal_conv1d import causal_conv1d_fn
        x, w, b = (torch.randn(*s, device=dev) for s in ((2, 8, 32), (8, 4), (8,)))
        ref = F.silu(F.conv1d(x, w.unsqueeze(1), b, padding=3, groups=8)[..., :32])
        torch.testing.assert_close(causal_conv1d_fn(x, w, b, activation="silu"), ref,
                                   rtol=1e-3, atol=1e-3)
    if "mamba_ssm.ops.selective_scan_interface" in modules:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        u, dt, B, C = (torch.randn(*s, device=dev) for s in ((2, 8, 32), (2, 8, 32), (2, 4, 32), (2, 4, 32)))
        A = -0.5 - torch.rand(8, 4, device=dev)
        y = selective_scan_fn(u, dt, A, B, C, delta_softplus=True)
        dt, h, ref = F.softplus(dt), u.new_zeros(2, 8, 4), []
        for t in range(32):
            h = torch.exp(dt[..., t, None] * A) * h + (dt[..., t] * u[..., t])[..., None] * B[:, None, :, t]
            ref.append((h * C[:, None, :, t]).sum(-1))
        torch.testing.assert_close(y, torch.stack(ref, -1), rtol=1e-3, atol=1e-3)
    torch.cuda.synchronize(dev)
"""


def verify(kernels: list[Kernel], devices: list[str], quiet: bool = False) -> bool:
    """Import the kernels and, on `devices`, hold one tiny call each against a reference."""
    extensions = ",".join(k.extension for k in kernels)
    modules = ",".join(k.module for k in kernels) if devices else ""
    result = subprocess.run([sys.executable, "-c", _VERIFY, extensions, modules, ",".join(devices)],
                            check=False, capture_output=True, text=True)
    if result.returncode != 0 and not quiet:
        sys.stderr.write("".join(result.stderr.splitlines(keepends=True)[-15:]))
    return result.returncode == 0


# --- main ----------------------------------------------------------------------------------


def stamp_path() -> Path:
    """Where this environment records what was installed (inside the venv, gone with it)."""
    return Path(sys.prefix) / ".gsm-cuda-kernels.json"


def already_done(pins: list[tuple[str, str]], archs: list[Arch]) -> bool:
    """True when the stamp says the pins are installed for `archs` and pip agrees."""
    try:
        stamp = json.loads(stamp_path().read_text())
    except (OSError, ValueError):
        return False
    for name, version in pins:
        entry = stamp.get(normalize(name), {})
        try:
            installed = importlib.metadata.version(name).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            return False
        if entry.get("version") != version or installed != version:
            return False
        built_for = set(entry.get("archs", []))
        if entry.get("how") != "prebuilt wheel" and not {fmt_arch(a) for a in archs} <= built_for:
            return False
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see --help)."""
    p = argparse.ArgumentParser(
        prog="setup_cuda.py",
        description="Install mamba-ssm and causal-conv1d (pyproject's cuda extra): the projects' "
                    "prebuilt wheels where they exist, else compiled for these GPUs only.")
    p.add_argument("--archs", metavar="LIST",
                   help="compute capabilities to compile for, e.g. 8.0,9.0 (default: "
                        "$GSM_CUDA_ARCHS, else the visible GPUs'); needed without a GPU")
    p.add_argument("--sdist-dir", type=Path, metavar="DIR",
                   help="take the sdists from DIR instead of downloading them (offline machines)")
    p.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR, metavar="DIR",
                   help=f"where to unpack, build and log (default: {rel(DEFAULT_BUILD_DIR)})")
    p.add_argument("--force-build", action="store_true",
                   help="compile without trying the prebuilt wheels (no GitHub access needed)")
    p.add_argument("--no-runtime-deps", action="store_true",
                   help="skip installing the kernels' runtime dependencies (einops, triton, ...), for "
                        "offline machines that already have them")
    p.add_argument("--reinstall", action="store_true",
                   help="redo the install even when the kernels are already in place")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """The whole install; raises SetupError on anything the user must fix."""
    archs = requested_archs(args.archs, os.environ.get("GSM_CUDA_ARCHS"))
    import torch

    if torch.version.cuda is None:
        raise SetupError(f"torch {torch.__version__} is not a CUDA build, and the kernels need CUDA "
                         "at run time: install a CUDA build of torch first")
    gpus = visible_gpus()
    for index, name, cap in gpus:
        if cap < MIN_ARCH:
            raise SetupError(f"GPU {index} ({name}) has compute capability {fmt_arch(cap)}; the "
                             f"kernels need {fmt_arch(MIN_ARCH)} or newer")
    if archs is None:
        if not gpus:
            raise SetupError("no CUDA GPU visible (torch.cuda.is_available() is False): pass "
                             "--archs (or set GSM_CUDA_ARCHS), e.g. 9.0, to build without one")
        archs = sorted({cap for _, _, cap in gpus})
    seen = ", ".join(f"{n} ({fmt_arch(c)})" for _, n, c in gpus) or "none"
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}); GPUs: {seen}; "
        f"architectures: {', '.join(fmt_arch(a) for a in archs)}")

    pins = read_pins(ROOT / "pyproject.toml")
    unknown = [n for n, _ in pins if normalize(n) not in KERNELS]
    if unknown:
        raise SetupError(f"the {EXTRA} extra lists {', '.join(unknown)}, which this script has no "
                         "recipe for: add one to KERNELS in scripts/setup_cuda.py")
    kernels = [KERNELS[normalize(n)] for n, _ in pins]
    # One device per distinct architecture is enough to catch a missing kernel image.
    devices = list({cap: f"cuda:{i}" for i, _, cap in reversed(gpus)}.values())

    if not args.reinstall and already_done(pins, archs):
        if verify(kernels, devices, quiet=True):
            log(f"ok: {', '.join(f'{n} {v}' for n, v in pins)} already installed and checked "
                "(--reinstall to redo)")
            return
        log("the installed kernels fail the check: installing them again")

    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = CUDA_HOME is not None and Path(CUDA_HOME, "bin", "nvcc").exists()
    force = args.force_build
    if not force:
        reason = github_reachable()
        if reason is not None:
            log(f"{PROBE_URL} unreachable ({reason}): no prebuilt wheels, compiling instead")
            force = True
    if force and not nvcc:
        raise SetupError("compiling needs nvcc (the CUDA toolkit), and none was found: install "
                         "it or set CUDA_HOME" + ("" if args.force_build else
                                                  f"; or give this machine access to {PROBE_URL}"))

    build_dir = args.build_dir.resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    sdists = get_sdists(pins, args.sdist_dir, build_dir)
    srcs = [extract(s, build_dir / "src") for s in sdists]
    for src in srcs:
        patch_setup_py(src, archs)
    missing = build_requirements(srcs)
    if missing:
        log(f"installing the build requirements {', '.join(missing)}")
        if pip(["install", *missing], build_dir / "build-requirements.log") != 0:
            raise SetupError(f"installing {', '.join(missing)} failed "
                             f"(log: {rel(build_dir / 'build-requirements.log')})")

    results = []
    for (name, version), src, kernel in zip(pins, srcs, kernels):
        how, seconds = install_kernel(name, version, src, kernel, archs, force, nvcc, build_dir)
        results.append((name, version, how, seconds))
    if not args.no_runtime_deps:
        install_runtime_deps(pins, build_dir)
    if not verify(kernels, devices):
        raise SetupError("the installed kernels fail the check above"
                         + ("" if devices else " (imports only: no GPU here)"))
    stamp_path().write_text(json.dumps({
        normalize(n): {"version": v, "how": how, "archs": [fmt_arch(a) for a in archs]}
        for n, v, how, _ in results}, indent=1) + "\n")
    ran = (f"kernels match the reference on {', '.join(devices)}" if devices
           else "imports only, no GPU here to run them")
    log("ok: " + ", ".join(f"{n} {v} ({how}, {fmt_secs(s)})" for n, v, how, s in results)
        + f"; {ran}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 1 with a one-line error otherwise."""
    args = parse_args(argv)
    try:
        run(args)
    except SetupError as e:
        print(f"setup_cuda: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("setup_cuda: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
