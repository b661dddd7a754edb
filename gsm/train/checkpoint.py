"""Training checkpoints: one dict of tensors and plain values, safe to read with weights_only=True.

Layout (FORMAT "gsm-vsr/1"):
  format, stage, iter, loss, elapsed, best, config (GSMConfig.to_dict()), train_config (StageConfig
  as a plain dict), seed, model and ema (state dicts; ema None without EMA), optimizer, scheduler,
  rng (torch/cuda/numpy/python states as tensors and lists), data (epoch and batches consumed in it),
  mlflow_run_id.
Anything that needs pickling beyond that is converted on the way in and out, so a checkpoint from
an untrusted source cannot run code when loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import tempfile
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from gsm.io import default_mode, free_space
from gsm.models.config import GSMConfig
from gsm.models.gsmamba import GSMamba

FORMAT = "gsm-vsr/1"

# Fields that do not change the network's parameters or what it computes.
NON_STRUCTURAL: frozenset[str] = frozenset({"scan_impl", "grad_checkpoint", "spynet_weights", "spynet_sha256"})


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class _WriteRecorder:
    """Forwards torch.save's writes, keeping the OSError one raised: torch replaces it with an
    "unexpected pos" RuntimeError, and the errno is what tells a full disk from other failures."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def _tensor_bytes(obj: Any) -> int:
    """Bytes of a state's tensors, each storage once: roughly what its checkpoint needs on disk."""
    seen: set[int] = set()

    def walk(o: Any) -> int:
        if isinstance(o, torch.Tensor):
            storage = o.untyped_storage()
            if storage.data_ptr() in seen:
                return 0
            seen.add(storage.data_ptr())
            return storage.nbytes()
        if isinstance(o, dict):
            return sum(walk(v) for v in o.values())
        if isinstance(o, (list, tuple)):
            return sum(walk(v) for v in o)
        return 0

    return walk(obj)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save into a temp file beside `path`, then rename: a crash or a full disk never leaves
    half a file, and the previous checkpoint stays until the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    recorder = None
    try:
        os.fchmod(fd, default_mode())
        with os.fdopen(fd, "wb") as fh:
            recorder = _WriteRecorder(fh)
            torch.save(state, recorder)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = recorder.error if recorder is not None and recorder.error is not None else exc
        if isinstance(cause, OSError) and cause.errno in _DISK_FULL:
            need = _tensor_bytes(state) / 2**20
            raise OSError(
                cause.errno,
                f"{path}: disk full while saving the checkpoint (about {need:.0f} MiB needed, "
                f"{free_space(path.parent)}); the previous checkpoint is kept, free space and rerun to resume",
            ) from None
        raise


def remove_stale_temps(folder: Path) -> None:
    """Delete temp files left by a process killed inside `save_checkpoint`."""
    if folder.is_dir():
        for tmp in folder.glob(".*.pt.*.tmp"):
            tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`, read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt zip, pickle refused by weights_only, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a readable checkpoint ({first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not a {FORMAT} checkpoint (format: {found!r})")
    for key in ("config", "model"):
        if not isinstance(state.get(key), dict):
            raise ValueError(f"{path}: checkpoint has no {key!r} entry")
    return state


def config_from_checkpoint(state: dict[str, Any], path: Path | str) -> GSMConfig:
    """The stored model config (unknown or bad keys name the file)."""
    try:
        return GSMConfig.from_dict(dict(state["config"]), where="config")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: stored model config is not usable: {exc}") from None


def check_compatible(ckpt_config: dict[str, Any], cfg: GSMConfig, path: Path | str) -> None:
    """Raise if the checkpoint's network differs structurally from `cfg`, listing every field.

    Fields missing from an older checkpoint count as their default value.
    """
    current = cfg.to_dict()
    defaults = GSMConfig().to_dict()
    diffs = []
    for f in fields(GSMConfig):
        if f.name in NON_STRUCTURAL:
            continue
        stored = ckpt_config.get(f.name, defaults[f.name])
        if stored != current[f.name]:
            diffs.append(f"{f.name} {stored} != {current[f.name]}")
    extra = sorted(set(ckpt_config) - set(current))
    diffs += [f"{name} {ckpt_config[name]} != (absent)" for name in extra]
    if diffs:
        raise ValueError(f"checkpoint {path} was trained with a different model: {', '.join(diffs)}")


def build_model(cfg: GSMConfig) -> GSMamba:
    """GSMamba whose SpyNet weights will come from a checkpoint: no file lookup, no random-init warning."""
    cfg = replace(cfg, spynet_weights=None, spynet_sha256=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="SpyNet created without weights")
        return GSMamba(cfg)


def weights_of(state: dict[str, Any], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The EMA state dict when present and wanted (the weights evaluated and served), else the model's."""
    ema = state.get("ema")
    return ema if use_ema and isinstance(ema, dict) else state["model"]


def serving_digest(path: Path) -> str:
    """sha256 of a checkpoint's network config and serving weights (EMA when present).

    The identity of "the model that was scored": unlike the file's own hash it does not change
    with what else the file holds (timings, run ids), so two identical trainings give the same one.
    """
    state = load_checkpoint(path)
    h = hashlib.sha256(json.dumps(state.get("config"), sort_keys=True).encode())
    for key, tensor in sorted(weights_of(state).items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path | str) -> None:
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ValueError(f"{path}: weights do not fit the network: {detail[:300]}") from None


def load_model(
    path: str | Path, *, use_ema: bool = True, map_location: str | torch.device = "cpu"
) -> GSMamba:
    """The trained network of a checkpoint, in eval mode (EMA weights when stored and `use_ema`)."""
    state = load_checkpoint(Path(path), map_location=map_location)
    model = build_model(config_from_checkpoint(state, path))
    load_weights(model, weights_of(state, use_ema), path)
    return model.to(map_location).eval()


# --- RNG states as tensors and lists (weights_only=True cannot unpickle numpy or tuples of state) ---


def rng_state() -> dict[str, Any]:
    """Global RNG states of torch (CPU and CUDA), numpy and python, in weights_only-safe types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
