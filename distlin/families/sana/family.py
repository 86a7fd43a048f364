"""The SANA family (diffusers ``SanaPipeline``): a linear-attention DiT over a 32x DC-AE latent. Torch-free."""

from __future__ import annotations

from distlin.families.base import Family


def token_row_unit(transformer_config: dict) -> int:
    """Latent rows per token row (the patch size): any token row may start a band, since no layer downsamples."""
    return int(transformer_config.get("patch_size", 1))


def dc_ae_factor(vae_config: dict) -> int:
    """Image pixels per latent pixel of a DC-AE: one x2 per decoder level after the first (32 for SANA's)."""
    return 2 ** (len(vae_config["decoder_block_out_channels"]) - 1)


SANA = Family(
    name="sana",
    denoiser="transformer",
    latent_argument="hidden_states",
    row_unit=token_row_unit,
    latent_factor=dc_ae_factor,
    parallelize="distlin.families.sana.transformer:parallelize_sana",
    parallelize_vae="distlin.families.sana.vae:parallelize_dc_ae",
    planner=False,
    sequential_vae=False,  # the DC-AE decodes band-parallel on every rank at any size
    linfusion=False,
    builtin=("tiny-sana",),
    hub_models=(
        "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers",
        "Efficient-Large-Model/Sana_1600M_4Kpx_BF16_diffusers",
        "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers",
    ),
    build="distlin.families.sana.tiny:build_sana_pipeline",
    # run at the size asked for: SANA's pipeline otherwise snaps it to its 1K/2K/4K aspect-ratio bins
    call_options=(("use_resolution_binning", False),),
    no_negative_prompt="",
    cascade="distlin.families.sana.sdedit:run_sana_sdedit",
    unsupported=(
        ("linfusion", "SANA's self-attention is linear already; pass --linfusion none"),
        ("compile", "--compile covers Stable Diffusion UNets only; drop it for SANA"),
        ("mask", "SANA has no inpainting pipeline; drop --mask"),
        ("controlnet", "a SANA ControlNet is not split into row bands yet; drop --controlnet"),
        ("ip_adapter", "SANA has no IP-Adapter; drop --ip-adapter"),
        ("plan", "the memory planner models Stable Diffusion UNets only; drop --plan for SANA"),
    ),
)
