"""One explicit object per parallel run: groups, layout, step counter, stale buffers and counters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.device_mesh import init_device_mesh

from distlin.parallel.comm import CommStats, Communicator, DryRunCommunicator, Work
from distlin.parallel.config import PatchParallelConfig
from distlin.parallel.layout import RowLayout
from distlin.parallel.runtime import Runtime
from distlin.parallel.topology import Topology


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

    Its :class:`~distlin.parallel.topology.Topology` says which ranks share the rows (``patch``) and which
    pair up across the two guidance halves (``cfg``, None when the batch is not split); it is chosen per UNet
    call (:meth:`use_topology`), so a run without guidance uses every rank for patches.
    """

    def __init__(
        self,
        runtime: Runtime,
        config: PatchParallelConfig,
        dry_run_ranks: int | None = None,
        stats: CommStats | None = None,
    ):
        self.runtime = runtime
        self.config = config
        self.stats = stats if stats is not None else CommStats()
        self.layout: RowLayout | None = None
        self.step = 0
        self.lane = 0  # which micro-batch of the current UNet evaluation is running
        self._timestep: float | None = None  # the last evaluation's, to see a new schedule begin
        self._over = False  # set by start_over: the next evaluation begins a generation
        self._restorers: list[Callable[[], None]] = []  # what close() puts back besides the model's own swaps
        self._convs: list[Any] = []  # the band convolutions on this engine: their dilation shapes the exchanges
        self._dilations: tuple[Any, ...] = ()  # theirs at the last evaluation
        self._slots: list[StaleSlot] = []
        self._groups = self._build_groups(runtime, config, dry_run_ranks)
        self._topologies = {guidance: self._read_topology(guidance) for guidance in (False, True)}  # held for the run
        self.patch, self.cfg = self._groups[False]
        self.topology = self.topology_for(guidance=False)

    def _build_groups(
        self, runtime: Runtime, config: PatchParallelConfig, dry_run_ranks: int | None
    ) -> dict[bool, tuple[Communicator, Communicator | None]]:
        """The communicators of every topology this run may use, keyed by whether the guidance batch is split.

        Groups are created once, collectively (every rank, same order), before any UNet call.
        """
        if dry_run_ranks is not None:
            return {False: (DryRunCommunicator(range(dry_run_ranks), dry_run_ranks // 2, self.stats), None)}
        world, rank = runtime.world_size, runtime.rank
        if not runtime.distributed or world == 1:
            return {False: (Communicator([rank], 0, self.stats), None)}
        groups = {False: (Communicator(range(world), rank, self.stats, group=None), None)}
        split = Topology.for_run(world, cfg_parallel=config.cfg_parallel, guidance=True, rank=rank)
        if split.cfg_split:
            mesh = init_device_mesh(runtime.device.type, split.mesh_shape, mesh_dim_names=("cfg", "patch"))
            patch = Communicator(split.patch_group(), split.patch_index, self.stats, mesh.get_group("patch"))
            pair = [split.patch_index, split.patch_index + split.patch_ranks]
            groups[True] = (patch, Communicator(pair, split.cfg_index, self.stats, mesh.get_group("cfg")))
        return groups

    def topology_for(self, guidance: bool) -> Topology:
        """The topology of a call whose batch holds both guidance halves (``guidance``) or not."""
        return self._topologies[guidance]

    def _read_topology(self, guidance: bool) -> Topology:
        """The topology read off the communicators built for it (so a dry run's simulated ranks count like real
        ones)."""
        split = guidance and True in self._groups
        patch, cfg = self._groups[split]
        world, rank = patch.size * (cfg.size if cfg else 1), (cfg.index if cfg else 0) * patch.size + patch.index
        return Topology.for_run(world, cfg_parallel=split, guidance=split, rank=rank)

    def use_topology(self, batch: int) -> Topology:
        """Pick this UNet call's topology: an even batch (the guidance halves) on two rank groups when CFG
        parallelism is set up, else every rank a patch rank. Sets :attr:`patch` and :attr:`cfg` to match."""
        self.topology = self.topology_for(guidance=batch % 2 == 0)
        self.patch, self.cfg = self._groups[self.topology.cfg_split]
        return self.topology

    @property
    def naive(self) -> bool:
        return self.config.mode == "naive"

    @property
    def displaced(self) -> bool:
        """True when this step may use last step's exchanges: from step ``warmup_steps + 1`` on (steps
        ``0 … warmup_steps`` are the synchronous warm-up, as DistriFusion counts it)."""
        return self.config.mode == "displaced" and self.step > self.config.warmup_steps

    def add_conv(self, conv: Any) -> None:
        """A band convolution on this engine, whose dilation :meth:`begin_step` watches."""
        self._convs.append(conv)

    def new_slot(self) -> StaleSlot:
        slot = StaleSlot()
        self._slots.append(slot)
        return slot

    def begin_step(self, layout: RowLayout, timestep: Any = None) -> None:
        """Called at every denoiser evaluation with its ``timestep``; starts a new generation (:meth:`reset`)
        where one begins: after :meth:`start_over` (the pipeline's call began or ended), at another layout (another
        size), or at a timestep above the last one (a new schedule: a cascade stage, a loop of the caller's own).

        An equal timestep continues the generation: a step may evaluate the denoiser twice at one timestep (Heun).
        Other convolution dilations start one too (DemoFusion's dilated branch and its local one): the halos and
        the states of one cannot stand in for the other's.
        """
        now = _timestep_value(timestep)
        risen = now is not None and self._timestep is not None and now > self._timestep
        dilations = tuple(conv.dilation for conv in self._convs)
        if self._over or layout != self.layout or risen or dilations != self._dilations:
            self.reset()
        self.layout, self._timestep, self._over, self._dilations = layout, now, False, dilations

    def start_over(self) -> None:
        """The next denoiser evaluation starts a new generation (called as a parallelized pipeline's call begins
        and ends, :func:`distlin.parallel.pipeline.parallelize`)."""
        self._over = True

    def end_step(self) -> None:
        self.step += 1
        self.stats.steps += 1

    def reset(self) -> None:
        """Start a new generation: drain exchanges in flight and forget stale values, so displaced mode warms up
        again (:meth:`begin_step` calls it where a generation begins)."""
        for slot in self._slots:
            slot.clear()
        self.step = 0

    def on_close(self, restore: Callable[[], None]) -> None:
        """Have :meth:`close` call ``restore`` (a rewrite made outside the model, such as its pipeline's call)."""
        self._restorers.append(restore)

    def close(self) -> None:
        """Undo what :meth:`on_close` registered, last first, and forget stale values (a handle's ``undo()``)."""
        while self._restorers:
            self._restorers.pop()()
        self.reset()

    def exchange(self, slot: StaleSlot, kind: str, launch: Callable[[bool], Work]) -> Any:
        """The result of an exchange of ``kind``: synchronous, or, once displaced and when ``kind`` is stale,
        last step's result while this step's travels.

        ``launch(async_op)`` starts the exchange and returns its :class:`Work`. Results of a stale kind are
        kept in ``slot`` (warm-up steps included) so the first displaced step has something to reuse; other
        kinds keep nothing.
        """
        if not self.config.is_stale(kind):
            return launch(False).wait()
        stale = slot.latest(self.lane)
        if self.displaced and stale is not None:
            slot.launch(self.lane, launch(True))
            return stale
        fresh = launch(False).wait()
        slot.keep(self.lane, fresh)
        return fresh


def _timestep_value(timestep: Any) -> float | None:
    """The highest timestep of a denoiser call (a number, or a tensor of one per sample), or None without one
    (or on meta tensors, which hold no value: the dry runs and memory measurements)."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.max()) if timestep.numel() and not timestep.is_meta else None
    return float(timestep)
