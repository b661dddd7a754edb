"""Register a scored checkpoint as a version of the `gsm-vsr` model and gate the `champion` alias.

The alias `champion` is what clients pull (`models:/gsm-vsr@champion`), so it moves only on
evidence: a new version takes it when its benchmark score (`mlflow.gate_metric` on
`mlflow.gate_set`, read from reports/metrics.json) beats the champion's by more than
`mlflow.gate_tolerance`; otherwise it is registered as `challenger`. Scores on different data are
not comparable: a champion whose `profile` tag differs (quickstart vs paper) or that has no score
on the gate set keeps its alias and the new version is a challenger. The first version is champion.

Every version carries tags: profile, datasets (the test sets scored), one `metric.<set>.<name>` per
score, git commit and dirty flag, dvc.lock's sha256, the checkpoint's path and sha256; its description
is a model card (gsm.registry.card: data, test sets, scores beside bicubic, speed). Registering a
checkpoint already registered with the same scores adds no version (DVC and Prefect reruns are
idempotent). reports/registry.json, written atomically, records the outcome: the DVC stage's metrics.
It is rewritten on every call with the champion read back from the registry (`registry_champion`),
since the registry, not the workspace, holds the state: a reused version reports who is champion now.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from gsm.io import atomic_write_json
from gsm.train.checkpoint import serving_digest
from gsm.tracking import (
    MlflowConfig,
    MlflowRun,
    TrackingTarget,
    client_for,
    first_line,
    mlflow_uris,
    provenance_tags,
    sha256_file,
)

CHAMPION = "champion"
CHALLENGER = "challenger"
Alias = Literal["champion", "challenger"]
SCORES = ("psnr", "ssim", "psnr_gain", "ssim_gain")  # per test set, as version tags


@dataclass(frozen=True)
class Champion:
    """What the gate compares against: the version holding `champion`, its profile and gate score."""

    version: str
    profile: str | None
    value: float | None


@dataclass(frozen=True)
class GateDecision:
    alias: Alias
    reason: str


@dataclass(frozen=True)
class RegisterResult:
    model_name: str
    version: int
    alias: str  # champion | challenger ("" for a reused version that has lost its alias since)
    promoted: bool  # this call moved `champion` to this version
    reused: bool  # the checkpoint was already registered with these scores: no new version
    reason: str
    gate_set: str
    gate_metric: str
    gate_tolerance: float
    value: float
    champion_version: int | None  # the champion compared against (None: there was none)
    champion_value: float | None
    model_uri: str  # models:/<name>/<version>
    run_id: str
    report: Path
    # The version holding `champion` in the registry once this call is done, read back from it: the
    # report states the registry's truth even when this checkpoint was registered long ago.
    registry_champion: int | None = None


def metric_tag(test_set: str, name: str) -> str:
    return f"metric.{test_set}.{name}"


def _incomparable(champion: Champion | None, profile: str, metric: str) -> GateDecision | None:
    """The decision when there is nothing to compare against (no champion, other data, no score)."""
    if champion is None:
        return GateDecision(CHAMPION, "first version")
    if champion.profile != profile:
        return GateDecision(CHALLENGER, f"champion v{champion.version} was trained on profile "
                                        f"{champion.profile!r}, not {profile!r}: not comparable")  # fmt: skip
    if champion.value is None:
        return GateDecision(CHALLENGER, f"champion v{champion.version} has no {metric} score: not comparable")
    return None


def gate(value: float, champion: Champion | None, *, profile: str, metric: str, tolerance: float) -> GateDecision:
    """Which alias a new version with score `value` gets (pure: the registry is read by the caller)."""
    if (decided := _incomparable(champion, profile, metric)) is not None:
        return decided
    assert champion is not None and champion.value is not None
    if value > champion.value + tolerance:
        return GateDecision(CHAMPION, f"{metric} {value:.4f} > champion v{champion.version} "
                                      f"{champion.value:.4f} + {tolerance:g}")  # fmt: skip
    return GateDecision(CHALLENGER, f"{metric} {value:.4f} <= champion v{champion.version} "
                                    f"{champion.value:.4f} + {tolerance:g}")  # fmt: skip


@dataclass(frozen=True)
class HeldOut:
    """Challenger and champion scored alike on the held-out clips of new data (gsm.data.incoming)."""

    test_set: str
    metric: str
    challenger: float
    champion: float
    tolerance: float  # how far the benchmark score may drop (dB), for the retrain gate


def retrain_gate(value: float, champion: Champion | None, heldout: HeldOut, *, profile: str,
                 metric: str) -> GateDecision:  # fmt: skip
    """The gate of a retrain on new data (pure): the challenger takes `champion` when the benchmark
    score drops by at most `heldout.tolerance` and it is not worse on the new held-out clips. Not
    "must beat": the benchmark does not contain the new data, so learning it may leave it flat."""
    if (decided := _incomparable(champion, profile, metric)) is not None:
        return decided
    assert champion is not None and champion.value is not None
    bench = f"{metric} {value:.4f} vs champion v{champion.version} {champion.value:.4f}"
    held = f"{heldout.test_set} {heldout.metric} {heldout.challenger:.4f} vs {heldout.champion:.4f}"
    if value < champion.value - heldout.tolerance:
        return GateDecision(CHALLENGER, f"benchmark regressed beyond {heldout.tolerance:g}: {bench}")
    if heldout.challenger < heldout.champion:
        return GateDecision(CHALLENGER, f"worse on the new held-out clips: {held}")
    return GateDecision(CHAMPION, f"benchmark within {heldout.tolerance:g} ({bench}); not worse on new data ({held})")


def heldout_tags(heldout: HeldOut, value: float, champion: Champion | None) -> dict[str, str]:
    """Both comparisons of the retrain gate, as version tags."""
    tags = {"gate.rule": "retrain", "gate.tolerance": repr(heldout.tolerance), "gate.benchmark.challenger": repr(value),
            "gate.heldout.set": heldout.test_set, "gate.heldout.metric": heldout.metric,
            "gate.heldout.challenger": repr(heldout.challenger), "gate.heldout.champion": repr(heldout.champion)}  # fmt: skip
    if champion is not None and champion.value is not None:
        tags["gate.benchmark.champion"] = repr(champion.value)
    return tags


def seen_data_versions(client: Any, name: str) -> set[tuple[str, str]]:
    """(incoming version id, digest) of every data version some registered version was trained on."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return set()
    prefix = "data.incoming.v"
    return {(k.removeprefix("data.incoming."), v) for mv in versions for k, v in (mv.tags or {}).items()
            if k.startswith(prefix)}  # fmt: skip


