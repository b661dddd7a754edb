"""MLflow plumbing shared by training, evaluation and the model registry.

One place decides where runs go and what provenance they carry, so a training run, the evaluation
that scored it and the registered model version all point at the same store and the same code:

* `MlflowConfig` is the `mlflow` section of params.yaml. The store defaults to an embedded one in
  the project (`sqlite:///mlflow.db`, artifacts in `mlartifacts/` beside it, both relative to the
  working directory, which is the project root under DVC); `$MLFLOW_TRACKING_URI` wins over it,
  an explicit `--tracking-uri` over both, and `tracking_uri: null` turns tracking off.
* `provenance_tags` records the git commit (and whether the code or params differ from it) and the
  sha256 of dvc.lock, the pipeline state a run started from.
* `MlflowRun` is one run driven through `MlflowClient`, never the process-global active run, so
  stages (and Prefect tasks) cannot leak runs into each other.
* `pipeline_run` is the parent run of one pipeline execution; the stages' runs nest under it.

MLflow is imported lazily: commands that track nothing do not pay its import time.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gsm.configs import from_mapping
from gsm.io import sha256_file

EXPERIMENT = "gsm-vsr"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# The experiment tag MLflow 3's UI reads for an experiment's kind, and the value of classic training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
PARENT_RUN_ENV = "GSM_PARENT_RUN_ID"  # the running pipeline's run: new runs nest under it
PARENT_TAG = "mlflow.parentRunId"  # the run tag MLflow nests runs by

GateMetric = Literal["psnr", "ssim", "psnr_gain", "ssim_gain"]  # all higher-is-better


@dataclass(frozen=True)
class MlflowConfig:
    """Where runs and registered models go, and how `register` gates the `champion` alias."""

    # null: no tracking (training and evaluation log only their files). $MLFLOW_TRACKING_URI wins.
    tracking_uri: str | None = DEFAULT_TRACKING_URI
    # Artifact location of a new experiment in a sqlite store: a path relative to the database's
    # folder, an absolute path, or a URI (s3://...). Other stores (a server) choose their own.
    artifact_root: str = "mlartifacts"
    experiment: str = EXPERIMENT
    model_name: str = "gsm-vsr"
    gate_set: str | None = None  # test set in reports/metrics.json; null = its first (alphabetical)
    gate_metric: GateMetric = "psnr"
    gate_tolerance: float = 0.0  # a new version becomes champion only above champion + tolerance
    # How the registered pyfunc streams a clip (defaults of its `predict` params).
    predict_chunk: int = 32
    predict_chunk_overlap: int = 4
    predict_tile: int | None = None
    predict_tile_overlap: int = 16

    def __post_init__(self) -> None:
        if self.tracking_uri is not None and not self.tracking_uri.strip():
            raise ValueError("tracking_uri must be a URI or null, got ''")
        for name in ("artifact_root", "experiment", "model_name"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must not be empty")
        if re.search(r"[/:@]", self.model_name):
            raise ValueError(f"model_name must not contain '/', ':' or '@' (they end models:/ URIs), "
                             f"got {self.model_name!r}")
        if self.gate_set is not None and not self.gate_set.strip():
            raise ValueError("gate_set must be a test set name or null, got ''")
        if not (math.isfinite(self.gate_tolerance) and self.gate_tolerance >= 0):
            raise ValueError(f"gate_tolerance must be a number >= 0, got {self.gate_tolerance!r}")
        if self.predict_chunk < 1 or self.predict_chunk_overlap < 0:
            raise ValueError("predict_chunk must be >= 1 and predict_chunk_overlap >= 0")
        if self.predict_tile is not None and not 0 <= self.predict_tile_overlap < self.predict_tile:
            raise ValueError(f"predict_tile_overlap must be in [0, predict_tile), got {self.predict_tile_overlap}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "mlflow") -> MlflowConfig:
        return from_mapping(cls, values, where)


@dataclass(frozen=True)
class TrackingTarget:
    """A resolved store: the URI every client uses, the experiment, and a new experiment's artifacts."""

    uri: str
    experiment: str = EXPERIMENT
    artifact_location: str | None = None  # None: the store's default
    parent_run_id: str | None = None  # the pipeline execution's run (`pipeline_run`); None: top level

    @classmethod
    def from_uri(cls, uri: str) -> TrackingTarget:
        """A bare URI with the `mlflow` section's defaults: a sqlite store keeps its artifacts beside it.

        (MLflow's own default for sqlite is ./mlruns in the working directory, wherever that is.)
        """
        target = tracking_target(MlflowConfig(tracking_uri=None), uri)
        assert target is not None
        return target


