"""MLflow tracking and the model registry, against a throwaway sqlite store.

One tiny quickstart pipeline (prepare -> train reds -> evaluate, through the `gsm` command) runs
once per module with tracking on; the tests then check what it logged, register checkpoints made
from its result (gating the `champion` alias both ways), pull the champion back through
`models:/` URIs (pyfunc predict, `gsm upscale`, the retrain flow's checkpoint) and check the
one-line errors.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_params_dict
from typer.testing import CliRunner

from gsm import stages
from gsm.cli import app
from gsm.params import Params, load_params, params_yaml
from gsm.registry.pyfunc import PredictSettings, check_frames, predict_frames
from gsm.registry.register import Champion, gate
from gsm.tracking import MlflowConfig, mlflow_uris, sha256_file, tracking_target
from gsm.train.checkpoint import serving_digest
from gsm.train.checkpoint import FORMAT, load_checkpoint, load_model, save_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@dataclass(frozen=True)
class Project:
    root: Path
    params: Path
    uri: str
    runs: Path
    reports: Path

    def load(self, **mlflow: Any) -> Params:
        p = load_params(self.params)
        return replace(p, mlflow=replace(p.mlflow, **mlflow))


def _gsm(*args: str) -> str:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """The tiny quickstart trained (3 iterations) and evaluated, tracked in root/mlflow.db."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    raw = tiny_params_dict(root)
    raw["mlflow"] = {"tracking_uri": uri, "gate_set": "quickstart-REDS", "predict_chunk": 4,
                     "predict_chunk_overlap": 2}  # fmt: skip
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    proj = Project(root, params, uri, root / "runs", root / "reports")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        common = ["--params", str(params), "--no-progress"]
        _gsm("prepare", *common)
        _gsm("train", "--stage", "reds", "--runs", str(proj.runs), *common)
        _gsm("evaluate", "--runs", str(proj.runs), "--out", str(proj.reports), *common)
        yield proj


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _run(client: Any, name: str) -> Any:
    exp = client.get_experiment_by_name("gsm-vsr")
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def test_training_and_evaluation_runs_are_tracked(project: Project) -> None:
    client = _client(project.uri)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    lock = Path("dvc.lock")

    train = _run(client, "reds")
    assert train.info.status == "FINISHED"
    assert train.data.tags["git_commit"] == train.data.tags["mlflow.source.git.commit"] == head
    assert train.data.tags["git_dirty"] in ("true", "false")
    if lock.is_file():
        assert train.data.tags["dvc_lock_sha256"] == sha256_file(lock)
    p = train.data.params
    assert p["model.embed_dim"] == "16" and p["train.reds.iters"] == "3" and p["data.profile"] == "quickstart"
    assert [m.step for m in client.get_metric_history(train.info.run_id, "loss")] == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(train.info.run_id)}
    assert artifacts == {"params.yaml", "metrics.jsonl"}
    snapshot = yaml.safe_load(Path(client.download_artifacts(train.info.run_id, "params.yaml",
                                                             str(project.root / "dl"))).read_text())  # fmt: skip
    assert snapshot["mlflow"]["gate_set"] == "quickstart-REDS" and snapshot["train"]["reds"]["iters"] == 3

    ev = _run(client, "evaluate")
    scores = json.loads((project.reports / "metrics.json").read_text())
    assert ev.data.metrics["quickstart-REDS.psnr"] == pytest.approx(scores["test_sets"]["quickstart-REDS"]["psnr"])
    assert "quickstart-Vimeo.psnr_gain" in ev.data.metrics and ev.data.tags["git_commit"] == head
    assert ev.data.params["checkpoint_sha256"] == serving_digest(project.runs / "reds" / "checkpoints" / "last.pt")
    assert ev.data.params["eval.max_clips"] == "1"
    # Only the REDS stage trained: per_stage scores every set with its checkpoint, and says so.
    reds_last = str(project.runs / "reds" / "checkpoints" / "last.pt")
    assert ev.data.params["scored_by.quickstart-REDS"] == ev.data.params["scored_by.quickstart-Vimeo"] == reds_last
    logged = {a.path for a in client.list_artifacts(ev.info.run_id)}
    assert {"metrics.json", "evaluated_model.json", "benchmark.md", "per_clip.csv", "plots"} <= logged
    assert "model" not in scores  # scores only; what they score is the plain file beside them
    evaluated = json.loads((project.reports / "evaluated_model.json").read_text())
    assert evaluated["checkpoint_sha256"] == ev.data.params["checkpoint_sha256"] and evaluated["params"] > 0
    assert client.list_artifacts(ev.info.run_id, "plots")
    # Artifacts sit beside the database, in the experiment's location.
    assert (project.root / "mlartifacts").is_dir()


