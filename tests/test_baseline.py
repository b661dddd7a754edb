"""The plain-CNN baseline: the network, the trainer training it, the benchmark and its benchmark.md row."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import REPO
from gsm.models.plain_cnn import PlainCNN, PlainCNNConfig

sys.path.insert(0, str(REPO / "benchmarks"))
import plain_cnn  # noqa: E402


def test_each_output_frame_sees_its_three_frames_only() -> None:
    torch.manual_seed(0)
    net = PlainCNN(PlainCNNConfig(channels=8, blocks=2)).eval()
    x = torch.rand(1, 6, 3, 8, 10)
    y = net(x)
    assert y.shape == (1, 6, 3, 32, 40)
    x2 = x.clone()
    x2[:, 4] = torch.rand(3, 8, 10)  # frame 4 feeds outputs 3, 4, 5 only
    y2 = net(x2)
    changed = [(y2[:, t] - y[:, t]).abs().max().item() > 0 for t in range(6)]
    assert changed == [False, False, False, True, True, True]
    assert sum(p.numel() for p in PlainCNN().parameters()) == 127_472  # 6 blocks of 32 channels
    with pytest.raises(ValueError, match="frames must be a positive odd number"):
        PlainCNNConfig(frames=2)


@pytest.fixture
def trained_quickstart(tiny_params: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """The tiny pipeline up to a trained GSM: (params, runs, reports)."""
    import yaml

    from gsm import stages
    from gsm.params import load_params

    raw = yaml.safe_load(tiny_params.read_text())
    raw["mlflow"]["tracking_uri"] = None  # nothing to track here
    # The quickstart's flow cache, so SpyNet is frozen for the GSM's stage only: the CNN runs more steps.
    raw["train"]["reds"].update(cache_flows=True, fix_flow=raw["train"]["reds"]["iters"])
    tiny_params.write_text(yaml.safe_dump(raw, sort_keys=False))
    p = load_params(tiny_params)
    stages.download(p, progress=False)
    stages.degrade(p, progress=False)
    stages.pack(p, progress=False)
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    for stage in ("reds", "vimeo"):
        stages.train(p, stage, runs, progress=False)  # type: ignore[arg-type]
    return tiny_params, runs, reports


def test_benchmark_trains_for_the_gsm_wall_clock_and_reports_beside_ours(
    trained_quickstart: tuple[Path, Path, Path],
) -> None:
    from gsm import stages
    from gsm.params import load_params

    params, runs, reports = trained_quickstart
    e = plain_cnn.run(params, runs, reports, calibrate=2)
    gsm_s = {s: plain_cnn.stage_seconds(runs / s / "metrics.jsonl") for s in ("reds", "vimeo")}
    assert e["gsm_train_seconds"] == gsm_s
    for s in ("reds", "vimeo"):  # the GSM's budget in its steps, at the CNN : GSM ratio of the probes
        c = e["calibration"][s]
        assert c["gsm_step"] > 0 and len(c["cnn_steps"]) == 2 and all(x > 0 for x in c["cnn_steps"])
        assert c["cnn_per_gsm_step"] == pytest.approx(c["gsm_step"] / (sum(c["cnn_steps"]) / 2))
        assert c["gsm_budget_steps"] == pytest.approx(gsm_s[s] / plain_cnn._seconds_per_iter(runs / s / "metrics.jsonl"))
        planned = max(2, round(c["gsm_budget_steps"] * c["cnn_per_gsm_step"]))
        if "first_run" in c:  # the planned run missed the GSM's seconds by over 5 %: trained again, rescaled
            assert c["first_run"]["iters"] == planned
            assert e["iters"][s] == plain_cnn.rescaled_iters(planned, c["first_run"]["seconds"], gsm_s[s], 2)
        else:
            assert e["iters"][s] == planned
    assert set(e["scores"]) == {"quickstart-REDS", "quickstart-Vimeo"}
    for sc in e["scores"].values():
        assert 5 < sc["psnr"] < 60 and 5 < sc["bicubic_psnr"] < 60
    saved = json.loads((reports / "baselines.json").read_text())
    assert saved["plain_cnn"]["scores"] == e["scores"] and saved["plain_cnn"]["eval_models"] == "per_stage"

    p = load_params(params)
    stages.evaluate(p, None, runs, reports, progress=False)
    md = (reports / "benchmark.md").read_text()
    assert "## Baselines trained here" in md and plain_cnn.TITLE in md and "Stale" not in md
    assert "at step-time ratios measured side by side" in md
    ran = f"; it ran {sum(e['train_seconds'].values()):.0f} s"
    assert ran + ")" in md or ran + " (**not equal wall-clock**" in md
    reds = e["scores"]["quickstart-REDS"]
    assert "| quickstart-REDS | " in md and f"{reds['psnr']:.2f} / {reds['ssim']:.4f}" in md

    # The CNN at its own lr: a second entry beside the recipe's, in baselines.md and benchmark.md.
    tuned = plain_cnn.run(params, runs, reports, calibrate=2, lrs={"reds": 5e-4})
    assert tuned["title"].endswith(", reds lr 0.0005") and tuned["lr"] == {"reds": 5e-4}
    saved = json.loads((reports / "baselines.json").read_text())
    assert set(saved) == {"plain_cnn", "plain_cnn_reds_lr0.0005"}
    assert (reports / "baselines.md").read_text().count("# Baseline: ") == 2
    stages.evaluate(p, None, runs, reports, progress=False)
    assert tuned["title"] in (reports / "benchmark.md").read_text()

    # Other data: the row stays, marked stale.
    saved["plain_cnn"]["data"]["reds"] = "0" * 64
    (reports / "baselines.json").write_text(json.dumps(saved))
    stages.evaluate(p, None, runs, reports, progress=False)
    assert "Stale: measured on other data" in (reports / "benchmark.md").read_text()

    # Same data, sets scored by other stages' models (an entry from before per-stage scoring): stale too.
    saved["plain_cnn"]["data"] = tuned["data"]
    del saved["plain_cnn"]["eval_models"]
    (reports / "baselines.json").write_text(json.dumps(saved))
    stages.evaluate(p, None, runs, reports, progress=False)
    md = (reports / "benchmark.md").read_text()
    assert md.count("**Stale") == 1 and "Stale: its sets were scored as eval.models 'final' says" in md

    # Same data and scoring, another recipe in params.yaml (or none recorded): stale, naming the keys.
    saved["plain_cnn"]["eval_models"] = "per_stage"
    saved["plain_cnn"]["recipe"]["reds"]["gt_size"] += 4
    del saved["plain_cnn_reds_lr0.0005"]["recipe"]
    (reports / "baselines.json").write_text(json.dumps(saved))
    stages.evaluate(p, None, runs, reports, progress=False)
    md = (reports / "benchmark.md").read_text()
    gt = p.train.reds.gt_size
    assert md.count("**Stale") == 2
    assert f"Stale: not trained on this run's recipe (train.reds.gt_size {gt + 4} != {gt}); rerun" in md
    assert "Stale: not trained on this run's recipe (the entry records none)" in md


def test_a_cnn_stage_that_missed_the_gsm_seconds_is_rescaled_by_its_own_rate() -> None:
    assert plain_cnn.rescaled_iters(11461, 255.4, 215.2, 240) == 9657  # 19 % over: its rate decides
    assert plain_cnn.rescaled_iters(1000, 80.0, 100.0, 240) == 1250  # 20 % short
    assert plain_cnn.rescaled_iters(1000, 104.0, 100.0, 240) is None  # within 5 %: kept
    assert plain_cnn.rescaled_iters(1000, 96.0, 100.0, 240) is None
    assert plain_cnn.rescaled_iters(300, 400.0, 100.0, 240) == 240  # never below the probes' length


def test_a_baseline_that_ran_longer_than_the_gsm_is_flagged() -> None:
    """The probes' step-time ratio is measured on a shared host: a run that missed the GSM's seconds
    by more than 5% says so beside its seconds, per stage."""
    from gsm.eval.report import _ran

    entry = {"gsm_train_seconds": {"reds": 200.0, "vimeo": 100.0}}
    assert _ran({**entry, "train_seconds": {"reds": 204.0, "vimeo": 97.0}}) == "; it ran 301 s"
    text = _ran({**entry, "train_seconds": {"reds": 240.0, "vimeo": 103.0}})
    assert text == "; it ran 343 s (**not equal wall-clock**: reds 1.20x the GSM's)"
    assert "vimeo 0.80x the GSM's" in _ran({**entry, "train_seconds": {"reds": 200.0, "vimeo": 80.0}})
    assert _ran({}) == ""
    from gsm.eval.report import _retrained

    assert _retrained({"calibration": {"reds": {"first_run": {}}, "vimeo": {}}}) == ", reds retrained at a first run's own rate"
    assert _retrained({"calibration": {"reds": {}, "vimeo": {}}}) == "" and _retrained({}) == ""


def test_a_step_is_timed_by_its_steady_rate_not_a_rounded_median(tmp_path: Path) -> None:
    """The trainer logs milliseconds: a CNN step of 20.5 ms reads 20 or 21. The median picks one of
    them (2.5% off); the trimmed mean of the steady steps does not, and the warm-up is left out."""
    t, times = 0.0, []
    for i in range(200):
        t += 0.5 if i < 10 else 0.020 if i % 2 else 0.021  # slow warm-up, then 20.5 ms on average
        times.append(round(t, 3))
    times[150:] = [x + 0.4 for x in times[150:]]  # one stall (the host): trimmed away
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"iter": i + 1, "time": x}) + "\n" for i, x in enumerate(times)))
    assert plain_cnn._seconds_per_iter(log) == pytest.approx(0.0205, abs=2e-4)
    log.write_text(json.dumps({"iter": 1, "time": 1.0}) + "\n")
    with pytest.raises(ValueError, match="too few iterations to time; raise --calibrate"):
        plain_cnn._seconds_per_iter(log)


def test_each_set_is_scored_by_the_stage_trained_for_it(trained_quickstart: tuple[Path, Path, Path]) -> None:
    """eval.models per_stage, as the paper's tables: the REDS-like set by the REDS stage's model, the
    Vimeo-like set by the Vimeo stage's; `final`: the Vimeo stage's model scores both; a given
    checkpoint scores both. The CNN baseline is scored the same way."""
    from gsm import stages
    from gsm.params import load_params

    params, runs, reports = trained_quickstart
    p = load_params(params)
    reds, vimeo = (runs / s / "checkpoints" / "last.pt" for s in ("reds", "vimeo"))
    per = stages.evaluate(p, None, runs, reports / "per", progress=False)
    by_reds = stages.evaluate(p, reds, runs, reports / "reds", progress=False)
    by_vimeo = stages.evaluate(p, vimeo, runs, reports / "vimeo", progress=False)
    final = stages.evaluate(replace(p, eval=replace(p.eval, models="final")), None, runs, reports / "final",
                            progress=False)  # fmt: skip
    assert by_reds["quickstart-REDS"].psnr != by_vimeo["quickstart-REDS"].psnr  # the two models differ here
    assert per["quickstart-REDS"].psnr == by_reds["quickstart-REDS"].psnr
    assert per["quickstart-Vimeo"].psnr == by_vimeo["quickstart-Vimeo"].psnr
    assert {n: r.psnr for n, r in final.items()} == {n: r.psnr for n, r in by_vimeo.items()}
    evaluated = json.loads((reports / "per" / "evaluated_model.json").read_text())
    assert evaluated["checkpoint"] == str(vimeo)  # the final model: what `register` registers
    assert {n: v["checkpoint"] for n, v in evaluated["scored_by"].items()} == {
        "quickstart-REDS": str(reds), "quickstart-Vimeo": str(vimeo)}  # fmt: skip
    assert f"- scored by: quickstart-REDS: {reds}; quickstart-Vimeo: {vimeo}" in (reports / "per" / "benchmark.md").read_text()

    from gsm.data.prepare import read_manifest

    cnn_reds = plain_cnn._train(p, "reds", 2, reports / "cnn", None)
    plain_cnn._train(p, "vimeo", 2, reports / "cnn", cnn_reds)
    p_final = replace(p, eval=replace(p.eval, models="final"))
    cnn_per = plain_cnn._score(p, stages.scoring_checkpoints(p, reports / "cnn", read_manifest(p.data)))
    cnn_final = plain_cnn._score(p_final, stages.scoring_checkpoints(p_final, reports / "cnn", read_manifest(p.data)))
    assert cnn_per["quickstart-REDS"] != cnn_final["quickstart-REDS"]
    assert cnn_per["quickstart-REDS"] == plain_cnn._score(p, {"reds": cnn_reds, "vimeo": cnn_reds})["quickstart-REDS"]
    assert cnn_per["quickstart-Vimeo"] == cnn_final["quickstart-Vimeo"]


def test_trainer_keeps_networks_apart(trained_quickstart: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A CNN run's checkpoint names its network; the GSM never resumes from it."""
    from gsm import stages
    from gsm.data.prepare import read_manifest
    from gsm.params import load_params
    from gsm.train.checkpoint import load_checkpoint
    from gsm.train.trainer import train_stage

    params, _, _ = trained_quickstart
    p = load_params(params)
    cfg = replace(p.train.reds, cache_flows=False)  # the CNN has no SpyNet
    dataset, _ = stages.train_inputs(p, read_manifest(p.data), "reds")
    out = tmp_path / "cnn"
    train_stage("reds", cfg, p.model, dataset, out, network=lambda: PlainCNN(PlainCNNConfig(channels=8, blocks=1)),
                device="cpu", progress=False)  # fmt: skip
    assert load_checkpoint(out / "checkpoints" / "last.pt")["network"] == "PlainCNN"
    with pytest.raises(ValueError, match="holds a PlainCNN run, not GSMamba"):
        train_stage("reds", cfg, p.model, dataset, out, device="cpu", progress=False)


