"""The stages wired end to end through the `gsm` command: prepare -> train reds -> train vimeo -> evaluate.

The data are the paper profile's archives at toy sizes (served on loopback, as in test_prepare),
the model and recipe tiny, so the whole chain runs in seconds and checks the wiring: the manifest
feeds the catalog, the Vimeo stage starts from the REDS checkpoint, evaluation finds the last stage
and writes every report.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from http_server import LoopbackServer, http_server  # noqa: F401 - fixture
from test_prepare import TOY, _archives
from typer.testing import CliRunner

from gsm.cli import app

TINY_MODEL = dict(embed_dim=16, num_heads=2, prop_layers=1, attn_depth=1, d_state=4, mid_channels=16, window=3,
                  scan_impl="torch")
STAGE = dict(iters=3, batch_size=2, gt_size=16, lr=1e-3, fix_flow=1, workers=0, ckpt_every=2, val_every=2,
             log_every=1, ema_decay=0.5)


def _params(tmp: Path, server: LoopbackServer) -> Path:
    names = {
        "reds_train_sharp": "train_sharp.zip", "reds_train_sharp_bicubic": "train_sharp_bicubic.zip",
        "reds_val_sharp": "val_sharp.zip", "reds_val_sharp_bicubic": "val_sharp_bicubic.zip",
        "vimeo_septuplet": "vimeo_septuplet.zip", "vid4_gt": "Vid4.zip",
    }  # fmt: skip
    params = {
        "model": TINY_MODEL,
        "train": {"device": "cpu", "reds": {**STAGE, "num_frames": 2}, "vimeo": STAGE},
        "eval": {"device": "cpu", "sets": ["REDS4", "Vimeo-90K-T", "Vid4-BI"], "max_clips": 1, "crop_size": 16},
        "data": {"profile": "paper", "root": str(tmp / "data"), "workers": 1, "paper": TOY},
        "sources": {k: {"url": server.url(v)} for k, v in names.items()},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},  # never the repo's mlflow.db
    }
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_stages_end_to_end(http_server: LoopbackServer, tmp_path: Path) -> None:  # noqa: F811
    http_server.files.update(_archives())
    params, runs, reports = _params(tmp_path, http_server), tmp_path / "runs", tmp_path / "reports"
    cli = CliRunner()

    def gsm(*args: str) -> str:
        r = cli.invoke(app, [*args, "--params", str(params), "--no-progress"])
        assert r.exit_code == 0, r.output
        return r.output

    gsm("prepare")
    assert "reds: 3 iterations (resumed at 0)" in gsm("train", "--stage", "reds", "--runs", str(runs))
    out = gsm("train", "--stage", "vimeo", "--runs", str(runs))
    assert "vimeo: 3 iterations" in out
    lines = [json.loads(x) for x in (runs / "vimeo" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines if "loss" in x] == [1, 2, 3] and any("val_psnr" in x for x in lines)
    # A finished stage returns at once.
    assert "resumed at 3" in gsm("train", "--stage", "reds", "--runs", str(runs))

    out = gsm("evaluate", "--runs", str(runs), "--out", str(reports))
    metrics = json.loads((reports / "metrics.json").read_text())
    assert set(metrics["test_sets"]) == {"REDS4", "Vimeo-90K-T", "Vid4-BI"}
    evaluated = json.loads((reports / "evaluated_model.json").read_text())  # what the scores are of
    assert evaluated["checkpoint"] == str(runs / "vimeo" / "checkpoints" / "last.pt") and "model" not in metrics
    for name in ("benchmark.md", "per_clip.csv"):
        assert (reports / name).stat().st_size > 0
    assert "REDS4:" in out and "bicubic" in out


def test_evaluate_without_training_is_one_line_error(http_server: LoopbackServer, tmp_path: Path) -> None:  # noqa: F811
    params = _params(tmp_path, http_server)
    r = CliRunner().invoke(app, ["evaluate", "--params", str(params), "--runs", str(tmp_path / "runs")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "error:" in r.output
