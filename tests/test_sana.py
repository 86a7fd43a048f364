"""SANA through the model-family seam: its transformer on row bands equals one process, and each layer's
exchange is one linear-attention state whose size does not grow with the image."""

from __future__ import annotations

import pytest
import torch
from diffusers import SanaTransformer2DModel
from multirank import run_ranks

from distlin.families import FAMILIES, family_of_pipeline
from distlin.parallel.config import PatchParallelConfig

# patch size 2 with a sin-cos positional embedding: every band cuts whole patches and takes its rows of it.
CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "num_layers": 2,
    "num_cross_attention_heads": 2,
    "cross_attention_head_dim": 8,
    "cross_attention_dim": 16,
    "caption_channels": 16,
    "sample_size": 16,
    "patch_size": 2,
    "interpolation_scale": 1,
}
# latent rows x columns: the model's native grid (its cached positional embedding) and another (recomputed)
SIZES = [(16, 16), (12, 20)]
STEPS = 3


def transformer() -> SanaTransformer2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return SanaTransformer2DModel.from_config(CONFIG).eval()


def inputs(height: int, width: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 4, height, width, generator=generator),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=generator),
        "timestep": torch.tensor([500.0, 500.0]),
    }


def on_ranks(runtime, mode: str) -> list:
    from distlin.families.sana.transformer import parallelize_transformer

    model = transformer()
    handle = parallelize_transformer(model, PatchParallelConfig(mode=mode, warmup_steps=1), runtime)
    results = []
    with torch.no_grad():
        for height, width in SIZES:
            handle.ctx.reset()
            handle.ctx.stats.reset()
            outputs = [model(**inputs(height, width)).sample for _ in range(STEPS)]
            results.append((outputs, handle.ctx.stats.summary()["bytes_per_step"]))
    handle.undo()
    return results


@pytest.fixture(scope="module")
def three_ranks() -> list:
    return run_ranks(3, on_ranks, "exact")[0]


def test_sana_pipelines_find_their_family() -> None:
    pipe = type("SanaPipeline", (), {})()
    assert family_of_pipeline(pipe) is FAMILIES["sana"]
    assert family_of_pipeline(type("StableDiffusionPipeline", (), {})()) is FAMILIES["sd"]


def test_transformer_on_three_ranks_equals_one_process(three_ranks) -> None:
    model = transformer()
    for (height, width), (outputs, _) in zip(SIZES, three_ranks, strict=True):
        with torch.no_grad():
            reference = model(**inputs(height, width)).sample
        for output in outputs:
            torch.testing.assert_close(output, reference, rtol=0, atol=2e-6)


def test_attention_bytes_do_not_grow_with_the_image(three_ranks) -> None:
    (_, small), (_, large) = three_ranks
    # per layer and step: B * h * (d + 1) * d float32 (2 layers, batch 2, 2 heads of 8)
    assert small["attention"] == large["attention"] == 2 * 2 * 2 * 9 * 8 * 4
    assert large["halo"] > small["halo"]  # the Mix-FFN conv's halo rows grow with the width
