"""Where training numbers go: a JSON-lines file beside the checkpoints, and MLflow when asked.

metrics.jsonl gets one line per iteration ({"stage", "iter", "loss", "lr", "time"}) and one per
validation ({"stage", "iter", "val_psnr", ...}). A resumed run first drops its stage's lines past
the checkpoint, so the file always describes the state that was saved. MLflow cannot delete
points: after a crash it may hold a second value for the re-run steps (equal on CPU, where
training is bit-reproducible).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, TextIO

from gsm.io import atomic_write_text

EXPERIMENT = "gsm-vsr"


def truncate_metrics(path: Path, stage: str, last_iter: int) -> None:
    """Keep other stages' lines and this stage's lines up to `last_iter`; drop torn lines."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the process died mid-write
        if not isinstance(row, dict):
            continue
        if row.get("stage") != stage or int(row.get("iter", 0)) <= last_iter:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete lines of a metrics.jsonl file."""
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _finite(value: float) -> float | None:
    """JSON has no NaN/inf: store null so every line stays standard JSON."""
    return value if math.isfinite(value) else None


class MetricsFile:
    """Appends lines; `flush` makes them durable up to now (called at log and checkpoint times)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh: TextIO = path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        clean = {k: _finite(v) if isinstance(v, float) else v for k, v in row.items()}
        self._fh.write(json.dumps(clean) + "\n")

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def tracking_uri_from_env(uri: str | None) -> str | None:
    """The explicit URI, else $MLFLOW_TRACKING_URI, else None (no MLflow)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


class MlflowRun:
    """One MLflow run per stage, through MlflowClient (no process-global active run).

    `run_id` from a checkpoint resumes that run; a run id the store does not know starts a new one.
    Metrics are buffered and sent in batches by `flush`.
    """

    def __init__(self, uri: str, stage: str, params: dict[str, str], run_id: str | None = None) -> None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.client = MlflowClient(tracking_uri=uri)
        self._pending: list[Any] = []
        if run_id is not None:
            try:
                self.client.get_run(run_id)
            except MlflowException:
                run_id = None
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(EXPERIMENT)
        run = self.client.create_run(exp_id, run_name=stage, tags={"stage": stage})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow's per-call param limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in values.items() if math.isfinite(v)]

    def flush(self) -> None:
        while self._pending:
            chunk, self._pending = self._pending[:1000], self._pending[1000:]  # per-call metric limit
            self.client.log_batch(self.run_id, metrics=chunk)

    def close(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)