def test_tracking_target_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = tracking_target(MlflowConfig())
    assert default is not None and default.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert default.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert tracking_target(MlflowConfig(tracking_uri=None)) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    env = tracking_target(MlflowConfig(tracking_uri=None))
    assert env is not None and env.uri == "http://127.0.0.1:5000" and env.artifact_location is None
    cli = tracking_target(MlflowConfig(), "sqlite:////srv/ml/mlflow.db")
    assert cli is not None and cli.artifact_location == "file:///srv/ml/mlartifacts"


def test_gate_is_pure() -> None:
    def alias(value: float, champion: Champion | None) -> str:
        return gate(value, champion, profile="quickstart", metric="psnr", tolerance=0.1).alias

    assert alias(30.0, None) == "champion"
    assert alias(30.2, Champion("1", "quickstart", 30.0)) == "champion"
    assert alias(30.1, Champion("1", "quickstart", 30.0)) == "challenger"  # not above the tolerance
    assert alias(40.0, Champion("1", "paper", 30.0)) == "challenger"  # other data: not comparable
    assert alias(40.0, Champion("1", "quickstart", None)) == "challenger"  # no score to compare


def test_a_version_keeps_only_the_scores_its_own_weights_made() -> None:
    """eval.models per_stage: the REDS stage's model scores the REDS-like set, the final one the rest.
    Registering the final model tags, cards and gates it on its own sets only; a gate set another
    model scored is a one-line error naming the param."""
    from gsm.registry.register import gate_score, own_scores, version_tags

    row = {"psnr": 30.0, "ssim": 0.8}
    metrics = {"test_sets": {"quickstart-REDS": {**row, "psnr": 34.0}, "quickstart-Vimeo": row},
               "model": {"checkpoint": "v.pt", "checkpoint_sha256": "bbb", "scored_by": {
                   "quickstart-REDS": {"checkpoint": "r.pt", "checkpoint_sha256": "aaa"},
                   "quickstart-Vimeo": {"checkpoint": "v.pt", "checkpoint_sha256": "bbb"}}}}  # fmt: skip
    mine = own_scores(metrics, "bbb")
    assert list(mine["test_sets"]) == ["quickstart-Vimeo"] and mine["other_sets"] == {"quickstart-REDS": "r.pt"}
    assert gate_score(mine, MlflowConfig(gate_set="quickstart-Vimeo")) == ("quickstart-Vimeo", 30.0)
    with pytest.raises(ValueError, match=r"^mlflow.gate_set: 'quickstart-REDS' was scored by r.pt \(eval.models "
                                         r"per_stage\).*\(quickstart-Vimeo\) or set eval.models: final$"):
        gate_score(mine, MlflowConfig(gate_set="quickstart-REDS"))
    tags = version_tags(mine, profile="quickstart", checkpoint=Path("v.pt"), sha256="bbb")
    assert "metric.quickstart-Vimeo.psnr" in tags and not any("quickstart-REDS" in k for k in tags)
    assert own_scores(metrics, "aaa")["other_sets"] == {"quickstart-Vimeo": "v.pt"}
    old = {"test_sets": metrics["test_sets"], "model": {"checkpoint_sha256": "bbb"}}  # before scored_by
    assert own_scores(old, "bbb") == old


