"""SpyNet's flows computed once per training frame pair, for stages that keep SpyNet frozen.

A frozen SpyNet gives the same flow for a frame pair at every iteration, yet a training step
recomputes it for every sampled clip: on a CPU that is about a fifth of the quickstart's step
(reports/flow_cache.md). With `train.<stage>.cache_flows` the trainer runs SpyNet once over the
whole LR frames of every adjacent pair the dataset can sample; each sample then carries its pairs'
flows cut and flipped like its frames (gsm.data.datasets.view_flows).

This changes results slightly, on purpose: a cached flow is SpyNet's on the whole frame, where the
uncached step sees only the crop (a 32x32 crop leaves SpyNet's coarse levels 1-4 pixels wide). The
whole-frame flow is also what inference computes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from gsm.data.datasets import RecurrentClipDataset, SeptupletDataset, _to_tensor
from gsm.train.data import _size, available_memory

Flows = dict[tuple[str, str], np.ndarray]


@torch.no_grad()
def compute_pair_flows(spynet: Callable[[Tensor, Tensor], Tensor], dataset: RecurrentClipDataset | SeptupletDataset,
                       device: torch.device, *, where: str, batch: int = 8, progress: bool = True,
                       memory: int | None = None) -> Flows:
    """f(a -> b) on the whole LR frames, for every pair of `dataset.flow_pairs()`.

    Refused (naming the param `where`) when the flows would take more than half of the available
    memory: this is for data of the quickstart's size, not for REDS's 27,000 frames.
    """
    pairs = list(dict.fromkeys(dataset.flow_pairs()))
    if not pairs:
        return {}
    h, w = dataset.lr_store.get(pairs[0][0]).shape[:2]
    need = len(pairs) * 2 * h * w * 4
    memory = available_memory() if memory is None else memory
    if need > memory // 2:
        raise ValueError(f"{where}: the {len(pairs)} training frame pairs need {_size(need)} of flows, more than "
                         f"half of the {_size(memory)} available; set it to false")
    frames: dict[str, Tensor] = {}

    def frame(key: str) -> Tensor:
        if key not in frames:
            frames[key] = _to_tensor(dataset.lr_store.get(key)[None])[0]
        return frames[key]

    flows: Flows = {}
    bar = tqdm(total=len(pairs), desc=f"{where}: SpyNet flows", unit="pair", disable=not progress)
    chunk: list[tuple[str, str]] = []

    def flush() -> None:
        a = torch.stack([frame(p[0]) for p in chunk]).to(device)
        b = torch.stack([frame(p[1]) for p in chunk]).to(device)
        out = spynet(a, b).float().cpu().numpy()
        flows.update({pair: out[i] for i, pair in enumerate(chunk)})
        bar.update(len(chunk))
        chunk.clear()

    for pair in pairs:
        if frame(pair[0]).shape != frame(pair[1]).shape:
            raise ValueError(f"{where}: LR frames {pair[0]} and {pair[1]} differ in size; cannot cache their flow")
        if chunk and (len(chunk) == batch or frame(chunk[0][0]).shape != frame(pair[0]).shape):
            flush()
        chunk.append(pair)
    flush()
    bar.close()
    return flows
