"""Process groups: the processes that train one model together, and the reductions over them.

Plain data-parallel training is one group of every process; IET's proxies (Liu et al., ECCV
2024) train with no gradient synchronisation at all and meet only when the weights are
averaged. Every collective in memguard (the gradient all-reduce of a training step, a defense's
gathered losses, the averaging of proxies) names the group it runs in, so the same code serves
one process, data parallelism, and models that train apart. A group of one process never
communicates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

BUCKET_NUMEL = 2**26  # elements per all-reduce buffer: bounded memory for large models


@dataclass(frozen=True)
class Group:
    """A set of processes that reduce together; `handle` is the torch.distributed group (None
    for this process alone)."""

    handle: Any = None  # torch.distributed.ProcessGroup, or None: no communication
    rank: int = 0  # this process's rank within the group
    size: int = 1

    @classmethod
    def local(cls) -> Group:
        """This process alone."""
        return cls()

    @classmethod
    def world(cls) -> Group:
        """Every process of the run (this one alone when torch.distributed is not running)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        return cls(dist.group.WORLD, dist.get_rank(), dist.get_world_size())

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over the group (a copy; itself on one process)."""
        value = value.detach().clone()
        if self.size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.handle)
        return value

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Concatenation along dim 0 over the group, in rank order (itself on one process)."""
        if self.size == 1:
            return value
        value = value.detach().contiguous()
        parts = [torch.empty_like(value) for _ in range(self.size)]
        dist.all_gather(parts, value, group=self.handle)
        return torch.cat(parts)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every process's `value` (anything picklable), in rank order ([value] on one process)."""
        if self.size == 1:
            return [value]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, value, group=self.handle)
        return gathered

    def average_(self, tensors: Iterable[torch.Tensor], weight: float | None = None) -> None:
        """In place, each tensor becomes its mean over the group, or with `weight` the sum of
        weight * tensor (weights that sum to one over the group). One all-reduce of a flat
        buffer per dtype and device (in buckets of BUCKET_NUMEL), so thousands of parameters
        cost a few collectives."""
        tensors = list(tensors)
        if self.size == 1 and weight is None:
            return
        scale = weight if weight is not None else 1.0 / self.size
        buckets: dict[tuple, list[list[torch.Tensor]]] = {}
        for tensor in tensors:
            chain = buckets.setdefault((tensor.dtype, tensor.device), [[]])
            if chain[-1] and sum(t.numel() for t in chain[-1]) + tensor.numel() > BUCKET_NUMEL:
                chain.append([])
            chain[-1].append(tensor)
        for bucket in (b for chain in buckets.values() for b in chain):
            flat = torch.cat([t.reshape(-1) for t in bucket]) * scale
            if self.size > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.handle)
            offset = 0
            for tensor in bucket:
                tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.handle)