def _variant(project: Project, name: str, seed: int) -> tuple[Path, Path]:
    """A checkpoint derived from the trained one (weights nudged by `seed`) and a reports folder."""
    state = load_checkpoint(project.runs / "reds" / "checkpoints" / "last.pt")
    gen = torch.Generator().manual_seed(seed)
    ema = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
           for k, v in state["ema"].items()}  # fmt: skip
    ckpt = project.root / "variants" / f"{name}.pt"
    save_checkpoint(ckpt, {**state, "ema": ema})
    return ckpt, project.root / "variants" / f"reports-{name}"


def _scores(reports: Path, ckpt: Path, psnr: float, profile: str = "quickstart") -> None:
    """metrics.json (scores) and evaluated_model.json (what they score) for `ckpt`, REDS-like PSNR `psnr`."""
    reports.mkdir(parents=True, exist_ok=True)
    row = {"psnr": psnr, "ssim": 0.8, "psnr_gain": psnr - 29.0, "ssim_gain": 0.01, "bicubic_psnr": 29.0}
    model = {"checkpoint": str(ckpt), "checkpoint_sha256": serving_digest(ckpt), "profile": profile}
    data = {"test_sets": {"quickstart-REDS": row, "quickstart-Vimeo": {**row, "psnr": 35.0}}}
    (reports / "metrics.json").write_text(json.dumps(data))
    (reports / "evaluated_model.json").write_text(json.dumps(model))


def test_read_scores_joins_the_evaluated_model_and_reads_an_old_metrics_json(tmp_path: Path) -> None:
    """register needs the scored checkpoint's digest: from evaluated_model.json, or from the `model`
    block a metrics.json written before the split still has."""
    from gsm.stages import read_scores

    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir(), old.mkdir()
    (new / "metrics.json").write_text('{"test_sets": {"a": {"psnr": 30.0}}}')
    (new / "evaluated_model.json").write_text('{"checkpoint_sha256": "abc", "profile": "quickstart"}')
    (old / "metrics.json").write_text('{"test_sets": {}, "model": {"checkpoint_sha256": "def"}}')
    assert read_scores(new) == {"test_sets": {"a": {"psnr": 30.0}},
                                "model": {"checkpoint_sha256": "abc", "profile": "quickstart"}}  # fmt: skip
    assert read_scores(old)["model"] == {"checkpoint_sha256": "def"}
    with pytest.raises(FileNotFoundError, match="gsm evaluate"):
        read_scores(tmp_path)


def test_register_gates_the_champion_both_ways(project: Project) -> None:
    p = project.load(model_name="gated", gate_tolerance=0.1)
    client = _client(project.uri)
    registered = []
    for name, seed, psnr in (("first", 1, 30.0), ("better", 2, 30.5), ("close", 3, 30.55), ("worse", 4, 29.0)):
        ckpt, reports = _variant(project, name, seed)
        _scores(reports, ckpt, psnr)
        registered.append((ckpt, reports, stages.register(p, project.runs, reports, checkpoint=ckpt,
                                                           progress=False)))  # fmt: skip
    first, better, close, worse = (r for _, _, r in registered)
    assert (first.version, first.alias, first.promoted) == (1, "champion", True)
    assert (better.version, better.alias, better.champion_version) == (2, "champion", 1)
    assert better.champion_value == pytest.approx(30.0) and better.value == pytest.approx(30.5)
    assert (close.alias, close.promoted) == ("challenger", False) and "<=" in close.reason  # within tolerance
    assert worse.alias == "challenger"
    assert str(client.get_model_version_by_alias("gated", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("gated", "challenger").version) == "4"

    tags = client.get_model_version("gated", "2").tags
    assert tags["profile"] == "quickstart" and tags["datasets"] == "quickstart-REDS,quickstart-Vimeo"
    assert float(tags["metric.quickstart-REDS.psnr"]) == 30.5 and "metric.quickstart-Vimeo.ssim" in tags
    assert tags["checkpoint_sha256"] == serving_digest(registered[1][0]) and len(tags["weights_sha256"]) == 64
    assert tags["git_commit"] == subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                text=True).stdout.strip()  # fmt: skip
    report = json.loads((registered[3][1] / "registry.json").read_text())
    assert report["version"] == 4 and report["alias"] == "challenger" and report["champion_version"] == 2
    assert report["value"] == 29.0 and report["gate_metric"] == "psnr" and report["gate_set"] == "quickstart-REDS"

    # The same checkpoint and scores again: no new version.
    again = stages.register(p, project.runs, registered[1][1], checkpoint=registered[1][0], progress=False)
    assert again.reused and again.version == 2 and again.alias == "champion"
    assert len(client.search_model_versions("name = 'gated'")) == 4

    # Scores on other data are not comparable: the champion stays.
    ckpt, reports = _variant(project, "paper", 5)
    _scores(reports, ckpt, 99.0, profile="paper")
    paper = stages.register(replace(p, data=replace(p.data, profile="paper")), project.runs, reports,
                            checkpoint=ckpt, progress=False)  # fmt: skip
    assert paper.alias == "challenger" and "not comparable" in paper.reason
    assert str(client.get_model_version_by_alias("gated", "champion").version) == "2"

    # metrics.json must score the checkpoint being registered.
    with pytest.raises(ValueError, match="run `gsm evaluate --model"):
        stages.register(p, project.runs, registered[0][1], checkpoint=registered[1][0], progress=False)


