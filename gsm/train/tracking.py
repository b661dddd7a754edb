"""Where training numbers go: a JSON-lines file beside the checkpoints, and MLflow when tracking is on.

metrics.jsonl gets one line per iteration ({"stage", "iter", "loss", "lr", "time"}) and one per
validation ({"stage", "iter", "val_psnr", ...}). A resumed run first drops its stage's lines past
the checkpoint, so the file always describes the state that was saved. MLflow cannot delete
points: after a crash it may hold a second value for the re-run steps (equal on CPU, where
training is bit-reproducible). The MLflow side (`MlflowRun`, where runs go) is `gsm.tracking`,
shared with evaluation and the registry.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TextIO

from gsm.io import atomic_write_text


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
