"""The flow_init stage: DIS targets in our flow convention, a SpyNet that learns them, the stage's files."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from gsm.ops.flow import flow_warp
from gsm.ops.spynet import SpyNet
from gsm.train.config import FlowInitConfig
from gsm.train.flow_init import EPE_KEYS, _fit, _Targets, dis_flow, epe


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture (DIS needs gradients everywhere)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8)
    big = cv2.resize(small, (w + 8, h + 8), interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(big[4:4 + h, 4:4 + w])


def _shifted(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """supp(p) = ref(p - d): content moved by +d, so ref(p) = supp(p + d) and f(ref -> supp) = d."""
    return np.roll(img, (dy, dx), axis=(0, 1))


def test_dis_flow_is_in_our_convention() -> None:
    ref = _texture(64, 96)
    supp = _shifted(ref, 2, -1)
    flow = dis_flow(ref, supp)
    assert flow.shape == (2, 64, 96) and flow.dtype == np.float32
    inner = (slice(None), slice(8, -8), slice(8, -8))
    np.testing.assert_allclose(np.median(flow[inner][0]), 2.0, atol=0.1)  # channel 0: horizontal
    np.testing.assert_allclose(np.median(flow[inner][1]), -1.0, atol=0.1)
    # flow_warp(supp, f) ~= ref: the convention SpyNet and the network use.
    to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float()  # noqa: E731
    warped = flow_warp(to_t(supp), torch.from_numpy(flow)[None])
    err = (warped - to_t(ref)).abs()[..., 8:-8, 8:-8].mean()
    assert float(err) < 2.0  # grey levels; without the flow it is ~20
    assert float((to_t(supp) - to_t(ref)).abs()[..., 8:-8, 8:-8].mean()) > 10


def test_spynet_learns_dis_targets_from_the_zero_flow() -> None:
    frames = [_texture(48, 48, seed=s) for s in range(4)]
    targets = _Targets([], [], [])
    for i, img in enumerate(frames):
        d = (1 + i % 2, -(i % 2))
        for ref, supp in ((img, _shifted(img, *d)), (_shifted(img, *d), img)):
            targets.refs.append(ref)
            targets.supps.append(supp)
            targets.flows.append(dis_flow(ref, supp))
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="without weights"):
        net = SpyNet()
    for level in net.basic_module:
        torch.nn.init.zeros_(level.basic_module[-1].weight)
        torch.nn.init.zeros_(level.basic_module[-1].bias)
    def frame_epe() -> float:  # of the final flow, over the whole training frames
        net.eval()
        with torch.no_grad():
            ref, supp = (torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in imgs])
                         for imgs in (targets.refs, targets.supps))  # fmt: skip
            return float(epe(net(ref, supp), torch.stack([torch.from_numpy(f) for f in targets.flows])))

    start = frame_epe()  # the zero flow's, against ~1-2 px motion
    assert start > 1.0
    _fit(net, targets, FlowInitConfig(iters=120, batch_size=4, patch=32, lr=1e-3), progress=False)
    assert frame_epe() < 0.8 * start  # measured: 1.63 -> 1.11 px


@pytest.mark.parametrize(
    ("values", "match"),
    [({"iters": 0}, "flow_init.iters must be a positive integer"),
     ({"patch": -1}, "flow_init.patch must be a positive integer"),
     ({"lr": 0.0}, "flow_init.lr must be a positive number"),
     ({"preset": "slow"}, "flow_init.preset must be one of ultrafast, fast, medium"),
     ({"nope": 1}, "flow_init.nope")],
)
def test_bad_settings_are_named(values: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FlowInitConfig.from_dict(values)


def test_stage_writes_loadable_weights_and_a_report(tiny_params: Path, tmp_path: Path) -> None:
    from gsm import stages
    from gsm.params import load_params

    p = load_params(tiny_params)
    stages.download(p, progress=False)
    stages.degrade(p, progress=False)
    stages.pack(p, progress=False)
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    r = stages.flow_init(p, runs, reports, progress=False)
    weights = runs / "flow" / "spynet.pth"
    report = json.loads((reports / "flow_init.json").read_text())
    run = json.loads((reports / "flow_init_run.json").read_text())
    assert {**report, **run} == r
    # The DVC metric holds the EPE scores only; strings, counts, timings and config are the plain output's.
    assert set(report) == set(EPE_KEYS)
    assert all(isinstance(v, float) for v in report.values())
    assert {"teacher", "train_pairs", "heldout_pairs", "train_seconds", "seconds", "config"} <= set(run)
    assert r["train_pairs"] == 2 * 3 and r["heldout_pairs"] > 0
    # Zero-initialised output layers: before training SpyNet predicts the zero flow exactly.
    assert r["heldout_epe_before"] == pytest.approx(r["heldout_zero_flow_epe"], abs=1e-4)
    net = SpyNet(weights)  # the BasicSR layout SpyNet loads with strict=True
    assert sorted(net.state_dict()) == sorted(torch.load(weights, weights_only=True)["params"])
    assert not list(weights.parent.glob(".*tmp"))
