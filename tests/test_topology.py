"""One rule for who shares the latent rows: the planner sizes exactly the bands the engine runs, for every world
size, with guidance on or off and CFG parallelism on or off (guidance off: every rank takes a band)."""

from __future__ import annotations

import pytest
from multirank import run_ranks
from parallel_jobs import band_tokens

from distlin.memory.planner import plan
from distlin.parallel.topology import Topology

HEIGHT, WIDTH = 384, 128  # latent 48 x 16: six 8-row units, so 2 and 4 ranks (and 2 per guidance half) split it


@pytest.mark.parametrize("world", [2, 4])  # odd sizes never split the guidance batch: the test below
def test_planner_band_equals_engine_band(world: int) -> None:
    engine = run_ranks(world, band_tokens, HEIGHT, WIDTH)
    for guidance in (True, False):
        for cfg_parallel in (True, False):
            planned = plan("tiny-sd15", HEIGHT, WIDTH, world, dtype="float32", cfg=guidance, cfg_parallel=cfg_parallel)
            tallest = max(rank[(guidance, cfg_parallel)] for rank in engine)
            assert planned["unet_band_tokens"] == tallest, (guidance, cfg_parallel)


@pytest.mark.parametrize("world", range(1, 9))
def test_guidance_off_makes_every_rank_a_patch_rank(world: int) -> None:
    for cfg_parallel in (True, False):
        assert Topology.for_run(world, cfg_parallel=cfg_parallel, guidance=False).patch_ranks == world
    split = Topology.for_run(world, cfg_parallel=True, guidance=True)
    assert split.patch_ranks == (world // 2 if world % 2 == 0 and world > 1 else world)
    sides = range(split.cfg_size)
    groups = [Topology(world, split.cfg_split, side * split.patch_ranks).patch_group() for side in sides]
    assert sorted(rank for group in groups for rank in group) == list(range(world))