def test_a_new_version_s_description_is_its_model_card(project: Project) -> None:
    p = project.load(model_name="carded")
    ckpt, reports = _variant(project, "carded", 6)
    _scores(reports, ckpt, 31.25)
    (reports / "runtime.json").write_text(json.dumps({"quickstart-REDS": {"seconds_per_frame": 0.125}}))
    network = load_checkpoint(ckpt)["config"]
    gpu = {"environment": {"config": {**network, "scan_impl": "cuda"}, "gpu": "NVIDIA H200",
                           "infer_shape": [10, 180, 320], "date": "2026-11-30T01:49:29+00:00"},
           "sections": {"inference_bf16": {"status": "ok", "ms_per_frame": 42.0}}}  # fmt: skip
    (reports / "gpu_runtime.json").write_text(json.dumps(gpu))
    r = stages.register(p, project.runs, reports, checkpoint=ckpt, progress=False)
    card = _client(project.uri).get_model_version("carded", str(r.version)).description
    head = "| test set | protocol | clips | frames | PSNR (dB) | SSIM | bicubic PSNR | bicubic SSIM | gain (dB) |"
    assert head in card
    assert "| quickstart-REDS | Y channel, every frame | - | - | 31.25 | 0.8000 | 29.00 | - | +2.25 |" in card
    assert "| quickstart-Vimeo | Y channel, centre frame (im4) |" in card
    assert "**Intended use:** a demonstration" in card and "- data profile: `quickstart`" in card
    assert f"stage `{load_checkpoint(ckpt)['stage']}`" in card
    head_commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert f"- git commit: `{head_commit}`" in card
    assert f"- params sha256: `{hashlib.sha256(params_yaml(p).encode()).hexdigest()}`" in card
    assert f"- checkpoint serving digest: `{serving_digest(ckpt)}`" in card
    assert "- CPU: quickstart-REDS 0.125 s / frame (`gsm evaluate` on cpu" in card
    assert "- GPU: bf16 42 ms / frame at 10x180x320 (T x H x W LR) on NVIDIA H200, 2026-11-30" in card

    # Timings of another network are not this one's.
    ckpt2, reports2 = _variant(project, "carded-2", 7)
    _scores(reports2, ckpt2, 31.5)
    other = {**gpu, "environment": {**gpu["environment"], "config": {**network, "embed_dim": 192}}}
    (reports2 / "gpu_runtime.json").write_text(json.dumps(other))
    r2 = stages.register(p, project.runs, reports2, checkpoint=ckpt2, progress=False)
    card2 = _client(project.uri).get_model_version("carded", str(r2.version)).description
    assert "- CPU: not measured\n- GPU: not measured (gpu_runtime.json timed another network)" in card2


