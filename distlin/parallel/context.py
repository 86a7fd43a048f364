"""One explicit object per parallel run: groups, layout, step counter, stale buffers and counters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from distlin.parallel.comm import CommStats, Communicator, DryRunCommunicator, Work
from distlin.parallel.config import PatchParallelConfig
from distlin.parallel.layout import RowLayout
from distlin.parallel.runtime import Runtime


class StaleSlot:
    """What one layer carries from step to step in displaced mode: the last exchanged value and the
    exchange still in flight (waited for only when its result is needed, a step later), one of each per
    micro-batch ("lane"), since every micro-batch sees different activations."""

    def __init__(self) -> None:
        self._values: dict[int, Any] = {}
        self._pending: dict[int, Work] = {}

    def latest(self, lane: int = 0) -> Any:
        if lane in self._pending:
            self._values[lane] = self._pending.pop(lane).wait()
        return self._values.get(lane)

    def keep(self, lane: int, value: Any) -> None:
        self._values[lane] = value

    def launch(self, lane: int, work: Work) -> None:
        self._pending[lane] = work

    def clear(self) -> None:
        for lane in list(self._pending):
            self.latest(lane)
        self._values.clear()


class ParallelContext:
    """Shared by every patched layer of one model: who the neighbours are, which rows are ours, which
    step we are at and whether exchanges may be stale.

    Ranks ``[0, N/2)`` and ``[N/2, N)`` form two CFG groups when CFG parallelism is on; each group is
    patch-parallel over its ranks (``patch``); ``cfg`` pairs rank ``i`` with ``i + N/2``.
    """

    def __init__(self, runtime: Runtime, config: PatchParallelConfig, dry_run_ranks: int | None = None):
        self.runtime = runtime
        self.config = config
        self.stats = CommStats()
        self.layout: RowLayout | None = None
        self.step = 0
        self.lane = 0  # which micro-batch of the current UNet evaluation is running
        self._last_timestep: float | None = None
        self._slots: list[StaleSlot] = []
        self.patch, self.cfg = self._build_groups(runtime, config, dry_run_ranks)

    def _build_groups(
        self, runtime: Runtime, config: PatchParallelConfig, dry_run_ranks: int | None
    ) -> tuple[Communicator, Communicator | None]:
        if dry_run_ranks is not None:
            return DryRunCommunicator(range(dry_run_ranks), dry_run_ranks // 2, self.stats), None
        world, rank = runtime.world_size, runtime.rank
        if not runtime.distributed or world == 1:
            return Communicator([rank], 0, self.stats), None
        if not (config.cfg_parallel and world % 2 == 0):
            return Communicator(range(world), rank, self.stats, group=None), None
        half = world // 2
        halves = [list(range(0, half)), list(range(half, world))]
        pairs = [[i, i + half] for i in range(half)]
        # new_group must be called by every rank for every group, in the same order.
        half_groups = [dist.new_group(r) for r in halves]
        pair_groups = [dist.new_group(r) for r in pairs]
        side, index = divmod(rank, half)
        patch = Communicator(halves[side], index, self.stats, half_groups[side])
        cfg = Communicator(pairs[index], side, self.stats, pair_groups[index])
        return patch, cfg

    @property
    def naive(self) -> bool:
        return self.config.mode == "naive"

    @property
    def displaced(self) -> bool:
        """True when this step may use last step's exchanges (after the synchronous warm-up)."""
        return self.config.mode == "displaced" and self.step >= self.config.warmup_steps

    def new_slot(self) -> StaleSlot:
        slot = StaleSlot()
        self._slots.append(slot)
        return slot

    def begin_step(self, timestep: torch.Tensor | float, layout: RowLayout) -> None:
        """Called at every UNet evaluation; a timestep that does not decrease starts a new generation."""
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if (self._last_timestep is not None and t >= self._last_timestep) or layout != self.layout:
            self.reset()
        self._last_timestep = t
        self.layout = layout

    def end_step(self) -> None:
        self.step += 1
        self.stats.steps += 1

    def reset(self) -> None:
        """Start a new generation: drain exchanges in flight and forget stale values."""
        for slot in self._slots:
            slot.clear()
        self.step = 0
        self._last_timestep = None

    def exchange(self, slot: StaleSlot, fresh: Any, launch: Callable[[bool], Work]) -> Any:
        """Synchronous exchange, or, when displaced, last step's result while this step's travels.

        ``launch(async_op)`` starts the exchange of ``fresh`` and returns its :class:`Work`. The result
        is always kept in ``slot`` so the first displaced step has something to reuse.
        """
        stale = slot.latest(self.lane)
        if self.displaced and stale is not None:
            slot.launch(self.lane, launch(True))
            return stale
        fresh_result = launch(False).wait()
        slot.keep(self.lane, fresh_result)
        return fresh_result
