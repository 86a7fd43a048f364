"""The Stable Diffusion family (SD-1.5, SD-2.1, SDXL; ControlNet, IP-Adapter; SDEdit and DemoFusion cascades).

Its model-side code is the engine's first client and lives where it grew: the UNet and ControlNet rewrites in
:mod:`distlin.parallel.unet` and :mod:`distlin.parallel.controlnet`, the AutoencoderKL coder in :mod:`distlin.vae`.
"""

from __future__ import annotations

from distlin.families.base import Family
from distlin.parallel.topology import LATENT_FACTOR, row_unit
from distlin.sources import architecture_of

SD = Family(
    name="sd",
    denoiser="unet",
    latent_argument="sample",
    row_unit=row_unit,
    latent_factor=lambda vae_config: LATENT_FACTOR,
    parallelize="distlin.parallel.pipeline:parallelize_sd",
    parallelize_vae="distlin.vae.parallel:parallelize_vae",
    plan="distlin.memory.planner:plan",
    architecture=architecture_of,
    controlnet_fits=("block_out_channels", "cross_attention_dim", "in_channels", "addition_embed_type"),
    residual_arguments=(
        "down_block_additional_residuals",
        "mid_block_additional_residual",
        "down_intrablock_additional_residuals",
    ),
)
