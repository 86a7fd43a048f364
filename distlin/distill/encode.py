"""UNet inputs from images and captions, with the pipeline's frozen VAE and text encoders.

SD-1.x/2.x condition on the text encoder's hidden states; SDXL adds the pooled embedding of ``text_encoder_2``
and the micro-conditioning time ids, passed as ``added_cond_kwargs``. ``pipe.encode_prompt`` chooses the right
hidden layer for each family, so training sees the same conditioning as sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distlin.loading import load_pipeline

# Built-in models draw their weights from this seed (as launch/generate.py does), so checkpoints fit them.
WEIGHTS_SEED = 0


def load_frozen_pipeline(model: str, device: torch.device) -> Any:
    """The pipeline whose VAE, text encoders and UNet stay frozen, in float32 (autocast handles mixed precision;
    float32 weights keep the mounted LinFusion layers, which take the UNet's dtype, in float32 for AdamW)."""
    return load_pipeline(model, torch.float32, device, WEIGHTS_SEED)


@dataclass
class Conditioning:
    """Clean latents and the conditioning of one batch; ``pooled`` and ``time_ids`` matter for SDXL only."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def added_cond_kwargs(self) -> dict[str, torch.Tensor] | None:
        if self.pooled is None:
            return None
        return {"text_embeds": self.pooled, "time_ids": self.time_ids}


def needs_added_conditioning(unet: nn.Module) -> bool:
    """SDXL-style UNets take pooled text embeddings and time ids besides the hidden states."""
    return unet.config.get("addition_embed_type") == "text_time"


def predict(unet: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The UNet's prediction (epsilon, v or sample, as the model was trained) for a noised batch."""
    return unet(
        noisy,
        timesteps,
        encoder_hidden_states=cond.prompt_embeds,
        added_cond_kwargs=cond.added_cond_kwargs(),
        return_dict=False,
    )[0]


class Encoders:
    """The pipeline's frozen VAE and text encoders, in float32 and called outside autocast.

    float32 because the SDXL VAE overflows in float16; the encoders cost little next to two UNet passes, and
    ``launch/distill.py cache`` removes them from training altogether.
    """

    def __init__(self, pipe: Any, device: torch.device):
        self.pipe = pipe
        self.device = device
        self.sdxl = needs_added_conditioning(pipe.unet)

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """The posterior mean, scaled as the UNet expects.

        The mean, not a sample: it keeps the cache to one tensor per image and makes training deterministic;
        the SD VAEs' posterior standard deviation is tiny next to the latents' spread.
        """
        vae = self.pipe.vae
        mean = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean
        config = vae.config
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            shift = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(mean)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(mean)
            return (mean - shift) * config.scaling_factor / std
        return (mean - (config.get("shift_factor") or 0.0)) * config.scaling_factor

    @torch.no_grad()
    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states for cross-attention, and SDXL's pooled embedding (None for SD-1.x/2.x)."""
        out = self.pipe.encode_prompt(
            prompt=list(captions), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return out[0], (out[2] if self.sdxl else None)

    def encode(self, batch: dict[str, Any]) -> Conditioning:
        """A data batch of pixels, captions and time ids as UNet inputs on the device."""
        embeds, pooled = self.text(batch["caption"])
        time_ids = batch["time_ids"].to(self.device) if self.sdxl else None
        return Conditioning(self.latents(batch["pixels"]), embeds, pooled, time_ids)
