"""`make deploy` / `make worker` (pipelines/deploy.py): both flows on a work pool of a real local
Prefect server (pipelines.serve.local_server, one per module), and a worker that runs a deployment.

The worker's flow run gets a params file that does not exist, so `retrain` fails in its first line
(load_params) with the project's own message: that proves the pool handed the run to the worker, the
pull step moved it into the checkout, the entrypoint loaded and the parameters arrived, without
training anything.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, tiny_params_dict

# Prefect reads its settings when first imported: a temporary PREFECT_HOME before that (test_flows,
# collected after this module, sets its own the same way; whichever is set last is the one used).
_PREFECT_HOME = tempfile.mkdtemp(prefix="gsm-test-deploy-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ.update({"PREFECT_HOME": _PREFECT_HOME, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})

POOL = "gsm-test-pool"


def _params(root: Path, **prefect: Any) -> Path:
    d = tiny_params_dict(root)
    d["prefect"] = {"work_pool": POOL, "deployment_name": "weekly-test", **prefect}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str], start: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {start}"), err


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


def test_dry_run_and_bad_input(no_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """--dry-run shows both deployments from params.yaml and contacts nothing; an unknown pool type,
    no server, a server that does not answer and a relative --workdir are one-line errors."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.deploy import main
    from gsm.io import free_port

    monkeypatch.chdir(REPO)
    params = _params(tmp_path, retrain_cron="15 4 * * 2", timezone="Europe/Berlin")
    assert main(["--params", str(params), "--dry-run", "--workdir", "/srv/gsm"]) == 0
    out = capsys.readouterr().out
    assert "deployment: gsm-pipeline/gsm-pipeline (pipelines/flows.py:pipeline" in out
    assert "deployment: retrain/weekly-test (pipelines/flows.py:retrain" in out
    assert "cron '15 4 * * 2' (Europe/Berlin)" in out and "schedule: none (run on demand)" in out
    assert "set_working_directory /srv/gsm" in out and f"worker start --pool {POOL} --limit 1" in out

    assert main(["--params", str(params), "--type", "kubernetes-nope"]) == 2
    _one_line_error(capsys, "unknown work pool type 'kubernetes-nope'")
    assert main(["--params", str(params)]) == 2
    _one_line_error(capsys, "PREFECT_API_URL is not set")
    assert main(["worker", "--params", str(params)]) == 2  # a worker with no server would wait forever
    _one_line_error(capsys, "PREFECT_API_URL is not set")
    assert main(["--params", str(params), "--workdir", "srv/gsm"]) == 2
    _one_line_error(capsys, "--workdir must be an absolute path")
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        assert main(["--params", str(params)]) == 2
    _one_line_error(capsys, "no Prefect server answers at PREFECT_API_URL=http://127.0.0.1:")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A private Prefect server (scheduler on) for this module; PREFECT_API_URL points at it, here
    and in subprocesses."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.serve import local_server

    with (local_server(timeout=120) as url, temporary_settings(updates={PREFECT_API_URL: url}),
          pytest.MonkeyPatch.context() as mp):  # fmt: skip
        mp.setenv("PREFECT_API_URL", url)
        yield url


def _deployments(client: Any) -> dict[str, Any]:
    return {f"{n}/{d}": client.read_deployment_by_name(f"{n}/{d}")
            for n, d in (("gsm-pipeline", "gsm-pipeline"), ("retrain", "weekly-test"))}  # fmt: skip


def test_deploy_registers_both_flows_on_the_pool(server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """`make deploy` creates the process pool and both deployments on it: entrypoints in the
    checkout, the params path, the pull step, retrain's cron from params.yaml. Deploying again after
    a cron edit updates them in place."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from pipelines.deploy import main

    monkeypatch.chdir(REPO)
    params = _params(tmp_path, retrain_cron="15 4 * * 2", timezone="Europe/Berlin")
    assert main(["--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert f"work pool '{POOL}' (process): created" in out and "deployed retrain/weekly-test" in out
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(POOL).type == "process"
        first = _deployments(client)
    for name, d in first.items():
        limit = d.global_concurrency_limit
        assert d.work_pool_name == POOL and d.pull_steps == pull and limit is not None and limit.limit == 1
        assert d.job_variables == {"env": {"MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}}
        assert d.entrypoint == f"pipelines/flows.py:{'pipeline' if name.startswith('gsm') else 'retrain'}"
    pipe, retrain = first["gsm-pipeline/gsm-pipeline"], first["retrain/weekly-test"]
    assert pipe.parameters == {"params": str(params), "runs": None, "reports": "reports"} and pipe.schedules == []
    assert retrain.parameters == {"params": str(params), "runs": None}
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in retrain.schedules] == [
        ("15 4 * * 2", "Europe/Berlin", True)]  # fmt: skip

    params = _params(tmp_path, retrain_cron="0 2 * * *")
    assert main(["--params", str(params)]) == 0
    assert f"work pool '{POOL}' (process): exists" in capsys.readouterr().out
    with get_client(sync_client=True) as client:
        again = _deployments(client)
        assert [d.id for d in again.values()] == [d.id for d in first.values()]  # updated, not duplicated
        assert [s.schedule.cron for s in again["retrain/weekly-test"].schedules] == ["0 2 * * *"]
        client.create_work_pool(WorkPoolCreate(name="docker-pool", type="docker"))
    assert main(["--params", str(_params(tmp_path, work_pool="docker-pool"))]) == 2
    _one_line_error(capsys, "work pool 'docker-pool' exists with type 'docker', not 'process'")


def test_params_inside_the_checkout_are_relative(tmp_path: Path) -> None:
    from pipelines.deploy import worker_params_path

    assert worker_params_path(Path("params.yaml"), Path.cwd()) == "params.yaml"
    assert worker_params_path(tmp_path / "x" / "p.yaml", tmp_path) == "x/p.yaml"
    assert worker_params_path(tmp_path / "p.yaml", tmp_path / "x") == str(tmp_path / "p.yaml")


def test_a_worker_picks_up_a_run_of_the_deployment(server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A run of `retrain` waits SCHEDULED in the pool until a worker (`make worker`'s command, once)
    takes it and runs the flow in the checkout, with the run's parameters."""
    from prefect.client.orchestration import get_client

    from gsm.params import load_params
    from pipelines.deploy import main, worker_command

    monkeypatch.chdir(REPO)
    params = _params(tmp_path, retrain_cron="15 4 * * 2")
    assert main(["--params", str(params)]) == 0
    capsys.readouterr()
    absent = tmp_path / "absent.yaml"  # retrain's first line fails on it: nothing is trained
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/weekly-test")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"params": str(absent)})
        assert run.state is not None and run.state.is_scheduled() and run.work_pool_name == POOL

    worker = subprocess.run([*worker_command(load_params(params)), "--run-once"], cwd=tmp_path, timeout=180,
                            capture_output=True, text=True)  # fmt: skip
    logs = worker.stdout + worker.stderr
    assert worker.returncode == 0, logs[-3000:]
    with get_client(sync_client=True) as client:
        done = client.read_flow_run(run.id)
    assert done.state is not None and done.state.is_failed(), (done.state, logs[-3000:])
    assert f"params file not found: {absent}" in (done.state.message or ""), (done.state, logs[-3000:])
