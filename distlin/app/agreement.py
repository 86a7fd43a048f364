"""A request that fails on some ranks only is refused on every rank, and the rank group stays in step.

Rank 0 checks a request before broadcasting it, but a rank can still fail alone (its disk, its memory, a file it
reads). Every rank therefore runs a request in parts (its settings, the pipeline, the generation) and after each
part joins :func:`agree`: one ``all_gather_object`` of each rank's one-line failure (or None). If any rank
failed, every rank raises and the request ends on all of them at the same point, as a refusal; the next request
runs as usual. A rank that fails inside a collective leaves the others waiting in it: that is caught by the
group's timeout (``--timeout-s``) and ends the app with one line, as a lost rank does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from distlin.errors import Cancelled, UsageError
from distlin.parallel.runtime import Runtime
from distlin.parallel.unet import NonFiniteError

T = TypeVar("T")

# Failures every rank meets at the same point of a run (bad input, cancel, a non-finite step): each rank raises
# its own, as the command line does.
SHARED_FAILURES = (UsageError, Cancelled, NonFiniteError)


class RankFailed(Exception):
    """A request failed on some rank(s); raised on every rank once all agreed, the group still in step."""


def agree(runtime: Runtime, part: Callable[[], T]) -> T:
    """``part()`` on this rank, then every rank learns whether any failed: a failed rank raises its own error
    (a :data:`SHARED_FAILURES` one as it is, any other as :class:`RankFailed`), the others RankFailed naming
    the first rank that failed. Without a process group, ``part()`` alone."""
    if not runtime.distributed:
        return part()
    try:
        value, error = part(), None
    except Exception as err:  # noqa: BLE001 - every failure is agreed on, then raised
        value, error = None, err
    failures: list[str | None] = [None] * runtime.world_size
    dist.all_gather_object(failures, None if error is None else _line(error))
    if error is not None:
        if isinstance(error, SHARED_FAILURES):
            raise error
        raise RankFailed(f"rank {runtime.rank}: {_line(error)}") from error
    failed = [(rank, line) for rank, line in enumerate(failures) if line is not None]
    if failed:
        rank, line = failed[0]
        raise RankFailed(f"rank {rank}: {line}")
    return value  # type: ignore[return-value]


def _line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
