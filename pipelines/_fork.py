"""Workaround for Prefect 3.8: forked children of a process that ran flows exit with code 1.

Prefect's queue services (its event and log workers) register a threading-atexit hook when they
start; after a fork they reset their state in the child, and that hook then fails on the reset
state (`assert self._done_event is not None`) when the child exits. Forked children are everywhere
here: the data steps' process pools, DataLoader workers, tests that fork. A child has nothing of
its parent's to drain, so right after Prefect's own reset, each service is marked done.
"""

from __future__ import annotations

import asyncio
import os

from prefect._internal.concurrency import services  # registers Prefect's reset first: ours runs after it


def _mark_services_done_after_fork() -> None:
    try:
        for service in list(services._active_services):
            if getattr(service, "_done_event", "absent") is None:
                done = asyncio.Event()  # bound to no loop: is_set() is all the atexit hook asks
                done.set()
                service._done_event = done
    except Exception:  # another Prefect version, other internals: leave them alone
        pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_services_done_after_fork)