def tracking_uri_from_env(uri: str | None) -> str | None:
    """The explicit URI, else $MLFLOW_TRACKING_URI, else None (no MLflow)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI (relative paths as SQLAlchemy reads them); None otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if rest in ("", ":memory:") else Path(rest)


def _has_scheme(text: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", text) is not None


def tracking_target(
    cfg: MlflowConfig, uri: str | None = None, parent_run_id: str | None = None
) -> TrackingTarget | None:
    """The store runs go to: `uri` (a command-line option) > $MLFLOW_TRACKING_URI > cfg.tracking_uri.

    None when all three are unset (tracking off). A relative sqlite path becomes absolute, so every
    process and the artifact location agree on one file whatever their working directory.
    Runs nest under `parent_run_id`, else $GSM_PARENT_RUN_ID (see `pipeline_run`), else nothing.
    """
    chosen = tracking_uri_from_env(uri) or cfg.tracking_uri
    if chosen is None:
        return None
    db = sqlite_path(chosen)
    if db is not None:
        db = db.expanduser().absolute()
        query = chosen.split("?", 1)[1] if "?" in chosen else None
        chosen = f"sqlite:///{db}" + (f"?{query}" if query else "")
    artifacts: str | None = None
    if _has_scheme(cfg.artifact_root):
        artifacts = cfg.artifact_root
    elif db is not None:  # a path: beside the database (a server picks its own artifact store)
        root = Path(cfg.artifact_root).expanduser()
        artifacts = (root if root.is_absolute() else db.parent / root).absolute().as_uri()
    parent = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
    return TrackingTarget(chosen, cfg.experiment, artifacts, parent)


@contextmanager
def mlflow_uris(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (log_model, load_model, models:/ URIs) at `uri`, then restore.

    The fluent API reads process-global URIs; pyfunc logging and loading have no client argument.
    MLflow's setters also export $MLFLOW_TRACKING_URI / $MLFLOW_REGISTRY_URI, so both the
    explicit settings (not the defaults the getters fill in) and the variables are put back
    exactly: otherwise a later `tracking_target` would read this store as the user's choice.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env = {name: os.environ.get(name) for name in names}
    before = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])  # type: ignore[arg-type]  # None: back to unset
        mlflow.set_registry_uri(before[1])  # type: ignore[arg-type]
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def client_for(target: TrackingTarget) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=target.uri, registry_uri=target.uri)


def experiment_id(client: Any, target: TrackingTarget) -> str:
    """The experiment's id, created (with the target's artifact location) when missing.

    A new experiment, and an existing one without a kind, is marked as model development
    (`EXPERIMENT_KIND_TAG`): untagged, MLflow 3 treats it as a GenAI experiment (traces overview,
    runs filed under "Evaluations", no metric columns). A kind someone chose is left alone.
    """
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(target.experiment)
    if exp is None:
        try:
            return str(client.create_experiment(target.experiment, artifact_location=target.artifact_location,
                                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))  # fmt: skip
        except MlflowException:  # another process created it first
            exp = client.get_experiment_by_name(target.experiment)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return str(exp.experiment_id)


# --- provenance ---


def _git(root: Path, *args: str) -> str | None:
    # GIT_OPTIONAL_LOCKS=0: `git status` must not take the index lock from a concurrent git command.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                             env=env, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit(root: str | Path = ".") -> str | None:
    """HEAD's commit of the repository holding `root`; None outside git (a tarball, no git binary)."""
    return _git(Path(root), "rev-parse", "HEAD") or None


GENERATED = ("reports", "dvc.lock")  # results and DVC's record of them, rewritten by every `make repro`


def git_dirty(root: str | Path = ".") -> bool | None:
    """Whether the code or params differ from HEAD (the commit alone would not reproduce the run).

    Changed tracked files count unless the pipeline writes them: reports/, dvc.lock, what dvc.yaml
    declares as outs, metrics or plots, and the .gitignore DVC keeps beside an out. A run rewrites
    those itself, so counting them would mark every run after the first `make repro` dirty.
    None outside git.
    """
    root = Path(root)
    changed = _git(root, "-c", "core.quotepath=off", "diff", "--name-only", "--no-renames", "HEAD", "--")
    prefix = _git(root, "rev-parse", "--show-prefix")  # the project's folder in the repository
    if changed is None or prefix is None:
        return None
    outs = dvc_outputs(root)
    ignores = [out.rsplit("/", 1)[0] + "/.gitignore" for out in outs if "/" in out]
    params = _yaml(root / "params.yaml")
    generated = re.compile("|".join(f"{re.escape(prefix)}{_path_regex(t, params)}(?:/.*)?"
                                    for t in (*GENERATED, *outs, *ignores)))  # fmt: skip
    return any(not generated.fullmatch(path) for path in changed.splitlines())


