"""The pipeline's stages as functions of the typed params: what `gsm` commands, DVC and Prefect run.

Each stage reads what the previous one wrote (the data manifest, a stage's checkpoints) and
nothing else, so any of them can be rerun alone and a finished stage costs seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gsm.data.catalog import eval_sets, split_name, train_stores
from gsm.data.prepare import read_manifest
from gsm.eval.protocols import TestResult, make_validator
from gsm.ops.backend import resolve_device
from gsm.params import Params, params_yaml
from gsm.tracking import TrackingTarget, mlflow_errors, sha256_file, tracking_target
from gsm.train.config import STAGES, TrainConfig, resolve_init, stage_differences
from gsm.train.data import reds_train_set, vimeo_train_set
from gsm.train.trainer import TrainResult, Validate, train_stage

if TYPE_CHECKING:
    from gsm.data.incoming import IngestResult
    from gsm.registry.register import HeldOut, RegisterResult

Stage = Literal["reds", "vimeo"]
log = logging.getLogger(__name__)


def download(p: Params, *, progress: bool = True) -> Path:
    """Stage 1: the source frames (quickstart: decoded from the bundled videos; paper: fetched and
    unpacked archives). Returns the stage's output folder, `<data.root>/<profile>/source`."""
    from gsm.data.prepare import download_data

    return download_data(p.data, p.sources, progress=progress)


def degrade(p: Params, *, progress: bool = True) -> Path:
    """Stage 2: LR frames made here (BI, and BD for Vid4) from the downloaded GT; `<profile>/lr`."""
    from gsm.data.prepare import degrade_data

    return degrade_data(p.data, p.sources, progress=progress)


def pack(p: Params, *, progress: bool = True) -> Path:
    """Stage 3: LMDBs of the GT and LR trees and the data manifest; returns the manifest's path."""
    from gsm.data.prepare import pack_data

    return pack_data(p.data, p.sources, progress=progress)


def flow_init(p: Params, runs: Path, reports: Path, *, progress: bool = True) -> dict[str, Any]:
    """Stage 4: SpyNet distilled from OpenCV's DIS flow on the training frames (no download), written
    to `<runs>/flow/spynet.pth` for `model.spynet_weights`; the held-out EPE goes to reports/flow_init.json
    (a metric), the teacher, pair counts, timings and config to reports/flow_init_run.json (a plain output)."""
    from gsm.train.flow_init import distil_spynet

    return distil_spynet(read_manifest(p.data), p.flow_init, Path(runs) / "flow" / "spynet.pth",
                         Path(reports) / "flow_init.json", run_report=Path(reports) / "flow_init_run.json",
                         progress=progress)  # fmt: skip


def train(
    p: Params, stage: Stage, runs: Path, *, init_from: Path | None = None, restart_on_change: bool = False,
    progress: bool = True, tracking_uri: str | None = None, parent_run_id: str | None = None,
    incoming: Mapping[str, Mapping[str, Any]] | None = None,
) -> TrainResult:
    """Train (or resume, or skip when finished) one stage on the prepared data of `p.data.profile`.

    `init_from` (a checkpoint) overrides the stage's `init_from` param: the retrain flow starts
    the finetuning from the registry's champion this way. `restart_on_change`: see train_stage
    (DVC and Prefect rerun a stage because its params changed; the old run is then obsolete).

    Validation (every `val_every` iterations and at the end) draws the curves; nothing is selected
    by it. It runs on the data's validation clips (the quickstart's, cut between its train and test
    spans), else on the stage's benchmark as the field does (REDS4 for REDS, Vimeo-90K-T for Vimeo);
    `val_every` > `iters` skips it.

    MLflow: `tracking_uri` > $MLFLOW_TRACKING_URI > `mlflow.tracking_uri` (null: off); the run
    gets the data profile as params and the whole params as a params.yaml artifact, and nests under
    `parent_run_id` (else $GSM_PARENT_RUN_ID): the pipeline execution it belongs to.

    `incoming` (version id -> its manifest, gsm.data.incoming; vimeo stage only): their train
    septuplets are trained on beside the main data's, as one dataset.
    """
    manifest = read_manifest(p.data)
    cfg = p.train.stage(stage)
    dataset, validate = train_inputs(p, manifest, stage, incoming)
    tracking = tracking_target(p.mlflow, tracking_uri, parent_run_id)
    with mlflow_errors(tracking.uri if tracking else None):
        return train_stage(
            stage, cfg, p.model, dataset, Path(runs) / stage, seed=p.train.seed, validate=validate,
            init_from=init_from or resolve_init(cfg.init_from, runs), device=p.train.device, progress=progress,
            restart_on_change=restart_on_change, inputs=_inputs(p, manifest, stage, incoming),
            tracking=tracking, params_snapshot=params_yaml(p),
            run_params={"data.profile": p.data.profile, "data.backend": p.data.backend},
        )  # fmt: skip


