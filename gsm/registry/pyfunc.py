"""GSM-VSR as an MLflow pyfunc: what `register` logs and any MLflow client loads.

Why a pyfunc: a client needs neither our checkpoint format nor our CLI,

    mlflow.pyfunc.load_model("models:/gsm-vsr@champion").predict(frames)

takes a T x H x W x 3 uint8 RGB clip and returns T x 4H x 4W x 3 uint8, streamed through the
network in overlapping temporal chunks (gsm.serve.upscale) so a long clip does not need memory
for all of its frames at once inside the network. `gsm upscale --model models:/...` loads the same
model and takes the network out of it (gsm.registry.uri) for its file-to-file streaming path.

The model is logged "from code" (gsm/registry/model_code.py), not pickled, and holds: the serving
weights (a slim checkpoint: config and EMA weights, no optimiser state), a copy of the gsm package
(code_paths, so a client without gsm installed can load it), pinned requirements, a uint8 tensor
signature with the chunk/tile settings as params, and a tiny input example.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from torch import nn

from gsm.ops.backend import resolve_device
from gsm.serve.upscale import check_chunking, temporal_radius, upscale_frames
from gsm.tracking import MlflowConfig

from gsm.registry.uri import WEIGHTS  # the artifact key (and file stem) of the serving checkpoint
# Distributions the model's code imports when loaded: pinned to this environment's versions.
REQUIREMENTS = ("torch", "numpy", "numba", "opencv-python-headless", "tqdm", "PyYAML")


@dataclass(frozen=True)
class PredictSettings:
    """How `predict` streams a clip; each is also a `params` entry of the signature (per-call override)."""

    chunk: int = 32
    chunk_overlap: int = 4
    tile: int = 0  # LR tile side; 0 = whole frames (MLflow params cannot be null)
    tile_overlap: int = 16

    @classmethod
    def from_config(cls, cfg: MlflowConfig) -> PredictSettings:
        return cls(cfg.predict_chunk, cfg.predict_chunk_overlap, cfg.predict_tile or 0, cfg.predict_tile_overlap)

    def merged(self, params: Mapping[str, Any] | None) -> PredictSettings:
        """These settings with the per-call `params` that name a field (others are ignored)."""
        given = {k: int(v) for k, v in (params or {}).items() if k in asdict(self) and v is not None}
        return replace(self, **given)


def check_frames(frames: Any) -> np.ndarray:
    """The clip as a (T, H, W, 3) uint8 array, or a ValueError saying what is wrong with it."""
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array (T x H x W x 3, uint8 RGB), got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB (0-255), got dtype {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be T x H x W x 3 (RGB), got shape {frames.shape}")
    if min(frames.shape[:3]) < 1:
        raise ValueError(f"frames must hold at least one non-empty frame, got shape {frames.shape}")
    return frames


def predict_frames(
    model: nn.Module, frames: np.ndarray, settings: PredictSettings, device: str | torch.device | None = None
) -> np.ndarray:
    """x4 upscaled clip (T, 4H, 4W, 3) uint8 from (T, H, W, 3) uint8, in overlapping temporal chunks."""
    frames = check_frames(frames)
    s = settings
    tile = s.tile or None
    if tile is not None and not 0 <= s.tile_overlap < tile:
        raise ValueError(f"tile_overlap must be in [0, tile), got tile_overlap={s.tile_overlap}, tile={tile}")
    check_chunking(s.chunk, s.chunk_overlap, temporal_radius(model))
    dev = resolve_device(device, "device")
    scale = int(getattr(model, "scale", 4))
    t, h, w, _ = frames.shape
    out = np.empty((t, h * scale, w * scale, 3), dtype=np.uint8)
    was_training = model.training
    model.to(dev).eval()
    try:
        with torch.inference_mode():
            stream = upscale_frames(model, iter(frames), chunk=s.chunk, chunk_overlap=s.chunk_overlap,
                                    tile=tile, tile_overlap=s.tile_overlap, device=dev)  # fmt: skip
            for i, frame in enumerate(stream):
                out[i] = frame
    finally:
        model.train(was_training)
    return out


class GSMVSRModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper. After loading, `.model` is the network (eval mode, on the CPU)."""

    model: nn.Module
    settings: PredictSettings

    def load_context(self, context: Any) -> None:
        from gsm.train.checkpoint import load_model

        self.model = load_model(context.artifacts[WEIGHTS], map_location="cpu")
        config = dict(context.model_config or {})
        self.settings = PredictSettings().merged(config)

    # np.ndarray: a hint MLflow accepts without inferring a schema (the signature gives the schema).
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        return predict_frames(self.model, model_input, self.settings.merged(params))


