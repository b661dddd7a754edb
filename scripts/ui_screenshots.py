"""Screenshots of the MLflow UI in headless Chromium: what a user sees after `make repro`.

    .venv/bin/python scripts/ui_screenshots.py [--params params.yaml] [--out reports/ui] [--browser chromium]

Why: which view the UI opens (GenAI traces or model training) is decided in the browser, not by
the store, so only a real browser shows it. This starts `mlflow ui` on the project's store (as
`make mlflow-ui` does, on a free port), photographs the experiment as it first opens and in the
model-training view, the newest training run and its metric charts, and the newest registered
version with its model card, then stops the server. Needs a Chromium (Debian: `apt-get install
chromium`); nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gsm.io import free_port, wait_until_healthy  # noqa: E402
from gsm.params import load_params  # noqa: E402

WINDOW = "1600,1000"
RENDER_MS = 45000  # virtual time the page gets to fetch and draw before the shot


def start_ui(store: str, artifacts: str, port: int) -> subprocess.Popen[bytes]:
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "ui", "--backend-store-uri", store, "--default-artifact-root", artifacts,
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pages(store: str, experiment: str, model: str) -> dict[str, str]:
    """UI routes to photograph: name -> URL fragment (the UI routes after '#')."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no experiment {experiment!r} in {store}: run `make repro` first")
    out = {"experiment-as-opened": f"/experiments/{exp.experiment_id}",
           "experiment-model-training": f"/experiments/{exp.experiment_id}?workflowType=machine_learning"}
    # The newest REDS training run that trained (a rerun that found its checkpoint logs no loss).
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'reds'",
                              order_by=["attributes.start_time DESC"], max_results=20)  # fmt: skip
    trained = [r for r in runs if "loss" in r.data.metrics]
    if trained:
        run = f"/experiments/{exp.experiment_id}/runs/{trained[0].info.run_id}"
        out["training-run"] = f"{run}?workflowType=machine_learning"
        out["training-run-metrics"] = f"{run}/model-metrics?workflowType=machine_learning"
    versions = client.search_model_versions(f"name='{model}'", order_by=["version_number DESC"], max_results=1)
    if versions:
        out["registered-version"] = f"/models/{model}/versions/{versions[0].version}"
    return out


def shoot(browser: str, url: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="gsm-chromium-") as profile:
        cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={WINDOW}", f"--virtual-time-budget={RENDER_MS}",
               f"--screenshot={dest}", url]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    if not dest.is_file():
        raise RuntimeError(f"{browser} wrote no screenshot for {url}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "ui")
    ap.add_argument("--browser", default="chromium", help="a Chromium executable")
    a = ap.parse_args(argv)
    browser = shutil.which(a.browser)
    if browser is None:
        print(f"error: no browser {a.browser!r} on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    p = load_params(a.params)
    store = p.mlflow.tracking_uri or "sqlite:///mlflow.db"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_ui(store, p.mlflow.artifact_root, port)
    try:
        wait_until_healthy(f"{base}/health", proc, 90.0, f"mlflow ui at {base}")
        a.out.mkdir(parents=True, exist_ok=True)
        for name, route in pages(store, p.mlflow.experiment, p.mlflow.model_name).items():
            shoot(browser, f"{base}/#{route}", a.out / f"{name}.png")
            print(f"{name}: {a.out / f'{name}.png'}  ({base}/#{route})")
    except (RuntimeError, ValueError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