def own_scores(metrics: Mapping[str, Any], sha256: str) -> dict[str, Any]:
    """`metrics` with only the test sets these weights scored. Under eval.models "per_stage" another
    stage's model scores some sets (evaluated_model.json's `scored_by`); those are not this version's
    scores, so they make no tag, no card row and no gate. They are kept as `other_sets` (name -> path)."""
    by = metrics.get("model", {}).get("scored_by") if isinstance(metrics.get("model"), Mapping) else None
    sets = metrics.get("test_sets")
    if not isinstance(by, Mapping) or not isinstance(sets, Mapping):
        return dict(metrics)
    theirs = {n: v for n, v in by.items() if isinstance(v, Mapping) and v.get("checkpoint_sha256") != sha256}
    return {**metrics, "test_sets": {n: v for n, v in sets.items() if n not in theirs},
            "other_sets": {n: str(v.get("checkpoint")) for n, v in theirs.items() if n in sets}}


def gate_score(metrics: Mapping[str, Any], cfg: MlflowConfig) -> tuple[str, float]:
    """(gate set, its gate metric) from a metrics.json mapping; the first set when gate_set is null."""
    sets = metrics.get("test_sets")
    other = metrics.get("other_sets") or {}
    if cfg.gate_set in other:
        raise ValueError(f"mlflow.gate_set: {cfg.gate_set!r} was scored by {other[cfg.gate_set]} (eval.models "
                         f"per_stage), not by the checkpoint registered; gate on a set it scored "
                         f"({', '.join(sorted(sets or {})) or 'none'}) or set eval.models: final")  # fmt: skip
    if not isinstance(sets, Mapping) or not sets:
        raise ValueError("metrics.json has no test_sets: run `gsm evaluate` first")
    name = cfg.gate_set or sorted(sets)[0]
    if name not in sets:
        raise ValueError(f"mlflow.gate_set: {name!r} is not in metrics.json (scored: {', '.join(sorted(sets))})")
    value = sets[name].get(cfg.gate_metric) if isinstance(sets[name], Mapping) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"metrics.json: {name}.{cfg.gate_metric} is {value!r}, not a finite score")
    return name, float(value)


