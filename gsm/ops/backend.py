"""Which optional kernels this process can use, and the choice rule for the selective scan.

The probes import lazily and are cached: importing mamba_ssm on a CPU-only machine fails inside
its extension loader (`No module named 'selective_scan_cuda'`), and doing that on every call would
be slow and noisy.
"""

from __future__ import annotations

import functools
import warnings

import torch

SCAN_IMPLS: tuple[str, ...] = ("auto", "cuda", "numba", "torch", "reference")


@functools.lru_cache(maxsize=None)
def mamba_ssm_available() -> bool:
    """True when mamba_ssm's fused CUDA selective scan can run here."""
    if not torch.cuda.is_available():
        return False
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception:  # ImportError, or a broken extension raising anything at load time
        return False
    return True


@functools.lru_cache(maxsize=None)
def causal_conv1d_available() -> bool:
    """True when the causal-conv1d CUDA extension can run here."""
    if not torch.cuda.is_available():
        return False
    try:
        from causal_conv1d import causal_conv1d_fn  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def numba_available() -> bool:
    """True when numba imports (the CPU scan kernels need nothing else)."""
    try:
        import numba  # noqa: F401
    except Exception:
        return False
    return True


def resolve_impl(requested: str, device: torch.device) -> str:
    """Map a requested scan implementation to the one that will run on `device`.

    "auto" picks the fastest available: mamba_ssm on CUDA, numba on CPU, else the chunked torch
    scan. Explicit requests that cannot run here raise instead of silently degrading.
    """
    if requested not in SCAN_IMPLS:
        raise ValueError(
            f"selective_scan: unknown impl {requested!r}; expected one of {SCAN_IMPLS}")
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if requested == "auto":
        if on_cuda:
            if mamba_ssm_available():
                return "cuda"
            # Python shows a warning once per call site: one line per process, not per scan.
            warnings.warn("selective_scan: mamba-ssm's CUDA kernels are not installed; falling back to "
                          "the pure-PyTorch scan on CUDA (several times slower; `make setup-cuda` builds "
                          "them, model.scan_impl: torch silences this)", RuntimeWarning, stacklevel=2)
            return "torch"
        if device.type == "cpu" and numba_available():
            return "numba"
        return "torch"
    if requested == "cuda":
        if not on_cuda:
            raise RuntimeError(
                f"selective_scan: impl='cuda' needs CUDA tensors, got device {device}")
        if not mamba_ssm_available():
            raise RuntimeError("selective_scan: impl='cuda' needs mamba_ssm with its CUDA "
                               "extension (install the 'cuda' extra on a CUDA machine)")
        return "cuda"
    if requested == "numba":
        if device.type != "cpu":
            raise RuntimeError(
                f"selective_scan: impl='numba' runs on CPU tensors, got device {device}")
        if not numba_available():
            raise RuntimeError("selective_scan: impl='numba' needs the numba package")
        return "numba"
    return requested


def resolve_device(name: str | torch.device | None = "auto", where: str = "device") -> torch.device:
    """A config's device string as a torch.device: "auto"/None picks CUDA when present.

    Asking for CUDA on a machine without it is a one-line error naming `where` (the config key),
    not a failure deep inside the first kernel launch.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{where}: not a device, got {name!r} (auto, cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{where}: must be auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{where} is {name} but CUDA is not available on this machine")
    return dev
