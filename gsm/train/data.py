"""The training data stream: a seeded, resumable epoch order, and the stage datasets' builders.

Global batch k of epoch e is items perm_e[k*B:(k+1)*B], with perm_e a permutation drawn from
(seed, e); process r of N takes its contiguous B/N share. So the set of clips in each iteration
does not depend on the number of processes, and a run resumes at (epoch, batch) exactly. The
datasets draw crops and flips from (seed, epoch, index), so worker counts never change samples.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Sampler
from tqdm import tqdm

from gsm.data.datasets import RecurrentClipDataset, SeptupletDataset
from gsm.data.images import FrameStore, MemoryStore, close_store
from gsm.train.config import StageConfig


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of n items used in `epoch`."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Whole global batches per epoch (the remainder of the permutation is dropped)."""
    return n // batch_size


class EpochSampler(Sampler[int]):
    """Indices this process loads in one epoch, from global batch `start` on."""

    def __init__(self, n: int, batch_size: int, *, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {world_size} processes")
        if batches_per_epoch(n, batch_size) < 1:
            raise ValueError(f"the training set has {n} items, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(self.n, self.seed, self.epoch)
        share = self.batch_size // self.world_size
        for k in range(self.start, batches_per_epoch(self.n, self.batch_size)):
            first = k * self.batch_size + self.rank * share
            yield from (int(i) for i in order[first:first + share])

    def __len__(self) -> int:
        remaining = max(0, batches_per_epoch(self.n, self.batch_size) - self.start)
        return remaining * (self.batch_size // self.world_size)


def reds_train_set(cfg: StageConfig, gt_store: FrameStore, lr_store: FrameStore, clips: Sequence[str], *,
                   frames_per_clip: int | Mapping[str, int] = 100, seed: int = 0,
                   key_format: str = "{clip}/{frame:08d}") -> RecurrentClipDataset:
    """REDS-style training clips with the stage's frames, patch, intervals and reversal."""
    return RecurrentClipDataset(
        gt_store, lr_store, clips, frames_per_clip=frames_per_clip, num_frames=cfg.num_frames,
        interval_list=cfg.interval_list, random_reverse=cfg.random_reverse, gt_size=cfg.gt_size,
        augment=True, seed=seed, key_format=key_format, repeat=cfg.repeat,
    )


def vimeo_train_set(cfg: StageConfig, gt_store: FrameStore, lr_store: FrameStore, sequences: Sequence[str], *,
                    seed: int = 0, key_format: str = "{seq}/im{frame}") -> SeptupletDataset:
    """Vimeo septuplets, not mirrored here: the trainer mirrors batches when cfg.mirror."""
    return SeptupletDataset(
        gt_store, lr_store, sequences, mirror=False, gt_size=cfg.gt_size, augment=True, seed=seed,
        key_format=key_format, num_frames=cfg.num_frames, repeat=cfg.repeat,
    )


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), else free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def preload(dataset: RecurrentClipDataset | SeptupletDataset, where: str, *, progress: bool = True,
            memory: int | None = None) -> int:
    """Decode every frame the dataset can read into memory once (its stores become MemoryStores).

    Samples stay identical: only where the decoded frames come from changes. Refused (naming the
    param `where`) when the frames would take more than half of the available memory; returns bytes.
    """
    keys = dataset.all_keys()
    first = [store.get(keys[0]) for store in (dataset.gt_store, dataset.lr_store)]
    need = len(keys) * sum(f.nbytes for f in first)
    memory = available_memory() if memory is None else memory
    if need > memory // 2:
        raise ValueError(
            f"{where}: the {len(keys)} training frames need {_size(need)} decoded, more than half of "
            f"the {_size(memory)} available; set it to false"
        )
    stores = []
    for name, store in (("GT", dataset.gt_store), ("LR", dataset.lr_store)):
        frames = {k: store.get(k) for k in tqdm(keys, desc=f"preload {name}", unit="frame", disable=not progress)}
        close_store(store)
        stores.append(MemoryStore(frames))
    dataset.gt_store, dataset.lr_store = stores
    return sum(s.nbytes for s in stores)