def check_scored(metrics: Mapping[str, Any], checkpoint: Path, sha256: str) -> None:
    """The scores must be the checkpoint's: by serving digest when `metrics["model"]` records it, else by
    path. `model` comes from reports/evaluated_model.json (gsm.stages.read_scores), not the metric file."""
    model = metrics.get("model") if isinstance(metrics.get("model"), Mapping) else {}
    scored_sha, scored = model.get("checkpoint_sha256"), model.get("checkpoint")
    if scored_sha is not None:
        same = scored_sha == sha256
    else:
        same = scored is not None and Path(str(scored)).resolve() == Path(checkpoint).resolve()
    if not same:
        raise ValueError(f"metrics.json scores {scored or 'an unknown checkpoint'}, not {checkpoint}: "
                         f"run `gsm evaluate --model {checkpoint}` first")  # fmt: skip


def version_tags(metrics: Mapping[str, Any], *, profile: str, checkpoint: Path, sha256: str) -> dict[str, str]:
    sets = metrics.get("test_sets") or {}
    tags = {"profile": profile, "datasets": ",".join(sorted(sets)), "checkpoint": str(checkpoint),
            "checkpoint_sha256": sha256, **provenance_tags()}  # fmt: skip
    for name, scores in sorted(sets.items()):
        for key in SCORES:
            value = scores.get(key) if isinstance(scores, Mapping) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                tags[metric_tag(name, key)] = repr(float(value))
    tags.pop("mlflow.source.git.commit", None)  # a run tag; versions get git_commit
    return tags


