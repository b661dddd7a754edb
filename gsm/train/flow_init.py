"""A starting SpyNet without downloads: distilled from OpenCV's DIS optical flow on the training frames.

The published SpyNet weights cannot always be fetched (the quickstart runs offline), and a random
SpyNet gives the alignment nothing to work with for most of a short training. DIS (Kroeger et al.,
2016) ships in OpenCV, which the project already depends on, and is accurate enough on small
displacements to teach SpyNet the flows of this very footage in a few minutes on a CPU.

Targets are DIS flows between adjacent LR training frames, both directions, computed once. SpyNet
learns them on random patches with the end-point error (EPE) at every pyramid level as loss. The held-out pairs are the
validation clips' adjacent LR frames (the test clips' for data without them): never trained on,
scored before and after against DIS.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from gsm.data.catalog import eval_sets, train_stores
from gsm.data.images import FrameStore
from gsm.io import atomic_write_text
from gsm.ops.spynet import SpyNet
from gsm.train.config import DIS_PRESETS, FlowInitConfig

_PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
            "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}  # fmt: skip
assert set(_PRESETS) == set(DIS_PRESETS)


# --- the teacher ---------------------------------------------------------------------------------


def dis_flow(ref: np.ndarray, supp: np.ndarray, preset: str = "medium") -> np.ndarray:
    """DIS flow f(ref -> supp) of two H x W x 3 uint8 RGB frames as (2, H, W) float32.

    Our convention, as SpyNet's: ``flow_warp(supp, f) ~= ref``, channel 0 horizontal. OpenCV's
    ``calc(prev, next)`` gives prev(p) ~= next(p + f(p)), the same thing with prev = ref.
    """
    dis = cv2.DISOpticalFlow_create(_PRESETS[preset])
    a = cv2.cvtColor(ref, cv2.COLOR_RGB2GRAY)
    b = cv2.cvtColor(supp, cv2.COLOR_RGB2GRAY)
    return np.ascontiguousarray(dis.calc(a, b, None).transpose(2, 0, 1))


def _train_pairs(manifest: dict[str, Any], max_pairs: int, seed: int) -> list[tuple[FrameStore, str, str]]:
    """Adjacent LR frame pairs of every training clip (REDS-like and Vimeo-like), a seeded subset."""
    pairs: list[tuple[FrameStore, str, str]] = []
    if manifest.get("reds"):
        _, lr, entry = train_stores(manifest, "reds")
        lengths = entry["frames_per_clip"]
        for clip in entry["train"]:
            n = lengths[clip] if isinstance(lengths, dict) else int(lengths)
            pairs += [(lr, f"{clip}/{t:08d}", f"{clip}/{t + 1:08d}") for t in range(n - 1)]
    if manifest.get("vimeo"):
        _, lr, entry = train_stores(manifest, "vimeo")
        for seq in entry["train"]:
            pairs += [(lr, f"{seq}/im{t}", f"{seq}/im{t + 1}") for t in range(1, 7)]
    if not pairs:
        raise ValueError("flow_init: the data has no training clips to distil flows from")
    rng = np.random.default_rng([seed, 0xF10])
    keep = sorted(rng.choice(len(pairs), size=min(max_pairs, len(pairs)), replace=False))
    return [pairs[i] for i in keep]


def _heldout_pairs(manifest: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Adjacent LR frames of the validation clips (never distilled on; the test clips for data
    without validation clips) as uint8 RGB. Recipe choices look at this score, so not at test."""
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for kind in ("reds", "vimeo"):
        if not manifest.get(kind):
            continue
        for held_out in eval_sets(manifest, kind, split="val"):
            ds = held_out.dataset
            for i in range(len(ds.names)):
                lq = (ds[i]["lq"].clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
                out += [(lq[t], lq[t + 1]) for t in range(len(lq) - 1)]
    return out


@dataclass
class _Targets:
    """Training frames and their DIS flows, both directions, kept in memory."""

    refs: list[np.ndarray]
    supps: list[np.ndarray]
    flows: list[np.ndarray]


def _teach(pairs: Sequence[tuple[FrameStore, str, str]], preset: str, progress: bool) -> _Targets:
    t = _Targets([], [], [])
    for store, a_key, b_key in tqdm(pairs, desc="flow_init: DIS targets", unit="pair", disable=not progress):
        a, b = store.get(a_key), store.get(b_key)
        for ref, supp in ((a, b), (b, a)):
            t.refs.append(ref)
            t.supps.append(supp)
            t.flows.append(dis_flow(ref, supp, preset))
    return t


# --- the student ---------------------------------------------------------------------------------


def _to_tensor(img: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)


def _batches(t: _Targets, cfg: FlowInitConfig) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Random patches (with horizontal flips: the flow's x component changes sign), seeded."""
    rng = np.random.default_rng([cfg.seed, 0xBA7C4])
    p = cfg.patch
    while True:
        refs, supps, flows = [], [], []
        for _ in range(cfg.batch_size):
            i = int(rng.integers(len(t.refs)))
            h, w = t.refs[i].shape[:2]
            ph, pw = min(p, h), min(p, w)  # SpyNet takes any size (it resizes to multiples of 32)
            y, x = int(rng.integers(h - ph + 1)), int(rng.integers(w - pw + 1))
            ref, supp = _to_tensor(t.refs[i][y:y + ph, x:x + pw]), _to_tensor(t.supps[i][y:y + ph, x:x + pw])
            flow = torch.from_numpy(t.flows[i][:, y:y + ph, x:x + pw].copy())
            if rng.random() < 0.5:
                ref, supp, flow = ref.flip(-1), supp.flip(-1), flow.flip(-1)
                flow[0].neg_()
            refs.append(ref)
            supps.append(supp)
            flows.append(flow)
        shapes = {r.shape for r in refs}
        if len(shapes) > 1:  # frames of different sizes: crop to the smallest patch of the batch
            hh, ww = min(s[1] for s in shapes), min(s[2] for s in shapes)
            refs, supps = [r[:, :hh, :ww] for r in refs], [s[:, :hh, :ww] for s in supps]
            flows = [f[:, :hh, :ww] for f in flows]
        yield torch.stack(refs), torch.stack(supps), torch.stack(flows)


def epe(pred: Tensor, target: Tensor) -> Tensor:
    """Mean end-point error: the Euclidean length of the flow difference, averaged over pixels."""
    return (pred - target).square().sum(1).add(1e-12).sqrt().mean()


def pyramid_epe(spynet: SpyNet, ref: Tensor, supp: Tensor, flow: Tensor) -> Tensor:
    """EPE summed over the pyramid levels, each against the target average-pooled to its size (and
    its vectors scaled down with it). Patches are cropped to multiples of 32 for the pyramid."""
    h, w = (ref.shape[-2] // 32) * 32, (ref.shape[-1] // 32) * 32
    if h == 0 or w == 0:  # smaller than the coarsest level: the final flow only
        return epe(spynet(ref, supp), flow)
    ref, supp, flow = ref[..., :h, :w], supp[..., :h, :w], flow[..., :h, :w]
    total = ref.new_zeros(())
    for pred in spynet.pyramid_flows(ref, supp):
        factor = h // pred.shape[-2]
        target = F.avg_pool2d(flow, factor) / factor if factor > 1 else flow
        total = total + epe(pred, target)
    return total


Heldout = list[tuple[Tensor, Tensor, Tensor]]  # (ref, supp, DIS flow), each with a batch axis of 1


def heldout_targets(pairs: Sequence[tuple[np.ndarray, np.ndarray]], preset: str) -> Heldout:
    """The held-out frames as tensors and their DIS flows, computed once for every score."""
    return [(_to_tensor(ref)[None], _to_tensor(supp)[None], torch.from_numpy(dis_flow(ref, supp, preset))[None])
            for ref, supp in pairs]  # fmt: skip


@torch.no_grad()
def heldout_epe(spynet: SpyNet, heldout: Heldout) -> float:
    """Mean EPE of SpyNet against DIS over whole held-out frames."""
    spynet.eval()
    return float(np.mean([float(epe(spynet(ref, supp), target)) for ref, supp, target in heldout]))


def zero_flow_epe(heldout: Heldout) -> float:
    """The floor an untrained flow should at least match: the zero flow's mean EPE."""
    return float(np.mean([float(epe(torch.zeros_like(target), target)) for _, _, target in heldout]))


def distil_spynet(manifest: dict[str, Any], cfg: FlowInitConfig, out: Path, report: Path, *,
                  run_report: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train SpyNet on DIS targets and write its weights (BasicSR layout, `params`) and a report.

    `report` (a DVC metric) gets only the EPE scores (EPE_KEYS), so `dvc metrics show` stays a
    table of numbers; `run_report` (a plain output) gets the rest: teacher, pair counts, timings,
    config. Returns both merged. Deterministic on CPU for a given seed and data; every file is
    written atomically.
    """
    t0 = time.monotonic()
    targets = _teach(_train_pairs(manifest, cfg.max_pairs, cfg.seed), cfg.preset, progress)
    heldout = heldout_targets(_heldout_pairs(manifest), cfg.preset)
    torch.manual_seed(cfg.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="SpyNet created without weights")
        spynet = SpyNet()
    random_init = heldout_epe(spynet, heldout)  # what a run without flow_init starts from
    for level in spynet.basic_module:  # start from the zero flow, not from random flows
        nn.init.zeros_(level.basic_module[-1].weight)
        nn.init.zeros_(level.basic_module[-1].bias)
    before = heldout_epe(spynet, heldout)
    t_train = time.monotonic()
    losses = _fit(spynet, targets, cfg, progress)
    train_s = time.monotonic() - t_train
    after = heldout_epe(spynet, heldout)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save({"params": spynet.state_dict()}, tmp)
    tmp.replace(out)
    result = {
        "teacher": f"OpenCV {cv2.__version__} DIS ({cfg.preset})",
        "train_pairs": len(targets.flows), "heldout_pairs": len(heldout),
        "heldout_epe_random_init": round(random_init, 4),
        "heldout_epe_before": round(before, 4), "heldout_epe_after": round(after, 4),
        "heldout_zero_flow_epe": round(zero_flow_epe(heldout), 4),
        "final_train_epe": round(float(np.mean(losses[-50:])), 4),
        "train_seconds": round(train_s, 1), "seconds": round(time.monotonic() - t0, 1),
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
    }
    scores, run = split_report(result)
    atomic_write_text(report, json.dumps(scores, indent=2) + "\n")
    if run_report is not None:
        atomic_write_text(run_report, json.dumps(run, indent=2) + "\n")
    return result


EPE_KEYS = ("heldout_epe_random_init", "heldout_epe_before", "heldout_epe_after", "heldout_zero_flow_epe",
            "final_train_epe")  # fmt: skip


def split_report(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(EPE scores, everything else): the metric file must hold numbers only, or `dvc metrics
    show` mixes strings and config into the score table."""
    scores = {k: result[k] for k in EPE_KEYS if k in result}
    return scores, {k: v for k, v in result.items() if k not in scores}


def _fit(spynet: SpyNet, targets: _Targets, cfg: FlowInitConfig, progress: bool) -> list[float]:
    spynet.train()
    opt = torch.optim.Adam(spynet.parameters(), lr=cfg.lr)
    losses: list[float] = []
    stream = _batches(targets, cfg)
    bar = tqdm(range(cfg.iters), desc="flow_init: SpyNet", unit="it", disable=not progress)
    for it in bar:
        lr = cfg.lr / 100 + (cfg.lr - cfg.lr / 100) * 0.5 * (1 + math.cos(math.pi * it / cfg.iters))
        for g in opt.param_groups:
            g["lr"] = lr
        ref, supp, flow = next(stream)
        loss = pyramid_epe(spynet, ref, supp, flow)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(epe=f"{losses[-1]:.3f}", refresh=False)
    return losses


__all__ = ["EPE_KEYS", "FlowInitConfig", "dis_flow", "distil_spynet", "epe", "heldout_epe", "heldout_targets",
           "split_report", "zero_flow_epe"]
