"""What every cascade does between two stages: decode, upscale bicubically in pixel space, encode again.

The coder that decodes and encodes is the run's (:func:`distlin.vae.coders.run_coder`: band-parallel, or band by
band on rank 0 above the sequential-VAE threshold, per image size); without one, the plain VAE
(:class:`~distlin.vae.coders.PlainVAE`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distlin.sampling.stages import Stage
from distlin.vae.coders import Coder
from distlin.vae.latents import scaled, unscaled, vae_in_float32_if_needed


def upscaled_reference(pipe: Any, coder: Coder, latents: torch.Tensor, stage: Stage) -> torch.Tensor:
    """The previous stage's result at ``stage``'s size: decode, bicubic upscale in pixel space, encode (the
    posterior mean, so a cascade is deterministic given its seed); scaled latents in and out."""
    with vae_in_float32_if_needed(pipe.vae) as dtype:
        image = coder.decode(unscaled(latents.to(dtype), pipe.vae.config))
        return encoded(pipe, coder, image, stage).to(latents.dtype)


def encoded(pipe: Any, coder: Coder, image: torch.Tensor, stage: Stage) -> torch.Tensor:
    """Scaled latents of ``image`` (values in [-1, 1]) resized bicubically to ``stage``'s size: the posterior
    mean, so a cascade is deterministic given its seed; in the VAE's dtype."""
    with vae_in_float32_if_needed(pipe.vae) as dtype:
        image = F.interpolate(image.float(), size=(stage.height, stage.width), mode="bicubic", align_corners=False)
        return scaled(coder.encode(image.clamp(-1, 1).to(dtype)).mean, pipe.vae.config)


def stage_reference(
    pipe: Any, coder: Coder, index: int, stage: Stage, init_image: torch.Tensor | None, latents: torch.Tensor | None
) -> torch.Tensor:
    """What cascade stage ``index`` refines (SDEdit): the init image encoded at stage 0, else the previous stage's
    ``latents`` upscaled to ``stage``'s size."""
    if index == 0:
        return encoded(pipe, coder, init_image, stage)
    return upscaled_reference(pipe, coder, latents, stage)
