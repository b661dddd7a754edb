"""Evaluation protocols on tiny PNG test sets: per frame -> per clip -> set means checked by hand, the
Vimeo mirror-and-average rule with a model whose output is known, tiled vs whole-frame inference
with a real tiny GSMamba, temporal chunking, the trainer's validator and the config section."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsm.data.datasets import VIMEO_CENTER_INDEX, VideoTestDataset
from gsm.data.degrade import bicubic_downsample
from gsm.data.images import FolderStore, write_png
from gsm.eval.bicubic import bicubic_upsample
from gsm.eval.config import EvalConfig, eval_config
from gsm.ops.backend import resolve_device
from gsm.eval.metrics import psnr, ssim
from gsm.eval.protocols import TestSet, chunk_spans, evaluate_model, make_validator, predict_clip, to_uint8
from gsm.eval.stage import run_evaluation, select_sets
from gsm.models.config import GSMConfig
from gsm.models.gsmamba import GSMamba

GT_H, GT_W = 48, 56
CLIPS = {"a": 3, "b": 2}  # unequal lengths: the mean of clip means differs from the mean of frames


class OffsetUpscaler(nn.Module):
    """Known output: bilinear x4 of the input plus `step` times the frame's position in the clip."""

    scale = 4

    def __init__(self, step: float = 0.01) -> None:
        super().__init__()
        self.step = step
        self.inputs: list[Tensor] = []  # what each forward received (tests inspect it)

    def forward(self, lqs: Tensor) -> Tensor:
        self.inputs.append(lqs.detach().cpu().clone())
        b, t, c, h, w = lqs.shape
        up = F.interpolate(lqs.flatten(0, 1), scale_factor=4, mode="bilinear", align_corners=False)
        offset = self.step * torch.arange(t, dtype=lqs.dtype, device=lqs.device).view(1, t, 1, 1, 1)
        return up.view(b, t, c, 4 * h, 4 * w) + offset


def _bilinear(lr: np.ndarray) -> Tensor:
    """3 x 4H x 4W float bilinear x4 of one uint8 LR frame."""
    x = torch.from_numpy(lr.transpose(2, 0, 1).copy()).float().div(255)[None]
    return F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)[0]


