"""The shards of iterative ensemble training, and memory-sample redistribution between them.

IET (Liu et al., "Iterative Ensemble Training with Anti-Gradient Control for Mitigating
Memorization in Diffusion Models", ECCV 2024, arXiv 2407.15328) trains each proxy model on its
own shard of the training set. `split` makes the shards: disjoint, covering the data, sizes
within one of each other; a seeded random split, or, given a metadata column, one that spreads
each of its values evenly over the shards (each shard holds within one of |value| / K rows of
every value: copies of a duplicated image, say, are shared out rather than left together).

Memory-sample redistribution (MSR; IET-AGC+, "Redistribute Ensemble Training for Mitigating
Memorization in Diffusion Models", arXiv 2502.09434) moves the samples a proxy's AGC skipped
most to the next proxy, which has not memorized them: `most_skipped` picks the top fraction of
a shard by skip count (ties in a seeded random order) and `redistribute` hands proxy k's to
proxy (k + 1) mod K. Shards are sorted lists of dataset indices.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np


def split(
    num_samples: int, num_shards: int, seed: int, strata: Sequence[Any] | None = None
) -> list[list[int]]:
    """`num_samples` indices in `num_shards` disjoint shards covering them, seeded; with
    `strata` (a value per index, e.g. a metadata column) each value is spread evenly."""
    if num_samples < num_shards:
        raise ValueError(f"{num_samples} samples cannot fill {num_shards} shards")
    rng = np.random.default_rng([seed, num_shards])
    groups: dict[str, list[int]] = {}
    for index in range(num_samples):
        value = None if strata is None else strata[index]
        groups.setdefault(json.dumps(value, sort_keys=True), []).append(index)
    order = [int(i) for key in sorted(groups) for i in rng.permutation(groups[key])]
    return [sorted(order[k::num_shards]) for k in range(num_shards)]


def most_skipped(
    shard: Sequence[int], skip_counts: dict[int, int], fraction: float, rng: np.random.Generator
) -> list[int]:
    """The floor(fraction * len(shard)) indices of `shard` that AGC skipped most (counts from
    `skip_counts`, 0 when absent), ties broken in `rng`'s random order; sorted."""
    count = int(fraction * len(shard))
    ties = rng.permutation(len(shard))
    ranked = sorted(range(len(shard)), key=lambda i: (-skip_counts.get(shard[i], 0), ties[i]))
    return sorted(shard[i] for i in ranked[:count])


def redistribute(
    shards: Sequence[Sequence[int]], moved: Sequence[Sequence[int]]
) -> list[list[int]]:
    """The shards after each proxy k hands `moved[k]` (a part of its shard) to proxy
    (k + 1) mod K."""
    num_shards = len(shards)
    new = []
    for k in range(num_shards):
        leaving = set(moved[k])
        if not leaving <= set(shards[k]):
            raise ValueError(f"proxy {k} cannot hand over samples outside its shard")
        kept = [i for i in shards[k] if i not in leaving]
        new.append(sorted(kept + list(moved[(k - 1) % num_shards])))
    return new
