"""`make schedule`'s private Prefect server dies with the process that started it, even by kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

CHILD = """
import sys, time
from pipelines.serve import local_server
with local_server(timeout=300) as url:
    print(url, flush=True)
    time.sleep(600)
"""


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_killed_scheduler_takes_its_server_with_it(tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    parent = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert parent.stdout is not None
        url = parent.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and _answers(url)
        parent.send_signal(signal.SIGKILL)  # no finally block runs in the scheduler
        parent.wait()
        deadline = time.monotonic() + 30
        while _answers(url) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _answers(url), "the Prefect server outlived the scheduler that started it"
    finally:
        parent.kill()
