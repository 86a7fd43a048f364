"""Displaced mode: its warm-up, which exchanges go stale, how GroupNorm corrects stale moments, and conv_in."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from multirank import run_ranks

from distlin import LinFusion
from distlin.errors import UsageError
from distlin.models.tiny import build_pipeline
from distlin.parallel import ParallelContext, PatchParallelConfig, Runtime, parallelize
from distlin.parallel.config import STALE_KINDS
from distlin.parallel.conv import PatchConv2d
from distlin.parallel.groupnorm import corrected_moments, group_moments
from distlin.parallel.layout import RowLayout

RANKS = 3  # uneven bands (16, 16, 8 latent rows); the middle rank has neighbours on both sides
STEPS, WARMUP = 4, 1  # steps 0 and 1 synchronous, 2 and 3 displaced
EVERYTHING = frozenset(STALE_KINDS)
STALE_SETS = [frozenset(c) for r in range(1, len(STALE_KINDS) + 1) for c in itertools.combinations(STALE_KINDS, r)]


def displaced(stale: frozenset[str], warmup: int = WARMUP) -> PatchParallelConfig:
    return PatchParallelConfig("displaced", warmup_steps=warmup, cfg_parallel=False, stale=stale)


EXACT = PatchParallelConfig("exact", cfg_parallel=False)
RUNS: dict[str, PatchParallelConfig] = {
    "exact": EXACT,
    "warmup-covers-all-steps": displaced(EVERYTHING, warmup=STEPS - 1),
    "warmup-leaves-one-step": displaced(EVERYTHING, warmup=STEPS - 2),
    **{f"{'+'.join(sorted(s))}": displaced(s) for s in STALE_SETS},
    **{f"{'+'.join(sorted(s))} again": displaced(s) for s in STALE_SETS},
}


def _pipeline() -> Any:
    pipe = build_pipeline("tiny-sd15", seed=0)
    torch.manual_seed(1)
    LinFusion.construct_for(pipe, load_pretrained=False, init="random")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: Any) -> torch.Tensor:
    out = pipe(
        "a lighthouse on a cliff at dawn",
        height=320,
        width=192,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(2),
    )
    return out.images


def _halo_exchanging_convs(pipe: Any, handle: Any) -> list[str]:
    """Names of the convolutions during whose call this rank received halo rows (one exact step)."""
    exchanged: list[str] = []
    hooks = []
    for name, module in pipe.unet.named_modules():
        if isinstance(module, PatchConv2d):

            def before(module: Any, args: Any, name: str = name) -> None:
                module.calls_before = handle.ctx.stats.calls["halo"]

            def after(module: Any, args: Any, out: Any, name: str = name) -> None:
                if handle.ctx.stats.calls["halo"] > module.calls_before:
                    exchanged.append(name)

            hooks += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with torch.inference_mode():
            pipe.unet(**_unet_inputs(pipe))
    finally:
        for hook in hooks:
            hook.remove()
    return sorted(set(exchanged))


def _unet_inputs(pipe: Any) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "sample": torch.randn(2, 4, 40, 24, generator=generator),
        "timestep": torch.tensor(999),
        "encoder_hidden_states": torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=generator),
    }


def displaced_job(runtime: Runtime) -> dict[str, Any]:
    """Every run of :data:`RUNS` on this rank, plus which convs exchanged halos in one exact UNet step."""
    pipe = _pipeline()
    latents = {}
    for name, config in RUNS.items():
        handle = parallelize(pipe, config, runtime)
        try:
            latents[name] = _generate(pipe)
        finally:
            handle.undo()
    handle = parallelize(pipe, EXACT, runtime)
    try:
        exchanging = _halo_exchanging_convs(pipe, handle)
    finally:
        handle.undo()
    spatial = sorted(n for n, m in pipe.unet.named_modules() if type(m) is torch.nn.Conv2d and m.kernel_size != (1, 1))
    return {"latents": latents, "exchanging": exchanging, "spatial": spatial}


@pytest.fixture(scope="module")
def one_device() -> torch.Tensor:
    return _generate(_pipeline())


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(RANKS, displaced_job)


def _error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((latents - reference) ** 2).mean())


def test_warmup_w_runs_w_plus_one_synchronous_steps() -> None:
    """As DistriFusion counts it: steps 0..W are synchronous, step W + 1 is the first displaced one."""
    ctx = ParallelContext(Runtime(), displaced(EVERYTHING, warmup=2))
    layout = RowLayout(40, 24, 8, 1)
    schedule = []
    for _ in range(5):
        ctx.begin_step(layout)
        schedule.append(ctx.displaced)
        ctx.end_step()
    assert schedule == [False, False, False, True, True]


def test_a_rising_timestep_starts_a_generation_and_an_equal_one_continues_it() -> None:
    """A new schedule (the next call, a cascade stage) warms up again; a second evaluation at one timestep (Heun)
    stays in its generation."""
    ctx = ParallelContext(Runtime(), displaced(EVERYTHING, warmup=0))
    layout = RowLayout(40, 24, 8, 1)
    schedule = []
    for timestep in [999, 666, 666, 333, 999, 500]:
        ctx.begin_step(layout, torch.tensor(timestep))
        schedule.append(ctx.displaced)
        ctx.end_step()
    assert schedule == [False, True, True, True, False, True]


def test_dilating_the_convolutions_starts_a_generation() -> None:
    """DemoFusion's dilated and local branches at one timestep: neither reuses the other's exchanges."""
    ctx = ParallelContext(Runtime(), displaced(EVERYTHING, warmup=0))
    conv = PatchConv2d.from_conv(torch.nn.Conv2d(4, 4, 3, padding=1), ctx)
    layout = RowLayout(40, 24, 8, 1)
    schedule = []
    for dilation in [1, 1, 2, 2, 1]:
        conv.dilation = (dilation, dilation)
        ctx.begin_step(layout, 500)
        schedule.append(ctx.displaced)
        ctx.end_step()
    assert schedule == [False, True, False, True, False]


def test_every_call_of_a_parallelized_pipeline_starts_a_generation_until_undo() -> None:
    pipe = _pipeline()
    cls = type(pipe)
    handle = parallelize(pipe, displaced(EVERYTHING, warmup=0), Runtime())
    assert type(pipe).__name__ == cls.__name__ and isinstance(pipe, cls)
    handle.ctx.begin_step(RowLayout(40, 24, 8, 1), 1)
    handle.ctx.end_step()
    steps = []
    pipe.unet.register_forward_pre_hook(lambda module, args: steps.append(handle.ctx.step))
    pipe("a cube", height=64, width=64, num_inference_steps=1, output_type="latent")  # timestep 999 > 1, step 0 too
    pipe("a cube", height=64, width=64, num_inference_steps=1, output_type="latent")  # the same timestep: step 0
    assert steps == [0, 0]
    handle.undo()
    assert type(pipe) is cls


def test_a_warmup_covering_every_step_equals_one_device(ranks, one_device) -> None:
    out = ranks[0]["latents"]
    assert _error(out["warmup-covers-all-steps"], one_device) <= 1e-10
    assert _error(out["warmup-leaves-one-step"], one_device) > 1e-8


def test_conv_in_reads_the_whole_latent_and_exchanges_nothing(ranks) -> None:
    """The middle band receives halo rows for every spatial convolution except conv_in."""
    middle = ranks[1]
    assert "conv_in" in middle["spatial"]
    assert middle["exchanging"] == [name for name in middle["spatial"] if name != "conv_in"]


def test_every_rank_ends_with_the_same_latents(ranks) -> None:
    for other in ranks[1:]:
        for name, latents in ranks[0]["latents"].items():
            assert torch.equal(latents, other["latents"][name]), name


@pytest.mark.parametrize("stale", STALE_SETS, ids=lambda s: "+".join(sorted(s)))
def test_each_stale_set_is_deterministic_for_a_given_n_and_seed(ranks, stale) -> None:
    name = "+".join(sorted(stale))
    out = ranks[0]["latents"]
    assert torch.equal(out[name], out[f"{name} again"])


@pytest.mark.parametrize("stale", [s for s in STALE_SETS if s != EVERYTHING], ids=lambda s: "+".join(sorted(s)))
def test_fewer_stale_exchanges_are_strictly_closer_to_one_device(ranks, one_device, stale) -> None:
    out = ranks[0]["latents"]
    error = _error(out["+".join(sorted(stale))], one_device)
    assert 0 < error < _error(out["+".join(sorted(EVERYTHING))], one_device)


def test_stale_moments_move_by_this_bands_whole_change() -> None:
    """DistriFusion's correction: last step's global mean and mean square, each moved by this band's full change
    since then (as if every band changed alike), not by its 1/N share of the sums."""

    def moments(count: float, mean: float, square: float) -> torch.Tensor:
        return torch.tensor([[[count, count * mean, count * square]]], dtype=torch.float64)

    stale_total, stale_band, band = moments(100, 1.0, 3.0), moments(25, 2.0, 5.0), moments(25, 2.5, 6.0)
    torch.testing.assert_close(corrected_moments(stale_band, stale_total, band), moments(100, 1.5, 4.0))


def test_corrected_moments_equal_fresh_ones_when_every_band_changes_alike() -> None:
    torch.manual_seed(0)
    before = torch.randn(2, 8, 30, 6)
    bands = [slice(0, 10), slice(10, 30)]  # unequal bands with the same per-group mean and mean square
    before[:, :, bands[1]] = torch.cat([before[:, :, bands[0]]] * 2, dim=2)
    after = 1.7 * before + 0.3
    for rows in bands:
        estimate = corrected_moments(
            group_moments(before[:, :, rows], 4), group_moments(before, 4), group_moments(after[:, :, rows], 4)
        )
        # the moments are float32-accurate (float64 only to add up over bands): float32's tolerance
        torch.testing.assert_close(estimate, group_moments(after, 4), rtol=1.3e-6, atol=1e-5)


def test_corrected_moments_never_give_a_negative_variance() -> None:
    """A band whose mean moved far while the image's spread was small falls back to its own variance."""
    total = torch.tensor([[[100.0, 0.0, 1.0]]], dtype=torch.float64)  # mean 0, variance 0.01
    stale_band = torch.tensor([[[50.0, 0.0, 0.5]]], dtype=torch.float64)
    band = torch.tensor([[[50.0, 50.0, 50.5]]], dtype=torch.float64)  # mean 1, variance 0.01
    count, total_sum, squares = corrected_moments(stale_band, total, band)[0, 0]
    mean = total_sum / count
    assert squares / count - mean * mean == pytest.approx(0.01)


def test_stale_names_are_checked() -> None:
    assert displaced(frozenset({"halo"})).stale == {"halo"}
    assert PatchParallelConfig(stale="all").stale == EVERYTHING
    assert PatchParallelConfig(stale="none").stale == frozenset()
    assert PatchParallelConfig(stale="groupnorm, halo").stale == {"groupnorm", "halo"}
    with pytest.raises(UsageError, match="unknown stale exchange 'kv'.*attention, groupnorm, halo"):
        PatchParallelConfig(stale={"kv", "halo"})
