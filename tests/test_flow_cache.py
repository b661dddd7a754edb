"""Cached SpyNet flows (train.<stage>.cache_flows): samples carry their pairs' flows, cut, flipped
and ordered like their frames, and a training run then never calls SpyNet per step."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gsm.data.datasets import RecurrentClipDataset, SeptupletDataset, View, view_flows
from gsm.data.images import FolderStore, MemoryStore
from gsm.models.config import GSMConfig
from gsm.models.gsmamba import GSMamba
from gsm.models.plain_cnn import PlainCNN
from gsm.ops.flow import flow_warp
from gsm.ops.spynet import compute_flows
from gsm.train.config import StageConfig
from gsm.train.data import reds_train_set
from gsm.train.flow_cache import compute_pair_flows
from gsm.train import trainer
from gsm.train.trainer import train_stage
from tests.test_train import CLIPS, TINY, make_tree

SHIFT = (2, -1)  # (dx, dy): frame b is frame a moved right by 2 and up by 1


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random image (H, W, 3) in [0, 1]: bilinear warps of it are accurate."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 3, h // 4, w // 4))).float()
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()


def _augment(img: np.ndarray, view: View) -> np.ndarray:
    """The dataset's crop and flips, written out again for an (H, W, C) image."""
    out = img[view.y:view.y + view.h, view.x:view.x + view.w]
    if view.hflip:
        out = out[:, ::-1]
    if view.vflip:
        out = out[::-1]
    if view.transpose:
        out = out.transpose(1, 0, 2)
    return np.ascontiguousarray(out)


@pytest.mark.parametrize("hflip,vflip,transpose", list(itertools.product([False, True], repeat=3)))
def test_view_flows_still_warp_b_onto_a(hflip: bool, vflip: bool, transpose: bool) -> None:
    """Whatever the flips, the cut and flipped flow a -> b still warps the flipped b onto the flipped
    a: the convention of gsm.ops.flow (out(p) = b(p + f(p))) survives the augmentation."""
    a = _smooth(40, 48)
    b = np.roll(a, shift=(SHIFT[1], SHIFT[0]), axis=(0, 1))
    flow = np.zeros((2, 40, 48), np.float32)
    flow[0], flow[1] = SHIFT
    view = View(y=4, x=6, h=28, w=32, hflip=hflip, vflip=vflip, transpose=transpose)
    a2, b2, f2 = _augment(a, view), _augment(b, view), view_flows(flow, view)
    assert f2.shape == (2, a2.shape[0], a2.shape[1])
    warped = flow_warp(torch.from_numpy(b2).permute(2, 0, 1)[None], torch.from_numpy(f2)[None])[0]
    inner = (slice(None), slice(3, -3), slice(3, -3))
    err = (warped - torch.from_numpy(a2).permute(2, 0, 1))[inner].abs().max()
    assert err < 1e-5
    # and the sign is not vacuous: the unflipped flow on a flipped pair is wrong
    if hflip or vflip:
        wrong = flow_warp(torch.from_numpy(b2).permute(2, 0, 1)[None], torch.from_numpy(view_flows(flow, View(
            4, 6, 28, 32, False, False, transpose)))[None])[0]
        assert (wrong - torch.from_numpy(a2).permute(2, 0, 1))[inner].abs().max() > 0.01


def test_view_flows_cuts_at_the_crop() -> None:
    flow = np.stack(np.meshgrid(np.arange(12.0), np.arange(10.0))).astype(np.float32)  # (x, y) per pixel
    out = view_flows(flow, View(y=3, x=5, h=4, w=6, hflip=False, vflip=False, transpose=False))
    np.testing.assert_array_equal(out, flow[:, 3:7, 5:11])