def test_register_reports_the_registry_champion_not_its_own_history(project: Project) -> None:
    """The issue's case: v1, then v2 takes `champion`, then v1's inputs come back (a reverted param).
    `gsm register` reuses v1 and its registry.json must say v2 is champion, as MLflow does."""
    p = project.load(model_name="reconciled", gate_tolerance=0.1)
    runs = {}
    for name, seed, psnr in (("v1", 11, 30.0), ("v2", 12, 31.0)):
        runs[name] = ckpt, reports = _variant(project, name, seed)
        _scores(reports, ckpt, psnr)
        stages.register(p, project.runs, reports, checkpoint=ckpt, progress=False)
    ckpt, reports = runs["v1"]
    again = stages.register(p, project.runs, reports, checkpoint=ckpt, progress=False)
    assert (again.reused, again.version, again.alias, again.registry_champion) == (True, 1, "", 2)
    report = json.loads((reports / "registry.json").read_text())
    assert (report["version"], report["alias"], report["registry_champion"]) == (1, "", 2)
    assert str(_client(project.uri).get_model_version_by_alias("reconciled", "champion").version) == "2"


def _clip(t: int = 5, h: int = 12, w: int = 16) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([np.stack([(xs * 9 + i * 5) % 256, (ys * 13) % 256, ((xs + ys) * 7 + i) % 256], -1)
                     for i in range(t)]).astype(np.uint8)  # fmt: skip


def _direct(ckpt: Path, frames: np.ndarray) -> np.ndarray:
    """The checkpoint's network on the whole clip at once: what predict must equal when not chunked."""
    model = load_model(ckpt)
    with torch.no_grad():
        out = model(torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255).unsqueeze(0))[0]
    return out.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_champion_loads_by_uri_and_predicts(project: Project, tmp_path: Path) -> None:
    import mlflow

    p = project.load(model_name="served")
    ckpt = project.runs / "reds" / "checkpoints" / "last.pt"
    r = stages.register(p, project.runs, project.reports, progress=False)  # the evaluated last.pt
    assert (r.version, r.alias) == (1, "champion")
    frames = _clip()
    with mlflow_uris(project.uri):
        model = mlflow.pyfunc.load_model("models:/served@champion")
        out = model.predict(frames)  # 5 frames in chunks of 4 sharing 2 (mlflow.predict_chunk*)
        whole = model.predict(frames, params={"chunk": 8})
    assert out.shape == (5, 48, 64, 3) and out.dtype == np.uint8
    chunked = predict_frames(load_model(ckpt), frames, PredictSettings(chunk=4, chunk_overlap=2))
    assert np.array_equal(out, chunked)
    assert np.array_equal(whole, _direct(ckpt, frames))

    inner = model.unwrap_python_model()
    with pytest.raises(ValueError, match="uint8"):
        inner.predict(None, frames.astype(np.float32))
    with pytest.raises(ValueError, match="T x H x W x 3"):
        check_frames(frames[..., :2])

    # The retrain flow's starting point: the champion's serving weights as a checkpoint file.
    (tmp_path / "init").mkdir()
    got = stages.champion_checkpoint(p, tmp_path / "init", progress=False)
    assert got == tmp_path / "init" / "served-v1.pt" and got.is_file()
    assert stages.champion_checkpoint(p, got, progress=False) == got  # up to date: kept
    served, trained = load_model(got).state_dict(), load_model(ckpt).state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in served.items())
    assert load_checkpoint(got)["format"] == FORMAT and load_checkpoint(got).get("optimizer") is None
    with pytest.raises(FileNotFoundError, match="no champion"):
        stages.champion_checkpoint(project.load(model_name="nobody"), tmp_path / "x.pt", progress=False)


def _video(path: Path, frames: np.ndarray) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (frames.shape[2], frames.shape[1]))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()


def _read(path: Path) -> list[np.ndarray]:
    cap, frames = cv2.VideoCapture(str(path)), []
    ok, frame = cap.read()
    while ok:
        frames.append(frame)
        ok, frame = cap.read()
    cap.release()
    return frames


