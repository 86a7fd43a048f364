"""How rank 0 hands work to the other ranks: one plain dict per message, broadcast to the whole group.

Messages: ``{"kind": "generate", "request": {...}}`` (every rank runs it), ``{"kind": "idle"}`` (sent while
no work waits, more often than the group's timeout, so a waiting rank is not mistaken for a dead one) and
``{"kind": "shutdown"}`` (workers return).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from distlin.app.agreement import SHARED_FAILURES, RankFailed
from distlin.app.request import GenerationRequest
from distlin.app.session import GenerationSession
from distlin.parallel.runtime import Runtime

GENERATE, IDLE, SHUTDOWN = "generate", "idle", "shutdown"

# How a request ends on every rank alike, the group still in step: refused, cancelled, or failed on some rank.
REFUSALS = (*SHARED_FAILURES, RankFailed)


class RankChannel:
    """Rank 0 sends, every other rank receives, in the same order (one broadcast per message)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def send(self, kind: str, **payload: Any) -> None:
        """On rank 0: a message to every rank (nothing to do on a single process)."""
        if self.runtime.distributed:
            dist.broadcast_object_list([{"kind": kind, **payload}], src=0)

    def receive(self) -> dict[str, Any]:
        """On ranks other than 0: the next message (blocks until rank 0 sends one)."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def serve_worker(channel: RankChannel, session: GenerationSession) -> None:
    """The loop of every rank but 0: run each request with rank 0 until it says shutdown.

    A request that fails, on any rank, is agreed on by every rank (:mod:`distlin.app.agreement`) and leaves the
    group in step, so the loop goes on; rank 0 reports it. Only a lost rank or a failed collective ends this rank,
    and torchrun the group.
    """
    while (message := channel.receive())["kind"] != SHUTDOWN:
        if message["kind"] != GENERATE:
            continue
        try:
            session.run(GenerationRequest.from_message(message["request"]), should_stop=_rank0_decides)
        except REFUSALS:
            continue


def _rank0_decides() -> bool:
    """A worker's ``should_stop``: given, so the worker joins rank 0's stop broadcast at every UNet call, which
    carries rank 0's answer alone (:class:`distlin.run.StepMonitor`)."""
    return False
