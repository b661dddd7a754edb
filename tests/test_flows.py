"""The Prefect flows (pipelines/): cache keys, the tiny pipeline twice, retries, retrain, the schedule.

Flows run against prefect_test_harness (a temporary API server with its own SQLite database) in a
temporary PREFECT_HOME, so results and cache records never touch ~/.prefect. The stage functions
are the real ones, wrapped by a spy that counts calls: a cached stage is one that was not called.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_params_dict

# Prefect reads its settings once, when first imported (by pipelines/): set them before that.
_PREFECT_HOME = tempfile.mkdtemp(prefix="gsm-test-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ.update({
    "PREFECT_HOME": _PREFECT_HOME,
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",  # the harness is stopped before late log batches
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
})  # fmt: skip

from gsm import stages  # noqa: E402
from gsm.params import Params, parse_params  # noqa: E402

STAGE_FUNCTIONS = ("download", "degrade", "pack", "train", "evaluate", "register", "champion_checkpoint")


def _params_dict(root: Path, **prefect: Any) -> dict[str, Any]:
    d = tiny_params_dict(root)
    d["mlflow"] = {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "flows-test"}
    d["prefect"] = {"download_retries": 1, "retry_delay_s": 0, **prefect}
    return d


def _write(root: Path, d: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


# --- (a) cache keys: pure functions, no server ----------------------------------------------------


@pytest.fixture
def keyed(tmp_path: Path) -> Callable[..., str]:
    """stage_key of a stage on the tiny params with `changes` ({"train.reds.lr": 0.5}) applied."""
    from pipelines.cache import stage_key

    (tmp_path / "data" / "quickstart" / "source").mkdir(parents=True)
    (tmp_path / "data" / "quickstart" / "lr").mkdir(parents=True)
    for f in ("source/index.json", "lr/index.json", "manifest.json"):
        (tmp_path / "data" / "quickstart" / f).write_text('{"a": 1}')
    for stage in ("reds", "vimeo"):
        (tmp_path / "runs" / stage / "checkpoints").mkdir(parents=True)
        (tmp_path / "runs" / stage / "checkpoints" / "last.pt").write_bytes(stage.encode())
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "metrics.json").write_text("{}")
    (tmp_path / "reports" / "evaluated_model.json").write_text("{}")

    def key(task_stage: str, changes: dict[str, Any] | None = None, **args: Any) -> str:
        d = _params_dict(tmp_path)
        for dotted, value in (changes or {}).items():
            *parents, last = dotted.split(".")
            node = d
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        task_args = {"p": parse_params(d), "runs": tmp_path / "runs", "out": tmp_path / "reports",
                     "reports": tmp_path / "reports", "checkpoint": None, **args}  # fmt: skip
        return stage_key(task_stage, task_args)

    key.root = tmp_path  # type: ignore[attr-defined]
    return key


@pytest.mark.parametrize(
    ("stage", "args", "changes", "unrelated"),
    [
        ("download", {}, {"sources.vid4_gt.url": "file:///x.zip"}, {"eval.max_clips": 2}),
        ("pack", {}, {"data.png_level": 3}, {"train.reds.lr": 0.5}),
        ("pack", {}, {"data.backend": "folder"}, {"model.embed_dim": 8}),
        ("train", {"stage": "reds"}, {"train.reds.lr": 0.5}, {"train.vimeo.lr": 0.5}),
        ("train", {"stage": "reds"}, {"model.embed_dim": 8}, {"eval.max_clips": 2}),
        ("train", {"stage": "vimeo"}, {"train.seed": 1}, {"train.reds.iters": 9}),
        ("evaluate", {}, {"eval.max_clips": 2}, {"train.vimeo.iters": 9}),
        ("register", {}, {"mlflow.gate_tolerance": 0.5}, {"eval.max_clips": 2}),
    ],
)
def test_key_follows_the_stage_params(keyed: Callable[..., str], stage: str, args: dict[str, Any],
                                      changes: dict[str, Any], unrelated: dict[str, Any]) -> None:  # fmt: skip
    base = keyed(stage, **args)
    assert keyed(stage, **args) == base  # deterministic
    assert keyed(stage, changes, **args) != base
    assert keyed(stage, unrelated, **args) == base
    assert keyed(stage, {"prefect.cache": False, "data.workers": 2} if stage == "train" else {"prefect.cache": False},
                 **args) == base  # fmt: skip


def test_stage_params_and_code_are_dvc_yaml_s() -> None:
    from pipelines.cache import dvc_stage

    assert dvc_stage("train_reds") == (("model", "train.seed", "train.device", "train.reds"),
                                       ("models", "ops", "train"))  # fmt: skip
    assert dvc_stage("degrade") == ((), ("data/degrade",))  # keyed on its input, source/index.json
    with pytest.raises(FileNotFoundError, match="no stage 'nope'"):
        dvc_stage("nope")


@pytest.mark.parametrize(
    ("stage", "args", "input_file"),
    [
        ("degrade", {}, "data/quickstart/source/index.json"),
        ("pack", {}, "data/quickstart/lr/index.json"),
        ("train", {"stage": "reds"}, "data/quickstart/manifest.json"),
        ("train", {"stage": "vimeo"}, "runs/reds/checkpoints/last.pt"),
        ("evaluate", {}, "runs/vimeo/checkpoints/last.pt"),
        ("register", {}, "reports/metrics.json"),
    ],
)
def test_key_follows_the_stage_inputs(keyed: Callable[..., str], stage: str, args: dict[str, Any],
                                      input_file: str) -> None:  # fmt: skip
    base = keyed(stage, **args)
    path = keyed.root / input_file  # type: ignore[attr-defined]
    path.write_bytes(path.read_bytes() + b" ")
    assert keyed(stage, **args) != base


def test_key_follows_the_output_location(keyed: Callable[..., str]) -> None:
    """Two checkouts (or runs folders) sharing one PREFECT_HOME must not share results."""
    other = keyed.root / "elsewhere"  # type: ignore[attr-defined]
    assert keyed("train", stage="reds", runs=other) != keyed("train", stage="reds")
    assert keyed("evaluate", out=other) != keyed("evaluate")
    assert keyed("download", {"data.root": str(other)}) != keyed("download")


def test_key_of_other_inputs_unchanged(keyed: Callable[..., str]) -> None:
    base = {s: keyed(s) for s in ("download", "degrade")}
    reds_ckpt = keyed.root / "runs/reds/checkpoints/last.pt"  # type: ignore[attr-defined]
    reds_ckpt.write_bytes(b"other weights")
    assert {s: keyed(s) for s in ("download", "degrade")} == base


def test_key_follows_the_code(keyed: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.cache as cache

    fake = tmp_path / "fake_gsm"
    (fake / "eval").mkdir(parents=True)
    (fake / "stages.py").write_text("# stages\n")
    (fake / "eval" / "metrics.py").write_text("x = 1\n")
    (fake / "data").mkdir()
    (fake / "data" / "degrade.py").write_text("y = 1\n")
    monkeypatch.setattr(cache, "GSM_ROOT", fake)
    evaluate, degrade = keyed("evaluate"), keyed("degrade")
    (fake / "eval" / "metrics.py").write_text("x = 2\n")
    assert keyed("evaluate") != evaluate and keyed("degrade") == degrade
    (fake / "stages.py").write_text("# stages, edited\n")
    assert keyed("degrade") != degrade


def test_missing_input_means_uncached_and_missing_output_means_refresh(keyed: Callable[..., str]) -> None:
    from pipelines.cache import StageCache, missing_outputs

    root = keyed.root  # type: ignore[attr-defined]
    p = parse_params(_params_dict(root))
    args = {"p": p, "runs": root / "runs", "out": root / "reports", "checkpoint": None}
    policy = StageCache(stage="evaluate")
    assert policy.compute_key(None, args, {}) == keyed("evaluate")  # type: ignore[arg-type]
    assert missing_outputs("evaluate", args) == []
    (root / "reports" / "metrics.json").unlink()
    assert missing_outputs("evaluate", args) == [root / "reports" / "metrics.json"]
    (root / "data" / "quickstart" / "manifest.json").unlink()
    assert policy.compute_key(None, args, {}) is None  # type: ignore[arg-type]


def test_prefect_params_are_checked() -> None:
    p = parse_params({"prefect": {"retrain_cron": "30 2 * * *", "timezone": "Europe/Berlin"}})
    assert p.prefect.retrain_cron == "30 2 * * *" and p.prefect.cache is True
    for bad, msg in [({"cron": "x"}, "unknown key prefect.cron"), ({"retrain_cron": "* *"}, "prefect.retrain_cron"),
                     ({"timezone": "Mars/Olympus"}, "prefect.timezone"), ({"cache": "yes"}, "prefect.cache"),
                     ({"download_retries": -1}, "prefect.download_retries")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg.replace(".", r"\.")):
            parse_params({"prefect": bad})


# --- flows in the test harness --------------------------------------------------------------------


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    from prefect.settings import PREFECT_HOME
    from prefect.testing.utilities import prefect_test_harness

    assert str(PREFECT_HOME.value()) == _PREFECT_HOME, "prefect was imported before test_flows set PREFECT_HOME"
    with prefect_test_harness(server_startup_timeout=90):
        yield


@dataclass
class Spy:
    """Wraps the stage functions of gsm.stages (which the tasks call) and records each call."""

    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)  # stage -> calls left to fail

    def install(self, mp: pytest.MonkeyPatch) -> Spy:
        for name in STAGE_FUNCTIONS:
            mp.setattr(stages, name, self._wrap(name, getattr(stages, name)))
        return self

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            if self.fail.get(name, 0) > 0:
                self.fail[name] -= 1
                raise ConnectionError(f"{name}: flaky mirror")
            return real(*args, **kwargs)

        return call

    def names(self, start: int = 0) -> list[str]:
        return [n if n != "train" else f"train-{a[1]}" for n, a, _ in self.calls[start:]]


@dataclass
class Project:
    root: Path
    params: Path
    runs: Path
    reports: Path
    spy: Spy
    first: dict[str, Any]
    calls_after_first: int
    second: dict[str, Any]
    calls_after_second: int

    @property
    def p(self) -> Params:
        from gsm.params import load_params

        return load_params(self.params)


@pytest.fixture(scope="module")
def project(harness: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """The tiny profile through `gsm-pipeline` twice (the second all cached), for the tests below."""
    from pipelines.flows import pipeline

    root = tmp_path_factory.mktemp("flows")
    params = _write(root, _params_dict(root))
    runs, reports = root / "runs", root / "reports"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        spy = Spy().install(mp)
        first = pipeline(params=str(params), runs=str(runs), reports=str(reports))
        n1 = len(spy.calls)
        second = pipeline(params=str(params), runs=str(runs), reports=str(reports))
        yield Project(root, params, runs, reports, spy, first, n1, second, len(spy.calls))


def test_pipeline_runs_every_stage_then_caches_all(project: Project) -> None:
    p, spy = project.p, project.spy
    assert spy.names(0)[: project.calls_after_first] == [
        "download", "degrade", "pack", "train-reds", "train-vimeo", "evaluate", "register"]  # fmt: skip
    assert project.calls_after_second == project.calls_after_first  # the second run called no stage
    outputs = [p.data.source_dir / "index.json", p.data.lr_dir / "index.json", p.data.manifest_path,
               project.runs / "reds/checkpoints/last.pt", project.runs / "vimeo/checkpoints/last.pt",
               *(project.reports / f for f in ("metrics.json", "benchmark.md", "registry.json"))]  # fmt: skip
    assert [f for f in outputs if not f.is_file()] == []
    first, second = project.first, project.second
    assert first["registered"].version == 1 and first["registered"].alias == "champion"
    assert second["registered"] == first["registered"] and second["vimeo"] == first["vimeo"]  # the recorded results
    assert set(second["scores"]) == set(first["scores"]) == {"quickstart-REDS", "quickstart-Vimeo"}


def _nested(project: Project) -> dict[str, list[str]]:
    """Each `gsm-pipeline` parent run (oldest first) and the names of the runs nested under it."""
    from mlflow import MlflowClient

    uri = project.p.mlflow.tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("flows-test").experiment_id
    runs = client.search_runs([exp], order_by=["attributes.start_time ASC"])
    parents = [r.info.run_id for r in runs if r.info.run_name == "gsm-pipeline"]
    return {pid: [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == pid] for pid in parents}


def test_each_flow_run_nests_its_mlflow_runs_under_one_parent(project: Project) -> None:
    """The first flow run's runs under one parent; the second, all cached, leaves none; a third that
    reruns the evaluation nests it under a parent of its own."""
    from pipelines.flows import pipeline

    nested = _nested(project)
    assert list(nested.values()) == [["reds", "vimeo", "evaluate", "register"]]
    (project.reports / "metrics.json").unlink()
    pipeline(params=str(project.params), runs=str(project.runs), reports=str(project.reports))
    first, *later = _nested(project).items()
    assert first[0] == list(nested)[0] and len(later) == 1
    assert later[0][1][0] == "evaluate" and set(later[0][1]) <= {"evaluate", "register"}  # register: cached


def test_deleted_output_reruns_its_stage(project: Project) -> None:
    from pipelines.flows import pipeline

    (project.reports / "metrics.json").unlink()
    start = len(project.spy.calls)
    pipeline(params=str(project.params), runs=str(project.runs), reports=str(project.reports))
    rerun = project.spy.names(start)
    assert rerun[0] == "evaluate" and set(rerun) <= {"evaluate", "register"}  # data and training stay cached
    assert (project.reports / "metrics.json").is_file()


def test_retrain_finetunes_the_champion_and_registers_a_version(project: Project) -> None:
    from pipelines.flows import retrain

    start = len(project.spy.calls)
    out = retrain(params=str(project.params), runs=str(project.runs))
    calls = project.spy.calls[start:]
    assert project.spy.names(start) == ["champion_checkpoint", "train-vimeo", "evaluate", "register"]  # data cached
    champion = out["champion"]
    assert champion.is_file() and calls[1][2]["init_from"] == champion
    run_dir = out["run_dir"]
    assert run_dir.parent == project.runs / "retrain"
    assert out["vimeo"].last == run_dir / "vimeo/checkpoints/last.pt" and out["vimeo"].iterations == 3
    assert (run_dir / "reports/metrics.json").is_file() and (run_dir / "reports/registry.json").is_file()
    registered = out["registered"]
    assert registered.version > project.first["registered"].version and not registered.reused
    assert registered.champion_version is not None  # gated against the champion it started from
    assert registered.alias in ("champion", "challenger")


def test_download_is_retried(harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A download failing once completes on its retry; with no retries left, the flow fails."""
    from prefect import flow

    from pipelines.flows import prepare

    monkeypatch.setattr(stages, "degrade", lambda p, progress=True: p.data.lr_dir)
    monkeypatch.setattr(stages, "pack", lambda p, progress=True: p.data.manifest_path)
    monkeypatch.setattr(stages, "download", lambda p, progress=True: p.data.source_dir)

    @flow
    def data(params: str) -> Path:
        from gsm.params import load_params

        return prepare(load_params(params), False)

    spy = Spy(fail={"download": 1}).install(monkeypatch)
    params = _write(tmp_path, _params_dict(tmp_path, download_retries=1, retry_delay_s=0))
    assert data(str(params)) == tmp_path / "data/quickstart/manifest.json"
    assert spy.names() == ["download", "download", "degrade", "pack"]

    spy = Spy(fail={"download": 1}).install(monkeypatch)
    params = _write(tmp_path / "no-retry", _params_dict(tmp_path / "no-retry", download_retries=0))
    with pytest.raises(ConnectionError, match="flaky mirror"):
        data(str(params))
    assert spy.names() == ["download"]

    def bad_url(p: Params, progress: bool = True) -> Path:
        raise ValueError("sources.reds_train_sharp: HTTP 404")  # a user error: retrying cannot help

    monkeypatch.setattr(stages, "download", bad_url)
    spy = Spy().install(monkeypatch)
    params = _write(tmp_path / "user-error", _params_dict(tmp_path / "user-error", download_retries=3))
    with pytest.raises(ValueError, match="404"):
        data(str(params))
    assert spy.names() == ["download"]


