"""Which rank this process is, as torchrun tells it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``) or ``--nproc-per-node`` adds (``DISTLIN_RENDEZVOUS_FILE``): read here and nowhere else,
without torch, so the input checks and the start line know it before anything heavy loads."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from distlin.errors import UsageError

# Set by --nproc-per-node (distlin.cli.launcher): the file store in a private folder its ranks meet through,
# instead of torchrun's MASTER_ADDR:MASTER_PORT.
RENDEZVOUS_ENV = "DISTLIN_RENDEZVOUS_FILE"


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks torchrun started (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the device index on this node: cuda:LOCAL_RANK
    launched: bool = False  # started by torchrun (RANK and WORLD_SIZE are set)
    local_world_size: int | None = None  # the ranks on this machine, sharing its RAM (None: not told)
    rendezvous_file: str | None = None  # started by --nproc-per-node: the file store its ranks meet through

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env(environ: Mapping[str, str] = os.environ) -> Ranks:
    """The ranks torchrun's variables describe; a value that is not a whole number is refused in one line."""

    def number(name: str, default: str) -> int:
        text = environ.get(name, default)
        try:
            return int(text)
        except ValueError:
            fix = "unset it or start the ranks with torchrun"
            raise UsageError(f"{name}={text!r} is not a whole number; {fix}") from None

    rank = number("RANK", "0")
    return Ranks(
        rank=rank,
        world_size=number("WORLD_SIZE", "1"),
        local_rank=number("LOCAL_RANK", str(rank)),
        launched="RANK" in environ and "WORLD_SIZE" in environ,
        local_world_size=number("LOCAL_WORLD_SIZE", "") if "LOCAL_WORLD_SIZE" in environ else None,
        rendezvous_file=environ.get(RENDEZVOUS_ENV) or None,
    )


def rank_prefix() -> str:
    """``"rank N: "`` for an error line printed by rank N > 0 (every rank reports: torchrun stops the others as
    soon as one exits), else nothing, also when the variables themselves are what is wrong."""
    try:
        rank = ranks_from_env().rank
    except UsageError:
        return ""
    return f"rank {rank}: " if rank else ""
