"""A rank that fails alone in the middle of a run does not cost the app its rank group: every rank rebuilds it.

Why: a rank that raises inside a denoising step leaves the others blocked in a collective it will never join;
without this they would wait there until the group's timeout (``--timeout-s``) and the app would end. Instead
the failing rank announces its failure in the rendezvous store (which outlives any process group), drops what
holds the group (the prepared pipeline, the failed frames) and aborts its communicators. A peer's collective then
fails at once when that closes the failing rank's connections (gloo: "Connection closed by peer"; gloo closes
them once nothing of that rank holds the group, hence :func:`clear_tracebacks`), else when the peer's wait
reaches the group's timeout (gloo's abort does not end an exchange under way). Each rank
that fails so finds the announcement, aborts its own communicators (freeing any rank waiting on it in turn), and
all of them meet in the store and build a fresh process group under a new key prefix
(``distlin-regroup/<round>``). The request ends as a refusal naming the failing rank's error. The new group
replaces the default one, which every collective of a run uses; the session drops its prepared pipeline, whose
communicators belonged to the old group, so the next request builds its engine on the new one.

A collective failure that no rank announced is a lost rank (killed, or past ``--timeout-s``): it is raised as it
is and ends the app, as before. Tested on gloo (CPU) only. With NCCL the abort is ``ncclCommAbort``, which ends
the failing rank's own kernels; a peer already waiting in an NCCL kernel is not woken by it, and NCCL's watchdog
may end that process at the group's timeout instead of raising.
"""

from __future__ import annotations

import datetime
import gc
import traceback
from collections.abc import Callable

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from distlin.errors import is_lost_rank
from distlin.parallel.runtime import Runtime

PREFIX = "distlin-regroup"


class GroupRecovery:
    """This rank's side of the rebuild: the store every rank reaches, the group's timeout, and how many rebuilds
    happened (the same count on every rank, since all of them take part in each)."""

    def __init__(self, runtime: Runtime, timeout_s: float, store: dist.Store | None = None):
        self.runtime = runtime
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.store = store if store is not None else c10d._get_default_store()  # kept: it outlives the groups
        self.rounds = 0

    def recover(self, error: BaseException, release: Callable[[], None] = lambda: None) -> str:
        """After ``error`` on this rank: announce it (unless another rank already announced a failure, which this
        error follows from), ``release()`` what holds the group, abort every communicator and join a fresh group.
        Returns the announced failure's line ("rank R: ..."). Raises ``error`` itself when it is a lost rank's (a
        collective failed and no rank announced why), and the store's error if a rank does not come back."""
        failed = f"{PREFIX}/{self.rounds}/failed"
        if not self.store.check([failed]):
            if is_lost_rank(error):
                raise error
            self.store.set(failed, f"rank {self.runtime.rank}: {one_line(error)}")
        line = self.store.get(failed).decode()
        clear_tracebacks(error)  # the failed call's frames hold its engine, and so the group's connections
        release()
        gc.collect()  # the group's connections close once nothing holds it
        self._rebuild()
        return line

    def _rebuild(self) -> None:
        try:
            c10d._abort_process_group()  # every group: the default one and the engine's sub-groups
        except Exception:  # noqa: BLE001 - a backend without abort: destroying closes its connections too
            dist.destroy_process_group()
        self.rounds += 1
        prefix = f"{PREFIX}/{self.rounds}"
        if self.store.add(f"{prefix}/arrived", 1) == self.runtime.world_size:
            self.store.set(f"{prefix}/all", "1")
        self.store.wait([f"{prefix}/all"], 2 * self.timeout)  # a peer may first wait out its collective's timeout
        dist.init_process_group(
            backend=self.runtime.backend,
            store=dist.PrefixStore(f"{prefix}/group", self.store),
            rank=self.runtime.rank,
            world_size=self.runtime.world_size,
            timeout=self.timeout,
            device_id=self.runtime.device if self.runtime.backend == "nccl" else None,
        )


def clear_tracebacks(error: BaseException) -> None:
    """Drop the frames ``error`` and the exceptions it was raised from or during still hold. Clearing their locals
    is not enough: a frame holds its function too, and the pipeline's wrapped ``__call__`` closes over its engine
    (:func:`distlin.surgery.around_calls`), which holds the group; while it lives gloo keeps the connections open
    and a peer waits out its collective's timeout instead of failing at once."""
    pending, seen = [error], set()
    while pending:
        err = pending.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err.__traceback__ = None
        pending += [err.__cause__, err.__context__]


def one_line(err: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
