"""A shuffling sampler whose order and augmentation seeds depend only on (seed, epoch), and that can start mid-epoch.

Lightning restores the loop's position on resume but restarts a plain DataLoader at the start of its epoch, which
replays the first batches. This sampler is told how many samples of the epoch were already trained on and skips
them, so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, augmentation_seed)`` in a per-epoch random order.

    Args:
        num_samples: dataset length.
        seed: base seed; the order of epoch ``e`` is a permutation seeded by ``(seed, e)``.
        shuffle: shuffle each epoch; otherwise keep the dataset order.
        rank: this process's rank (the order is shared; each rank takes every ``world_size``-th sample).
        world_size: number of processes.
    """

    def __init__(
        self, num_samples: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0  # samples of this rank already consumed in the current epoch (set on resume)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        # Padded like DistributedSampler: every rank gets the same number of samples (and of batches).
        return math.ceil(self.num_samples / self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = (
            torch.randperm(self.num_samples, generator=generator).tolist()
            if self.shuffle
            else list(range(self.num_samples))
        )
        # One augmentation seed per (epoch, sample), drawn after the order so both come from the same stream.
        seeds = torch.randint(2**62, (self.num_samples,), generator=generator).tolist()
        order += order[: len(self) * self.world_size - len(order)]  # pad by wrapping around
        mine = order[self.rank :: self.world_size]
        skip, self.skip = self.skip, 0  # skipping applies to the resumed epoch only
        for index in mine[skip:]:
            yield index, seeds[index]