def _smooth_frame(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random image (so bicubic and bilinear are meaningful) with some texture."""
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float64)
    big = np.kron(small, np.ones((8, 8, 1)))[:h, :w]
    yy, xx = np.mgrid[:h, :w]
    big += 20 * np.sin(xx / 3.0)[..., None] * np.cos(yy / 4.0)[..., None]
    return np.clip(big, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[np.ndarray]]]:
    """GT/LR PNGs: REDS-like clips a (3 frames) and b (2), and one Vimeo-like septuplet."""
    root = tmp_path_factory.mktemp("evalsets")
    rng = np.random.default_rng(7)
    frames: dict[str, dict[str, list[np.ndarray]]] = {}
    for clip, n in [*CLIPS.items(), ("00001/0001", 7)]:
        gts, lrs = [], []
        for f in range(n):
            gt = _smooth_frame(rng, GT_H, GT_W)
            lr = bicubic_downsample(gt, 4)
            name = f"im{f + 1}" if "/" in clip else f"{f:08d}"
            write_png(root / "GT" / clip / f"{name}.png", gt)
            write_png(root / "LR" / clip / f"{name}.png", lr)
            gts.append(gt)
            lrs.append(lr)
        frames[clip] = {"gt": gts, "lr": lrs}
    frames["_root"] = root  # type: ignore[assignment]
    return frames


def _stores(tree: dict) -> tuple[FolderStore, FolderStore]:
    root = tree["_root"]
    return FolderStore(root / "GT"), FolderStore(root / "LR")


def _clip_set(tree: dict, protocol: str = "reds4", name: str = "tiny") -> TestSet:
    gt, lr = _stores(tree)
    clips = {c: [f"{c}/{f:08d}" for f in range(n)] for c, n in CLIPS.items()}
    return TestSet(name, protocol, VideoTestDataset(gt, lr, clips))  # type: ignore[arg-type]


def _vimeo_set(tree: dict) -> TestSet:
    gt, lr = _stores(tree)
    seq = "00001/0001"
    ds = VideoTestDataset(gt, lr, {seq: [f"{seq}/im{i}" for i in range(1, 8)]}, center_index=VIMEO_CENTER_INDEX)
    return TestSet("vimeo-tiny", "vimeo", ds)


def _expected_clip_scores(tree: dict, clip: str, step: float, y: bool) -> tuple[list[float], ...]:
    """Per-frame (psnr, ssim, bicubic psnr, bicubic ssim) computed directly from the PNG arrays."""
    ps, ss, bps, bss = [], [], [], []
    for t, (gt, lr) in enumerate(zip(tree[clip]["gt"], tree[clip]["lr"])):
        ours = to_uint8(_bilinear(lr) + step * t)
        bic = bicubic_upsample(lr)
        ps.append(psnr(ours, gt, y_channel=y))
        ss.append(ssim(ours, gt, y_channel=y))
        bps.append(psnr(bic, gt, y_channel=y))
        bss.append(ssim(bic, gt, y_channel=y))
    return ps, ss, bps, bss


# --------------------------------------------------------------------------------------------------
# Protocol arithmetic


@pytest.mark.parametrize("protocol", ["reds4", "vid4"])
def test_evaluate_model_per_frame_clip_and_set_means(tree: dict, protocol: str) -> None:
    y = protocol == "vid4"
    model = OffsetUpscaler(step=0.01)
    model.train()
    r = evaluate_model(model, _clip_set(tree, protocol), tile=None, device="cpu", progress=False)
    assert model.training  # restored after the run
    assert (r.y_channel, r.crop_border, r.frames) == (y, 0, 5)
    assert [c.clip for c in r.clips] == ["a", "b"]
    assert r.clips[0].frames == ("00000000", "00000001", "00000002")
    clip_means = []
    for c in r.clips:
        ps, ss, bps, bss = _expected_clip_scores(tree, c.clip, 0.01, y)
        np.testing.assert_allclose(c.psnr, ps, rtol=0, atol=1e-9)
        np.testing.assert_allclose(c.ssim, ss, rtol=0, atol=1e-12)
        np.testing.assert_allclose(c.bicubic_psnr, bps, rtol=0, atol=1e-9)
        np.testing.assert_allclose(c.bicubic_ssim, bss, rtol=0, atol=1e-12)
        assert c.mean_psnr == pytest.approx(np.mean(ps), abs=1e-9)
        clip_means.append((np.mean(ps), np.mean(ss), np.mean(bps)))
    assert r.psnr == pytest.approx((clip_means[0][0] + clip_means[1][0]) / 2, abs=1e-9)
    assert r.ssim == pytest.approx((clip_means[0][1] + clip_means[1][1]) / 2, abs=1e-12)
    assert r.bicubic_psnr == pytest.approx((clip_means[0][2] + clip_means[1][2]) / 2, abs=1e-9)
    all_frames = np.mean([p for c in r.clips for p in c.psnr])
    assert abs(r.psnr - all_frames) > 1e-6  # it really is the mean of clip means
    # the showcase frame is the one where ours gains most over bicubic
    gains = [(p - b, c.clip, f) for c in r.clips for p, b, f in zip(c.psnr, c.bicubic_psnr, c.frames)]
    best = max(gains, key=lambda g: g[0])
    assert r.showcase is not None and (r.showcase.clip, r.showcase.frame) == best[1:]
    k = int(best[2])
    np.testing.assert_array_equal(r.showcase.gt, tree[best[1]]["gt"][k])
    np.testing.assert_array_equal(r.showcase.bicubic, bicubic_upsample(tree[best[1]]["lr"][k]))


def test_vimeo_mirrors_to_14_and_averages_the_two_centre_predictions(tree: dict) -> None:
    model = OffsetUpscaler(step=0.01)
    r = evaluate_model(model, _vimeo_set(tree), tile=None, device="cpu", progress=False)
    (sent,) = model.inputs
    lr = tree["00001/0001"]["lr"]
    lq = torch.stack([torch.from_numpy(f.transpose(2, 0, 1).copy()).float().div(255) for f in lr])
    assert sent.shape == (1, 14, 3, GT_H // 4, GT_W // 4)
    torch.testing.assert_close(sent[0], torch.cat([lq, lq.flip(0)]), rtol=0, atol=0)
    # predictions of im4 sit at indices 3 and 10: offsets 0.03 and 0.10, averaged before rounding
    expected = to_uint8(_bilinear(lr[3]) + 0.5 * (0.03 + 0.10))
    assert r.showcase is not None
    np.testing.assert_array_equal(r.showcase.ours, expected)
    assert not np.array_equal(expected, to_uint8(_bilinear(lr[3]) + 0.03))
    (clip,) = r.clips
    assert clip.clip == "00001/0001" and clip.frames == ("im4",)
    gt = tree["00001/0001"]["gt"][3]
    assert clip.psnr[0] == pytest.approx(psnr(expected, gt, y_channel=True), abs=1e-9)
    assert clip.ssim[0] == pytest.approx(ssim(expected, gt, y_channel=True), abs=1e-12)
    assert clip.bicubic_psnr == pytest.approx((psnr(bicubic_upsample(lr[3]), gt, y_channel=True),), abs=1e-9)
    assert r.y_channel and r.psnr == clip.psnr[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_evaluation_matches_cpu(tree: dict) -> None:
    cpu = evaluate_model(OffsetUpscaler(), _clip_set(tree), tile=8, tile_overlap=2, device="cpu", progress=False)
    model = OffsetUpscaler().cuda()
    gpu = evaluate_model(model, _clip_set(tree), tile=8, tile_overlap=2, device="cuda", progress=False)
    assert gpu.psnr == pytest.approx(cpu.psnr, abs=0.01) and gpu.ssim == pytest.approx(cpu.ssim, abs=1e-4)
    assert gpu.bicubic_psnr == cpu.bicubic_psnr


def test_quantisation_clamps_and_rounds() -> None:
    x = torch.tensor([-0.2, 0.0, 1.49 / 255, 1.51 / 255, 0.5, 1.0, 1.3]).view(1, 1, 7).expand(3, 1, 7)
    out = to_uint8(x)
    assert out.shape == (1, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 2, 128, 255, 255])  # 127.5 rounds to even


def test_chunk_spans_tile_the_clip() -> None:
    assert chunk_spans(10, None, 2) == [(0, 10, 0, 10)]
    assert chunk_spans(4, 5, 2) == [(0, 4, 0, 4)]
    assert chunk_spans(10, 4, 1) == [(0, 5, 0, 4), (3, 9, 4, 8), (7, 10, 8, 10)]


def test_chunked_prediction_keeps_every_frame_once() -> None:
    model = OffsetUpscaler(step=0.01)
    lq = torch.rand(7, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    parts = list(predict_clip(model, lq, tile=None, tile_overlap=0, chunk=3, chunk_overlap=1))
    assert [s for s, _ in parts] == [0, 3, 6]
    out = torch.cat([p for _, p in parts])
    # each run restarts the time index at its first (context) frame: offsets follow the run, not the clip
    runs = [(0, 4), (2, 7), (5, 7)]
    assert [tuple(x.shape[1:2]) for x in model.inputs] == [(b - a,) for a, b in runs]
    base = F.interpolate(lq, scale_factor=4, mode="bilinear", align_corners=False)
    expected_offset = [0, 1, 2, 1, 2, 3, 1]  # frame - run start
    for t in range(7):
        torch.testing.assert_close(out[t], base[t] + 0.01 * expected_offset[t])


# --------------------------------------------------------------------------------------------------
# A real tiny GSMamba


@pytest.fixture(scope="module")
def tiny_gsm() -> GSMamba:
    torch.manual_seed(0)
    cfg = GSMConfig(embed_dim=16, num_heads=2, prop_layers=1, attn_depth=1, d_state=4, mid_channels=16, window=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random SpyNet weights
        return GSMamba(cfg).eval()


def test_tiled_inference_matches_whole_frames(tiny_gsm: GSMamba) -> None:
    lq = torch.rand(3, 3, 24, 32, generator=torch.Generator().manual_seed(1))
    ((_, whole),) = predict_clip(tiny_gsm, lq, tile=None, tile_overlap=0)
    with torch.no_grad():
        torch.testing.assert_close(whole, tiny_gsm(lq[None])[0], rtol=0, atol=0)
    ((_, tiled),) = predict_clip(tiny_gsm, lq, tile=16, tile_overlap=8)
    assert tiled.shape == whole.shape == (3, 3, 96, 128)
    # Not exact: SpyNet, attention windows and convolutions see less context inside a tile. On
    # random noise (the worst case for flow) this seed gives mean 0.0017, max 0.019 (< 5 grey levels).
    diff = (tiled - whole).abs()
    assert diff.mean() < 4e-3 and diff.max() < 0.05, (float(diff.mean()), float(diff.max()))
    assert psnr(to_uint8(tiled[1]), to_uint8(whole[1])) > 42  # measured 49.4 dB


def test_evaluate_real_model_and_validator(tree: dict, tiny_gsm: GSMamba) -> None:
    ts = _clip_set(tree)
    r = evaluate_model(tiny_gsm, ts, tile=None, device="cpu", progress=False)
    sample = ts.dataset[1]  # clip b
    with torch.no_grad():
        out = to_uint8(tiny_gsm(sample["lq"][None])[0])
    gts = tree["b"]["gt"]
    np.testing.assert_allclose(r.clips[1].psnr, [psnr(out[t], gts[t]) for t in range(2)], atol=1e-9)
    np.testing.assert_allclose(r.clips[1].ssim, [ssim(out[t], gts[t]) for t in range(2)], atol=1e-12)
    assert math.isfinite(r.psnr) and 0 < r.ssim < 1

    tiny_gsm.train()
    validate = make_validator(ts, None, 8, "cpu")
    scores = validate(tiny_gsm)
    assert tiny_gsm.training
    tiny_gsm.eval()
    assert set(scores) == {"psnr", "ssim"}
    assert scores["psnr"] == pytest.approx(r.psnr, abs=1e-9)
    assert scores["ssim"] == pytest.approx(r.ssim, abs=1e-12)
    first = make_validator(ts, None, 8, "cpu", max_clips=1)(tiny_gsm)
    assert first["psnr"] == pytest.approx(r.clips[0].mean_psnr, abs=1e-9)


# --------------------------------------------------------------------------------------------------
# Test sets, configuration, the stage


def test_test_set_validation(tree: dict) -> None:
    gt, lr = _stores(tree)
    plain = VideoTestDataset(gt, lr, {"a": ["a/00000000"]})
    centred = VideoTestDataset(gt, lr, {"00001/0001": [f"00001/0001/im{i}" for i in range(1, 8)]}, center_index=3)
    with pytest.raises(ValueError, match="vimeo protocol needs a dataset with center_index"):
        TestSet("x", "vimeo", plain)
    with pytest.raises(ValueError, match="scores every frame, not center_index 3"):
        TestSet("x", "vid4", centred)
    with pytest.raises(ValueError, match="protocol must be one of reds4, vimeo, vid4"):
        TestSet("x", "reds", plain)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="crop_border"):
        TestSet("x", "reds4", plain, crop_border=-1)
    reds4 = TestSet("REDS4", "reds4", plain)
    assert [s.name for s in select_sets([reds4, TestSet("Vid4-BI", "vid4", plain)], ["Vid4-BI"])] == ["Vid4-BI"]
    with pytest.raises(ValueError, match="eval.sets: unknown test set 'REDS5'"):
        select_sets([reds4], ["REDS5"])


def test_eval_config() -> None:
    cfg = eval_config({"tile": 64, "tile_overlap": 8, "sets": ["REDS4", "Vid4-BI"], "chunk": 20})
    assert cfg == EvalConfig(sets=("REDS4", "Vid4-BI"), tile=64, tile_overlap=8, chunk=20)
    assert eval_config(None) == EvalConfig() == EvalConfig.from_dict({})
    with pytest.raises(ValueError, match=r"unknown key eval\.tiles"):
        eval_config({"tiles": 64})
    with pytest.raises(ValueError, match=r"eval\.tile: must be an integer"):
        eval_config({"tile": "big"})
    with pytest.raises(ValueError, match="tile_overlap must be in"):
        eval_config({"tile": 16, "tile_overlap": 16})
    with pytest.raises(ValueError, match="chunk must be >= 2"):
        eval_config({"chunk": 1})
    with pytest.raises(ValueError, match="device"):
        eval_config({"device": "tpu"})
    with pytest.raises(ValueError, match=r"^eval.models: must be one of per_stage, final, got 'best'$"):
        eval_config({"models": "best"})
    assert resolve_device("cpu") == torch.device("cpu")


def test_run_evaluation_writes_reports(tree: dict, tmp_path: Path) -> None:
    cfg = EvalConfig(sets=("tiny-vid4", "vimeo-tiny"), crop_size=16, device="cpu")
    sets = [_clip_set(tree, "reds4", "tiny-reds"), _clip_set(tree, "vid4", "tiny-vid4"), _vimeo_set(tree)]
    results = run_evaluation([(OffsetUpscaler(), sets)], cfg, tmp_path / "reports", progress=False, info={"ckpt": "x.pt"})
    assert list(results) == ["tiny-vid4", "vimeo-tiny"]
    names = sorted(p.name for p in (tmp_path / "reports").rglob("*") if p.is_file())
    assert names == ["benchmark.md", "crops_tiny-vid4.png", "crops_vimeo-tiny.png", "evaluated_model.json",
                     "metrics.json", "per_clip.csv", "per_clip_tiny-vid4.png", "per_clip_vimeo-tiny.png",
                     "per_frame.csv", "per_frame_tiny-vid4.png", "per_frame_vimeo-tiny.png", "runtime.json",
                     "tiny-vid4.mp4", "train.csv", "val.csv", "vimeo-tiny.mp4"]  # fmt: skip
    for r in results.values():  # the video keeps (bicubic, ours, GT) of every scored frame here (< 48)
        assert len(r.video) == r.frames and {f.shape for triple in r.video for f in triple} == {r.video[0][0].shape}
        assert all(side % 2 == 0 for side in r.video[0][0].shape[:2])  # H.264 yuv420p needs even sides
    rows = (tmp_path / "reports" / "per_frame.csv").read_text().splitlines()
    assert len(rows) == 1 + sum(r.frames for r in results.values())


def test_run_evaluation_scores_each_set_with_its_own_model(tree: dict, tmp_path: Path) -> None:
    """eval.models per_stage hands one model per stage with the sets it scores; a set left out by
    eval.sets is never run, and the results keep the sets' order."""
    reds_model, vimeo_model = OffsetUpscaler(), OffsetUpscaler(step=0.3)
    reds, vid4, vimeo = _clip_set(tree, "reds4", "tiny-reds"), _clip_set(tree, "vid4", "tiny-vid4"), _vimeo_set(tree)
    cfg = EvalConfig(sets=("vimeo-tiny", "tiny-reds"), crop_size=16, device="cpu")
    results = run_evaluation([(reds_model, [reds]), (vimeo_model, [vid4, vimeo])], cfg, tmp_path / "r", progress=False)
    assert list(results) == ["vimeo-tiny", "tiny-reds"]
    alone = run_evaluation([(OffsetUpscaler(step=0.3), [vimeo])], EvalConfig(crop_size=16, device="cpu"),
                           tmp_path / "alone", progress=False)  # fmt: skip
    assert results["vimeo-tiny"].psnr == alone["vimeo-tiny"].psnr
    assert {x.shape[1] for x in vimeo_model.inputs} == {14}  # the mirrored septuplet only: vid4 was not selected
    assert {x.shape[1] for x in reds_model.inputs} == set(CLIPS.values())
    with pytest.raises(ValueError, match="no model to score"):
        run_evaluation([], cfg, tmp_path / "none", progress=False)
