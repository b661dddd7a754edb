"""Prefect flows over gsm.stages: the functions DVC's stages run through `gsm`, never a second copy.

* `gsm-pipeline`: download -> degrade -> pack -> flow_init -> train reds -> train vimeo -> evaluate -> register,
  the DVC chain plus registration. Download retries (`prefect.download_retries`, with
  `prefect.retry_delay_s` between tries); every stage is cached on what DVC would compare
  (pipelines.cache), so a rerun with unchanged params, inputs and code skips it.
* `retrain`: the scheduled job. Finetune the registry's champion on the configured data with the
  `train.vimeo` recipe into a new `<runs>/retrain/<run>/`, evaluate it there, register it (the
  registry decides champion or challenger). With an `incoming` source it first ingests new videos
  (gsm.data.incoming) and ends at once when no data version is new to the registry; otherwise it
  trains on the main data plus every version, and the retrain gate compares challenger and champion
  on the benchmark and on the new held-out clips.

Each flow run opens one MLflow parent run (gsm.tracking.pipeline_run, named after the flow) and
hands its id to the training, evaluation and registration tasks, whose runs nest under it.

By hand: `python -m pipelines.flows pipeline --params params.yaml` (or `retrain`). Without
PREFECT_API_URL, Prefect runs them in its ephemeral mode (a temporary local API, SQLite in
PREFECT_HOME); cached results live in PREFECT_HOME/storage.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from gsm import stages
from gsm.params import Params, load_params
from gsm.tracking import pipeline_run, tracking_target
from pipelines.cache import StageCache, missing_outputs

# One-line wrappers: the stage functions do the work (and resume); tasks add retries and caching.
# `progress` (tqdm bars on stderr) is not part of any cache key.


@task(name="download", cache_policy=StageCache(stage="download"))
def download(p: Params, progress: bool = False) -> Path:
    return stages.download(p, progress=progress)


@task(name="degrade", cache_policy=StageCache(stage="degrade"))
def degrade(p: Params, progress: bool = False) -> Path:
    return stages.degrade(p, progress=progress)


@task(name="pack", cache_policy=StageCache(stage="pack"))
def pack(p: Params, progress: bool = False) -> Path:
    return stages.pack(p, progress=progress)


@task(name="flow_init", cache_policy=StageCache(stage="flow_init"))
def flow_init(p: Params, runs: Path, reports: Path, progress: bool = False) -> Any:
    return stages.flow_init(p, runs, reports, progress=progress)


@task(name="train", task_run_name="train-{stage}", cache_policy=StageCache(stage="train"))
def train(p: Params, stage: str, runs: Path, init_from: Path | None = None, restart_on_change: bool = False,
          progress: bool = False, parent_run_id: str | None = None,
          incoming: dict[str, Any] | None = None) -> Any:  # fmt: skip
    return stages.train(p, stage, runs, init_from=init_from,  # type: ignore[arg-type]
                        restart_on_change=restart_on_change, progress=progress, parent_run_id=parent_run_id,
                        incoming=incoming)  # fmt: skip


@task(name="evaluate", cache_policy=StageCache(stage="evaluate"))
def evaluate(p: Params, checkpoint: Path | None, runs: Path, out: Path, progress: bool = False,
             parent_run_id: str | None = None) -> Any:  # fmt: skip
    return stages.evaluate(p, checkpoint, runs, out, progress=progress, parent_run_id=parent_run_id)


@task(name="register", cache_policy=StageCache(stage="register"))
def register(p: Params, runs: Path, reports: Path, checkpoint: Path | None = None, progress: bool = False,
             parent_run_id: str | None = None, heldout: Any = None,
             extra_tags: dict[str, str] | None = None) -> Any:  # fmt: skip
    return stages.register(p, runs, reports, checkpoint=checkpoint, progress=progress, parent_run_id=parent_run_id,
                           heldout=heldout, extra_tags=extra_tags)  # fmt: skip


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(p: Params, progress: bool = False) -> Any:
    return stages.ingest(p, progress=progress)


@task(name="unseen-data", cache_policy=NO_CACHE)
def unseen_versions(p: Params, versions: tuple[dict[str, Any], ...]) -> list[Any]:
    return stages.unseen_versions(p, versions)


@task(name="heldout", cache_policy=NO_CACHE)
def heldout_scores(p: Params, checkpoints: dict[str, Path], manifests: dict[str, Any], progress: bool = False) -> Any:
    return stages.heldout_scores(p, checkpoints, manifests, progress=progress)


@task(name="champion-checkpoint", cache_policy=NO_CACHE)
def champion_checkpoint(p: Params, dest: Path) -> Path:
    return stages.champion_checkpoint(p, dest, progress=False)


def transient(task: Task[..., Any], task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry what may pass (network, disk), not the project's one-line user
    errors (a wrong params value, a missing file or champion): those fail at once."""
    return not isinstance(state.data, (ValueError, FileNotFoundError, PermissionError))


