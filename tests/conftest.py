"""Shared fixtures: a tiny quickstart profile that runs the real pipeline in seconds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# Every size key pinned, so a checkpoint built from TINY_MODEL alone matches the tiny params whatever
# params.yaml's model section says.
TINY_MODEL = dict(embed_dim=16, num_heads=2, prop_layers=1, attn_depth=1, d_state=4, expand=1, ffn_ratio=2,
                  mid_channels=16, recon_blocks=0, upsampler="progressive", window=3, align="implicit",
                  bidirectional=True, scan_impl="torch",
                  spynet_weights=None)  # fmt: skip
TINY_STAGE = dict(iters=3, batch_size=2, gt_size=16, lr=1e-3, fix_flow=1, cache_flows=False, workers=0, ckpt_every=2, val_every=2,
                  log_every=1, ema_decay=0.5)  # fmt: skip


REPO = Path(__file__).resolve().parents[1]


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over`'s leaves written in (nested mappings merged, anything else replaced)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_params_dict(root: Path) -> dict[str, Any]:
    """The repository's params.yaml (every key DVC tracks) with the quickstart at toy sizes (20 + 37
    source frames, small crops), a tiny net and 3 iterations per stage; data under `root`/data."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    return merged(base, {
        "model": dict(TINY_MODEL),
        "data": {
            "profile": "quickstart", "root": str(root / "data"), "workers": 1,
            "quickstart": {
                "reds_max_frames": 20, "reds_clip_len": 4, "reds_test_frames": 4, "reds_gap": 2,
                "reds_val_frames": 4, "reds_crop": [96, 160], "vimeo_max_frames": 37, "vimeo_test_frames": 10,
                "vimeo_gap": 3, "vimeo_val_frames": 7,
                "vimeo_train_stride": 4, "vimeo_crop": [64, 96], "vimeo_crops": 2,
            },
        },
        "train": {"seed": 0, "device": "cpu", "reds": {**TINY_STAGE, "num_frames": 2, "repeat": 1},
                  "vimeo": dict(TINY_STAGE)},
        "eval": {"device": "cpu", "max_clips": 1, "crop_size": 16},
        "flow_init": {"iters": 2, "batch_size": 2, "patch": 32, "max_pairs": 3},
    })  # fmt: skip


@pytest.fixture
def tiny_params(tmp_path: Path) -> Path:
    """params.yaml of the tiny profile in tmp_path (data under tmp_path/data)."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params_dict(tmp_path), sort_keys=False))
    return path


@pytest.fixture(scope="session", autouse=True)
def hermetic_mlflow() -> Iterator[None]:
    """No test logs to the developer's MLflow server or into the repository's embedded store.

    $MLFLOW_TRACKING_URI (which wins over params) and $GSM_PARENT_RUN_ID (a developer's running
    pipeline) are unset for the session, subprocesses included; tests that track point
    `mlflow.tracking_uri` into tmp_path. The session fails if mlflow.db,
    mlartifacts/ or mlruns/ appeared in the repository anyway (the params default is relative to
    the working directory).
    """
    stores = [REPO / name for name in ("mlflow.db", "mlartifacts", "mlruns")]
    before = {path for path in stores if path.exists()}
    with pytest.MonkeyPatch.context() as mp:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "GSM_PARENT_RUN_ID"):
            mp.delenv(name, raising=False)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        yield
    created = [path.name for path in stores if path.exists() and path not in before]
    assert not created, f"tests wrote MLflow data into the repository: {created}; use a store in tmp_path"
