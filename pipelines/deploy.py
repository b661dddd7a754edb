"""`python -m pipelines.deploy` (`make deploy`, `make worker`): both flows as deployments of a work pool.

For teams: a Prefect server that every machine reaches (PREFECT_API_URL), a work pool
(`prefect.work_pool`, created as a `process` pool if missing), and a worker on each GPU machine
(`python -m pipelines.deploy worker`, i.e. `prefect worker start --pool <pool> --limit 1`) that runs
the flow runs the pool hands it, in a subprocess. Two deployments:

* `gsm-pipeline/gsm-pipeline`: the DVC chain, download to register; no schedule, run on demand
  (`prefect deployment run gsm-pipeline/gsm-pipeline`, or from the UI).
* `retrain/<prefect.deployment_name>`: on `prefect.retrain_cron` in `prefect.timezone`.

params.yaml is the one source of the cron, the time zone and the names: they are read here, at
deploy time, so a changed cron needs another `make deploy` (it updates the deployments in place).
No prefect.yaml: it would be a second copy of them.

Where the code runs: the worker machine's checkout of this repository, whose data/, runs/ and
MLflow store the flows use, like `make repro` there. Each deployment's one pull step is
`set_working_directory` to that checkout (`--workdir`, default: the directory `make deploy` runs
in), the entrypoints are files in it (`pipelines/flows.py:pipeline`, `:retrain`) and the params
path is relative to it, so each run reads that machine's params.yaml. A `git_clone` pull step
would start every run in a fresh clone without the data, checkpoints and registry it builds on.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gsm.params import Params, load_params
from pipelines.serve import next_runs, schedule_of

PIPELINE_DEPLOYMENT = "gsm-pipeline"
ENTRYPOINTS = {"gsm-pipeline": "pipelines/flows.py:pipeline", "retrain": "pipelines/flows.py:retrain"}
# The flow runs' environment on the worker, on top of the worker's own (as `make schedule` sets it).
RUN_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}


def worker_params_path(params: Path, root: Path) -> str:
    """The params file as the worker opens it: relative to the project root when inside it (the
    worker's checkout has its own params.yaml there), else the absolute path, as it is."""
    path = params.resolve()
    try:
        return str(path.relative_to(root.resolve()))
    except ValueError:
        return str(path)


def check_workdir(workdir: str) -> str:
    """The worker's checkout: an absolute path (on the worker machine, not necessarily this one)."""
    if not Path(workdir).is_absolute():
        raise ValueError(f"--workdir must be an absolute path on the worker machine, got {workdir!r}")
    return workdir


def build_deployments(p: Params, params: str, workdir: str) -> list[Any]:
    """The two deployments of the work pool (built, not registered): each runs its flow's file in
    `workdir` with the params file `params` (relative to `workdir` unless absolute), one run at a time."""
    from prefect.runner.storage import LocalStorage

    from pipelines.flows import pipeline, retrain

    common: dict[str, Any] = dict(work_pool_name=p.prefect.work_pool, job_variables={"env": dict(RUN_ENV)},
                                  concurrency_limit=1)  # fmt: skip
    deployments = [
        pipeline.to_deployment(
            name=PIPELINE_DEPLOYMENT, parameters={"params": params, "runs": None, "reports": "reports"},
            description="The DVC chain, download to register, on demand (pipelines/flows.py).", **common,
        ),
        retrain.to_deployment(
            name=p.prefect.deployment_name, schedules=[schedule_of(p)], parameters={"params": params, "runs": None},
            description="Finetune the champion on the configured data, evaluate, register (pipelines/flows.py).",
            **common,
        ),
    ]  # fmt: skip
    for d in deployments:
        # Files of the worker's checkout, whatever this process's working directory: the pull step
        # makes `workdir` the run's working directory before the entrypoint is loaded.
        d.entrypoint = ENTRYPOINTS[d.flow_name]
        d.storage = LocalStorage(workdir)
    return deployments


def pool_worker_class(pool_type: str) -> Any:
    """The installed Prefect worker class of `pool_type`; an unknown type is a one-line ValueError."""
    from prefect.workers.base import BaseWorker

    cls = BaseWorker.get_worker_class_from_type(pool_type)
    if cls is None:
        known = ", ".join(sorted(BaseWorker.get_all_available_worker_types()))
        raise ValueError(f"unknown work pool type {pool_type!r} (installed worker types: {known})")
    return cls


def api_url() -> str:
    """The team's Prefect server; without one the deployments would vanish with an ephemeral API."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise RuntimeError("PREFECT_API_URL is not set: a work pool needs a Prefect server every machine reaches "
                           "(e.g. `prefect server start --host 0.0.0.0` on one, PREFECT_API_URL=http://<host>:4200/api "
                           "on all); on one machine, `make schedule` needs none")  # fmt: skip
    return url


def check_server(url: str, timeout: float = 5.0) -> None:
    """A one-line RuntimeError unless a server answers at `url` (any HTTP reply counts: Prefect
    Cloud answers an unauthenticated /health too)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RuntimeError(f"no Prefect server answers at PREFECT_API_URL={url} ({reason})") from None


def ensure_pool(name: str, pool_type: str) -> tuple[Any, bool]:
    """The work pool `name`, created with `pool_type`'s default job template if missing. Returns it
    and whether it was created; one of another type is a one-line ValueError."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    worker = pool_worker_class(pool_type)
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = worker.get_default_base_job_template()
            return client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template)), True
    if pool.type != pool_type:
        raise ValueError(f"work pool {name!r} exists with type {pool.type!r}, not {pool_type!r}; "
                         f"choose another prefect.work_pool or --type {pool.type}")  # fmt: skip
    return pool, False


def deploy(p: Params, params: str, workdir: str, pool_type: str = "process") -> dict[str, Any]:
    """Create the pool if missing, then register (or update) both deployments. {"flow/name": id}."""
    pool_worker_class(pool_type)  # before contacting anything
    check_server(api_url())
    deployments = build_deployments(p, params, workdir)
    pool, created = ensure_pool(p.prefect.work_pool, pool_type)
    print(f"work pool {pool.name!r} ({pool.type}): {'created' if created else 'exists'}", flush=True)
    return {f"{d.flow_name}/{d.name}": d.apply() for d in deployments}


def worker_command(p: Params) -> list[str]:
    """The worker of the pool, one flow run at a time (one GPU), in this interpreter's environment:
    the flow runs' subprocesses use the same Python (`make setup-cuda`'s on a GPU machine)."""
    return [sys.executable, "-m", "prefect", "worker", "start", "--pool", p.prefect.work_pool, "--limit", "1"]


def describe(p: Params, params: str, workdir: str) -> str:
    """What `deploy` would register (the deployment objects themselves), and the worker command."""
    lines = [f"work pool: {p.prefect.work_pool}"]
    for d in build_deployments(p, params, workdir):
        limit = f"at most {d.concurrency_limit} run at a time"
        lines.append(f"deployment: {d.flow_name}/{d.name} ({d.entrypoint}, {limit})")
        lines.append(f"  parameters: {d.parameters}")
        if d.schedules:
            cron = d.schedules[0].schedule
            lines.append(f"  schedule: cron {cron.cron!r} ({cron.timezone}); next runs: {', '.join(next_runs(p))}")
        else:
            lines.append("  schedule: none (run on demand)")
    lines.append(f"pull step: set_working_directory {workdir}")
    lines.append(f"worker (on the GPU machine): python {' '.join(worker_command(p)[1:])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.deploy", description=__doc__.splitlines()[0])
    ap.add_argument("action", nargs="?", choices=("deploy", "worker"), default="deploy",
                    help="deploy: register the pool and both deployments (default); worker: start a worker "
                         "on the pool here (the GPU machine)")  # fmt: skip
    ap.add_argument("--params", default="params.yaml", type=Path, help="params file (default: params.yaml)")
    ap.add_argument("--workdir", default=None,
                    help="the repository's checkout on the worker machine, absolute (default: this directory)")
    ap.add_argument("--type", default="process", dest="pool_type",
                    help="type of the work pool if it is created (default: process)")
    ap.add_argument("--dry-run", action="store_true", help="print the deployments; contact no server")
    a = ap.parse_args(argv)
    try:
        p = load_params(a.params)
        if a.action == "worker":
            check_server(api_url())
            cmd = worker_command(p)
            print("python", " ".join(cmd[1:]), flush=True)
            os.execv(cmd[0], cmd)  # the worker replaces this process: Ctrl-C and signals reach it
        root = Path.cwd()
        if a.workdir is None and not (root / ENTRYPOINTS["retrain"].split(":")[0]).is_file():
            raise FileNotFoundError(f"run from the repository's root (no {ENTRYPOINTS['retrain'].split(':')[0]} "
                                    f"in {root}), or give --workdir")  # fmt: skip
        workdir = check_workdir(a.workdir or str(root))
        params = worker_params_path(a.params, root)
        if not a.dry_run:  # bad input and a missing server first, in one line
            pool_worker_class(a.pool_type)
            check_server(api_url())
        print(describe(p, params, workdir), flush=True)
        if not a.dry_run:
            for name, deployment_id in deploy(p, params, workdir, a.pool_type).items():
                print(f"deployed {name} ({deployment_id})")
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