def retried(t: Task[..., Any], p: Params) -> Task[..., Any]:
    """`t` with the download retries of the `prefect` params section."""
    return t.with_options(retries=p.prefect.download_retries, retry_delay_seconds=p.prefect.retry_delay_s,
                          retry_condition_fn=transient)  # fmt: skip


def run_stage(t: Task[..., Any], p: Params, *, cache: bool = True, **args: Any) -> Any:
    """Call stage task `t` as the params ask: uncached when `prefect.cache` (or `cache`) is off;
    recomputed, not looked up, when its outputs were deleted since its result was recorded."""
    if not (cache and p.prefect.cache):
        t = t.with_options(cache_policy=NO_CACHE)
    elif missing_outputs(t.cache_policy.stage, {"p": p, **args}):  # type: ignore[union-attr]
        t = t.with_options(refresh_cache=True)
    return t(p=p, **args)


def default_runs(p: Params, runs: str | None) -> Path:
    """The flows' runs folder: `runs/<data.profile>` unless given."""
    return Path(runs) if runs else Path("runs") / p.data.profile


def prepare(p: Params, progress: bool) -> Path:
    """The data steps; downloads retried as `prefect` params say. Returns the manifest's path."""
    run_stage(retried(download, p), p, progress=progress)
    run_stage(degrade, p, progress=progress)
    return run_stage(pack, p, progress=progress)


