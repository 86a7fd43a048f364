"""How the denoiser's latents map to a VAE's own and back, read from the VAE's config in one place (the final
decode and the cascade's decode-upscale-encode both use it)."""

from __future__ import annotations

import pytest
import torch

from distlin.models.tiny import build_pipeline
from distlin.vae.latents import scaled, unscaled, vae_in_float32_if_needed

CONFIGS = {
    "scaling (SD)": {"scaling_factor": 0.18215},
    "scaling and shift": {"scaling_factor": 0.5, "shift_factor": 0.1},
    "scaling, per-channel mean and std": {
        "scaling_factor": 0.5,
        "latents_mean": [0.1, -0.2, 0.3, 0.0],
        "latents_std": [1.5, 0.5, 2.0, 1.0],
    },
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=list(CONFIGS))
def test_scaling_undoes_unscaling(config: dict) -> None:
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scaled(unscaled(latents, config), config), latents)


def test_a_plain_scaling_factor_divides_as_diffusers_does() -> None:
    latents = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(unscaled(latents, CONFIGS["scaling (SD)"]), latents / 0.18215)


def test_a_float16_vae_that_asks_runs_in_float32_meanwhile_and_returns_to_float16() -> None:
    vae = build_pipeline("tiny-sd15").vae.to(torch.float16)
    vae.register_to_config(force_upcast=True)
    with vae_in_float32_if_needed(vae) as dtype:
        assert dtype == vae.dtype == torch.float32
    assert vae.dtype == torch.float16
