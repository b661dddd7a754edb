"""benchmarks/recipe_search.py: a trial's overrides, its params (validation off, one checkpoint), the table."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO
from gsm.params import Params

sys.path.insert(0, str(REPO / "benchmarks"))
import recipe_search  # noqa: E402


def test_overrides_read_scalars_and_refuse_a_pair_without_value() -> None:
    got = recipe_search.overrides(["embed_dim=16", "lr=1e-3", "scatter=false", "spynet_weights=null", "align=bilinear"], "-m")
    assert got == {"embed_dim": 16, "lr": 1e-3, "scatter": False, "spynet_weights": None, "align": "bilinear"}
    assert isinstance(got["embed_dim"], int) and isinstance(got["lr"], float)
    with pytest.raises(ValueError, match="-t 'iters': expected KEY=VALUE"):
        recipe_search.overrides(["iters"], "-t")


def test_trial_params_override_one_stage_and_switch_validation_off() -> None:
    p = Params()
    q = recipe_search.trial_params(p, "reds", {"embed_dim": 16, "num_heads": 2}, {"iters": 40, "lr": 5e-4})
    r = q.train.stage("reds")
    assert (q.model.embed_dim, q.model.num_heads, r.iters, r.lr) == (16, 2, 40, 5e-4)
    assert r.ckpt_every == 40 and r.val_every > r.iters and r.init_from is None
    assert q.train.stage("vimeo") == p.train.stage("vimeo")  # the other stage untouched
    with pytest.raises(TypeError):
        recipe_search.trial_params(p, "reds", {"no_such_key": 1}, {})


def test_table_has_a_row_per_trial_with_signed_gains_and_notes() -> None:
    rows = [
        {"name": "a", "net": "cnn", "stage": "reds", "model": {}, "train": {"iters": 10}, "iters": 10,
         "s_per_it": 0.07, "train_s": 0.7, "X val gain": 1.234, "Y val gain": -0.5, "note": "why"},
        {"name": "b", "net": "gsm", "stage": "reds", "model": {"embed_dim": 16}, "train": {}, "iters": 5,
         "s_per_it": 0.4, "train_s": 2.0, "X val gain": 0.1},
    ]
    lines = recipe_search.table(rows).splitlines()
    assert lines[4] == "| trial | net | stage | overrides | iters | s/it | train s | X val gain | Y val gain | note |"
    assert lines[6] == "| a | cnn | reds | `iters=10` | 10 | 0.070 | 1 | +1.23 | -0.50 | why |"
    assert lines[7] == "| b | gsm | reds | `embed_dim=16` | 5 | 0.400 | 2 | +0.10 | - |  |"


def test_curve_point_is_the_gain_over_bicubic_at_training_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A point holds each set's mean Y-PSNR gain over its crops' bicubic, and a clock that leaves
    the scoring's own seconds out."""
    import time

    import numpy as np
    import torch

    from gsm.eval.metrics import psnr

    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(2)]
    out = torch.rand(1, 2, 3, 32, 48)
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    class Slow(torch.nn.Module):
        def forward(self, lq: torch.Tensor) -> torch.Tensor:
            clock[0] += 7.0  # scoring takes 7 s of the clock
            return out

    crops = [("X val", torch.zeros(2, 3, 8, 12), gts, 20.0), ("X val", torch.zeros(2, 3, 8, 12), gts, 22.0)]
    points: list[dict[str, float]] = []
    score = recipe_search.curve_validator(crops, points, t0=40.0)
    frames = recipe_search.to_uint8(out[0])
    y = float(np.mean([psnr(frames[i], gts[i], crop_border=8, y_channel=True) for i in range(2)]))
    assert score(Slow()) == {"psnr": round(y - 21.0, 3)}
    clock[0] += 30.0  # 30 s of training
    score(Slow())
    assert points == [{"t": 60.0, "X val gain": round(y - 21.0, 3)}, {"t": 90.0, "X val gain": round(y - 21.0, 3)}]


def test_curve_trial_records_points_and_the_table_draws_them(tiny_params, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """`--curve 1` on the tiny pipeline: a point per iteration with both sets' gains, rising clock."""
    import json

    import yaml

    from gsm import stages
    from gsm.params import load_params

    raw = yaml.safe_load(tiny_params.read_text())
    raw["mlflow"]["tracking_uri"] = None
    tiny_params.write_text(yaml.safe_dump(raw, sort_keys=False))
    p = load_params(tiny_params)
    for make in (stages.download, stages.degrade, stages.pack):
        make(p, progress=False)
    out = tmp_path / "trials.jsonl"
    base = ["--params", str(tiny_params), "--out", str(out)]
    assert recipe_search.main(["t", "-t", "iters=2", "--curve", "1", *base]) == 0
    row = json.loads(out.read_text())
    sets = ["quickstart-REDS val gain", "quickstart-Vimeo val gain"]
    assert [sorted(pt) for pt in row["curve"]] == [sorted(["t", *sets])] * 2
    assert 0 < row["curve"][0]["t"] < row["curve"][1]["t"] <= row["train_s"]
    assert all(-30 < pt[s] < 30 for pt in row["curve"] for s in sets)
    assert recipe_search.main(["--table", "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    pt = row["curve"][1]
    assert f"{pt['t']:.0f} s: {pt[sets[0]]:+.2f} / {pt[sets[1]]:+.2f}" in md.split("## Learning curves")[1]
    assert recipe_search.main(["u", "--curve", "-1", *base]) == 2
    assert "--curve must be a number of iterations >= 1 (0: no curve), got -1" in capsys.readouterr().err
