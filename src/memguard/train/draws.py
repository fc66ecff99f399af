"""The randomness of training, as a pure function of (seed, step).

The order of samples, the noise, the timesteps, the caption dropout (for classifier-free
guidance, Ho & Salimans 2022) and the flips are drawn for the whole effective batch of a step
and each process and micro-batch takes its slice. Hence a killed run resumed from a checkpoint,
the same run on N processes, and the same run with gradient accumulation give the weights of
one uninterrupted process on the same batch.

A model that trains apart from others (an IET proxy) has streams of its own: plain training's
draws with a seed derived from (seed, proxy), `derive_seed`. The step's generator stays
readable after its draws (`StepDraws.generator`), so a defense that draws more (threshold-aware
augmentation) is as reproducible as the step.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def derive_seed(*key: int) -> int:
    """A 31-bit seed that is a function of `key` alone, e.g. (seed, proxy) for a proxy's
    draws; unrelated to the seeds of other keys."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint32)[0] >> 1)


class StepDraws:
    """The random draws of one optimizer step, for its whole effective batch.

    Drawn from a generator seeded by (seed, step) alone, for processes x accumulation x batch
    samples; each micro-batch of each process takes its slice. So the draws do not depend on
    the number of processes, on gradient accumulation, or on where a run was resumed.
    """

    def __init__(
        self, seed: int, step: int, size: int, num_timesteps: int, caption_dropout: float
    ) -> None:
        state = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
        self._generator = torch.Generator().manual_seed(int(state >> np.uint64(1)))
        self.size = size
        self.timesteps = torch.randint(0, num_timesteps, (size,), generator=self._generator)
        self.dropped = torch.rand(size, generator=self._generator) < caption_dropout
        self.flipped = torch.rand(size, generator=self._generator) < 0.5
        self._noise: torch.Tensor | None = None

    @property
    def generator(self) -> torch.Generator:
        """The step's generator: what a defense draws more from, once the micro-batches (their
        noise included) are drawn."""
        return self._generator

    def noise(self, shape: torch.Size) -> torch.Tensor:
        """Standard normal noise (size, *shape), drawn on first use (latent shapes vary)."""
        if self._noise is None:
            self._noise = torch.randn((self.size, *shape), generator=self._generator)
        return self._noise


class GlobalBatchSampler(Sampler):
    """Yields this process's slice of each global batch, forever.

    The data order is a chain of permutations, one per epoch, each seeded by (seed, epoch), so
    global batch b is the same whatever the number of processes and wherever a run resumed.
    """

    def __init__(
        self, num_samples: int, local_batch: int, rank: int, world: int, seed: int, start: int = 0
    ) -> None:
        self.num_samples, self.local_batch, self.rank = num_samples, local_batch, rank
        self.global_batch = local_batch * world
        self.seed, self.start = seed, start
        self._permutations: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._permutations = {
                epoch: torch.randperm(self.num_samples, generator=generator).tolist()
            }
        return self._permutations[epoch]

    def batch(self, index: int) -> list[int]:
        """Indices of global batch `index`."""
        first = index * self.global_batch
        return [
            self._permutation(p // self.num_samples)[p % self.num_samples]
            for p in range(first, first + self.global_batch)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        index = self.start
        while True:
            batch = self.batch(index)
            yield batch[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
            index += 1
