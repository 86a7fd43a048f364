"""Randomness as a function of sample position, and the split of every global batch across ranks.

Everything random about a training sample (which item it is, its crop, its timestep, its noise) is derived from
the run's seed and the sample's *position* in the global stream, ``step * global_batch + i``. No RNG state is
carried from one sample to the next or owned by a rank, which is what makes a resumed run continue exactly and
makes 2 ranks x batch b compute the same samples as 1 rank x batch 2b.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from distlin.errors import UsageError


def stream_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for item ``index`` of a named stream; a hash, so neighbouring indices are unrelated."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator(seed: int, stream: str, index: int) -> torch.Generator:
    """A CPU generator for one draw; CPU because CUDA generators give other numbers for the same seed."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, index))


def noise_and_timesteps(
    seed: int, stream: str, positions: Sequence[int], shape: Sequence[int], num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Gaussian noise of ``shape`` and a uniform timestep in ``[0, num_train_timesteps)``."""
    noises, steps = [], []
    for position in positions:
        g = generator(seed, stream, position)
        steps.append(torch.randint(num_train_timesteps, (1,), generator=g))
        noises.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(noises), torch.cat(steps)


def holdout_keys(keys: Sequence[str], count: int) -> list[str]:
    """The ``count`` keys with the smallest hash: a split that does not depend on the seed or on file order,
    so runs with different seeds are evaluated on the same images."""
    return sorted(keys, key=lambda key: hashlib.blake2b(key.encode(), digest_size=8).digest())[:count]


class SampleOrder:
    """Which item sits at a stream position: a fresh seeded permutation per epoch, so every epoch sees every
    item once. Holds one permutation at a time; positions are read nearly in order."""

    def __init__(self, num_items: int, seed: int):
        if num_items < 1:
            raise ValueError("SampleOrder needs at least one item")
        self.num_items = num_items
        self.seed = seed
        self._epoch = -1
        self._permutation = torch.empty(0, dtype=torch.long)

    def item(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_items)
        if epoch != self._epoch:
            self._permutation = torch.randperm(self.num_items, generator=generator(self.seed, "order", epoch))
            self._epoch = epoch
        return int(self._permutation[offset])


@dataclass(frozen=True)
class BatchLayout:
    """A global batch split over ``world_size`` ranks and ``grad_accum`` micro-batches of equal size.

    Rank r takes positions ``r, r + W, r + 2W, ...`` of each global batch (as DistributedSampler does), and
    cuts its share into consecutive micro-batches. Equal sizes make the mean of micro-batch means over ranks
    and accumulation steps exactly the mean over the global batch.
    """

    global_batch: int
    grad_accum: int
    world_size: int

    def __post_init__(self) -> None:
        if self.global_batch < 1 or self.grad_accum < 1:
            raise UsageError(f"--batch-size {self.global_batch} and --grad-accum {self.grad_accum} must be at least 1")
        parts = self.world_size * self.grad_accum
        if self.global_batch % parts:
            fit = max(parts, round(self.global_batch / parts) * parts)
            raise UsageError(
                f"global --batch-size {self.global_batch} does not divide into world size {self.world_size} x "
                f"--grad-accum {self.grad_accum} = {parts} equal micro-batches; pass --batch-size {fit}"
            )

    @property
    def micro_batch(self) -> int:
        return self.global_batch // (self.world_size * self.grad_accum)

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Stream positions of this rank's micro-batches for optimizer step ``step``."""
        first = step * self.global_batch
        mine = list(range(first + rank, first + self.global_batch, self.world_size))
        size = self.micro_batch
        return [mine[i : i + size] for i in range(0, len(mine), size)]


@dataclass(frozen=True)
class MicroBatchSampler:
    """A DataLoader ``batch_sampler``: this rank's micro-batches for steps ``[start_step, end_step)``."""

    layout: BatchLayout
    rank: int
    start_step: int
    end_step: int

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.end_step):
            yield from self.layout.micro_batches(step, self.rank)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step) * self.layout.grad_accum
