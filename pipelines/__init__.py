"""Prefect flows over gsm.stages (flows.py), their cache keys (cache.py) and the schedule (serve.py)."""

from pipelines import _fork  # noqa: F401 - a Prefect 3.8 fix that must be in place before any fork
