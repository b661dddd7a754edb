"""gsm.tracking against throwaway stores: the experiment's kind, pipeline parent runs, git_dirty."""

from __future__ import annotations

from pathlib import Path

import pytest

from gsm.tracking import TrackingTarget, client_for, experiment_id

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