def dvc_outputs(root: Path) -> list[str]:
    """The outs, metrics and plots dvc.yaml declares (its stages' and its top-level plots), as
    written there: relative to `root`, `${...}` unresolved."""
    spec = _yaml(root / "dvc.yaml")
    entries = [e for stage in (spec.get("stages") or {}).values() for kind in ("outs", "metrics", "plots")
               for e in stage.get(kind) or []]  # fmt: skip
    entries += spec.get("plots") or []
    return [str(next(iter(e)) if isinstance(e, dict) else e).strip("/") for e in entries]


def _path_regex(template: str, params: Mapping[str, Any]) -> str:
    """A regex of the path a dvc.yaml entry names: `${key}` is params.yaml's value, as DVC reads it,
    or any one folder name when params.yaml has none."""
    import posixpath

    def value(m: re.Match[str]) -> str:
        node: Any = params
        for key in m.group(1).strip().split("."):
            node = node.get(key) if isinstance(node, Mapping) else None
        return str(node) if isinstance(node, (str, int, float)) and not isinstance(node, bool) else "\0"

    path = posixpath.normpath(re.sub(r"\$\{([^}]*)\}", value, template))
    return re.escape(path).replace("\0", "[^/]+")


def _yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping file's content; {} when it is missing or not a mapping."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def dvc_lock_sha256(root: str | Path = ".") -> str | None:
    """sha256 of dvc.lock: the exact data, params and outputs DVC recorded; None before the first repro."""
    lock = Path(root) / "dvc.lock"
    return sha256_file(lock) if lock.is_file() else None


def provenance_tags(root: str | Path = ".") -> dict[str, str]:
    """Tags every run and model version carries: git commit and dirty flag, dvc.lock's sha256.

    The commit also goes to `mlflow.source.git.commit`, which the MLflow UI shows as the run's source.
    """
    tags: dict[str, str] = {}
    commit = git_commit(root)
    if commit:
        tags["git_commit"] = tags["mlflow.source.git.commit"] = commit
        dirty = git_dirty(root)
        if dirty is not None:
            tags["git_dirty"] = str(dirty).lower()
    lock = dvc_lock_sha256(root)
    if lock:
        tags["dvc_lock_sha256"] = lock
    return tags


# --- runs ---


class MlflowRun:
    """One MLflow run, through MlflowClient (no process-global active run).

    `run_id` from a checkpoint resumes that run; a run id the store does not know starts a new one.
    Metrics are buffered and sent in batches by `flush`. A new run gets `params` and `tags`, plus
    the provenance tags and a `stage` tag naming it. With a parent in the target, the run (a
    resumed one too: the execution finishing it is the one that shows it) nests under it.
    """

    def __init__(
        self, target: TrackingTarget | str, name: str, params: Mapping[str, str], run_id: str | None = None, *,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        self.target = target if isinstance(target, TrackingTarget) else TrackingTarget.from_uri(target)
        self.client = client_for(self.target)
        self._pending: list[Any] = []
        resumed = None
        if run_id is not None:
            try:
                resumed = self.client.get_run(run_id)
            except MlflowException:
                pass
        if resumed is not None:
            self.run_id = resumed.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            for key, value in parent_tag(self.client, self.target, resumed.info.experiment_id).items():
                self.client.set_tag(self.run_id, key, value)
            return
        exp_id = experiment_id(self.client, self.target)
        all_tags = {"stage": name, **provenance_tags(), **dict(tags or {}),
                    **parent_tag(self.client, self.target, exp_id)}  # fmt: skip
        run = self.client.create_run(exp_id, run_name=name, tags=all_tags)
        self.run_id = run.info.run_id
        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow's per-call param limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in values.items() if math.isfinite(v)]

    def flush(self) -> None:
        while self._pending:
            chunk, self._pending = self._pending[:1000], self._pending[1000:]  # per-call metric limit
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's files under `artifact_path` (default: the folder's name)."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def close(self, status: str = "FINISHED", artifacts: tuple[Path, ...] = ()) -> None:
        """Send pending metrics and `artifacts` (those that exist), then end the run with `status`.

        A failing run still ends: an artifact upload error must not hide why the run failed.
        """
        try:
            self.flush()
            for path in artifacts:
                if Path(path).exists():
                    self.log_artifact(path)
        except Exception:
            if status == "FINISHED":
                self.client.set_terminated(self.run_id, status="FAILED")
                raise
        self.client.set_terminated(self.run_id, status=status)


