"""gsm.tracking against throwaway stores and repositories: the experiment's kind, pipeline parent runs, git_dirty."""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, tiny_params_dict
from typer.testing import CliRunner

from gsm.cli import app
from gsm.tracking import (
    MlflowRun,
    TrackingTarget,
    client_for,
    experiment_id,
    git_dirty,
    pipeline_run,
    provenance_tags,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture
def target(tmp_path: Path) -> TrackingTarget:
    return TrackingTarget.from_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_experiment_is_marked_model_development(target: TrackingTarget) -> None:
    client = client_for(target)
    created = experiment_id(client, target)
    assert client.get_experiment(created).tags["mlflow.experimentKind"] == "custom_model_development"

    older = client.create_experiment("made-before")  # an existing experiment without a kind gets it
    assert experiment_id(client, TrackingTarget(target.uri, "made-before")) == older
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"

    client.set_experiment_tag(created, "mlflow.experimentKind", "genai_development")  # chosen: kept
    experiment_id(client, target)
    assert client.get_experiment(created).tags["mlflow.experimentKind"] == "genai_development"


def _parents(client: Any, names: tuple[str, ...]) -> dict[str, list[str]]:
    """Each run name's runs' parent ids, oldest first."""
    exp = client.get_experiment_by_name("gsm-vsr")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return {n: [r.data.tags.get("mlflow.parentRunId", "") for r in runs if r.info.run_name == n] for n in names}


STAGE_RUN = """import sys
from gsm.tracking import MlflowConfig, MlflowRun, tracking_target
MlflowRun(tracking_target(MlflowConfig(tracking_uri=sys.argv[1])), sys.argv[2], {}).close()
"""


def test_pipeline_run_groups_the_runs_of_separate_processes(target: TrackingTarget, tmp_path: Path) -> None:
    """As `dvc repro` runs its stages: one process each, the parent handed down in the environment."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**tiny_params_dict(tmp_path), "mlflow": {"tracking_uri": target.uri}}))
    stage = [sys.executable, "-c", STAGE_RUN, target.uri]
    script = " && ".join(shlex.join([*stage, name]) for name in ("reds", "evaluate", "register"))
    for _ in range(2):
        r = CliRunner().invoke(app, ["pipeline-run", "--params", str(params), "--name", "repro", "--", "sh", "-c",
                                     script])  # fmt: skip
        assert r.exit_code == 0, r.output
    client = client_for(target)
    parents = _parents(client, ("reds", "evaluate", "register"))
    first, second = ({names[i] for names in parents.values()} for i in (0, 1))
    assert len(first) == len(second) == 1 and first != second and "" not in first | second
    parent = client.get_run(first.pop())
    assert (parent.info.run_name, parent.info.status) == ("repro", "FINISHED")

    # A failing command fails its parent and exits with its status; one that logged nothing leaves none.
    failing = CliRunner().invoke(app, ["pipeline-run", "--params", str(params), "--", "sh", "-c",
                                       shlex.join([*stage, "reds"]) + " && exit 3"])  # fmt: skip
    assert failing.exit_code == 3
    assert client.get_run(_parents(client, ("reds",))["reds"][-1]).info.status == "FAILED"
    assert CliRunner().invoke(app, ["pipeline-run", "--params", str(params), "--", "true"]).exit_code == 0
    exp = client.get_experiment_by_name("gsm-vsr").experiment_id
    assert [r.info.run_name for r in client.search_runs([exp], "attributes.run_name = 'pipeline'")] == ["pipeline"]


def test_a_stale_parent_is_refused(target: TrackingTarget) -> None:
    with pipeline_run(target, "old") as parent:
        MlflowRun(replace(target, parent_run_id=parent), "reds", {}).close()
    with pytest.raises(RuntimeError, match="FINISHED: unset GSM_PARENT_RUN_ID"):
        MlflowRun(replace(target, parent_run_id=parent), "reds", {})


def _git_project(root: Path) -> Path:
    """A committed project: the real dvc.yaml and params.yaml, code, and what the pipeline writes."""
    files = {"dvc.yaml": (REPO / "dvc.yaml").read_text(), "params.yaml": (REPO / "params.yaml").read_text(),
             "gsm/stage.py": "x = 1\n", "reports/metrics.json": "{}\n", "reports/gpu_runtime.json": "{}\n",
             "dvc.lock": "schema: '2.0'\n", "runs/quickstart/reds/metrics.jsonl": "{}\n",
             "runs/quickstart/reds/.gitignore": "/checkpoints\n", "data/quickstart/manifest.json": "{}\n"}  # fmt: skip
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)
    return root


@pytest.mark.parametrize("changed, dirty", [
    ("reports/metrics.json", False), ("reports/gpu_runtime.json", False), ("dvc.lock", False),
    ("runs/quickstart/reds/metrics.jsonl", False), ("runs/quickstart/reds/.gitignore", False),
    ("data/quickstart/manifest.json", False), ("gsm/stage.py", True), ("params.yaml", True), ("dvc.yaml", True),
])  # fmt: skip
def test_git_dirty_means_code_or_params_changed(tmp_path: Path, changed: str, dirty: bool) -> None:
    root = _git_project(tmp_path)
    assert git_dirty(root) is False
    with (root / changed).open("a") as fh:
        fh.write("# changed\n")
    assert git_dirty(root) is dirty
    subprocess.run(["git", "-C", str(root), "add", changed], check=True)  # staged: the same
    assert git_dirty(root) is dirty
    assert provenance_tags(root)["git_dirty"] == str(dirty).lower()


def test_git_dirty_outside_git_is_unknown(tmp_path: Path) -> None:
    assert git_dirty(tmp_path) is None
