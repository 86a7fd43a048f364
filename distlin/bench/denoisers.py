"""The denoisers the ``scaling`` suite times: a built-in UNet (:mod:`distlin.bench.models`) or SANA's transformer
(``tiny-sana``, or ``full-sana``: SANA-1600M's architecture), seeded random weights, each called and made
patch-parallel the way its model family is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distlin.bench.models import build, model_name, unet_inputs
from distlin.errors import UsageError
from distlin.families.sana.family import SANA, architecture
from distlin.parallel.config import PatchParallelConfig
from distlin.parallel.runtime import Runtime
from distlin.parallel.topology import LATENT_FACTOR

SANA_TEXT_TOKENS = 300  # the Gemma-2 tokens SanaPipeline encodes a prompt into (max_sequence_length)


def denoiser_name(name: str) -> str:
    """A built-in UNet's name (:func:`~distlin.bench.models.model_name`) or a built-in SANA model's."""
    if name.removeprefix("distlin/") in SANA.builtin:
        return name.removeprefix("distlin/")
    try:
        return model_name(name)
    except UsageError as err:
        raise UsageError(f"{err}, {', '.join(SANA.builtin)}") from None


def is_sana(name: str) -> bool:
    return name in SANA.builtin


def check_attention(name: str, attention: str) -> None:
    """SANA's self-attention is its own linear attention: no softmax to compare it with."""
    if is_sana(name) and attention != "linear":
        raise UsageError(f"{name}'s self-attention is linear already; drop --attention {attention}")


def build_denoiser(name: str, attention: str, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """The denoiser of ``name`` (seed 0): a UNet with ``attention`` self-attention, or SANA's transformer (its
    self-attention is linear already)."""
    if not is_sana(name):
        return build(name, attention, device, dtype)
    check_attention(name, attention)
    from diffusers import SanaTransformer2DModel

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = SanaTransformer2DModel.from_config(architecture(name)["transformer"])
    return torch.nn.Module.to(model, dtype=dtype).eval()


def latent_factor(name: str) -> int:
    """Image pixels per latent pixel of ``name``'s VAE (a UNet's AutoencoderKL's, SANA's DC-AE's for SANA)."""
    return SANA.latent_factor(architecture(name)["vae"]) if is_sana(name) else LATENT_FACTOR


def denoiser_inputs(name: str, model: nn.Module, batch: int, height: int, width: int) -> dict[str, Any]:
    """Keyword arguments of one call (timestep excluded) on ``model``'s device and dtype."""
    if not is_sana(name):
        return unet_inputs(model, batch, height, width)
    factor, config = latent_factor(name), model.config
    if height % factor or width % factor:
        raise UsageError(f"{name} needs sides that are multiples of {factor} px; got {width}x{height}")
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=model.device, dtype=model.dtype)

    return {
        "hidden_states": tensor(batch, config.in_channels, height // factor, width // factor),
        "encoder_hidden_states": tensor(batch, SANA_TEXT_TOKENS, config.caption_channels),
    }


def timestep(name: str, value: int, batch: int, device: torch.device) -> Any:
    """The timestep argument of a call at ``value``: SANA's embedding takes one per sample."""
    return torch.full((batch,), float(value), device=device) if is_sana(name) else value


def parallelize_denoiser(name: str, model: nn.Module, config: PatchParallelConfig, runtime: Runtime) -> Any:
    """``model`` patch-parallel over ``runtime``'s ranks as its family does it; the handle has ``.ctx`` and
    ``.undo()``."""
    if is_sana(name):
        from distlin.families.sana.transformer import parallelize_transformer

        return parallelize_transformer(model, config, runtime, latent_factor(name))
    from distlin.parallel import parallelize_unet

    return parallelize_unet(model, config, runtime)
