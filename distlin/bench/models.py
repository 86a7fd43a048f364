"""Benchmark models: built-in UNets (real weights or meta), with LinFusion or softmax self-attention, and inputs;
a built-in pipeline prepared as a run prepares it (:func:`run_pipeline`)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from distlin.errors import UsageError
from distlin.linfusion import LinFusion
from distlin.models.architectures import FULL_NAMES, TINY_NAMES
from distlin.models.tiny import build_unet
from distlin.parallel.runtime import Runtime
from distlin.parallel.topology import LATENT_FACTOR
from distlin.run import Prepared, fitted_settings, prepare_pipeline
from distlin.sampling.stages import Stage
from distlin.settings import RunSettings, build_settings
from distlin.sizes import format_size

ALIASES = {"sd15": "full-sd15", "sd21": "full-sd21", "sdxl": "full-sdxl"}
ATTENTIONS = ("linear", "softmax")
TEXT_TOKENS = 77


def model_name(name: str) -> str:
    """A built-in model name; ``sd15``, ``sd21`` and ``sdxl`` mean the full-size architectures."""
    name = ALIASES.get(name, name)
    if name not in TINY_NAMES + FULL_NAMES:
        choices = ", ".join([*ALIASES, *TINY_NAMES, *FULL_NAMES])
        raise UsageError(f"unknown model {name!r}; choose one of: {choices}")
    return name


def latent_size(height: int, width: int) -> tuple[int, int]:
    if height % LATENT_FACTOR or width % LATENT_FACTOR or height <= 0 or width <= 0:
        size = format_size(width, height)
        raise UsageError(f"image size {size} must be positive multiples of {LATENT_FACTOR} pixels")
    return height // LATENT_FACTOR, width // LATENT_FACTOR


def mount_fresh_linfusion(unet: UNet2DConditionModel, seed: int = 0) -> LinFusion:
    """Fresh LinFusion layers, identical on every rank for a seed.

    On meta the teacher's weights cannot be copied, so the layers keep their (shape-identical) random init.
    """
    on_meta = unet.device.type == "meta"
    with torch.random.fork_rng(devices=[]), torch.device("meta") if on_meta else nullcontext():
        torch.manual_seed(seed)
        return LinFusion.construct_for(unet=unet, load_pretrained=False, init="random" if on_meta else "teacher")


def build(
    model: str, attention: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> UNet2DConditionModel:
    """A built-in UNet (seed 0) whose self-attention is LinFusion (``linear``) or the original (``softmax``)."""
    if attention not in ATTENTIONS:
        raise UsageError(f"unknown attention {attention!r}; use linear or softmax")
    unet = build_unet(model_name(model), seed=0, torch_dtype=dtype, device=device)
    if attention == "linear":
        mount_fresh_linfusion(unet)
    return unet


def unet_inputs(unet: UNet2DConditionModel, batch: int, height: int, width: int, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments of one UNet call on ``unet``'s device and dtype (timestep excluded); empty on meta.

    SDXL-style UNets (``text_time`` embedding) also get ``added_cond_kwargs``.
    """
    cfg, device, dtype = unet.config, unet.device, unet.dtype
    generator = None if device.type == "meta" else torch.Generator().manual_seed(seed)

    def tensor(*shape: int) -> torch.Tensor:
        if generator is None:
            return torch.empty(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    h, w = latent_size(height, width)
    kwargs: dict[str, Any] = {
        "sample": tensor(batch, cfg.in_channels, h, w),
        "encoder_hidden_states": tensor(batch, TEXT_TOKENS, cfg.cross_attention_dim),
    }
    if cfg.addition_embed_type == "text_time":
        time_ids = 6  # original size, crop offset, target size
        text = cfg.projection_class_embeddings_input_dim - time_ids * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": tensor(batch, text), "time_ids": tensor(batch, time_ids)}
    return kwargs


def count_flops(unet: UNet2DConditionModel, height: int, width: int, batch: int) -> int:
    """FLOPs of one call, counted on whatever device ``unet`` is on (meta: nothing computed)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        unet(timestep=999, **unet_inputs(unet, batch, height, width))
    return counter.get_total_flops()


def run_pipeline(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    preset: str = "sd15",
    stages: Sequence[Stage] | None = None,
    runtime: Runtime | None = None,
    **overrides: Any,
) -> tuple[Prepared, RunSettings]:
    """The built-in ``model`` on ``runtime``'s ranks (default: one rank of ``device``), fitted and prepared exactly
    as a run does it (:func:`distlin.run.fitted_settings`: the memory savers a GPU needs;
    :func:`distlin.run.prepare_pipeline`: memory bounds with the ``DISTLIN_*`` thresholds, the engine, the band
    VAE), and the settings it was prepared for: ``preset``'s values with ``overrides`` (keys of
    :class:`~distlin.settings.RunSettings` or of the engine config; fresh LinFusion layers unless
    ``linfusion="none"``, softmax) and, if given, ``stages`` as the cascade (the last one the image size)."""
    runtime = runtime or Runtime(device=device)
    values = {"linfusion": "fresh", **overrides, "model": model_name(model), "device": str(runtime.device)}
    dtype_name = str(dtype).removeprefix("torch.")
    settings = build_settings(preset, {**values, "dtype": dtype_name}, world_size=runtime.world_size)
    if stages:
        settings = replace(settings, stages=tuple(stages), height=stages[-1].height, width=stages[-1].width)
    settings = fitted_settings(settings, runtime)
    return prepare_pipeline(settings, runtime), settings
