"""What every cascade does between two stages: decode, upscale bicubically in pixel space, encode again.

With several ranks the band-parallel VAE (:class:`~distlin.vae.parallel.ParallelVAE`) does the decoding and
encoding, exactly and without seams; one rank uses the plain VAE (:class:`PlainVAE`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distlin.sampling.stages import Stage
from distlin.vae.parallel import ParallelVAE


class PlainVAE:
    """The decode/encode interface of :class:`ParallelVAE` on an unparallelized VAE."""

    def __init__(self, vae: Any):
        self.vae = vae

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> Any:
        return self.vae.encode(image).latent_dist




Coder = ParallelVAE | PlainVAE


@contextmanager
def vae_in_float32_if_needed(vae: nn.Module) -> Iterator[torch.dtype]:
    """SDXL's VAE overflows in float16 (``force_upcast``): run it in float32 between stages."""
    upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        yield vae.dtype
    finally:
        if upcast:
            vae.to(dtype=torch.float16)


def upscaled_reference(pipe: Any, coder: Coder, latents: torch.Tensor, stage: Stage) -> torch.Tensor:
    """The previous stage's result at ``stage``'s size: decode, bicubic upscale in pixel space, encode (the
    posterior mean, so a cascade is deterministic given its seed); scaled latents in and out."""
    with vae_in_float32_if_needed(pipe.vae) as dtype:
        image = coder.decode(latents.to(dtype) / pipe.vae.config.scaling_factor)
        return encoded(pipe, coder, image, stage).to(latents.dtype)


def encoded(pipe: Any, coder: Coder, image: torch.Tensor, stage: Stage) -> torch.Tensor:
    """Scaled latents of ``image`` (values in [-1, 1]) resized bicubically to ``stage``'s size: the posterior
    mean, so a cascade is deterministic given its seed; in the VAE's dtype."""
    with vae_in_float32_if_needed(pipe.vae) as dtype:
        image = F.interpolate(image.float(), size=(stage.height, stage.width), mode="bicubic", align_corners=False)
        return coder.encode(image.clamp(-1, 1).to(dtype)).mean * pipe.vae.config.scaling_factor