def train_inputs(p: Params, manifest: dict[str, Any], stage: Stage,
                 incoming: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Any, Validate | None]:  # fmt: skip
    """A stage's training set and its validator (None when `val_every` > `iters`), as `train` uses them."""
    cfg = p.train.stage(stage)
    gt, lr, entry = train_stores(manifest, stage)
    if stage == "reds":
        if incoming:
            raise ValueError("incoming data are Vimeo-like septuplets: only the vimeo stage trains on them")
        dataset = reds_train_set(cfg, gt, lr, entry["train"], frames_per_clip=entry["frames_per_clip"], seed=p.train.seed)
    elif incoming:
        from gsm.data.incoming import BASE, union, version_stores

        ugt, ulr, names = union({BASE: (gt, lr, entry["train"]), **version_stores(incoming, "train")})
        dataset = vimeo_train_set(cfg, ugt, ulr, names, seed=p.train.seed)
    else:
        dataset = vimeo_train_set(cfg, gt, lr, entry["train"], seed=p.train.seed)
    e, validate = p.eval, None
    if cfg.val_every <= cfg.iters:  # a larger val_every means: no validation in this run
        validate = make_validator(eval_sets(manifest, stage, split="val")[0], e.tile, e.tile_overlap,
                                  resolve_device(e.device, "eval.device"), chunk=e.chunk,
                                  chunk_overlap=e.chunk_overlap, max_clips=e.max_clips)  # fmt: skip
    return dataset, validate


def _inputs(p: Params, manifest: dict[str, Any], stage: Stage,
            incoming: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, str]:  # fmt: skip
    """What a run is made from besides params: the data, and a local SpyNet file's content (a new
    distillation must restart the stage, not be taken for the finished run)."""
    inputs = {"data": data_fingerprint(manifest, stage)}
    inputs.update({f"incoming.{vid}": m["made_from"]["incoming"] for vid, m in (incoming or {}).items()})
    weights = p.model.spynet_weights
    if weights is not None and "://" not in weights and Path(weights).is_file():
        inputs["spynet"] = sha256_file(Path(weights))
    return inputs