@flow(name="gsm-pipeline")
def pipeline(params: str = "params.yaml", runs: str | None = None, reports: str = "reports",
             progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """The whole chain on `params`; runs in `runs` (default runs/<profile>), reports in `reports`."""
    p = load_params(params)
    runs_dir, reports_dir = default_runs(p, runs), Path(reports)
    with pipeline_run(tracking_target(p.mlflow), "gsm-pipeline", _flow_tags()) as parent:
        manifest = prepare(p, progress)
        run_stage(flow_init, p, runs=runs_dir, reports=reports_dir, progress=progress)
        # As DVC does (`--restart-on-change`): a stage rerun because its params changed starts over.
        tracked = dict(progress=progress, parent_run_id=parent)
        reds = run_stage(train, p, stage="reds", runs=runs_dir, restart_on_change=True, **tracked)
        vimeo = run_stage(train, p, stage="vimeo", runs=runs_dir, restart_on_change=True, **tracked)
        # No checkpoint: each set by the model eval.models picks from runs_dir, as `dvc repro` scores them.
        scores = run_stage(evaluate, p, checkpoint=None, runs=runs_dir, out=reports_dir, **tracked)
        registered = run_stage(register, p, runs=runs_dir, reports=reports_dir, checkpoint=vimeo.last, **tracked)
    return {"manifest": manifest, "reds": reds, "vimeo": vimeo, "scores": scores, "registered": registered}


def _flow_tags() -> dict[str, str]:
    """The parent run's link back to the Prefect flow run (absent outside one)."""
    return {"prefect_flow_run_id": str(flow_run.id)} if flow_run.id else {}


def run_name() -> str:
    """A retrain run's folder name: UTC start time, then the flow run's id (sortable, unique)."""
    run_id = (flow_run.id or "local")[:8]
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{run_id}"


@dataclass(frozen=True)
class NewData:
    """What a retrain with an `incoming` source trains on: every version, and those new to the registry."""

    manifests: dict[str, Any]  # version id -> manifest, all versions (trained on beside the main data)
    new: dict[str, Any]  # the versions no registered model saw: the gate's held-out clips
    tags: dict[str, str]  # the data versions, for the registered version


def new_data(p: Params, progress: bool) -> NewData | str:
    """Ingest the incoming videos; the data to train on, or the one-line reason there is nothing to do."""
    from gsm.data.incoming import data_tags, version_manifest

    got = retried(ingest, p)(p, progress=progress)  # URLs are downloads
    unseen = unseen_versions(p, got.versions)
    if not unseen:
        return (f"retrain: no new data ({got.videos_seen} incoming video(s), all in versions already trained on); "
                f"nothing trained or registered")  # fmt: skip
    manifests = {v["id"]: version_manifest(got.store, v) for v in got.versions}
    tags = data_tags(got.versions, unseen, p.data.manifest_path, got.dvc_md5)
    return NewData(manifests, {v["id"]: manifests[v["id"]] for v in unseen}, tags)


def gate_inputs(p: Params, data: NewData | None, champion: Path, tuned: Path, progress: bool) -> dict[str, Any]:
    """The register task's retrain-gate arguments: both models on the new held-out clips, the data tags."""
    from gsm.registry.register import HeldOut

    if data is None:
        return {}
    got = heldout_scores(p, {"challenger": tuned, "champion": champion}, data.new, progress=progress)
    held = HeldOut("incoming-heldout", "psnr", got["challenger"], got["champion"], p.incoming.tolerance_db)
    return {"heldout": held, "extra_tags": data.tags}


@flow(name="retrain")
def retrain(params: str = "params.yaml", runs: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Finetune the champion on the configured data, evaluate, register; in <runs>/retrain/<run>/.

    The data steps are the pipeline's (cached: seconds when the data are unchanged). Training,
    evaluation and registration are never cached: every retrain is a new model. With an `incoming`
    source: new videos first; none new to the registry ends the run at once (`skipped` says why).
    """
    p = load_params(params)
    data = new_data(p, progress) if p.incoming.configured else None
    if isinstance(data, str):
        get_run_logger().info(data)
        return {"run_dir": None, "skipped": data}
    run_dir = default_runs(p, runs) / "retrain" / run_name()
    with pipeline_run(tracking_target(p.mlflow), "retrain", _flow_tags()) as parent:
        prepare(p, progress)
        champion = retried(champion_checkpoint, p)(p, run_dir / "champion.pt")  # a download too
        tracked = dict(cache=False, progress=progress, parent_run_id=parent)
        tuned = run_stage(train, p, stage="vimeo", runs=run_dir, init_from=champion,
                          incoming=data.manifests if data else None, **tracked)  # fmt: skip
        reports = run_dir / "reports"
        scores = run_stage(evaluate, p, checkpoint=tuned.last, runs=run_dir, out=reports, **tracked)
        gated = gate_inputs(p, data, champion, tuned.last, progress)
        registered = run_stage(register, p, runs=run_dir, reports=reports, checkpoint=tuned.last, **gated, **tracked)
    return {"run_dir": run_dir, "champion": champion, "vimeo": tuned, "scores": scores, "registered": registered}


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.flows pipeline|retrain --params ...`: one flow run, by hand."""
    ap = argparse.ArgumentParser(prog="python -m pipelines.flows", description=__doc__.splitlines()[0])
    ap.add_argument("flow", choices=("pipeline", "retrain"))
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--runs", default=None, help="runs folder (default: runs/<data.profile>)")
    ap.add_argument("--reports", default="reports", help="reports folder of the pipeline (default: reports)")
    ap.add_argument("--progress", action="store_true", help="progress bars on stderr")
    a = ap.parse_args(argv)
    try:
        load_params(a.params)  # a wrong key fails here, in one line, before Prefect starts anything
        if a.flow == "pipeline":
            out = pipeline(params=a.params, runs=a.runs, reports=a.reports, progress=a.progress)
            where = a.reports
        else:
            out = retrain(params=a.params, runs=a.runs, progress=a.progress)
            if out.get("skipped"):
                print(out["skipped"])
                return 0
            where = str(out["run_dir"] / "reports")
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError, ConnectionError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, r in out["scores"].items():
        print(f"{name}: {r.psnr:.2f} dB (bicubic {r.bicubic_psnr:.2f} dB)")
    reg = out["registered"]
    print(f"registered {reg.model_uri} ({reg.alias or 'no alias'}): {reg.reason}")
    print(f"{a.flow}: done; reports in {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