def parent_tag(client: Any, target: TrackingTarget, exp_id: str) -> dict[str, str]:
    """The tag nesting a run of experiment `exp_id` under the target's parent ({} without one).

    The parent must be a running run of the same experiment: the UI nests runs only within one, and a
    finished parent is a stale $GSM_PARENT_RUN_ID left from an earlier execution.
    """
    from mlflow.exceptions import MlflowException

    parent = target.parent_run_id
    if parent is None:
        return {}
    try:
        info = client.get_run(parent).info
    except MlflowException:
        info = None
    if info is None or info.experiment_id != exp_id or info.status != "RUNNING":
        why = "not a run of this store" if info is None else (
            f"in another experiment than {target.experiment!r}" if info.experiment_id != exp_id else info.status)
        raise RuntimeError(f"parent run {parent} (${PARENT_RUN_ENV} or the flow's) is {why}: unset "
                           f"{PARENT_RUN_ENV}, or run the pipeline as `gsm pipeline-run -- dvc repro`")  # fmt: skip
    return {PARENT_TAG: parent}


@contextmanager
def pipeline_run(
    target: TrackingTarget | None, name: str, tags: Mapping[str, str] | None = None
) -> Iterator[str | None]:
    """The parent run of one pipeline execution, RUNNING while the block runs; yields its id (None:
    tracking off). The caller hands the id on: a Prefect flow to its stage tasks, `gsm pipeline-run`
    to the command it wraps as $GSM_PARENT_RUN_ID.

    Why a run opened by whoever starts the execution, handed down: `dvc repro` runs each stage in its
    own process and gives them no common id, and neither the params nor dvc.lock (rewritten after
    every stage) nor the commit tell one execution from the next (`dvc repro -f`, a resumed run).
    An environment variable crosses DVC's processes unchanged, and the flows pass the same id as an
    argument. The run ends FINISHED, FAILED on an exception, KILLED on Ctrl-C; it is deleted when no
    run nested under it (every stage was up to date), so a no-op `make repro` leaves nothing behind.
    """
    if target is None:
        yield None
        return
    with mlflow_errors(target.uri):
        run = MlflowRun(target, name, {}, tags={"pipeline": name, **dict(tags or {})})
    status = "FAILED"
    try:
        yield run.run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        with mlflow_errors(target.uri):
            run.close(status)
            if not child_runs(run.client, run.run_id):
                run.client.delete_run(run.run_id)


def child_runs(client: Any, run_id: str) -> list[Any]:
    """The runs nested directly under `run_id`, oldest first."""
    exp_id = client.get_run(run_id).info.experiment_id
    return client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{run_id}'",
                              order_by=["attributes.start_time ASC"])  # fmt: skip


def log_finished_run(
    target: TrackingTarget, name: str, *, params: Mapping[str, str], metrics: Mapping[str, float],
    artifacts: tuple[Path, ...] = (), tags: Mapping[str, str] | None = None,
) -> str:
    """A run made in one go (evaluation): params, step-0 metrics, artifacts; returns its id."""
    run = MlflowRun(target, name, params, tags=tags)
    run.log(0, metrics)
    run.close("FINISHED", artifacts)
    return run.run_id


@contextmanager
def mlflow_errors(uri: str | None) -> Iterator[None]:
    """MLflow's exceptions (store unreachable, locked, unknown model) as one-line RuntimeErrors naming
    the store, which the CLI prints as `error: ...`; other exceptions pass unchanged."""
    try:
        yield
    except Exception as exc:
        errors = sys.modules.get("mlflow.exceptions")
        if uri is None or errors is None or not isinstance(exc, errors.MlflowException):
            raise
        raise RuntimeError(f"MLflow store {uri}: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    """An exception's message as one line (MLflow's messages often carry a JSON body or a trace)."""
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = [
    "DEFAULT_TRACKING_URI",
    "EXPERIMENT",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "PARENT_RUN_ENV",
    "PARENT_TAG",
    "MlflowConfig",
    "MlflowRun",
    "TrackingTarget",
    "child_runs",
    "client_for",
    "dvc_lock_sha256",
    "dvc_outputs",
    "experiment_id",
    "first_line",
    "git_commit",
    "git_dirty",
    "log_finished_run",
    "mlflow_errors",
    "mlflow_uris",
    "parent_tag",
    "pipeline_run",
    "provenance_tags",
    "sha256_file",
    "sqlite_path",
    "tracking_target",
    "tracking_uri_from_env",
]
