"""Retraining on new videos: ingestion (gsm.data.incoming), the retrain gate, and the retrain flow's
incoming path, on synthetic videos written with OpenCV (a moving window over a random texture)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from conftest import REPO, TINY_MODEL, tiny_params_dict

from gsm.data.catalog import eval_sets, train_stores
from gsm.data.degrade import bicubic_downsample
from gsm.data.incoming import IncomingConfig, ingest, read_frames, read_ledger
from gsm.data.prepare import DataConfig
from gsm.io import sha256_file
from gsm.params import load_params, parse_params
from gsm.registry.register import Champion, HeldOut, retrain_gate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

HW = (66, 98)  # not multiples of 4: GT is the centred 64x96


def write_video(path: Path, seed: int, n: int = 30) -> None:
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (HW[0] + n, HW[1] + n, 3), dtype=np.uint8)
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (HW[1], HW[0]))
    assert out.isOpened()
    for t in range(n):
        out.write(np.ascontiguousarray(texture[t : t + HW[0], t : t + HW[1]]))
    out.release()


def setup(tmp: Path, *videos: tuple[str, int]) -> tuple[IncomingConfig, DataConfig, Path]:
    drop = tmp / "drop"
    drop.mkdir(parents=True, exist_ok=True)
    for name, seed in videos:
        write_video(drop / name, seed)
    cfg = IncomingConfig(folder=str(drop), store=str(tmp / "incoming"), gap=2)
    return cfg, DataConfig(root=str(tmp / "data"), workers=1), drop


def test_each_video_is_ingested_once_by_content(tmp_path: Path) -> None:
    cfg, data, drop = setup(tmp_path, ("a.mp4", 1))
    first = ingest(cfg, data, progress=False)
    assert first.new_version == "v0001" and first.videos_seen == 1 and len(first.versions) == 1
    again = ingest(cfg, data, progress=False)
    assert again.new_version is None and again.versions == first.versions
    shutil.copy(drop / "a.mp4", drop / "a-renamed.mp4")  # same bytes: not new
    assert ingest(cfg, data, progress=False).new_version is None
    write_video(drop / "b.mp4", 2)
    third = ingest(cfg, data, progress=False)
    assert third.new_version == "v0002" and third.videos_seen == 3
    ledger = read_ledger(first.store)
    assert [len(v["videos"]) for v in ledger["versions"]] == [1, 1]
    assert ledger["versions"][1]["videos"] == [sha256_file(drop / "b.mp4")]
    assert {r["version"] for r in ledger["videos"].values()} == {"v0001", "v0002"} and len(ledger["videos"]) == 2
    assert ledger["versions"][0]["digest"] != ledger["versions"][1]["digest"]


def test_train_and_heldout_parts_are_disjoint_and_degraded_with_bi(tmp_path: Path) -> None:
    cfg, data, drop = setup(tmp_path, ("a.mp4", 1))
    store = ingest(cfg, data, progress=False).store
    (rec,) = read_ledger(store)["videos"].values()
    # 30 frames: held-out = the last round(0.25 * 30) = 8 (22-29), gap 2 (20-21), train 0-19.
    assert rec["frames"] == 30 and rec["train_frames"] == [0, 18] and rec["heldout_frames"] == [22, 28]
    assert rec["heldout_frames"][0] - rec["train_frames"][1] > cfg.gap
    assert len(rec["train"]) == 5 and len(rec["heldout"]) == 1 and not set(rec["train"]) & set(rec["heldout"])
    manifest = json.loads((store / "v0001" / "manifest.json").read_text())
    gt, lr, entry = train_stores(manifest, "vimeo")  # read as the main data is
    assert entry["train"] == rec["train"] and entry["test"] == rec["heldout"]
    frames = list(read_frames(drop / "a.mp4"))
    held = rec["heldout"][0]
    for i in (1, 7):  # im1 is source frame 22, im7 frame 28: the centred 64x96 window
        img = gt.get(f"{held}/im{i}")
        assert img.shape == (64, 96, 3) and np.array_equal(img, frames[21 + i][1:65, 1:97])
        assert np.array_equal(lr.get(f"{held}/im{i}"), bicubic_downsample(img, 4))
    (test_set,) = eval_sets(manifest, "vimeo")
    assert test_set.name == "incoming-v0001" and test_set.protocol == "vimeo" and len(test_set.dataset) == 1


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    cfg, data, drop = setup(tmp_path, ("a.mp4", 1))
    (drop / "broken.mp4").write_text("not a video")
    with pytest.raises(ValueError, match=r"broken\.mp4") as err:
        ingest(cfg, data, progress=False)
    assert "\n" not in str(err.value)
    store = tmp_path / "incoming" / "quickstart"
    assert not (store / "ledger.json").exists() and not [p for p in store.glob("*") if p.name != "downloads"]
    (drop / "broken.mp4").unlink()
    write_video(drop / "short.mp4", 3, n=10)  # too few frames for train, gap and held-out
    with pytest.raises(ValueError, match=r"short\.mp4: 10 frames are too few"):
        ingest(cfg, data, progress=False)
    assert not (store / "ledger.json").exists() and not list(store.glob("*"))
    with pytest.raises(FileNotFoundError, match=r"^incoming.folder: .*nowhere: no such folder$"):
        ingest(IncomingConfig(folder=str(tmp_path / "nowhere")), data, progress=False)
    for bad, key in [({"heldout_fraction": 1.5}, "incoming.heldout_fraction"), ({"crop": [50, 64]}, "incoming.crop"),
                     ({"tolerance_db": -1}, "incoming.tolerance_db"), ({"folders": "x"}, "incoming.folders")]:  # fmt: skip
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            parse_params({"incoming": bad})
    with pytest.raises(ValueError, match="mlflow.gate_metric must be psnr"):
        parse_params({"incoming": {"folder": "x"}, "mlflow": {"gate_metric": "ssim"}})
    assert parse_params({"mlflow": {"gate_metric": "ssim"}}).incoming.configured is False  # the default: none


def test_retrain_gate_allows_the_tolerance_and_never_worse_held_out() -> None:
    champ = Champion("3", "quickstart", 30.0)

    def decide(value: float, challenger: float, champion: Champion | None = champ) -> str:
        held = HeldOut("incoming-heldout", "psnr", challenger, 27.9, tolerance=0.1)
        return retrain_gate(value, champion, held, profile="quickstart", metric="quickstart-REDS psnr").alias

    assert decide(29.95, 28.0) == "champion"  # -0.05 dB on the benchmark: within 0.1, better on new data
    assert decide(29.9, 27.9) == "champion"  # exactly at the tolerance, equal on new data
    assert decide(29.85, 30.0) == "challenger"  # -0.15 dB: a regression, however good on new data
    assert decide(31.0, 27.8) == "challenger"  # worse on the new held-out clips
    assert decide(20.0, 20.0, None) == "champion"  # the first version
    assert decide(31.0, 28.0, Champion("3", "paper", 30.0)) == "challenger"  # not comparable
    held = HeldOut("incoming-heldout", "psnr", 28.0, 27.9, tolerance=0.1)
    reason = retrain_gate(29.85, champ, held, profile="quickstart", metric="m").reason
    assert reason.startswith("benchmark regressed beyond 0.1") and "29.8500 vs champion v3 30.0000" in reason


def test_dvc_tracks_each_version(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "DVC_NO_ANALYTICS": "1", "HOME": str(tmp_path)}

    def run(*args: str) -> str:
        r = subprocess.run(list(args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    run("git", "init", "-q")
    run(str(bin_dir / "dvc"), "init", "-q")
    cfg, data, drop = setup(tmp_path, ("a.mp4", 1))
    data = DataConfig(root=str(tmp_path / "data"), workers=1)
    first = ingest(cfg, data, progress=False)
    dvc_file = tmp_path / "incoming" / "quickstart.dvc"
    assert first.dvc_md5 and first.dvc_md5.endswith(".dir") and dvc_file.is_file()
    assert "incoming/quickstart.dvc" in run("git", "status", "--porcelain", "-uall")  # committable, not ignored
    assert "up to date" in run(str(bin_dir / "dvc"), "status", str(dvc_file.relative_to(tmp_path)))
    write_video(drop / "b.mp4", 2)
    second = ingest(cfg, data, progress=False)
    assert second.new_version == "v0002" and second.dvc_md5 not in (None, first.dvc_md5)
    assert yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"] == second.dvc_md5


# --- the retrain flow's incoming path ---------------------------------------------------------------


@dataclass
class Retrained:
    root: Path
    params: Path
    uri: str
    first: dict[str, Any]
    second: dict[str, Any]
    calls: list[str]


def _tiny_checkpoint(path: Path) -> Path:
    from gsm.models.config import GSMConfig
    from gsm.train.checkpoint import FORMAT, build_model, save_checkpoint

    cfg = GSMConfig(**TINY_MODEL)  # type: ignore[arg-type]
    save_checkpoint(path, {"format": FORMAT, "config": cfg.to_dict(), "model": build_model(cfg).state_dict()})
    return path


def _fake_metrics(out: Path, ckpt: Path, psnr: float) -> None:
    """metrics.json and evaluated_model.json as `evaluate` writes them (the benchmark scores are set,
    not measured: CPU time)."""
    from gsm.train.checkpoint import serving_digest

    row = {"psnr": psnr, "ssim": 0.8, "psnr_gain": 1.0, "ssim_gain": 0.01, "bicubic_psnr": psnr - 1, "bicubic_ssim": 0.79}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"test_sets": {"quickstart-Vimeo": row}}))
    (out / "evaluated_model.json").write_text(json.dumps(
        {"checkpoint": str(ckpt), "checkpoint_sha256": serving_digest(ckpt), "profile": "quickstart"}))


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Retrained]:
    """The retrain flow's body (Prefect's engine left out: tasks called as functions) on one new
    video, then again with nothing new. The main data is an ingested video too; the data steps and
    the benchmark evaluation are stood in for (their own tests cover them)."""
    import pipelines.flows as flows
    from gsm.registry.register import register_checkpoint
    from gsm.stages import read_scores
    from gsm.tracking import tracking_target

    root = tmp_path_factory.mktemp("retrain_incoming")
    cfg, _, drop = setup(root, ("a.mp4", 1))
    data = DataConfig(root=str(root / "data"), workers=1)
    base = ingest(replace(cfg, store=str(root / "base")), data, progress=False)  # stands in for the main data
    shutil.rmtree(drop)
    setup(root, ("new.mp4", 5))
    raw = tiny_params_dict(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    raw["mlflow"] = {"tracking_uri": uri, "gate_set": "quickstart-Vimeo", "model_name": "incoming-test"}
    raw["train"]["vimeo"]["val_every"] = 99  # no validation curve: not what this tests
    raw["incoming"] = {"folder": str(drop), "store": str(root / "incoming"), "gap": 2, "tolerance_db": 0.1, "dvc_add": False}
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    p = load_params(params)
    p.data.manifest_path.parent.mkdir(parents=True)
    shutil.copy(base.store / "v0001" / "manifest.json", p.data.manifest_path)

    champion = _tiny_checkpoint(root / "champion-src.pt")
    _fake_metrics(root / "champion-reports", champion, 30.0)
    metrics = read_scores(root / "champion-reports")  # scores joined with what they score, as register reads them
    register_checkpoint(p.mlflow, tracking_target(p.mlflow), champion, metrics, profile="quickstart",
                        report=root / "champion-reports" / "registry.json", progress=False)  # fmt: skip

    calls: list[str] = []

    def fake_evaluate(p: Any, checkpoint: Path, runs: Path, out: Path, **_: Any) -> dict[str, Any]:
        _fake_metrics(out, checkpoint, 29.95)  # -0.05 dB: within the 0.1 tolerance
        return {}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flows, "get_run_logger", lambda: logging.getLogger("test"))
        mp.setattr(flows, "retried", lambda t, p: t)
        mp.setattr(flows, "prepare", lambda p, progress: calls.append("prepare"))
        mp.setattr(flows, "run_stage", lambda t, p, cache=True, **a: (calls.append(t.__name__), t(p=p, **a))[1])
        for name in ("ingest", "unseen_versions", "heldout_scores", "champion_checkpoint", "train", "register"):
            mp.setattr(flows, name, getattr(flows, name).fn)
        mp.setattr(flows, "evaluate", fake_evaluate)
        first = flows.retrain.fn(params=str(params), runs=str(root / "runs"))
        n = len(calls)
        second = flows.retrain.fn(params=str(params), runs=str(root / "runs"))
        yield Retrained(root, params, uri, first, second, calls[n:])


def _version(r: Retrained, version: int) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=r.uri, registry_uri=r.uri).get_model_version("incoming-test", str(version))


def test_retrain_on_new_data_records_data_versions_and_both_comparisons(retrained: Retrained) -> None:
    from gsm import stages

    reg = retrained.first["registered"]
    assert reg.version == 2 and reg.champion_version == 1 and reg.gate_tolerance == 0.1
    tags = _version(retrained, 2).tags
    p = load_params(retrained.params)
    ledger = read_ledger(root_store := Path(p.incoming.store) / "quickstart")
    (version,) = ledger["versions"]
    assert tags["data.incoming.v0001"] == version["digest"] and tags["data.incoming.new"] == "v0001"
    assert tags["data.manifest_sha256"] == sha256_file(p.data.manifest_path)
    assert tags["gate.rule"] == "retrain" and float(tags["gate.tolerance"]) == 0.1
    assert float(tags["gate.benchmark.challenger"]) == 29.95 and float(tags["gate.benchmark.champion"]) == 30.0
    challenger, champion = float(tags["gate.heldout.challenger"]), float(tags["gate.heldout.champion"])
    manifests = {"v0001": json.loads((root_store / "v0001" / "manifest.json").read_text())}
    again = stages.heldout_scores(p, {"challenger": retrained.first["vimeo"].last,
                                      "champion": retrained.first["champion"]}, manifests, progress=False)  # fmt: skip
    assert again == {"challenger": challenger, "champion": champion} and 5 < champion < 60
    assert reg.alias == ("champion" if challenger >= champion else "challenger")  # the benchmark is within 0.1
    # trained on the main data and the new version together
    dataset, _ = stages.train_inputs(p, json.loads(p.data.manifest_path.read_text()), "vimeo", manifests)
    assert len(dataset) == 5 + 5 and dataset.sequences[0].startswith("base/") and dataset.sequences[-1].startswith("v0001/")
    assert dataset[9]["gt"].shape[-2:] == (16, 16)


def test_retrain_without_new_data_ends_at_once(retrained: Retrained) -> None:
    assert retrained.second == {"run_dir": None, "skipped": retrained.second["skipped"]}
    assert retrained.second["skipped"].startswith("retrain: no new data (1 incoming video(s)")
    assert retrained.calls == []  # no data step, training, evaluation or registration
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=retrained.uri, registry_uri=retrained.uri)
    assert len(client.search_model_versions("name = 'incoming-test'")) == 2
