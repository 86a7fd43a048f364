"""What a VAE's config says about its latents, in one place: how the denoiser's (scaled) latents map to the VAE's
own and back, and that the SDXL VAE runs in float32 (it overflows in float16). The final decode and the decode,
upscale and encode between cascade stages both go through these."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _per_channel(config: Mapping[str, Any], latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The config's per-channel latent mean and std (SDXL-style VAEs that set them), shaped for ``latents``."""
    if config.get("latents_mean") is None or config.get("latents_std") is None:
        return None
    mean = torch.tensor(config["latents_mean"]).view(1, -1, 1, 1).to(latents)
    return mean, torch.tensor(config["latents_std"]).view(1, -1, 1, 1).to(latents)


def unscaled(latents: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    """The VAE's latents from the denoiser's: undo the scaling factor, and the shift or the per-channel mean/std."""
    moments = _per_channel(config, latents)
    if moments is not None:
        mean, std = moments
        return latents * std / config["scaling_factor"] + mean
    return latents / config["scaling_factor"] + (config.get("shift_factor") or 0.0)


def scaled(latents: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    """The denoiser's latents from the VAE's: the inverse of :func:`unscaled`."""
    moments = _per_channel(config, latents)
    if moments is not None:
        mean, std = moments
        return (latents - mean) * config["scaling_factor"] / std
    return (latents - (config.get("shift_factor") or 0.0)) * config["scaling_factor"]


def needs_float32(vae: nn.Module) -> bool:
    """A float16 VAE whose config asks to run in float32 (``force_upcast``: SDXL's overflows in float16)."""
    return vae.dtype == torch.float16 and bool(vae.config.get("force_upcast", False))


@contextmanager
def vae_in_float32_if_needed(vae: nn.Module) -> Iterator[torch.dtype]:
    """The VAE in float32 meanwhile where :func:`needs_float32`; yields the dtype its inputs take."""
    upcast = needs_float32(vae)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        yield vae.dtype
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
