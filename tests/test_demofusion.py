"""SDXL DemoFusion cascade on tiny-sdxl: end to end, 2 ranks equal 1, dilation restores, weights follow the formula."""

from __future__ import annotations

import math

import pytest
import torch
from multirank import run_ranks

from distlin import LinFusion
from distlin.errors import UsageError
from distlin.models.tiny import build_pipeline, build_unet
from distlin.parallel import PatchParallelConfig, Runtime, parallelize, parallelize_unet
from distlin.parallel.conv import PatchConv2d
from distlin.presets import load_preset
from distlin.sampling.demofusion import demofusion_weights, dilated_convs, run_demofusion, upscale_strengths
from distlin.sampling.stages import Stage, cascade_stages
from distlin.vae.parallel import parallelize_vae

STAGES = [Stage(64, 64), Stage(128, 128, 0.75)]  # latent 16 rows at stage 1: bands of 8, 2 rows at the deepest level


def _unet_inputs() -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(5)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    kwargs = {
        "encoder_hidden_states": torch.randn(2, 77, 64, generator=g),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.rand(2, 6) * 128},
    }
    return sample, kwargs


def job(runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Final latents of the cascade and one UNet output with convs dilated x2, parallelized over ``runtime``."""
    torch.set_num_threads(1)
    pipe = build_pipeline("tiny-sdxl", seed=0)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(1)
    LinFusion.construct_for(pipe, load_pretrained=False, init="random")
    handle = parallelize(pipe, PatchParallelConfig(cfg_parallel=False), runtime)
    vae = parallelize_vae(pipe.vae, runtime)
    latents = run_demofusion(pipe, "a castle", STAGES, steps=4, seed=3, vae=vae, handle=handle)
    sample, kwargs = _unet_inputs()
    with torch.no_grad(), dilated_convs(pipe.unet, 2):
        dilated = pipe.unet(sample, 500, **kwargs).sample
    return latents, dilated


@pytest.fixture(scope="module")
def single() -> tuple[torch.Tensor, torch.Tensor]:
    return job(Runtime())


def test_one_rank_runs_end_to_end(single) -> None:
    latents = single[0]
    assert latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()


def test_two_ranks_equal_one(single) -> None:
    two = run_ranks(2, job)[0]
    for got, want in zip(two, single, strict=True):
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_dilation_context_restores_every_conv_exactly() -> None:
    unet = build_unet("tiny-sdxl")
    parallelize_unet(unet)  # one rank: its convs become PatchConv2d, which carry pad_top
    sample, kwargs = _unet_inputs()

    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]

    def geometry() -> list[tuple]:
        return [(m.dilation, m.padding, getattr(m, "pad_top", None)) for m in convs]

    state = {k: v.clone() for k, v in unet.state_dict().items()}
    before_geometry = geometry()
    with torch.no_grad():
        before = unet(sample, 500, **kwargs).sample
        with dilated_convs(unet, 3):
            patched = [m for m in convs if isinstance(m, PatchConv2d) and m.kernel_size == (3, 3)]  # all with padding 1
            assert patched and all(m.dilation == m.padding == (3, 3) and m.pad_top == 3 for m in patched)
            assert all(m.dilation == (1, 1) and m.padding == (0, 0) for m in convs if m.kernel_size == (1, 1))
            dilated = unet(sample, 500, **kwargs).sample
        with pytest.raises(RuntimeError, match="inside"), dilated_convs(unet, 2):
            raise RuntimeError("inside")
        after = unet(sample, 500, **kwargs).sample
    assert dilated.shape == before.shape and not torch.allclose(dilated, before)
    assert geometry() == before_geometry
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    assert torch.equal(after, before)


@pytest.mark.parametrize("t", [1000, 999, 750, 500, 250, 1])
def test_weights_follow_the_cosine_formula(t: int) -> None:
    cos_f = 0.5 * (1 + math.cos(math.pi * (1000 - t) / 1000))
    w = demofusion_weights(t, 1000)
    assert w.cos_f == pytest.approx(cos_f, abs=1e-12)
    assert (w.c1, w.c2) == (pytest.approx(cos_f**3, abs=1e-12), pytest.approx(cos_f, abs=1e-12))
    assert demofusion_weights(500).cos_f == pytest.approx(0.5) and demofusion_weights(1000).c1 == 1.0


def test_sdxl_preset_stages_double_with_linfusion_strengths() -> None:
    stages = list(cascade_stages(load_preset("sdxl-16k")))
    assert [(s.height, s.width) for s in stages] == [(512 * 2**k, 1024 * 2**k) for k in range(5)]
    assert [s.strength for s in stages[1:]] == upscale_strengths(4) == [0.32, 0.24, 0.16, 0.08]
    assert [int(50 * s.strength) for s in stages[1:]] == [16, 12, 8, 4]


def test_stages_must_be_integer_multiples_of_the_native_size() -> None:
    pipe = build_pipeline("tiny-sdxl")
    with pytest.raises(UsageError, match="integer multiple"):
        run_demofusion(pipe, "x", [Stage(64, 64), Stage(96, 96, 0.5)], steps=2)