def data_fingerprint(manifest: dict[str, Any], stage: Stage) -> str:
    """sha256 of what the manifest says about a stage's data (which includes what it was made from)."""
    text = json.dumps({"made_from": manifest.get("made_from"), "data": manifest[stage]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def final_checkpoint(runs: Path) -> Path:
    """The last stage that has trained: Vimeo's last.pt when it exists, else REDS's."""
    for stage in reversed(STAGES):
        path = Path(runs) / stage / "checkpoints" / "last.pt"
        if path.is_file():
            return path
    raise FileNotFoundError(f"{runs}: no trained stage (checkpoints/last.pt); run `gsm train` first")


TEST_KINDS = ("reds", "vimeo", "vid4")  # the manifest's test-set families, in report order
# The stage whose model scores each family under eval.models "per_stage": the paper's tables
# score REDS4 with the REDS-trained model and Vimeo-90K-T and Vid4 with the Vimeo-trained one.
SCORED_BY: dict[str, Stage] = {"reds": "reds", "vimeo": "vimeo", "vid4": "vimeo"}


def scoring_checkpoints(p: Params, runs: Path, manifest: dict[str, Any], checkpoint: Path | None = None) -> dict[str, Path]:
    """Test-set family -> the checkpoint that scores it. A given checkpoint scores every family;
    otherwise eval.models picks each family's own stage ("per_stage") or the final one ("final").
    A family whose stage has not trained falls back to the final checkpoint, with a warning."""
    kinds = [k for k in TEST_KINDS if manifest.get(k)]
    if checkpoint is not None:
        return {k: Path(checkpoint) for k in kinds}
    final = final_checkpoint(runs)
    if p.eval.models == "final":
        return {k: final for k in kinds}
    chosen: dict[str, Path] = {}
    for kind in kinds:
        chosen[kind] = Path(runs) / SCORED_BY[kind] / "checkpoints" / "last.pt"
        if not chosen[kind].is_file():
            log.warning("eval.models per_stage: no %s-stage checkpoint (%s); %s test sets are scored by %s",
                        SCORED_BY[kind], chosen[kind], kind, final)  # fmt: skip
            chosen[kind] = final
    return chosen


def evaluate(
    p: Params, checkpoint: Path | None, runs: Path, out: Path, *, progress: bool = True,
    tracking_uri: str | None = None, parent_run_id: str | None = None,
) -> dict[str, TestResult]:
    """Score the trained models (or one given checkpoint) on every benchmark the data has; write reports/.

    Which checkpoint scores which set: `scoring_checkpoints`. evaluated_model.json (beside
    metrics.json, which holds only scores) records the final checkpoint's serving digest
    (gsm.train.checkpoint.serving_digest) and, under `scored_by`, each set's checkpoint and digest,
    so `register` can tell which weights scored its gate set. With tracking on (as for `train`),
    one MLflow run "evaluate" logs the eval params, each test set's scores and the reports as
    artifacts (nested as `train`'s).
    """
    from gsm.eval.stage import run_evaluation, select_sets
    from gsm.train.checkpoint import load_model, serving_digest

    manifest = read_manifest(p.data)
    by_kind = scoring_checkpoints(p, runs, manifest, checkpoint)
    sets = {kind: eval_sets(manifest, kind) for kind in by_kind}  # type: ignore[arg-type]
    chosen = {s.name for s in select_sets([s for ss in sets.values() for s in ss], p.eval.sets)}
    groups: dict[Path, list[Any]] = {}
    for kind, ckpt in by_kind.items():
        groups.setdefault(ckpt, []).extend(s for s in sets[kind] if s.name in chosen)
    groups = {ckpt: ss for ckpt, ss in groups.items() if ss}
    digests = {ckpt: serving_digest(ckpt) for ckpt in groups}
    final = Path(checkpoint) if checkpoint is not None else final_checkpoint(runs)
    info = {"checkpoint": str(final), "checkpoint_sha256": digests.get(final) or serving_digest(final),
            "profile": p.data.profile,
            "scored_by": {s.name: {"checkpoint": str(ckpt), "checkpoint_sha256": digests[ckpt]}
                          for ckpt, ss in groups.items() for s in ss}}  # fmt: skip
    logs = [Path(runs) / s / "metrics.jsonl" for s in STAGES if (Path(runs) / s / "metrics.jsonl").is_file()]
    val_sets = {s: split_name(manifest, s, "val") for s in STAGES if manifest.get(s)}  # type: ignore[arg-type]
    scorers = [(load_model(ckpt), ss) for ckpt, ss in groups.items()]
    results = run_evaluation(scorers, p.eval, out, train_logs=logs, info=info, progress=progress,
                             baselines=read_baselines(Path(out) / "baselines.json", manifest, p.eval.models, p.train),
                             val_sets=val_sets)  # fmt: skip
    target = tracking_target(p.mlflow, tracking_uri, parent_run_id)
    if target is not None:
        with mlflow_errors(target.uri):
            _log_evaluation(target, p, info, Path(out))
    return results


def read_baselines(path: Path, manifest: dict[str, Any], models: str, train: TrainConfig) -> dict[str, dict[str, Any]]:
    """The baselines measured on this profile (benchmarks/plain_cnn.py), each marked `same_data`
    when it was trained on exactly the data in `manifest`, `same_models` when its sets were scored
    as eval.models `models` says (an entry without `eval_models` predates per-stage scoring:
    "final"), and given `recipe_changes`: how `train` differs from the recipe it was trained on
    (an entry that recorded none: unknown). A missing file: none."""
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    current = {s: data_fingerprint(manifest, s) for s in STAGES if manifest.get(s)}

    def recipe_changes(e: dict[str, Any]) -> list[str]:
        recipe = e.get("recipe")
        if not isinstance(recipe, dict):
            return ["the entry records none"]
        return [f"train.{s}.{d}" for s in STAGES for d in stage_differences(recipe.get(s) or {}, train.stage(s))]

    return {name: {**e, "same_data": e.get("data") == current, "same_models": e.get("eval_models", "final") == models,
                   "recipe_changes": recipe_changes(e)}
            for name, e in entries.items()
            if isinstance(e, dict) and e.get("profile") == manifest.get("profile")}  # fmt: skip


def _log_evaluation(target: TrackingTarget, p: Params, info: dict[str, Any], out: Path) -> str:
    """The evaluate run: eval params, `<set>.<score>` metrics from metrics.json, the reports; which
    checkpoint scored each set as params `scored_by.<set>`."""
    from gsm.configs import to_mapping
    from gsm.tracking import log_finished_run
    from gsm.train.config import flat_params

    scores = json.loads((out / "metrics.json").read_text())["test_sets"]
    metrics = {f"{name}.{key}": float(v) for name, row in scores.items() for key, v in row.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
    scored_by = {f"scored_by.{name}": v["checkpoint"] for name, v in info.get("scored_by", {}).items()}
    params = {**flat_params("eval", to_mapping(p.eval)), **{k: v for k, v in info.items() if k != "scored_by"}, **scored_by}
    names = ("metrics.json", "evaluated_model.json", "benchmark.md", "per_clip.csv", "per_frame.csv", "runtime.json", "plots", "curves",
             "videos")  # those written
    artifacts = tuple(out / n for n in names)
    return log_finished_run(target, "evaluate", params=params, metrics=metrics, artifacts=artifacts,
                            tags={"profile": p.data.profile})  # fmt: skip


def register(
    p: Params, runs: Path, reports: Path, *, checkpoint: Path | None = None, progress: bool = True,
    tracking_uri: str | None = None, parent_run_id: str | None = None, heldout: HeldOut | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> RegisterResult:
    """Register the evaluated checkpoint (default: the final stage's) as a version of `mlflow.model_name`.

    reports/metrics.json must score that checkpoint; the alias `champion` moves to the new version
    only when its `mlflow.gate_metric` on `mlflow.gate_set` beats the champion's by more than
    `mlflow.gate_tolerance`, else it is `challenger` (gsm.registry.register). Writes
    reports/registry.json. Needs a store: `tracking_uri` > $MLFLOW_TRACKING_URI > `mlflow.tracking_uri`.
    The register run nests as `train`'s. A new version's description is its model card (gsm.registry.card).
    `heldout` (a retrain on new data) switches to the retrain gate; `extra_tags` go on the version.
    """
    import json

    from gsm.registry.register import own_scores, register_checkpoint
    from gsm.train.checkpoint import serving_digest

    target = _store(p, tracking_uri, parent_run_id)
    metrics_path = Path(reports) / "metrics.json"
    metrics = read_scores(Path(reports))
    scored_profile = (metrics.get("model") or {}).get("profile")
    if scored_profile not in (None, p.data.profile):
        raise ValueError(f"{metrics_path} scores profile {scored_profile!r}, params say {p.data.profile!r}")
    ckpt = checkpoint or final_checkpoint(runs)
    card = model_card_of(p, Path(ckpt), own_scores(metrics, serving_digest(Path(ckpt))), Path(reports))
    with mlflow_errors(target.uri):
        return register_checkpoint(p.mlflow, target, Path(ckpt), metrics, profile=p.data.profile,
                                   report=Path(reports) / "registry.json", progress=progress,
                                   description=card, heldout=heldout, extra_tags=extra_tags)  # fmt: skip


def read_scores(reports: Path) -> dict[str, Any]:
    """reports/metrics.json with `model` (what it scores) from evaluated_model.json beside it.

    The metric file keeps only scores so `dvc metrics show` reads at a glance; the registry gate and
    the model card still need the checkpoint digest, profile and parameter count, so they are joined
    here. A metrics.json written before the split keeps its own `model` block when the file is absent.
    """
    from gsm.eval.report import EVALUATED_MODEL

    metrics_path, model_path = Path(reports) / "metrics.json", Path(reports) / EVALUATED_MODEL
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found: run `gsm evaluate` first")
    metrics = json.loads(metrics_path.read_text())
    if model_path.is_file():
        metrics["model"] = json.loads(model_path.read_text())
    return metrics


def model_card_of(p: Params, checkpoint: Path, metrics: dict[str, Any], reports: Path) -> str:
    """The model card of `checkpoint`, scored in `metrics` (`read_scores(reports)`) in `reports`."""
    from gsm.registry.card import CardFacts, model_card
    from gsm.tracking import provenance_tags
    from gsm.train.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    state = {k: state.get(k) for k in ("config", "stage", "iter", "train_config")}
    facts = CardFacts(p, metrics, state, provenance_tags(), scoring_protocols(p), reports,
                      str(resolve_device(p.eval.device, "eval.device")))  # fmt: skip
    return model_card(facts)


def scoring_protocols(p: Params) -> dict[str, str]:
    """Each test set's scoring protocol, from the data manifest ({} when the data is not here)."""
    try:
        manifest = read_manifest(p.data)
        return {s.name: s.protocol for kind in TEST_KINDS if manifest.get(kind)
                for s in eval_sets(manifest, kind)}  # fmt: skip
    except (FileNotFoundError, ValueError, KeyError):
        return {}


def champion_checkpoint(p: Params, dest: Path, *, progress: bool = True, tracking_uri: str | None = None) -> Path:
    """The registry's champion as a checkpoint file at `dest` (or inside it, when a folder): what the
    retrain flow finetunes from (`train(..., init_from=...)`). FileNotFoundError when there is no champion."""
    from gsm.registry.register import download_champion

    target = _store(p, tracking_uri)
    with mlflow_errors(target.uri):
        return download_champion(p.mlflow, target, Path(dest), progress=progress)


def ingest(p: Params, *, progress: bool = True) -> IngestResult:
    """New videos of `incoming` -> the next data version (gsm.data.incoming); nothing new: nothing written."""
    from gsm.data.incoming import ingest as ingest_videos

    return ingest_videos(p.incoming, p.data, retries=p.data.download_retries, progress=progress)


def unseen_versions(p: Params, versions: Sequence[Mapping[str, Any]], *,
                    tracking_uri: str | None = None) -> list[Mapping[str, Any]]:  # fmt: skip
    """The data versions no registered model was trained on (the registry's `data.incoming.*` tags)."""
    from gsm.data.incoming import unseen
    from gsm.registry.register import seen_data_versions
    from gsm.tracking import client_for

    if not versions:
        return []
    target = _store(p, tracking_uri)
    with mlflow_errors(target.uri):
        return unseen(versions, seen_data_versions(client_for(target), p.mlflow.model_name))


def heldout_scores(p: Params, checkpoints: Mapping[str, Path], manifests: Mapping[str, Mapping[str, Any]], *,
                   metric: str = "psnr", progress: bool = True) -> dict[str, float]:  # fmt: skip
    """Each checkpoint's `metric` on the held-out clips of `manifests`, all clips, as eval params say."""
    from gsm.data.incoming import heldout_set
    from gsm.eval.protocols import evaluate_model
    from gsm.train.checkpoint import load_model

    e, test_set = p.eval, heldout_set(manifests)
    device = resolve_device(e.device, "eval.device")
    out = {}
    for name, ckpt in checkpoints.items():
        r = evaluate_model(load_model(ckpt).to(device), test_set, tile=e.tile, tile_overlap=e.tile_overlap,
                           chunk=e.chunk, chunk_overlap=e.chunk_overlap, device=device, progress=progress,
                           keep=False, bicubic=False)  # fmt: skip
        out[name] = float(getattr(r, metric))
    return out


def _store(p: Params, tracking_uri: str | None, parent_run_id: str | None = None) -> TrackingTarget:
    target = tracking_target(p.mlflow, tracking_uri, parent_run_id)
    if target is None:
        raise ValueError("the model registry needs an MLflow store: mlflow.tracking_uri is null and "
                         "$MLFLOW_TRACKING_URI is not set")  # fmt: skip
    return target
