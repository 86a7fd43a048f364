"""A request that fails on some ranks only is refused on every rank, and the rank group stays in step.

Rank 0 checks a request before broadcasting it, but a rank can still fail alone (its disk, its memory, a file it
reads). Every rank therefore runs a request in parts (its settings, the pipeline, the generation) and after each
part joins :func:`agree`: one ``all_gather_object`` of each rank's one-line failure (or None). If any rank
failed, every rank raises and the request ends on all of them at the same point, as a refusal; the next request
runs as usual. A rank that fails alone while the others may be waiting in a collective for it (inside a denoising
step) cannot join the exchange: given a :class:`~distlin.app.regroup.GroupRecovery`, every rank rebuilds the group
instead (:mod:`distlin.app.regroup`) and the request ends as a refusal on every rank all the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from distlin.app.regroup import GroupRecovery, one_line
from distlin.errors import Cancelled, UsageError
from distlin.parallel.runtime import Runtime
from distlin.parallel.unet import NonFiniteError

T = TypeVar("T")

# Failures every rank meets at the same point of a run (bad input, cancel, a non-finite step): each rank raises
# its own, as the command line does.
SHARED_FAILURES = (UsageError, Cancelled, NonFiniteError)


class RankFailed(Exception):
    """A request failed on some rank(s); raised on every rank once all agreed, the group still in step."""


def agree(
    runtime: Runtime,
    part: Callable[[], T],
    recovery: GroupRecovery | None = None,
    release: Callable[[], None] = lambda: None,
) -> T:
    """``part()`` on this rank, then every rank learns whether any failed: a failed rank raises its own error
    (a :data:`SHARED_FAILURES` one as it is, any other as :class:`RankFailed`), the others RankFailed naming
    the first rank that failed. Without a process group, ``part()`` alone.

    With ``recovery``, a failure of this rank alone (not a shared one), or a collective broken by another rank's,
    rebuilds the group on every rank (after ``release()``, which drops what holds the old one) and raises
    RankFailed naming the rank that failed first."""
    if not runtime.distributed:
        return part()
    try:
        value, error = part(), None
    except Exception as err:  # noqa: BLE001 - every failure is agreed on, then raised
        value, error = None, err
    failures: list[str | None] = [None] * runtime.world_size
    try:
        if recovery is not None and error is not None and not isinstance(error, SHARED_FAILURES):
            raise error  # the others may be waiting for this rank in a collective: rebuild instead of exchanging
        dist.all_gather_object(failures, None if error is None else one_line(error))
    except Exception as broken:  # noqa: BLE001 - this rank's failure, or another's reaching this rank
        if recovery is None:
            raise
        raise RankFailed(recovery.recover(broken, release)) from broken
    if error is not None:
        if isinstance(error, SHARED_FAILURES):
            raise error
        raise RankFailed(f"rank {runtime.rank}: {one_line(error)}") from error
    failed = [(rank, line) for rank, line in enumerate(failures) if line is not None]
    if failed:
        rank, line = failed[0]
        raise RankFailed(f"rank {rank}: {line}")
    return value  # type: ignore[return-value]
