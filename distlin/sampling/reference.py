"""What every cascade does between two stages: decode, upscale bicubically in pixel space, encode again.

With several ranks the band-parallel VAE (:class:`~distlin.vae.parallel.ParallelVAE`) does the decoding and
encoding, exactly and without seams; one rank uses the plain VAE (:class:`PlainVAE`). Images above the run's
sequential-VAE threshold go band by band through host RAM on rank 0 instead (:class:`SequentialVAE`, chosen per
size by :class:`SizedCoder`): at 16K the encoder's full-resolution maps fit no GPU either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from distlin.parallel.runtime import Runtime
from distlin.parallel.topology import LATENT_FACTOR
from distlin.sampling.stages import Stage
from distlin.vae.latents import scaled, unscaled, vae_in_float32_if_needed
from distlin.vae.parallel import ParallelVAE
from distlin.vae.sequential import decode_sequential, encode_sequential

TransferReport = Callable[[str, int, float], None]  # (what, bytes moved, seconds)


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


class SequentialVAE:
    """The decode/encode interface band by band through host RAM (:mod:`distlin.vae.sequential`) on rank 0
    alone, so no device holds a full-resolution activation.

    The image stays in host RAM (upscaled there between stages, then encoded band by band from it). Other
    ranks compute nothing: their decoded image is a ``meta`` placeholder of the right shape (the bicubic
    upscale between stages costs nothing on it), and they receive the posterior rank 0 encodes, one broadcast of
    latent size. ``options`` are :func:`~distlin.vae.sequential.decode_sequential`'s keyword arguments as
    :func:`~distlin.memory.planner.sequential_vae_settings` gives them; ``on_done`` (rank 0) gets each pass's
    bytes moved and seconds.
    """

    def __init__(
        self,
        vae: Any,
        runtime: Runtime,
        options: dict[str, Any],
        on_done: TransferReport | None = None,
        store: torch.device | str = "cpu",
    ):
        self.vae, self.runtime, self.options, self.on_done, self.store = vae, runtime, options, on_done, store

    def _report(self, what: str) -> Callable[[int, float], None] | None:
        on_done = self.on_done
        return None if on_done is None else lambda moved, seconds: on_done(what, moved, seconds)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        batch, _, rows, cols = latents.shape
        if not self.runtime.is_main:
            shape = (batch, self.vae.config.out_channels, rows * LATENT_FACTOR, cols * LATENT_FACTOR)
            return torch.empty(shape, device="meta", dtype=latents.dtype)
        return decode_sequential(self.vae, latents, store=self.store, on_done=self._report("decoded"), **self.options)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> DiagonalGaussianDistribution:
        if self.runtime.is_main:
            report = self._report("encoded")
            posterior = encode_sequential(self.vae, image, store=self.store, on_done=report, **self.options)
            moments = posterior.parameters.contiguous()  # a collective sends the storage as it lies in memory
        else:
            batch, _, height, width = image.shape
            channels = 2 * self.vae.config.latent_channels
            shape = (batch, channels, height // LATENT_FACTOR, width // LATENT_FACTOR)
            moments = torch.empty(shape, device=self.runtime.device, dtype=self.vae.dtype)
        if self.runtime.distributed:
            dist.broadcast(moments, src=0)
        return DiagonalGaussianDistribution(moments)


class SizedCoder:
    """A run's coder between cascade stages: the direct one (band-parallel or plain), or :class:`SequentialVAE`
    for images that ``is_large(height, width)`` in pixels (the run's sequential-VAE rule, the decode's)."""

    def __init__(
        self,
        direct: ParallelVAE | PlainVAE,
        sequential: SequentialVAE,
        is_large: Callable[[int, int], bool],
        factor: int = LATENT_FACTOR,  # image pixels per latent pixel (the model family's)
    ):
        self.direct, self.sequential, self.is_large, self.factor = direct, sequential, is_large, factor

    def _for(self, height: int, width: int) -> ParallelVAE | PlainVAE | SequentialVAE:
        return self.sequential if self.is_large(height, width) else self.direct

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        rows, cols = latents.shape[-2:]
        return self._for(rows * self.factor, cols * self.factor).decode(latents)

    def encode(self, image: torch.Tensor) -> DiagonalGaussianDistribution:
        return self._for(*image.shape[-2:]).encode(image)


Coder = ParallelVAE | PlainVAE | SequentialVAE | SizedCoder


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
