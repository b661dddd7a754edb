"""The DVC pipeline itself (dvc.yaml as committed), run by `dvc` on the tiny profile in a temporary
git + DVC copy of the project: every stage runs, a rerun skips all, a param change reruns exactly
the stages downstream of it, two clean runs score the same, and metrics/params/plots/experiments
commands work on it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import REPO, merged, tiny_params_dict

ALL = ["download", "degrade", "pack", "flow_init", "train_reds", "finetune_vimeo", "evaluate", "register", "model_report"]


class Project:
    def __init__(self, root: Path) -> None:
        self.root = root
        bin_dir = str(Path(sys.executable).parent)  # `gsm` and `dvc` of this interpreter's venv
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                    "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                    "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                    "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
        self.env.pop("MLFLOW_TRACKING_URI", None)  # the params' embedded store, inside the copy

    def run(self, *args: str) -> str:
        r = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout + r.stderr

    def repro(self) -> list[str]:
        """Names of the stages that ran."""
        return re.findall(r"Running stage '([^']+)'", self.run("dvc", "repro"))

    def set_param(self, dotted: str, value: object) -> None:
        params = yaml.safe_load((self.root / "params.yaml").read_text())
        *path, last = dotted.split(".")
        node = params
        for key in path:
            node = node[key]
        node[last] = value
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def metrics(self) -> dict[str, object]:
        return json.loads((self.root / "reports" / "metrics.json").read_text())


def _no_baselines(root: Path) -> None:
    """reports/baselines.json as committed before any baseline is measured (an evaluate dependency)."""
    (root / "reports").mkdir(exist_ok=True)
    (root / "reports" / "baselines.json").write_text("{}\n")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    root = tmp_path_factory.mktemp("dvc_project")
    shutil.copytree(REPO / "gsm", root / "gsm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    params = tiny_params_dict(root)
    params["data"]["root"] = "data"  # relative, as in the real params.yaml
    params["model"]["spynet_weights"] = "runs/quickstart/flow/spynet.pth"  # the flow_init stage's, as there
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _no_baselines(root)
    p = Project(root)
    p.run("git", "init", "-q")
    p.run("dvc", "init", "-q")
    p.run("git", "add", "-A")
    p.run("git", "commit", "-qm", "tiny project")
    yield p


def test_repro_runs_all_then_nothing_and_is_reproducible(project: Project) -> None:
    assert project.repro() == ALL
    first = project.metrics()
    assert set(first["test_sets"]) == {"quickstart-REDS", "quickstart-Vimeo"}  # type: ignore[arg-type]
    assert project.repro() == []  # everything up to date
    assert "Data and pipelines are up to date" in project.run("dvc", "status")

    # From a clean state again: the same scores, to the last digit.
    for out in ("data", "runs", "reports", ".dvc/cache"):  # the cache too: its run-cache would restore outputs
        shutil.rmtree(project.root / out)
    _no_baselines(project.root)
    assert project.repro() == ALL
    assert project.metrics() == first
    registry = json.loads((project.root / "reports" / "registry.json").read_text())
    assert (registry["version"], registry["reused"]) == (1, True)  # the same weights: the same version


def test_param_changes_rerun_exactly_downstream(project: Project) -> None:
    project.repro()
    project.set_param("eval.max_clips", 2)
    assert "eval.max_clips" in project.run("dvc", "params", "diff")
    assert project.repro() == ["evaluate", "register"]

    project.set_param("train.vimeo.lr", 5.0e-4)
    assert project.repro() == ["finetune_vimeo", "evaluate", "register"]

    project.set_param("data.png_level", 3)  # same pixels in the LMDBs: training need not rerun
    assert project.repro() == ["pack"]

    project.set_param("data.quickstart.reds_gap", 3)  # other frames: everything after download
    assert project.repro() == ["download", "degrade", "pack", "flow_init", "train_reds", "finetune_vimeo", "evaluate",
                               "register"]  # fmt: skip

    project.set_param("flow_init.iters", 3)  # another starting SpyNet: both trainings rerun
    assert project.repro() == ["flow_init", "train_reds", "finetune_vimeo", "evaluate", "register"]

    project.set_param("mlflow.gate_tolerance", 0.5)
    assert project.repro() == ["register"]


def _repro_parents(root: Path) -> list[tuple[str, list[str]]]:
    """Each `repro` parent run in the project's store (oldest first), with the names of its runs."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("gsm-vsr")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]) if exp else []
    return [(p.info.run_id, [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id])
            for p in runs if p.info.run_name == "repro"]  # fmt: skip


def test_pipeline_run_nests_each_repro_under_its_own_parent(project: Project) -> None:
    """`gsm pipeline-run -- dvc repro`, as `make repro` runs it: the runs of the stages, each made by
    its own process, nest under one parent per execution; an execution with nothing to do leaves none."""
    before = len(_repro_parents(project.root))
    for lr in (3.1e-4, 2.9e-4):  # other weights each time: a new version, so a register run too
        project.set_param("train.vimeo.lr", lr)
        project.run("gsm", "pipeline-run", "--name", "repro", "--", "dvc", "repro")
    project.run("gsm", "pipeline-run", "--name", "repro", "--", "dvc", "repro")  # up to date
    parents = _repro_parents(project.root)[before:]
    assert len(parents) == 2 and parents[0][0] != parents[1][0]
    assert {"vimeo", "evaluate", "register"} <= set(parents[0][1])  # everything when run alone
    assert parents[1][1] == ["vimeo", "evaluate", "register"]


def _numbers_only(node: object) -> bool:
    """Every leaf a number or null, so `dvc metrics show` / `diff` is a table of scores."""
    if isinstance(node, dict):
        return all(_numbers_only(v) for v in node.values())
    return node is None or (isinstance(node, (int, float)) and not isinstance(node, bool))