def _stub_spynet(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A pointwise stand-in for SpyNet (its value at a pixel depends only on that pixel of a and b),
    so its whole-frame result cut at a crop equals its result on the crop."""
    return torch.stack([(b - a).mean(1), (2 * b + a).mean(1)], 1)


def _stores(keys: list[str], h: int = 12, w: int = 16) -> tuple[MemoryStore, MemoryStore]:
    rng = np.random.default_rng(1)
    lr = {k: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for k in keys}
    return MemoryStore({k: np.kron(v, np.ones((4, 4, 1), np.uint8)) for k, v in lr.items()}), MemoryStore(lr)


def _check_samples(dataset: RecurrentClipDataset | SeptupletDataset, n: int) -> None:
    """Without flips, a sample's flows are the stub's on its (cropped, reordered) frames."""
    for i in range(n):
        s = dataset[i]
        lq, flows = s["lq"][None], s["flows"]
        fwd, bwd = compute_flows(_stub_spynet, lq)
        assert flows.shape == (2, lq.shape[1] - 1, 2, *lq.shape[-2:])
        torch.testing.assert_close(flows[0], fwd[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(flows[1], bwd[0], rtol=0, atol=1e-6)


def test_recurrent_samples_carry_their_pairs_flows() -> None:
    keys = [f"{c}/{f:08d}" for c in ("a", "b") for f in range(8)]
    gt, lr = _stores(keys)
    ds = RecurrentClipDataset(gt, lr, ["a", "b"], frames_per_clip=8, num_frames=4, interval_list=[1, 2],
                              random_reverse=True, gt_size=32, augment=False, repeat=4)
    pairs = ds.flow_pairs()
    assert ("a/00000000", "a/00000002") in pairs and ("a/00000002", "a/00000000") in pairs
    assert ("a/00000007", "b/00000000") not in pairs and len(pairs) == len(set(pairs)) == 2 * 2 * (7 + 6)
    ds.flows = compute_pair_flows(_stub_spynet, ds, torch.device("cpu"), where="train.reds.cache_flows",
                                  batch=5, progress=False)
    assert set(ds.flows) == set(pairs)
    _check_samples(ds, len(ds))
    assert any(ds.frame_indices(i)[1][0] > ds.frame_indices(i)[1][1] for i in range(len(ds)))  # reversals seen
    single = RecurrentClipDataset(gt, lr, ["a"], frames_per_clip=8, num_frames=1, gt_size=32, augment=False)
    assert single.flow_pairs() == []
    single.flows = compute_pair_flows(_stub_spynet, single, torch.device("cpu"), where="w", progress=False)
    _check_samples(single, 1)  # no pair: empty flows, shaped as compute_flows gives them


def test_mirrored_septuplets_carry_their_pairs_flows() -> None:
    keys = [f"s{q}/im{i}" for q in range(2) for i in range(1, 8)]
    gt, lr = _stores(keys)
    ds = SeptupletDataset(gt, lr, ["s0", "s1"], mirror=True, gt_size=24, augment=False)
    assert ("s0/im7", "s0/im7") in ds.flow_pairs()
    ds.flows = compute_pair_flows(_stub_spynet, ds, torch.device("cpu"), where="w", progress=False)
    _check_samples(ds, len(ds))
    assert ds[0]["flows"].shape == (2, 13, 2, 6, 6)


def test_flow_cache_refuses_what_does_not_fit() -> None:
    gt, lr = _stores([f"a/{f:08d}" for f in range(4)])
    ds = RecurrentClipDataset(gt, lr, ["a"], frames_per_clip=4, num_frames=2, gt_size=16)
    with pytest.raises(ValueError, match=r"^train\.reds\.cache_flows: the 6 training frame pairs need .* set it to false$"):
        compute_pair_flows(_stub_spynet, ds, torch.device("cpu"), where="train.reds.cache_flows", memory=1000)
    for bad, match in (({"iters": 10, "fix_flow": 9}, "fix_flow \\(9\\) must be >= iters \\(10\\)"),
                       ({"iters": 10, "fix_flow": 10, "mirror": True}, "set mirror false")):
        with pytest.raises(ValueError, match=match):
            StageConfig(cache_flows=True, **bad)


def test_model_takes_the_flows_it_would_compute() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="SpyNet created without weights")
        model = GSMamba(GSMConfig(**TINY)).eval()
    lq = torch.rand(2, 3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(lq, flows=compute_flows(model.spynet, lq)), model(lq))
        with pytest.raises(ValueError, match="flows must be two"):
            model(lq, flows=compute_flows(model.spynet, lq[:, :2]))


def _spynet_calls(cfg: StageConfig, data: Path, out: Path) -> tuple[int, int]:
    """Run a stage; return SpyNet's calls before the first step and during the steps."""
    calls: list[int] = []
    cached_at: list[int] = []
    train_set = reds_train_set(cfg, FolderStore(data / "GT"), FolderStore(data / "LR"), CLIPS, frames_per_clip=5)
    real_init, real_cache = GSMamba.__init__, trainer.compute_pair_flows

    def init(self: GSMamba, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        self.spynet.register_forward_hook(lambda *_: calls.append(1))

    def cache(*args: Any, **kwargs: Any) -> Any:
        flows = real_cache(*args, **kwargs)
        cached_at.append(len(calls))
        return flows

    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.filterwarnings("ignore", message="SpyNet created without weights")
        mp.setattr(GSMamba, "__init__", init)
        mp.setattr(trainer, "compute_pair_flows", cache)
        result = trainer.train_stage("reds", cfg, GSMConfig(**TINY), train_set, out, device="cpu", progress=False)
    assert result.iterations == cfg.iters
    before = cached_at[0] if cached_at else 0
    return before, len(calls) - before


def test_training_with_cached_flows_never_runs_spynet_per_step(tmp_path: Path) -> None:
    data = make_tree(tmp_path / "data")
    base = dict(iters=4, batch_size=2, num_frames=3, gt_size=32, lr=1e-3, fix_flow=4, ckpt_every=4, val_every=4,
                log_every=1, workers=0, ema_decay=0.0)
    # cached: 4 clips x 4 pairs x 2 ways, 8 pairs per call, then nothing per step
    assert _spynet_calls(StageConfig(**base, cache_flows=True), data, tmp_path / "a") == (4, 0)
    assert _spynet_calls(StageConfig(**base), data, tmp_path / "b") == (0, 4)  # uncached: one call per step


def test_cache_flows_refuses_a_network_without_spynet(tmp_path: Path) -> None:
    data = make_tree(tmp_path / "data")
    cfg = StageConfig(iters=2, batch_size=2, num_frames=3, gt_size=32, fix_flow=2, workers=0, cache_flows=True)
    train_set = reds_train_set(cfg, FolderStore(data / "GT"), FolderStore(data / "LR"), CLIPS, frames_per_clip=5)
    with pytest.raises(ValueError, match=r"^train\.reds\.cache_flows: the PlainCNN network has no SpyNet"):
        train_stage("reds", cfg, GSMConfig(**TINY), train_set, tmp_path / "o", device="cpu", progress=False,
                    network=PlainCNN)
