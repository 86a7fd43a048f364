"""Band-parallel VAE, chunked execution and the SDEdit cascade equal their plain single-device versions."""

from __future__ import annotations

import pytest
import torch
from multirank import run_ranks

from distlin import LinFusion
from distlin.lean import bound_memory
from distlin.lean.feedforward import enable_ff_chunking
from distlin.lean.transformer import ChunkedTransformer2D
from distlin.models.tiny import build_pipeline, build_unet
from distlin.ops.index_safe import conv2d_rows
from distlin.parallel import PatchParallelConfig, Runtime, parallelize
from distlin.presets import load_preset
from distlin.sampling.sdedit import run_sdedit
from distlin.sampling.stages import Stage, cascade_stages
from distlin.vae.parallel import parallelize_vae

LATENT_H, LATENT_W = 7, 6  # 3 ranks get uneven 1-row-unit bands (3, 2, 2)
STAGES = [Stage(128, 64), Stage(192, 96, 0.5), Stage(256, 128, 0.3)]  # 16 latent rows: 2 bands of 8


def _vae_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.randn(1, 4, LATENT_H, LATENT_W, generator=torch.Generator().manual_seed(0))
    image = torch.rand(1, 3, 8 * LATENT_H, 8 * LATENT_W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return z, image


def vae_errors(runtime: Runtime) -> tuple[float, float]:
    """Max abs difference of band-parallel decode and encode (mean) from the plain tiny-sd15 VAE."""
    vae = build_pipeline("tiny-sd15").vae
    z, image = _vae_inputs()
    with torch.no_grad():
        decoded, encoded = vae.decode(z).sample, vae.encode(image).latent_dist.mean
    banded = parallelize_vae(vae, runtime, query_chunk=5)  # several query chunks, one straddling bands
    return (banded.decode(z) - decoded).abs().max().item(), (banded.encode(image).mean - encoded).abs().max().item()


def cascade(runtime: Runtime) -> torch.Tensor:
    pipe = build_pipeline("tiny-sd15", seed=0)
    torch.manual_seed(1)
    LinFusion.construct_for(pipe, load_pretrained=False, init="random")
    parallelize(pipe, PatchParallelConfig(cfg_parallel=False), runtime)
    vae = parallelize_vae(pipe.vae, runtime)
    return run_sdedit(pipe, "a castle", STAGES, steps=4, seed=3, vae=vae)


def two_rank_job(runtime: Runtime) -> tuple[tuple[float, float], torch.Tensor]:
    torch.set_num_threads(1)
    return vae_errors(runtime), cascade(runtime)


@pytest.fixture(scope="module")
def single() -> tuple[tuple[float, float], torch.Tensor]:
    return two_rank_job(Runtime())


@pytest.fixture(scope="module")
def two_ranks() -> tuple[tuple[float, float], torch.Tensor]:
    return run_ranks(2, two_rank_job)[0]


def test_vae_one_rank_is_plain(single) -> None:
    assert max(single[0]) <= 1e-4


def test_vae_bands_equal_plain_on_two_and_three_ranks(two_ranks) -> None:
    assert max(two_ranks[0]) <= 1e-4
    assert max(run_ranks(3, vae_errors)[0]) <= 1e-4


def test_diffusers_tiling_differs_where_bands_do_not(single) -> None:
    vae = build_pipeline("tiny-sd15").vae
    z, _ = _vae_inputs()
    with torch.no_grad():
        plain = vae.decode(z).sample
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 32, 4, 0.25
        tiled = vae.decode(z).sample
    assert (tiled - plain).abs().max().item() > 100 * max(single[0][0], 1e-6)


def test_cascade_reaches_final_size_and_two_ranks_equal_one(single, two_ranks) -> None:
    latents = single[1]
    assert latents.shape == (1, 4, 256 // 8, 128 // 8) and torch.isfinite(latents).all()
    torch.testing.assert_close(two_ranks[1], latents, atol=1e-3, rtol=0)  # three stages of fp32 sums


def test_presets_give_cascade_stages() -> None:
    stages = list(cascade_stages(load_preset("sd15-16k")))
    assert [(s.height, s.width) for s in stages][-1] == (8192, 16384)
    assert [s.strength for s in stages[1:]] == [0.4, 0.3, 0.2, 0.1]
    assert list(cascade_stages(load_preset("sd15-16k-square")))[-1] == Stage(16384, 16384, 0.1)


def test_chunked_feed_forward_equals_unchunked() -> None:
    unet = build_unet("tiny-sd15")
    sample, context = torch.randn(1, 4, 16, 12), torch.randn(1, 77, 32)
    with torch.no_grad():
        plain = unet(sample, 10, context).sample
        assert enable_ff_chunking(unet, 37) > 0  # 37 divides no level's token count
        chunked = unet(sample, 10, context).sample
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])  # conv proj_in/out; linear projections, 2 blocks
def test_token_chunked_transformers_equal_whole_ones(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    unet = build_unet(name)
    LinFusion.construct_for(unet=unet, load_pretrained=False, init="random")
    config = unet.config
    sample, context = torch.randn(2, 4, 48, 32), torch.randn(2, 77, config.cross_attention_dim)  # >= 96 tokens a level
    kwargs = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled), "time_ids": torch.randn(2, 6)}
    calls, sizes = [], []
    original = ChunkedTransformer2D._forward_chunked

    def counted(self: ChunkedTransformer2D, *args: torch.Tensor) -> torch.Tensor:
        calls.append(self)
        return original(self, *args)

    monkeypatch.setattr(ChunkedTransformer2D, "_forward_chunked", counted)
    with torch.no_grad():
        plain = unet(sample, 10, context, **kwargs).sample
        bound_memory(unet, 37)  # 37 divides no level's token count
        for module in unet.modules():
            if isinstance(module, ChunkedTransformer2D):
                module.register_forward_pre_hook(lambda _, args: sizes.append(args[0][0, 0].numel()))
        chunked = unet(sample, 10, context, **kwargs).sample
    assert len(calls) == sum(n > 37 for n in sizes) > 0  # every transformer above the chunk ran chunked
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"), [(3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (1, 1, 0, 1)]
)
def test_row_chunked_conv_equals_conv(kernel: int, stride: int, padding: int, dilation: int) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 6, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 5, 23, 9)
    with torch.no_grad():
        torch.testing.assert_close(conv2d_rows(x, conv.weight, conv.bias, stride, padding, dilation, rows=4), conv(x))