def test_metrics_plots_and_experiments(project: Project) -> None:
    project.repro()
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "baseline")
    shown = json.loads(project.run("dvc", "metrics", "show", "--json"))
    metrics = shown[""]["data"]["reports/metrics.json"]["data"]
    assert metrics["test_sets"]["quickstart-REDS"]["psnr"] > 0
    assert set(shown[""]["data"]) == {"reports/metrics.json", "reports/flow_init.json"}
    for path, data in shown[""]["data"].items():  # scores only: strings and config stay in plain outputs
        assert _numbers_only(data["data"]), path

    plots = json.loads(project.run("dvc", "plots", "show", "--json"))["data"]
    losses = plots["reports/curves/train.csv"][0]["content"]["data"]["values"]
    assert [(r["step"], r["stage"]) for r in losses][2:4] == [("3", "reds"), ("4", "vimeo")]
    assert any("val_psnr" in r for r in plots["reports/curves/val.csv"][0]["content"]["data"]["values"])
    assert any(k.startswith("reports/plots/") and k.endswith(".png") for k in plots)

    # An ablation as an experiment: only the training stages and their downstream rerun.
    log = project.run("dvc", "exp", "run", "-n", "no-scatter", "-S", "model.scatter=false")
    ran = re.findall(r"Running stage '([^']+)'", log)
    assert ran == ["train_reds", "finetune_vimeo", "evaluate", "register", "model_report"]
    table = project.run("dvc", "exp", "show", "--no-pager", "--csv")
    assert "no-scatter" in table and "model.scatter" in table


def test_remote_round_trip_evaluates_from_pulled_data_only(project: Project, tmp_path: Path) -> None:
    """The README's DVC-remote path: push, fresh clone, pull, `dvc repro --allow-missing`; the clone
    has no frame trees (source/, lr/ are not cached), so evaluation must read only what came back."""
    project.repro()
    remote = tmp_path / "remote"
    project.run("dvc", "remote", "add", "-f", "-d", "local", str(remote))
    project.run("git", "add", "-A")
    project.run("git", "commit", "-qm", "run to share", "--allow-empty")
    project.run("dvc", "push")
    clone = Project(tmp_path / "clone")
    project.run("git", "clone", "-q", str(project.root), str(clone.root))
    clone.run("dvc", "pull")
    profile = clone.root / "data" / "quickstart"
    assert (profile / "manifest.json").is_file() and not (profile / "source").exists() and not (profile / "lr").exists()
    ran = re.findall(r"Running stage '([^']+)'", clone.run("dvc", "repro", "--allow-missing"))
    assert not {"download", "degrade", "pack", "train_reds", "finetune_vimeo"} & set(ran)
    ran = re.findall(r"Running stage '([^']+)'", clone.run("dvc", "repro", "--allow-missing", "-f", "-s", "evaluate"))
    assert ran == ["evaluate"] and not (profile / "source").exists()
    assert clone.metrics()["test_sets"] == project.metrics()["test_sets"]


@pytest.mark.parametrize("params_file", ["params.yaml", "configs/paper.yaml"])
def test_params_files_hold_every_key_dvc_tracks(params_file: str) -> None:
    """`dvc repro` refuses a params file missing a tracked key; both profiles must parse."""
    from gsm.params import load_params

    raw = yaml.safe_load((REPO / params_file).read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for dotted in stage.get("params", []):
            node = raw
            for key in dotted.split("."):
                assert isinstance(node, dict) and key in node, f"{params_file}: {dotted} (stage {name})"
                node = node[key]
    p = load_params(REPO / params_file)
    assert p.data.profile == ("quickstart" if params_file == "params.yaml" else "paper")


_REGISTER = """\
import json, pathlib, sys
import yaml
x = yaml.safe_load(open("params.yaml"))["x"]
store = pathlib.Path(sys.argv[1])  # the registry: outside the workspace, as MLflow's store is
best = max(x, int(store.read_text()) if store.is_file() else 0)
store.write_text(str(best))
pathlib.Path("reports").mkdir(exist_ok=True)
pathlib.Path("reports/registry.json").write_text(json.dumps({"champion": best}))
"""


@pytest.mark.parametrize("fixed", [True, False])
def test_register_outputs_are_never_restored_from_the_run_cache(tmp_path: Path, fixed: bool) -> None:
    """The issue's sequence on a toy stage with the register stage's outputs as dvc.yaml declares
    them: v1, then v2 takes over, then the param goes back; registry.json must still say v2 (the
    registry's state), not v1 brought back by the run-cache. `fixed=False` declares registry.json as
    it was when the bug was seen (a `cache: false` metric, which DVC still run-caches) to show that
    the toy does reproduce it."""
    register = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["register"]
    declared = {"metrics": register.get("metrics", []), "outs": register.get("outs", [])}
    if not fixed:
        declared = {"metrics": [{"reports/registry.json": {"cache": False}}], "outs": []}
    root, store = tmp_path / "repo", tmp_path / "registry.txt"
    root.mkdir()
    (root / "register.py").write_text(_REGISTER)
    stage = {"cmd": f"{sys.executable} register.py {store}", "deps": ["register.py"], "params": ["x"],
             **{k: v for k, v in declared.items() if v}}  # fmt: skip
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"register": stage}}))
    p = Project(root)
    p.run("dvc", "init", "--no-scm", "-q")
    for x in (1, 2, 1):
        (root / "params.yaml").write_text(f"x: {x}\n")
        p.repro()
    champion = json.loads((root / "reports" / "registry.json").read_text())["champion"]
    assert champion == (2 if fixed else 1)