def test_serve_dry_run_and_the_deployment(harness: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run prints the cron of params.yaml and starts nothing; the built deployment, applied to
    the harness's API, carries that cron and time zone."""
    from prefect.client.orchestration import get_client

    from gsm.params import load_params
    from pipelines.serve import build_deployment, main

    params = _write(tmp_path, _params_dict(tmp_path, retrain_cron="15 4 * * 2", timezone="Europe/Berlin",
                                           deployment_name="nightly-test"))  # fmt: skip
    assert main(["--params", str(params), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "cron '15 4 * * 2' (Europe/Berlin)" in out and "retrain/nightly-test" in out
    assert "next runs: " in out

    deployment_id = build_deployment(load_params(params), params, None).apply()
    with get_client(sync_client=True) as client:
        d = client.read_deployment(deployment_id)
    assert d.name == "nightly-test" and d.parameters == {"params": str(params.resolve()), "runs": None}
    assert [(s.schedule.cron, s.schedule.timezone) for s in d.schedules] == [("15 4 * * 2", "Europe/Berlin")]

    bad = _write(tmp_path / "bad", _params_dict(tmp_path / "bad", retrain_cron="61 * * * *"))
    assert main(["--params", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: prefect.retrain_cron")


def _child(q: Any) -> None:
    q.put(os.getpid())


def test_forked_children_exit_cleanly(project: Project) -> None:
    """After flows ran here (Prefect's event and log services started), a forked child (a process
    pool worker, a DataLoader worker) exits with 0 (pipelines/_fork.py)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_child, args=(q,))
    child.start()
    assert q.get(timeout=30) == child.pid
    child.join(30)
    assert child.exitcode == 0