def _float_tag(tags: Mapping[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def current_champion(client: Any, name: str, gate_key: str) -> Champion | None:
    """The version holding `champion`, or None when the model or the alias does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return Champion(str(mv.version), mv.tags.get("profile"), _float_tag(mv.tags, gate_key))


def _existing_version(client: Any, name: str, tags: Mapping[str, str]) -> Any | None:
    """A version of `name` with this checkpoint and exactly these scores, if one was registered."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    scores = {k: v for k, v in tags.items() if k.startswith("metric.") or k in ("checkpoint_sha256", "profile")}
    for mv in versions:
        if all(mv.tags.get(k) == v for k, v in scores.items()):
            return client.get_model_version(name, str(mv.version))  # search results lack the aliases
    return None


@contextmanager
def _artifact_progress(progress: bool) -> Iterator[None]:
    """MLflow's artifact progress bars on stderr only when asked for (read per call from the env)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    if not progress:
        os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def register_checkpoint(
    cfg: MlflowConfig, target: TrackingTarget, checkpoint: Path, metrics: Mapping[str, Any], *, profile: str,
    report: Path, progress: bool = True, description: str | None = None, heldout: HeldOut | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> RegisterResult:
    """Log `checkpoint` as a pyfunc in a `register` run, register it under cfg.model_name, gate the alias.

    `metrics` is reports/metrics.json's content for this checkpoint with `model` from
    evaluated_model.json joined in (gsm.stages.read_scores; see `check_scored`);
    `description` (markdown: the model card) becomes a new version's description. With `heldout`
    (a retrain on new data) the retrain gate decides, and both comparisons become tags and metrics;
    `extra_tags` (the data versions trained on) go on the new version.
    """
    import mlflow

    from gsm.registry.pyfunc import WEIGHTS, PredictSettings, log_pyfunc

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    sha = serving_digest(checkpoint)  # deterministic: the same weights give the same digest
    check_scored(metrics, checkpoint, sha)
    metrics = own_scores(metrics, sha)
    gate_set, value = gate_score(metrics, cfg)
    gate_key = metric_tag(gate_set, cfg.gate_metric)
    tags = version_tags(metrics, profile=profile, checkpoint=checkpoint, sha256=sha)
    client = client_for(target)
    name = cfg.model_name

    with _artifact_progress(progress):
        existing = _existing_version(client, name, tags)
        if existing is not None:
            aliases = set(existing.aliases or ())
            alias = CHAMPION if CHAMPION in aliases else CHALLENGER if CHALLENGER in aliases else ""
            result = RegisterResult(
                name, int(existing.version), alias, False, True, f"already registered as version {existing.version}",
                gate_set, cfg.gate_metric, cfg.gate_tolerance, value, None, None,
                f"models:/{name}/{existing.version}", existing.run_id or "", Path(report),
                _champion_version(client, name, gate_key))  # fmt: skip
            _write_report(result, sha, profile)
            return result

        champion = current_champion(client, name, gate_key)
        metric = f"{gate_set} {cfg.gate_metric}"
        if heldout is None:
            decision = gate(value, champion, profile=profile, metric=metric, tolerance=cfg.gate_tolerance)
        else:
            decision = retrain_gate(value, champion, heldout, profile=profile, metric=metric)
            tags = {**tags, **heldout_tags(heldout, value, champion)}
        tags = {**tags, **dict(extra_tags or {})}
        params = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha, "profile": profile,
                  "gate_set": gate_set, "gate_metric": cfg.gate_metric, "gate_tolerance": str(cfg.gate_tolerance),
                  "model_name": name}  # fmt: skip
        run = MlflowRun(target, "register", params, tags={"profile": profile})
        status = "FAILED"
        try:
            run.log(0, {f"{gate_set}.{cfg.gate_metric}": value, **_heldout_metrics(heldout)})
            run.flush()
            with tempfile.TemporaryDirectory(prefix="gsm-register-") as tmp, mlflow_uris(target.uri), \
                    mlflow.start_run(run_id=run.run_id):  # fmt: skip
                info = log_pyfunc(checkpoint, PredictSettings.from_config(cfg), Path(tmp),
                                  metadata={"profile": profile, "checkpoint_sha256": sha})  # fmt: skip
                weights_sha = sha256_file(Path(tmp) / f"{WEIGHTS}.pt")  # the file inside the model
                mv = mlflow.register_model(info.model_uri, name, tags={**tags, "weights_sha256": weights_sha,
                                                                       "decision": decision.reason})
            if description:
                client.update_model_version(name, mv.version, description=description)
            client.set_registered_model_alias(name, decision.alias, mv.version)
            status = "FINISHED"
        finally:
            run.close(status)

    result = RegisterResult(
        name, int(mv.version), decision.alias, decision.alias == CHAMPION, False, decision.reason, gate_set,
        cfg.gate_metric, heldout.tolerance if heldout else cfg.gate_tolerance, value,
        int(champion.version) if champion else None,
        champion.value if champion else None, f"models:/{name}/{mv.version}", run.run_id, Path(report),
        _champion_version(client, name, gate_key))  # fmt: skip
    _write_report(result, sha, profile)
    return result


def _heldout_metrics(heldout: HeldOut | None) -> dict[str, float]:
    if heldout is None:
        return {}
    return {f"{heldout.test_set}.{heldout.metric}": heldout.challenger,
            f"{heldout.test_set}.{heldout.metric}.champion": heldout.champion}  # fmt: skip


def _champion_version(client: Any, name: str, gate_key: str) -> int | None:
    now = current_champion(client, name, gate_key)
    return int(now.version) if now else None


def _write_report(result: RegisterResult, sha: str, profile: str) -> None:
    data = asdict(result)
    data.pop("report")
    data.update(checkpoint_sha256=sha, profile=profile)
    atomic_write_json(result.report, data)


def download_champion(cfg: MlflowConfig, target: TrackingTarget, dest: Path, *, progress: bool = True) -> Path:
    """The champion version's serving checkpoint, copied to `dest` (a file, or into a folder).

    The copy is verified against the version's weights and lands atomically; an up-to-date `dest`
    is kept. The checkpoint loads with gsm.train.checkpoint.load_model and seeds training (init_from).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from gsm.registry.pyfunc import WEIGHTS

    client = client_for(target)
    name = cfg.model_name
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        raise FileNotFoundError(f"models:/{name}@{CHAMPION}: no champion in {target.uri} "
                                f"({first_line(exc)}); run `gsm register` first") from None  # fmt: skip
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / f"{name}-v{mv.version}.pt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".champion-", dir=dest.parent) as tmp, _artifact_progress(progress):
        try:
            with mlflow_uris(target.uri):
                local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{mv.version}", dst_path=tmp))
        except MlflowException as exc:
            raise RuntimeError(f"models:/{name}/{mv.version}: download failed ({first_line(exc)})") from None
        weights = local / "artifacts" / f"{WEIGHTS}.pt"
        if not weights.is_file():
            raise RuntimeError(f"models:/{name}/{mv.version}: no artifacts/{WEIGHTS}.pt (not a GSM-VSR model)")
        sha = sha256_file(weights)
        expected = mv.tags.get("weights_sha256")
        if expected is not None and sha != expected:
            raise RuntimeError(f"models:/{name}/{mv.version}: downloaded weights have sha256 {sha}, "
                               f"the version records {expected}")  # fmt: skip
        if dest.is_file() and sha256_file(dest) == sha:
            return dest
        os.replace(weights, dest)  # same folder, so the rename is atomic
    return dest


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "Champion",
    "GateDecision",
    "HeldOut",
    "RegisterResult",
    "check_scored",
    "own_scores",
    "current_champion",
    "download_champion",
    "gate",
    "gate_score",
    "metric_tag",
    "register_checkpoint",
    "retrain_gate",
    "seen_data_versions",
    "version_tags",
]