def test_probes_keep_the_stage_flow_schedule() -> None:
    """A probe or CNN run of any length trains SpyNet exactly when the stage would."""
    from gsm.train.config import StageConfig

    frozen = StageConfig(iters=30, fix_flow=30, cache_flows=True)
    gsm_probe, cnn_run = plain_cnn.run_config(frozen, 60, cnn=False), plain_cnn.run_config(frozen, 7000, cnn=True)
    assert (gsm_probe.iters, gsm_probe.fix_flow, gsm_probe.cache_flows) == (60, 60, True)
    assert (cnn_run.iters, cnn_run.fix_flow, cnn_run.cache_flows) == (7000, 7000, False)
    assert gsm_probe.val_every > 60 and gsm_probe.ckpt_every == 60
    released = plain_cnn.run_config(StageConfig(iters=100, fix_flow=20), 60, cnn=False)
    assert released.fix_flow == 20  # trains SpyNet from step 20 as the stage does


@pytest.mark.parametrize("arg", ["reds", "reds=fast", "reds=0", "train=1e-3"])
def test_bad_cnn_lr_is_one_line(tiny_params: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], arg: str) -> None:
    (tmp_path / "runs").mkdir()
    rc = plain_cnn.main(["--params", str(tiny_params), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path),
                         "--lr", arg])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --lr {arg}") and "\n" not in err
    assert not (tmp_path / "baselines.json").exists()


