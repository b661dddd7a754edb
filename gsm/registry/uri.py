"""`--model` as an MLflow model URI: recognise one, load its network, upscale a video with it.

Kept apart from `pyfunc` so that telling a URI from a checkpoint path costs no MLflow import.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import nn

from gsm.serve.upscale import UpscaleSummary


def is_model_uri(text: str) -> bool:
    """Whether `--model` names an MLflow model (models:/, runs:/, or any scheme://) and not a local file."""
    if Path(text).is_file():
        return False
    return re.match(r"^(models|runs):/", text) is not None or re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", text) is not None


def load_network(uri: str, tracking_uri: str) -> nn.Module:
    """The GSMamba inside a registered pyfunc (`models:/gsm-vsr@champion`, `models:/gsm-vsr/3`, `runs:/...`).

    `tracking_uri` is the store that resolves models:/ and runs:/ URIs. Failures (unknown model,
    alias or version; no server) become one RuntimeError naming the URI.
    """
    import mlflow
    import requests
    from mlflow.exceptions import MlflowException

    from gsm.tracking import first_line, mlflow_uris, sqlite_path

    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():  # MLflow would create an empty store there
        raise FileNotFoundError(f"{uri}: no MLflow store at {db} (set --tracking-uri or $MLFLOW_TRACKING_URI)")
    try:
        with mlflow_uris(tracking_uri):
            loaded = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError, requests.RequestException) as exc:
        raise RuntimeError(f"{uri}: cannot load it from {tracking_uri} ({first_line(exc)})") from None
    inner = loaded.unwrap_python_model()
    network = getattr(inner, "model", None)
    if not isinstance(network, nn.Module):
        raise ValueError(f"{uri}: not a GSM-VSR model (its pyfunc is {type(inner).__name__})")
    return network


def upscale_from_uri(uri: str, tracking_uri: str, src: str | Path, dst: str | Path, **kwargs: Any) -> UpscaleSummary:
    """`upscale_video` with a registered model's network; input and output are checked before loading it."""
    from gsm.serve.frames import check_output, probe_source
    from gsm.serve.upscale import upscale_video

    info = probe_source(src)
    check_output(dst, bool(kwargs.get("overwrite", False)), src=info.path)
    return upscale_video(load_network(uri, tracking_uri), src, dst, **kwargs)


__all__ = ["is_model_uri", "load_network", "upscale_from_uri"]
