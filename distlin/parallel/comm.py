"""Every collective the engine issues goes through a :class:`Communicator`, which counts it.

The counts (bytes received per rank and calls, by kind; of those bytes, the ones that travelled behind compute
(launched asynchronously); the time the caller spent launching them (buffers, copies, handing them to the
backend) and blocked waiting) are what ``--report-comm`` and the
benchmarks report. :class:`DryRunCommunicator` issues nothing and only counts, so the same accounting runs for
sizes that cannot run here (meta tensors).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import torch
import torch.distributed as dist

KINDS = ("attention", "halo", "groupnorm", "gather")


@dataclass
class CommStats:
    """Bytes received by this rank and number of calls, per kind of exchange, over ``steps`` UNet calls; of the
    bytes, those ``hidden`` behind compute (launched asynchronously, waited for a step later); the seconds this
    rank spent launching them (``launch_s``: padding, copies, handing buffers to the backend) and blocked in
    ``wait`` (``wait_s``: what the exchanges cost it beyond their launch)."""

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    hidden: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    wait_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    launch_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    steps: int = 0

    def add(self, kind: str, nbytes: int, hidden: bool = False) -> None:
        self.bytes[kind] += int(nbytes)
        self.calls[kind] += 1
        if hidden:
            self.hidden[kind] += int(nbytes)

    def waited(self, kind: str, seconds: float) -> None:
        self.wait_s[kind] += seconds

    def launched(self, kind: str, seconds: float) -> None:
        self.launch_s[kind] += seconds

    def reset(self) -> None:
        for counts in (self.bytes, self.calls, self.hidden, self.wait_s, self.launch_s):
            counts.clear()
        self.steps = 0

    def totals(self) -> dict[str, object]:
        """Bytes and calls by kind over everything counted (for work that is not per UNet step: the VAE)."""
        bytes_ = {k: self.bytes.get(k, 0) for k in KINDS}
        calls = {k: self.calls.get(k, 0) for k in KINDS}
        return {"bytes": {**bytes_, "total": sum(bytes_.values())}, "calls": {**calls, "total": sum(calls.values())}}

    def summary(self) -> dict[str, object]:
        """Per-step bytes, calls, hidden bytes, milliseconds launching and blocked by kind, plus totals (what
        ``--report-comm`` prints)."""
        steps = max(self.steps, 1)

        def per_step(counts: dict[str, Any], scale: float = 1.0) -> dict[str, float]:
            values = {k: counts.get(k, 0) * scale / steps for k in KINDS}
            return {**values, "total": sum(values.values())}

        return {
            "steps": self.steps,
            "bytes_per_step": per_step(self.bytes),
            "calls_per_step": per_step(self.calls),
            "hidden_bytes_per_step": per_step(self.hidden),
            "wait_ms_per_step": per_step(self.wait_s, 1e3),
            "launch_ms_per_step": per_step(self.launch_s, 1e3),
        }


class Work:
    """A pending exchange: ``wait()`` returns its result (passed through ``finish``) once it has arrived;
    ``blocked(seconds)`` is told how long that wait blocked (the communicator's counters)."""

    def __init__(
        self,
        handles: Sequence[object],
        result: Any,
        finish: Callable[[Any], Any] | None = None,
        blocked: Callable[[float], None] | None = None,
    ):
        self._handles = list(handles)
        self._result = result
        self._finish = finish
        self._blocked = blocked

    def wait(self) -> Any:
        if self._handles:
            start = perf_counter()
            for h in self._handles:
                h.wait()
            self._handles.clear()
            if self._blocked is not None:
                self._blocked(perf_counter() - start)
        if self._finish is not None:
            self._result, self._finish = self._finish(self._result), None
        return self._result

    def then(self, fn: Callable[[Any], Any]) -> Work:
        """A Work whose result is ``fn`` of this one's, computed when waited for."""
        return Work([self], None, lambda _: fn(self.wait()))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Communicator:
    """Collectives among the ranks of one group (``ranks``: their global ranks, in band order).

    Every exchange starts at once and returns a :class:`Work`; ``async_op`` says the caller waits for it only a
    step later (its bytes count as hidden behind compute)."""

    def __init__(self, ranks: Sequence[int], index: int, stats: CommStats, group: object = None):
        self.ranks = list(ranks)
        self.index = index
        self.size = len(self.ranks)
        self.stats = stats
        self.group = group

    # transport, overridden by DryRunCommunicator; always asynchronous: the caller blocks in Work.wait (which
    # counts the time), at once for a synchronous exchange (the same as torch's own synchronous call)
    def _all_reduce(self, t: torch.Tensor) -> list[object]:
        return [dist.all_reduce(t, group=self.group, async_op=True)]

    def _all_gather(self, out: list[torch.Tensor], t: torch.Tensor) -> list[object]:
        return [dist.all_gather(out, t, group=self.group, async_op=True)]

    def _p2p(self, ops: list[tuple[bool, torch.Tensor, int]]) -> list[object]:
        """``ops``: (send?, buffer, global peer rank)."""
        if not ops:
            return []
        return dist.batch_isend_irecv(
            [dist.P2POp(dist.isend if send else dist.irecv, buf, peer) for send, buf, peer in ops]
        )

    # counted API
    def all_reduce(self, t: torch.Tensor, kind: str, async_op: bool = False) -> Work:
        """Sum ``t`` in place over the group."""
        if self.size == 1:
            return Work([], t)
        start = perf_counter()
        self.stats.add(kind, _nbytes(t), hidden=async_op)
        handles = self._all_reduce(t)
        self.stats.launched(kind, perf_counter() - start)
        return Work(handles, t, blocked=self._blocked(kind))

    def _blocked(self, kind: str) -> Callable[[float], None]:
        return lambda seconds: self.stats.waited(kind, seconds)

    def all_gather_rows(
        self, t: torch.Tensor, sizes: Sequence[int], dim: int, kind: str, async_op: bool = False
    ) -> Work:
        """Gather bands of different lengths along ``dim``; the result is the list of every rank's band."""
        if self.size == 1:
            return Work([], [t])
        start = perf_counter()
        longest = max(sizes)
        pad = list(t.shape)
        pad[dim] = longest - t.shape[dim]
        padded = torch.cat([t, t.new_zeros(pad)], dim=dim) if pad[dim] else t.contiguous()
        out = [torch.empty_like(padded) for _ in range(self.size)]
        self.stats.add(kind, _nbytes(padded) * (self.size - 1), hidden=async_op)
        handles = self._all_gather(out, padded)
        self.stats.launched(kind, perf_counter() - start)
        return Work(
            handles,
            out,
            lambda bands: [b.narrow(dim, 0, n) for b, n in zip(bands, sizes, strict=True)],
            self._blocked(kind),
        )

    def exchange_neighbours(
        self,
        to_prev: torch.Tensor | None,
        to_next: torch.Tensor | None,
        from_prev: torch.Tensor | None,
        from_next: torch.Tensor | None,
        kind: str,
        async_op: bool = False,
    ) -> Work:
        """Point-to-point with the band above (prev) and below (next) only; receives into the given buffers."""
        start = perf_counter()
        ops: list[tuple[bool, torch.Tensor, int]] = []
        for buf, peer, send in (
            (to_prev, self.index - 1, True),
            (to_next, self.index + 1, True),
            (from_prev, self.index - 1, False),
            (from_next, self.index + 1, False),
        ):
            if buf is None or buf.numel() == 0:
                continue
            if not send:
                self.stats.add(kind, _nbytes(buf), hidden=async_op)
            ops.append((send, buf.contiguous(), self.ranks[peer]))
        handles = self._p2p(ops)
        self.stats.launched(kind, perf_counter() - start)
        return Work(handles, (from_prev, from_next), blocked=self._blocked(kind))


class DryRunCommunicator(Communicator):
    """Counts what a group of ``len(ranks)`` would exchange without exchanging (e.g. on meta tensors)."""

    def _all_reduce(self, t: torch.Tensor) -> list[object]:
        return []

    def _all_gather(self, out: list[torch.Tensor], t: torch.Tensor) -> list[object]:
        return []

    def _p2p(self, ops: list[tuple[bool, torch.Tensor, int]]) -> list[object]:
        return []
