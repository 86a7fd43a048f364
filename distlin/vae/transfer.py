"""Copies between the sequential decoder's store (host RAM) and its compute device, overlapped on CUDA.

On CUDA with a CPU store, :class:`HostStore` keeps the stored bands in pinned host memory and runs every copy
on one side stream, so the copies of the next band (in) and of the previous band (out) run while the current
band computes. The ordering, with one CUDA event per copy:

* to compute (:meth:`HostStore.fetch`): the copy is queued on the side stream and records an event; the
  compute stream waits for that event before its first use (:meth:`Fetch.get`), and the device tensor is
  marked as used by the compute stream, so the allocator does not hand its memory to the side stream early;
* to the store (:meth:`HostStore.save`): the side stream first waits for the compute stream (the band is
  finished), copies into a fresh pinned buffer and records an event; the device tensor is marked as used by
  the side stream. The host never reads a stored buffer before its event (:meth:`HostStore.ready`): host-side
  reads (cutting rows across band borders, the final image) wait for the copies that write what they read.
  A copy from a stored buffer back to compute needs no wait: it is queued behind its writer on the same stream.

Elsewhere (CPU compute, or the store on the compute device) the same calls copy synchronously: no pinning,
no stream, no event, and nothing to overlap, so :attr:`HostStore.lookahead` is 0 there: :func:`ahead` then
fetches each band when it is needed, and the device holds one band less. With overlap it is 1: band
``r + 1``'s copy is started before band ``r`` is handed over for compute (double buffering).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")


def ahead(count: int, fetch: Callable[[int], T], depth: int) -> Iterator[tuple[int, T]]:
    """``(r, fetch(r))`` for ``r < count``, with ``fetch(r + depth)`` called before band ``r`` is yielded: the
    next ``depth`` bands' copies are queued before the caller queues band ``r``'s compute, so on CUDA they
    overlap it."""
    queued: list[T] = []
    for r in range(count):
        while len(queued) <= depth and r + len(queued) < count:
            queued.append(fetch(r + len(queued)))
        yield r, queued.pop(0)  # held by the caller alone: it may free the band while computing


class Fetch:
    """A band on its way to compute: :meth:`get` makes the compute stream wait for its copy, then casts it."""

    def __init__(self, tensor: torch.Tensor, dtype: torch.dtype, copied: torch.cuda.Event | None = None):
        self.tensor, self.dtype, self.copied = tensor, dtype, copied

    def get(self) -> torch.Tensor:
        if self.copied is not None:
            stream = torch.cuda.current_stream(self.tensor.device)
            stream.wait_event(self.copied)
            self.tensor.record_stream(stream)
        return self.tensor.to(self.dtype)


def copies_overlap(compute: torch.device | str, store: torch.device | str) -> bool:
    """Whether copies between ``store`` and ``compute`` overlap compute (CUDA compute, host-RAM store); the
    sequential VAE then holds the next band on the device beside the one computing (the planner counts it)."""
    return torch.device(compute).type == "cuda" and torch.device(store).type == "cpu"


class HostStore:
    """The store side of the sequential decoder: copies to and from ``compute``, counted in bytes (``moved``).

    ``overlap`` (CUDA compute, CPU store): pinned host buffers and a side stream, ordered by events (module
    docstring); otherwise synchronous copies.
    """

    def __init__(self, compute: torch.device, store: torch.device):
        self.compute, self.store = compute, store
        self.overlap = copies_overlap(compute, store)
        self.stream = torch.cuda.Stream(compute) if self.overlap else None
        self.moved = 0  # bytes copied between store and compute, both ways
        self._writes: dict[int, torch.cuda.Event] = {}  # host buffer address -> event of the copy writing it

    @property
    def lookahead(self) -> int:
        """Bands fetched ahead of the one computing: 1 where copies overlap compute, else 0."""
        return 1 if self.overlap else 0

    def ready(self, tensors: list[torch.Tensor]) -> None:
        """Wait until the copies writing ``tensors`` (stored buffers or views of them) are done: before the host
        reads them."""
        for t in tensors:
            copied = self._writes.pop(t.untyped_storage().data_ptr(), None)
            if copied is not None:
                copied.synchronize()

    def fetch(self, pieces: list[torch.Tensor], dtype: torch.dtype) -> Fetch:
        """Start copying the stored ``pieces``, joined along the rows (dim 2), to compute in ``dtype``."""
        if len(pieces) == 1 and (pieces[0].is_contiguous() or not self.overlap):
            source = pieces[0]
        else:
            self.ready(pieces)
            shape = list(pieces[0].shape)
            shape[2] = sum(p.shape[2] for p in pieces)
            source = torch.empty(shape, dtype=pieces[0].dtype, device=pieces[0].device, pin_memory=self.overlap)
            torch.cat(pieces, dim=2, out=source)
        self.moved += source.numel() * source.element_size()
        if not self.overlap:
            return Fetch(self._to_compute(source, dtype), dtype)
        with torch.cuda.stream(self.stream):
            tensor = self._to_compute(source, source.dtype)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return Fetch(tensor, dtype, copied)

    def load(self, pieces: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The stored ``pieces``, joined along the rows, on compute in ``dtype``, ready to use."""
        return self.fetch(pieces, dtype).get()

    def save(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``t`` (on compute) in ``dtype`` on the store; on CUDA the copy runs on the side stream."""
        t = t.to(dtype)
        self.moved += t.numel() * t.element_size()
        if not self.overlap:
            return self._to_store(t)
        self.stream.wait_stream(torch.cuda.current_stream(self.compute))
        with torch.cuda.stream(self.stream):
            host = self._to_store(t)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        t.record_stream(self.stream)
        self._writes[host.untyped_storage().data_ptr()] = copied
        return host

    def finish(self) -> None:
        """Wait for every copy (the decode's wall time then includes them)."""
        if self.overlap:
            self.stream.synchronize()
            self._writes.clear()

    def _to_compute(self, source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return source.to(self.compute, dtype, non_blocking=self.overlap)

    def _to_store(self, t: torch.Tensor) -> torch.Tensor:
        if not self.overlap:
            return t.to(self.store)
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)
