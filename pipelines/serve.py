"""`python -m pipelines.serve` (`make schedule`): the `retrain` deployment on params.yaml's cron.

The schedule (`prefect.retrain_cron`, `prefect.timezone`) and the deployment's name are read once,
at start; every scheduled run reloads the params file, so other edits apply to the next run.

With PREFECT_API_URL set, the deployment is registered with that server and this process polls it
for due runs. Without it, Prefect's ephemeral mode would serve the deployment but never schedule a
run: its temporary API runs without the scheduler service (Prefect warns "Cannot schedule flows on
an ephemeral server"). So this command then starts a private `prefect server start` (SQLite in
PREFECT_HOME, scheduler on, no UI unless --ui) for as long as it serves, and stops it on exit.
`--dry-run` prints the deployment and its next runs, and starts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from gsm.io import free_port, wait_until_healthy
from gsm.params import Params, load_params


def schedule_of(p: Params) -> Any:
    """The retrain schedule as a Prefect Cron; a cron Prefect rejects is a one-line ValueError."""
    from prefect.schedules import Cron
    from pydantic import ValidationError

    try:
        return Cron(p.prefect.retrain_cron, timezone=p.prefect.timezone)
    except ValueError as exc:  # of a pydantic ValidationError, its first message only: one line
        msg = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise ValueError(f"prefect.retrain_cron {p.prefect.retrain_cron!r}: {msg}") from None


def next_runs(p: Params, n: int = 3) -> list[str]:
    """The next `n` times the schedule fires, in its time zone (what the scheduler will create)."""
    from prefect.server.schemas.schedules import CronSchedule

    s = CronSchedule(cron=p.prefect.retrain_cron, timezone=p.prefect.timezone)
    return [f"{d:%Y-%m-%d %H:%M %Z}" for d in asyncio.run(s.get_dates(n=n))]


def deployment_parameters(params: Path, runs: str | None) -> dict[str, Any]:
    """The retrain flow's parameters: absolute params path; runs left to the flow unless given."""
    return {"params": str(params.resolve()), "runs": str(Path(runs).resolve()) if runs else None}


def build_deployment(p: Params, params: Path, runs: str | None) -> Any:
    """The `retrain` deployment: the cron schedule, the flow's parameters, one run at a time."""
    from prefect.types.entrypoint import EntrypointType

    from pipelines.flows import retrain

    # A module path, not a file path relative to the working directory: the package is installed.
    return retrain.to_deployment(
        name=p.prefect.deployment_name, schedules=[schedule_of(p)], concurrency_limit=1,
        entrypoint_type=EntrypointType.MODULE_PATH,
        parameters=deployment_parameters(params, runs),
        description="Finetune the champion on the configured data, evaluate, register (pipelines/flows.py).",
    )  # fmt: skip


def _check_scheduler_deps() -> None:
    """Prefect 3.8's scheduler service fails on SQLAlchemy 2.1 ("Can't evaluate bulk DML statement")
    and then never creates a run: refuse to serve rather than wait silently forever."""
    import prefect
    import sqlalchemy

    if tuple(int(x) for x in sqlalchemy.__version__.split(".")[:2]) >= (2, 1):
        raise RuntimeError(f"prefect {prefect.__version__}'s scheduler fails under SQLAlchemy {sqlalchemy.__version__}"
                           f" (no run would ever be scheduled); install sqlalchemy<2.1 (`make setup`)")  # fmt: skip


def _tied_to(parent: int) -> Callable[[], None]:
    """preexec_fn for the server: on Linux it gets SIGTERM when `parent` dies, even by kill -9, so
    a killed `make schedule` does not leave a server listening. Elsewhere only the `finally` below
    stops it."""

    def tie() -> None:
        if sys.platform == "linux":
            try:
                ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            except (OSError, AttributeError):
                return
            if os.getppid() != parent:  # died before the tie was made
                os._exit(1)

    return tie


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (the CLI and its uvicorn worker), SIGKILL after 15 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def local_server(port: int = 0, ui: bool = False, timeout: float = 120.0) -> Iterator[str]:
    """A private Prefect server with its scheduler, for as long as the block runs; yields its API URL."""
    from prefect.settings import PREFECT_HOME

    _check_scheduler_deps()
    port = port or free_port()
    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "gsm-serve-server.log"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--ui" if ui else "--no-ui"]  # fmt: skip
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_tied_to(os.getpid()))  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_until_healthy(f"{url}/health", proc, timeout, "the local Prefect server", f"; see {log_path}")
        yield url
    finally:
        _stop(proc)


def describe(p: Params, params: Path, runs: str | None, api: str | None) -> str:
    """What `serve` would serve, from the deployment object itself (built, not registered)."""
    d = build_deployment(p, params, runs)
    cron = d.schedules[0].schedule
    lines = [
        f"deployment: retrain/{d.name} ({d.entrypoint}, at most {d.concurrency_limit} run at a time)",
        f"schedule: cron {cron.cron!r} ({cron.timezone})",
        f"next runs: {', '.join(next_runs(p))}",
        f"parameters: {d.parameters}",
        f"api: {api}" if api else "api: none set (PREFECT_API_URL): a private local Prefect server runs the scheduler",
    ]
    return "\n".join(lines)


def serve(p: Params, params: Path, runs: str | None, *, port: int = 0, ui: bool = False) -> None:
    """Register the deployment and run its scheduled runs until interrupted (blocks)."""
    from prefect import serve as serve_deployments
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def go() -> None:
        serve_deployments(build_deployment(p, params, runs), limit=1)

    if PREFECT_API_URL.value():
        go()
        return
    with local_server(port, ui) as url, temporary_settings(updates={PREFECT_API_URL: url}):
        os.environ["PREFECT_API_URL"] = url  # the flow-run subprocesses read it too
        print(f"local Prefect server at {url.removesuffix('/api')} (log in PREFECT_HOME/gsm-serve-server.log)")
        go()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", type=Path, help="params file (default: params.yaml)")
    ap.add_argument("--runs", default=None, help="runs folder of the flow (default: runs/<data.profile>)")
    ap.add_argument("--dry-run", action="store_true", help="print the deployment and its next runs; start nothing")
    ap.add_argument("--port", type=int, default=0, help="port of the private local server (default: a free one)")
    ap.add_argument("--ui", action="store_true", help="the private local server also serves Prefect's UI")
    a = ap.parse_args(argv)
    try:
        p = load_params(a.params)
        from prefect.settings import PREFECT_API_URL

        print(describe(p, a.params, a.runs, PREFECT_API_URL.value()), flush=True)
        if not a.dry_run:
            serve(p, a.params, a.runs, port=a.port, ui=a.ui)
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
