"""Report files from hand-made results: metrics.json keys and values, per-clip CSV rows, the benchmark
table beside the papers' numbers, training curves from metrics.jsonl, and non-empty PNGs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gsm.eval.protocols import ClipResult, Showcase, TestResult
from gsm.eval.metrics import psnr
from gsm.eval.report import (
    choose_crop,
    crops_figure,
    per_clip_figure,
    per_frame_figure,
    read_train_log,
    slug,
    train_loss_figure,
    val_figure,
    write_reports,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _result(
    name: str, protocol: str, clips: list[tuple[str, list[float], list[float]]], showcase: bool = True
) -> TestResult:
    """Clip scores given as (clip, our PSNRs, bicubic PSNRs); SSIM = PSNR / 40 for simplicity."""
    rows = tuple(
        ClipResult(c, tuple(f"{i:08d}" for i in range(len(p))), tuple(p), tuple(v / 40 for v in p),
                   tuple(b), tuple(v / 40 for v in b))  # fmt: skip
        for c, p, b in clips
    )
    show = None
    if showcase:
        rng = np.random.default_rng(0)
        gt = rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)
        show = Showcase(clips[0][0], "00000000", gt // 2, gt, gt, 30.0, 25.0, gt[::4, ::4].copy())
    return TestResult(name, protocol, protocol != "reds4", 0, rows, 1.5, show)


@pytest.fixture()
def results() -> dict[str, TestResult]:
    return {
        "REDS4": _result("REDS4", "reds4", [("000", [30.0, 32.0], [26.0, 26.0]), ("011", [28.0], [25.0])]),
        "quickstart-Vimeo": _result("quickstart-Vimeo", "vimeo", [("00001/0001", [35.0], [31.0])], showcase=False),
    }


def _logs(tmp_path: Path) -> list[Path]:
    run = tmp_path / "run1"
    run.mkdir()
    lines = [{"stage": "reds", "iter": i, "loss": 0.1 / i, "lr": 2e-4, "time": 0.5 * i} for i in range(1, 6)]
    lines.insert(3, {"stage": "reds", "iter": 3, "val_psnr": 27.5, "val_ssim": 0.8})
    lines.append({"stage": "reds", "iter": 5, "val_psnr": 28.0, "val_ssim": 0.81})
    # enough noisy points to take the moving-average path
    lines += [{"stage": "vimeo", "iter": i, "loss": 0.02 + 0.01 * (i % 3), "lr": 1e-4} for i in range(1, 151)]
    lines.append({"stage": "vimeo", "iter": 150, "val_psnr": 31.0, "val_ssim": 0.9})  # a lone end-of-stage point
    path = run / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return [path]


def test_write_reports_files_and_numbers(tmp_path: Path, results: dict[str, TestResult]) -> None:
    out = tmp_path / "reports"
    written = write_reports(results, out, model_info={"params": 1_234_567, "checkpoint": "ema.pt"},
                            train_logs=_logs(tmp_path), crop_size=16)  # fmt: skip
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "benchmark.md", "curves/train.csv", "curves/val.csv", "evaluated_model.json", "metrics.json", "per_clip.csv",
        "per_frame.csv",
        "plots/crops_reds4.png", "plots/per_clip_quickstart-vimeo.png", "plots/per_clip_reds4.png",
        "plots/per_frame_quickstart-vimeo.png", "plots/per_frame_reds4.png",
        "plots/train_loss.png", "plots/val_psnr.png", "runtime.json",
    ]  # fmt: skip — no temporaries left behind, and no crops for a result without a showcase
    assert set(written) == {"metrics", "evaluated_model", "per_clip", "per_frame", "benchmark", "train_loss", "val_psnr",
                            "per_clip_REDS4", "per_clip_quickstart-Vimeo", "per_frame_REDS4",
                            "per_frame_quickstart-Vimeo", "crops_REDS4", "runtime", "train_curve",
                            "val_curve"}  # fmt: skip — no videos: these results keep no frames
    for p in (out / "plots").iterdir():
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, p

    m = json.loads((out / "metrics.json").read_text())
    reds = m["test_sets"]["REDS4"]
    assert reds["psnr"] == pytest.approx((31.0 + 28.0) / 2)  # mean of clip means, not of frames (30.0)
    assert reds["bicubic_psnr"] == pytest.approx(25.5)
    assert reds["psnr_gain"] == pytest.approx(4.0)
    assert reds["ssim"] == pytest.approx(29.5 / 40) and reds["ssim_gain"] == pytest.approx(4.0 / 40)
    assert (reds["clips"], reds["frames"]) == (2, 3) and "seconds" not in reds  # timings vary run to run
    assert json.loads((out / "runtime.json").read_text())["REDS4"] == {"seconds": 1.5, "frames": 3,
                                                                       "seconds_per_frame": 0.5}  # fmt: skip
    # DVC plot data: one row per logged loss, `step` going on from the REDS stage's last iteration (5)
    train = list(csv.DictReader((out / "curves" / "train.csv").open()))
    assert len(train) == 155 and train[0] == {"step": "1", "stage": "reds", "iter": "1", "loss": "0.1", "lr": "0.0002"}
    assert (train[5]["step"], train[5]["stage"], train[5]["iter"]) == ("6", "vimeo", "1")
    val = list(csv.DictReader((out / "curves" / "val.csv").open()))
    assert [(r["step"], r["set"], r["val_psnr"]) for r in val] == [("3", "", "27.5"), ("5", "", "28.0"), ("155", "", "31.0")]
    assert m["test_sets"]["quickstart-Vimeo"]["psnr_gain"] == pytest.approx(4.0)
    # metrics.json is DVC's score table: numbers (or null) only; what it scores is a plain file beside it.
    assert set(m) == {"test_sets"} and all(_numbers_only(row) for row in m["test_sets"].values())
    model = json.loads((out / "evaluated_model.json").read_text())
    assert model == {"params": 1_234_567, "checkpoint": "ema.pt"}

    rows = list(csv.DictReader((out / "per_clip.csv").open()))
    assert [(r["test_set"], r["clip"], r["frames"]) for r in rows] == [
        ("REDS4", "000", "2"), ("REDS4", "011", "1"), ("quickstart-Vimeo", "00001/0001", "1")]  # fmt: skip
    assert float(rows[0]["psnr"]) == 31.0 and float(rows[0]["bicubic_psnr"]) == 26.0
    assert float(rows[1]["ssim"]) == pytest.approx(0.7, abs=1e-6)

    md = (out / "benchmark.md").read_text()
    assert "| REDS4 | RGB, every frame (REDS4) | 2 | 3 | 29.50 / 0.7375 | 25.50 / 0.6375 | +4.00 | 1.5 |" in md
    assert "| quickstart-Vimeo | Y channel, centre frame (im4) | 1 | 1 |" in md
    assert "| GSM-VSR (ours, this run) | 29.50 / 0.7375 | not run | not run | 1.23M |" in md
    assert "| Bicubic (this run) | 25.50 / 0.6375 | not run | not run | - |" in md
    iart = "| IART ([arXiv 2305.00163](https://arxiv.org/abs/2305.00163)) | 32.90 / 0.9138 | 38.14 / 0.9528 |"
    assert iart in md and "measured here, on the test sets of the same name" in md
    assert "| GSM (paper) ([arXiv 2510.00862](https://arxiv.org/abs/2510.00862)) | see paper | 38.25 / 0.9534 |" in md
    assert "SPEC" not in md
    assert "![crops_reds4](plots/crops_reds4.png)" in md


def _numbers_only(node: Any) -> bool:
    """Every leaf a number or null: what a DVC metric file may hold to read at a glance."""
    if isinstance(node, dict):
        return all(_numbers_only(v) for v in node.values())
    return node is None or (isinstance(node, (int, float)) and not isinstance(node, bool))


def test_non_finite_scores_become_null(tmp_path: Path) -> None:
    perfect = _result("Vid4-BI", "vid4", [("calendar", [math.inf], [20.0])], showcase=False)
    no_bicubic = TestResult("x", "vid4", True, 0, (ClipResult("walk", ("0",), (30.0,), (0.9,)),), 0.1)
    write_reports({"Vid4-BI": perfect, "x": no_bicubic}, tmp_path, model_info={}, crop_size=None)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["test_sets"]["Vid4-BI"]["psnr"] is None and m["test_sets"]["Vid4-BI"]["psnr_gain"] is None
    assert m["test_sets"]["x"]["bicubic_psnr"] is None and m["test_sets"]["x"]["psnr"] == 30.0
    md = (tmp_path / "benchmark.md").read_text()
    assert "| x | Y channel, every frame | 1 | 1 | 30.00 / 0.9000 | n/a | n/a |" in md
    assert not (tmp_path / "plots" / "train_loss.png").exists()


def test_training_log_errors(tmp_path: Path, results: dict[str, TestResult]) -> None:
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"stage": "reds", "iter": 1, "loss": 0.1}\n{"stage": oops}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON object"):
        read_train_log(bad)
    with pytest.raises(FileNotFoundError, match="training log not found"):
        write_reports(results, tmp_path / "r", model_info={}, train_logs=[tmp_path / "missing.jsonl"])
    with pytest.raises(ValueError, match="no test results"):
        write_reports({}, tmp_path / "r", model_info={})


def test_choose_crop_finds_the_largest_difference() -> None:
    a = np.zeros((30, 40, 3), np.uint8)
    b = a.copy()
    assert choose_crop(a, b, 10) == (10, 15)  # no difference: the centre
    b[20:24, 5:9] = 50  # a 4 x 4 hot spot: the first 10 x 10 window covering it wholly
    assert choose_crop(a, b, 10) == (14, 0)
    assert choose_crop(a, b, 100) == (0, 0)  # capped at the frame
    b[0, 39] = 255  # a stronger single pixel elsewhere does not outweigh 16 x 3 x 50
    assert choose_crop(a, b, 10) == (14, 0)


def test_slug() -> None:
    assert slug("Vimeo-90K-T") == "vimeo-90k-t" and slug("Vid4 BI/x") == "vid4-bi-x" and slug("??") == "set"


VAL_SETS = {"reds": "quickstart-REDS val", "vimeo": "quickstart-Vimeo val"}


def test_train_loss_continues_across_stages(tmp_path: Path) -> None:
    """Vimeo's iterations go on from REDS's last (5), after a dashed line, labelled by stage."""
    fig = train_loss_figure(_logs(tmp_path))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["REDS stage", "Vimeo stage (mean of 3)"]
    reds, vimeo_raw = ax.get_lines()[0], ax.get_lines()[1]
    assert list(reds.get_xdata()) == [1, 2, 3, 4, 5] and vimeo_raw.get_xdata()[0] == 6
    assert vimeo_raw.get_xdata()[-1] == 155
    (boundary,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert list(boundary.get_xdata()) == [5.5, 5.5]


def test_val_psnr_one_panel_per_set(tmp_path: Path) -> None:
    logs = _logs(tmp_path)
    fig = val_figure(logs, VAL_SETS)
    reds, vimeo = fig.axes
    assert (reds.get_title(), vimeo.get_title()) == ("quickstart-REDS val", "quickstart-Vimeo val")
    assert list(reds.get_lines()[0].get_xdata()) == [3, 5] and list(reds.get_lines()[0].get_ydata()) == [27.5, 28.0]
    assert list(vimeo.get_lines()[0].get_xdata()) == [150]  # its own stage's iteration
    assert vimeo.get_xlabel() == "iteration of the Vimeo stage"
    out = tmp_path / "r"
    write_reports({"x": _result("x", "vid4", [("a", [30.0], [28.0])], showcase=False)}, out, model_info={},
                  train_logs=logs, val_sets=VAL_SETS)  # fmt: skip
    sets = [r["set"] for r in csv.DictReader((out / "curves" / "val.csv").open())]
    assert sets == ["quickstart-REDS val", "quickstart-REDS val", "quickstart-Vimeo val"]


def test_per_clip_bars_are_horizontal_with_clip_names() -> None:
    names = [f"00001/{i:04d}" for i in range(68, 73)]
    r = _result("quickstart-Vimeo", "vimeo", [(n, [30.0 + i], [28.0]) for i, n in enumerate(names)], showcase=False)
    ax = per_clip_figure(r).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert ax.get_xlabel() == "PSNR (dB, Y)"
    ours = ax.containers[1]
    assert [b.get_width() for b in ours] == [30.0, 31.0, 32.0, 33.0, 34.0]
    many = _result("big", "vimeo", [(f"c{i}", [30.0], [28.0]) for i in range(41)], showcase=False)
    assert "gain over bicubic" in per_clip_figure(many).axes[0].get_xlabel()


def test_crops_show_lr_and_each_crops_own_psnr() -> None:
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 256, (32, 48, 3)).astype(np.uint8)
    ours = gt.copy()
    ours[8:16, 8:16] = 0  # ours is wrong here, so the crop lands on it
    bic = (gt // 2 + 60).astype(np.uint8)
    show = Showcase("clip", "0007", bic, ours, gt, 99.0, 98.0, gt[::4, ::4].copy())
    r = _result("quickstart-REDS", "vid4", [("clip", [30.0], [28.0])], showcase=False)
    fig = crops_figure(r, show, 16)
    titles = [ax.get_title() for ax in fig.axes]
    y, x = choose_crop(ours, bic, 16)
    crop = (slice(y, y + 16), slice(x, x + 16))
    lr_up = np.repeat(np.repeat(gt[::4, ::4], 4, 0), 4, 1)
    assert titles == [f"LR (nearest) {psnr(lr_up[crop], gt[crop], 0, True):.2f} dB",
                      f"bicubic {psnr(bic[crop], gt[crop], 0, True):.2f} dB",
                      f"ours {psnr(ours[crop], gt[crop], 0, True):.2f} dB", "ground truth"]  # fmt: skip
    assert "99.00" not in " ".join(titles)  # not the whole frame's PSNR
    assert fig.axes[0].get_images()[0].get_array().shape == (16, 16, 3)


def test_per_frame_csv_and_plot(tmp_path: Path, results: dict[str, TestResult]) -> None:
    write_reports(results, tmp_path, model_info={}, crop_size=None)
    rows = list(csv.DictReader((tmp_path / "per_frame.csv").open()))
    assert list(rows[0]) == ["set", "clip", "frame", "psnr", "bicubic_psnr"]
    assert [(r["set"], r["clip"], r["frame"], float(r["psnr"]), float(r["bicubic_psnr"])) for r in rows] == [
        ("REDS4", "000", "00000000", 30.0, 26.0), ("REDS4", "000", "00000001", 32.0, 26.0),
        ("REDS4", "011", "00000000", 28.0, 25.0),
        ("quickstart-Vimeo", "00001/0001", "00000000", 35.0, 31.0)]  # fmt: skip
    ax = per_frame_figure(results["REDS4"]).axes[0]
    bic, ours = ax.get_lines()[:2]
    assert (bic.get_label(), list(bic.get_ydata())) == ("bicubic", [26.0, 26.0, 25.0])
    assert (ours.get_label(), list(ours.get_ydata())) == ("ours", [30.0, 32.0, 28.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["000", "011"]  # each clip named at its first frame
    assert list(ax.get_xticks()) == [0, 2] and ax.get_title() == "REDS4: PSNR per frame"


def test_side_by_side_video(tmp_path: Path) -> None:
    """H.264 yuv420p, bicubic | ours | GT across, one video frame per kept frame, a few seconds, small."""
    import av

    frames = tuple(tuple(np.full((36, 64, 3), v, np.uint8) for v in (40, 128, 220)) for _ in range(12))
    r = _result("quickstart-REDS", "vid4", [("005", [30.0], [28.0])], showcase=False)
    r = TestResult(r.name, r.protocol, r.y_channel, 0, r.clips, 1.0, None, frames)
    written = write_reports({"quickstart-REDS": r}, tmp_path, model_info={}, crop_size=None)
    path = tmp_path / "videos" / "quickstart-reds.mp4"
    assert written["video_quickstart-REDS"] == path and path.stat().st_size < 2_000_000
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        assert (v.codec_context.name, v.codec_context.pix_fmt, v.width, v.height) == ("h264", "yuv420p", 192, 36)
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(v)]
        assert len(decoded) == 12 and float(v.average_rate) == 4.0  # 12 frames over 3 s
    below_labels = decoded[5][24:]
    means = [below_labels[:, i : i + 64].mean() for i in (0, 64, 128)]
    assert means == pytest.approx([40, 128, 220], abs=3)  # bicubic | ours | GT, through limited-range YUV


def test_benchmark_names_protocols_and_cites_papers(tmp_path: Path) -> None:
    """Quickstart stand-ins only: no rows of "not run" beside the papers; every method cites its paper."""
    r = _result("quickstart-REDS", "vid4", [("005", [33.0], [32.0])], showcase=False)
    r = TestResult(r.name, r.protocol, True, 4, r.clips, 1.0)
    write_reports({"quickstart-REDS": r}, tmp_path, model_info={}, crop_size=None)
    md = (tmp_path / "benchmark.md").read_text()
    assert "| quickstart-REDS | Y channel, every frame, 4 px border cropped | 1 | 1 |" in md
    assert "| vid4 |" not in md and "not run" not in md and "this run evaluated none of these" in md.lower()
    assert "SPEC" not in md
    for arxiv in ("2510.00862", "2305.00163", "2206.02146", "2201.12288", "2104.13371"):
        assert f"(https://arxiv.org/abs/{arxiv})" in md


def test_dvc_yaml_metrics_are_scores_only() -> None:
    """`dvc metrics show` reads only score files; sizes, timings and registry state are plain outputs
    (never cached), the registry's still persisted so DVC's run-cache never brings an old one back."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    metrics = {next(iter(m)) for s in stages.values() for m in s.get("metrics", [])}
    assert metrics == {"reports/metrics.json", "reports/flow_init.json"}
    outs = {k: v for s in stages.values() for o in s.get("outs", []) if isinstance(o, dict) for k, v in o.items()}
    for path in ("reports/model.json", "reports/runtime.json", "reports/per_frame.csv", "reports/videos",
                 "reports/evaluated_model.json", "reports/flow_init_run.json"):
        assert outs[path] == {"cache": False}, path
    assert outs["reports/registry.json"] == {"cache": False, "persist": True}
    assert "dvc_plots/" in (root / ".gitignore").read_text().splitlines()
