"""`--model` as an MLflow model URI: recognise one, load its network, upscale a video with it.

Kept apart from `pyfunc` so that telling a URI from a checkpoint path costs no MLflow import.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from gsm.serve.upscale import UpscaleSummary

WEIGHTS = "weights"  # the artifact key (and file stem) of the serving checkpoint in a registered model


def is_model_uri(text: str) -> bool:
    """Whether `--model` names an MLflow model (models:/, runs:/, or any scheme://) and not a local file."""
    if Path(text).is_file():
        return False
    return re.match(r"^(models|runs):/", text) is not None or re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", text) is not None


@contextlib.contextmanager
def _http_patience(retries: int, timeout_s: float) -> Iterator[None]:
    """MLflow's HTTP retry count and timeout for the block (its defaults keep retrying an unreachable
    server for minutes; a user at a terminal wants to know in seconds)."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_network(uri: str, tracking_uri: str, *, retries: int = 0, timeout_s: float = 10.0) -> nn.Module:
    """The GSMamba of a registered model (`models:/gsm-vsr@champion`, `models:/gsm-vsr/3`, `runs:/...`),
    built by the installed gsm from the weights and config stored with it.

    Only two files are fetched: the MLmodel description (YAML, read safely) and the serving checkpoint
    (torch.load with weights_only). The gsm code stored beside them, which MLflow clients import
    when they load the pyfunc, is never imported here: someone able to write to a shared store
    cannot run code on the machines that upscale with `--model models:/...`.
    `tracking_uri` resolves models:/ and runs:/ URIs. An unreachable server fails after `retries`
    retries of `timeout_s` each. Failures are one RuntimeError naming the URI.
    """
    import requests
    import yaml
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from gsm.tracking import first_line, mlflow_uris, sqlite_path
    from gsm.train.checkpoint import load_model

    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():  # MLflow would create an empty store there
        raise FileNotFoundError(f"{uri}: no MLflow store at {db} (set --tracking-uri or $MLFLOW_TRACKING_URI)")
    with tempfile.TemporaryDirectory(prefix="gsm-model-") as tmp:
        try:
            with mlflow_uris(tracking_uri), _http_patience(retries, timeout_s):
                repo = get_artifact_repository(uri)
                description = yaml.safe_load(Path(repo.download_artifacts("MLmodel", tmp)).read_text())
                stored = (description.get("flavors", {}).get("python_function", {}).get("artifacts", {})
                          .get(WEIGHTS, {}).get("path"))  # fmt: skip
                if not isinstance(stored, str):
                    raise ValueError(f"{uri}: not a GSM-VSR model (no '{WEIGHTS}' artifact in its MLmodel)")
                weights = repo.download_artifacts(stored, tmp)
        except (MlflowException, OSError, requests.RequestException, yaml.YAMLError) as exc:
            raise RuntimeError(f"{uri}: cannot load it from {tracking_uri} ({first_line(exc)})") from None
        return load_model(weights, map_location="cpu")


def upscale_from_uri(uri: str, tracking_uri: str, src: str | Path, dst: str | Path, *, retries: int = 0,
                     **kwargs: Any) -> UpscaleSummary:  # fmt: skip
    """`upscale_video` with a registered model's network; input and output are checked before loading it."""
    from gsm.serve.frames import check_output, probe_source
    from gsm.serve.upscale import upscale_video

    info = probe_source(src)
    check_output(dst, bool(kwargs.get("overwrite", False)), src=info.path)
    return upscale_video(load_network(uri, tracking_uri, retries=retries), src, dst, **kwargs)


__all__ = ["is_model_uri", "load_network", "upscale_from_uri"]