def test_missing_gsm_run_is_one_line(tiny_params: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = plain_cnn.main(["--params", str(tiny_params), "--runs", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "train the quickstart first" in err and "\n" not in err


def test_seed_spread_trains_each_model_per_seed_and_resumes(
    trained_quickstart: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import seed_spread

    from gsm.configs import to_mapping
    from gsm.params import load_params

    params, runs, reports = trained_quickstart
    p = load_params(params)
    recipe = json.loads(json.dumps({s: to_mapping(p.train.stage(s)) for s in ("reds", "vimeo")}))
    other = json.loads(json.dumps(recipe))
    other["reds"]["gt_size"] += 4
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "baselines.json").write_text(json.dumps({
        "plain_cnn": {"profile": "quickstart", "lr": {"reds": 5e-4}, "iters": {"reds": 3, "vimeo": 2}, "recipe": recipe},
        "old_cnn": {"profile": "quickstart", "lr": {}, "iters": {"reds": 3, "vimeo": 2}, "recipe": other},  # left out
    }))
    doc = seed_spread.run(params, runs, reports, seeds=[0, 1])
    assert doc["models"] == ["gsm", "plain_cnn"]
    cells = doc["cells"]
    assert set(cells) == {"gsm/0", "plain_cnn/0", "gsm/1", "plain_cnn/1"}
    assert cells["gsm/0"]["source"] == str(runs)  # the params' seed: the pipeline's own run, scored as it is
    assert cells["gsm/0"]["seconds"]["reds"] == pytest.approx(plain_cnn.stage_seconds(runs / "reds" / "metrics.jsonl"), abs=1e-3)
    assert cells["gsm/1"]["source"] == "trained here" and cells["gsm/1"]["iters"] == {"reds": p.train.reds.iters,
                                                                                    "vimeo": p.train.vimeo.iters}
    assert cells["plain_cnn/1"]["iters"] == {"reds": 3, "vimeo": 2} and cells["plain_cnn/1"]["lr"] == {"reds": 5e-4}
    vimeo = cells["gsm/1"]["scores"]["quickstart-Vimeo"]
    assert vimeo["clips"] > vimeo["first_clips"] == p.eval.max_clips  # every clip, and benchmark.md's first ones
    assert cells["gsm/1"]["scores"] != cells["gsm/0"]["scores"]  # another seed trained another model
    md = (reports / "seed_spread.md").read_text()
    assert "| gsm | " in md and "| plain_cnn | " in md and "old_cnn" not in md
    assert md.count("- GSM minus plain_cnn, paired by seed: ") == 2 and "2 seeds)" in md

    # A rerun finds every cell done and trains nothing.
    monkeypatch.setattr(seed_spread, "run_cell", lambda *a, **k: pytest.fail("a finished cell ran again"))
    assert seed_spread.run(params, runs, reports, seeds=[0, 1])["cells"] == cells

    # A cell made from other data is trained again, and only that one.
    saved = json.loads((reports / "seed_spread.json").read_text())
    saved["cells"]["plain_cnn/1"]["inputs"]["reds"]["data"] = "0" * 64
    (reports / "seed_spread.json").write_text(json.dumps(saved))
    ran: list[str] = []

    def again(p: object, name: str, spec: object, seed: int, runs: Path) -> dict[str, object]:
        ran.append(f"{name}/{seed}")
        return {k: cells[f"{name}/{seed}"][k] for k in ("seconds", "scores", "source")}

    monkeypatch.setattr(seed_spread, "run_cell", again)
    assert seed_spread.run(params, runs, reports, seeds=[0, 1])["cells"] == cells and ran == ["plain_cnn/1"]


def test_seed_spread_scores_every_clip_and_benchmark_mds_first() -> None:
    import seed_spread

    from gsm.eval.protocols import ClipResult, TestResult

    clips = tuple(ClipResult(f"c{i}", ("f",), (30.0 + i,), (0.9,), (28.0,), (0.8,)) for i in range(3))
    r = TestResult("s", "vimeo", True, 0, clips, 1.0)
    assert seed_spread.set_scores(r, 2) == {"clips": 3, "psnr": 31.0, "bicubic_psnr": 28.0, "first_clips": 2,
                                            "psnr_first": 30.5, "bicubic_psnr_first": 28.0}
    assert seed_spread.set_scores(r, None)["psnr_first"] == 31.0
    assert seed_spread.spread([1.0, 2.0, 3.0]) == "2.000 ± 1.000" and seed_spread.spread([1.5]) == "1.50"


def test_seed_spread_refuses_a_run_of_another_recipe(trained_quickstart: tuple[Path, Path, Path]) -> None:
    import seed_spread

    from gsm.params import load_params

    params, runs, _ = trained_quickstart
    p = load_params(params)
    seed_spread.check_run(p, runs)  # the fixture's run: the params' recipe and seed
    other = replace(p, train=replace(p.train, seed=5, reds=replace(p.train.reds, gt_size=p.train.reds.gt_size + 4)))
    with pytest.raises(ValueError, match=r"reds/checkpoints/last.pt was not trained on params' train.reds: "
                                         r"gt_size \d+ != \d+, seed 0 != 5; rerun"):
        seed_spread.check_run(other, runs)
    with pytest.raises(FileNotFoundError, match="no GSM checkpoint"):
        seed_spread.check_run(p, runs.parent / "elsewhere")
