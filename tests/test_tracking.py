"""gsm.tracking against throwaway stores: the experiment's kind, pipeline parent runs, git_dirty."""

from __future__ import annotations

import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_params_dict
from typer.testing import CliRunner

from gsm.cli import app
from gsm.tracking import MlflowRun, TrackingTarget, client_for, experiment_id, pipeline_run

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