def test_upscale_cli_takes_a_models_uri(project: Project, tmp_path: Path) -> None:
    p = project.load(model_name="cli")
    stages.register(p, project.runs, project.reports, progress=False)
    src = tmp_path / "in.mp4"
    _video(src, _clip(6, 24, 32))
    common = ["--chunk", "4", "--chunk-overlap", "2", "--no-progress", "--tracking-uri", project.uri]
    out = _gsm("upscale", str(src), str(tmp_path / "uri.mp4"), "--model", "models:/cli@champion", *common)
    assert "6 frames 128x96" in out
    _gsm("upscale", str(src), str(tmp_path / "ckpt.mp4"), "--model",
         str(project.runs / "reds" / "checkpoints" / "last.pt"), *common)  # fmt: skip
    a, b = _read(tmp_path / "uri.mp4"), _read(tmp_path / "ckpt.mp4")
    assert len(a) == 6 and all(np.array_equal(x, y) for x, y in zip(a, b))

    r = CliRunner().invoke(app, ["upscale", str(src), str(tmp_path / "no.mp4"), "--model",
                                 "models:/cli@nonexistent", *common])  # fmt: skip
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "models:/cli@nonexistent" in r.output


def test_upscale_never_imports_the_code_stored_with_a_model(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared store's stored code is not run: the network comes from weights and config only."""
    import mlflow

    p = project.load(model_name="tamper")
    others = set(project.root.rglob("code/gsm"))
    stages.register(p, project.runs, project.reports, progress=False)
    for code in set(project.root.rglob("code/gsm")) - others:  # the copy logged with this model
        shutil.rmtree(code)
    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda *a, **k: pytest.fail("the pyfunc loader was used"))
    path_before = list(sys.path)
    src = tmp_path / "in.mp4"
    _video(src, _clip(3, 16, 16))
    out = _gsm("upscale", str(src), str(tmp_path / "o.mp4"), "--model", "models:/tamper@champion", "--chunk", "4",
               "--chunk-overlap", "2", "--no-progress", "--tracking-uri", project.uri)  # fmt: skip
    assert "3 frames 64x64" in out and sys.path == path_before


def test_an_unreachable_tracking_server_fails_in_seconds(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = tmp_path / "in.mp4"
    _video(src, _clip(2, 16, 16))
    t0 = time.monotonic()
    r = CliRunner().invoke(app, ["upscale", str(src), str(tmp_path / "o.mp4"), "--model", "models:/x@champion",
                                 "--tracking-uri", f"http://127.0.0.1:{port}", "--no-progress"])  # fmt: skip
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "models:/x@champion: cannot load it from http://127.0.0.1:" in r.output
    assert time.monotonic() - t0 < 30  # MLflow's own defaults retry for minutes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_bad_mlflow_params_are_one_line_errors(project: Project, tmp_path: Path) -> None:
    cases = (({"gate_metrc": "psnr"}, "mlflow.gate_metrc"), ({"gate_metric": "lpips"}, "mlflow.gate_metric"),
             ({"gate_tolerance": -1}, "gate_tolerance"))
    for section, key in cases:
        bad = tmp_path / "params.yaml"
        bad.write_text(yaml.safe_dump({**yaml.safe_load(project.params.read_text()), "mlflow": section}))
        r = CliRunner().invoke(app, ["register", "--params", str(bad), "--reports", str(project.reports)])
        assert r.exit_code == 2 and r.output.count("\n") == 1 and key in r.output, r.output
    none = tmp_path / "none.yaml"
    none.write_text(yaml.safe_dump({"mlflow": {"tracking_uri": None}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        r = CliRunner().invoke(app, ["register", "--params", str(none), "--reports", str(project.reports)])
    assert r.exit_code == 2 and "needs an MLflow store" in r.output


def test_no_store_is_created_for_a_missing_database(project: Project, tmp_path: Path) -> None:
    src = tmp_path / "in.mp4"
    _video(src, _clip(2, 16, 16))
    missing = f"sqlite:///{tmp_path / 'absent.db'}"
    r = CliRunner().invoke(app, ["upscale", str(src), str(tmp_path / "o.mp4"), "--model", "models:/x@champion",
                                 "--tracking-uri", missing, "--no-progress"])  # fmt: skip
    assert r.exit_code == 2 and "no MLflow store" in r.output and not (tmp_path / "absent.db").exists()