def signature(settings: PredictSettings) -> Any:
    """uint8 clips in and out, any length and size, 3 channels; the chunk/tile settings as params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    clip = TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))
    params = ParamSchema([ParamSpec(name, "long", value) for name, value in asdict(settings).items()])
    return ModelSignature(inputs=Schema([clip]), outputs=Schema([clip]), params=params)


def input_example() -> np.ndarray:
    """Two 16 x 16 frames of a drifting gradient: small enough that MLflow's check of it is instant."""
    ys, xs = np.mgrid[0:16, 0:16]
    frames = [np.stack([(xs * 12 + i * 8) % 256, (ys * 12) % 256, ((xs + ys) * 6) % 256], -1) for i in range(2)]
    return np.stack(frames).astype(np.uint8)


def requirements() -> list[str]:
    """Pinned versions of what the model's code imports (CPU/CUDA local tags dropped: `2.13.0+cpu`)."""
    pins = []
    for dist in REQUIREMENTS:
        try:
            pins.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(dist)
    return pins


def serving_checkpoint(checkpoint: Path, dest: Path) -> Path:
    """A slim copy of a training checkpoint: its config and the weights it serves (EMA when stored).

    Optimiser and RNG state are for resuming, not serving; dropping them shrinks the registry's
    copy about threefold. The result still loads with gsm.train.checkpoint.load_model and
    initialises training (`init_from`).
    """
    from gsm.train.checkpoint import FORMAT, load_checkpoint, save_checkpoint, weights_of

    state = load_checkpoint(checkpoint)
    slim = {"format": FORMAT, "config": state["config"], "model": weights_of(state, use_ema=True), "ema": None,
            "stage": state.get("stage"), "iter": state.get("iter")}  # fmt: skip
    save_checkpoint(dest, slim)
    return dest


def _stage_code(dest: Path) -> Path:
    """A copy of the gsm package without caches (numba's and Python's) for the model's code_paths."""
    import gsm

    src = Path(gsm.__file__).parent
    target = dest / "gsm"
    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"))
    return target


def log_pyfunc(
    checkpoint: Path, settings: PredictSettings, workdir: Path, *, name: str = "model",
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """Log the checkpoint as a pyfunc into the active run (fluent API); returns MLflow's ModelInfo.

    `workdir` (empty, temporary) holds the slim checkpoint and the staged code until they are copied.
    """
    weights = serving_checkpoint(checkpoint, workdir / f"{WEIGHTS}.pt")
    code = _stage_code(workdir / "code")
    entry = Path(__file__).with_name("model_code.py")  # models from code: nothing pickled
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(entry), artifacts={WEIGHTS: str(weights)}, code_paths=[str(code)],
        signature=signature(settings), input_example=input_example(), pip_requirements=requirements(),
        model_config=asdict(settings), metadata=dict(metadata or {}),
    )  # fmt: skip


__all__ = [
    "GSMVSRModel",
    "PredictSettings",
    "check_frames",
    "input_example",
    "log_pyfunc",
    "predict_frames",
    "requirements",
    "serving_checkpoint",
    "signature",
]
