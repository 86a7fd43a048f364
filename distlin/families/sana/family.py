"""The SANA family (diffusers ``SanaPipeline``): a linear-attention DiT over a 32x DC-AE latent. Torch-free."""

from __future__ import annotations

import json
from typing import Any

from distlin.families.base import Family
from distlin.models.architectures import ARCHITECTURES_DIR

TINY_SANA_MODELS = ("tiny-sana",)
FULL_SANA_MODELS = ("full-sana",)  # SANA-1600M's architecture with random weights (launch/bench.py gpu)
# SANA-1600M's transformer and DC-AE: the 1K and 4K models differ only in their native latent size.
SANA_1600M_MODELS = {
    "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers": 32,
    "Efficient-Large-Model/Sana_1600M_4Kpx_BF16_diffusers": 128,
}

# patch_size 1 and no positional embedding, as SANA-1600M at 1K and 4K; three DC-AE levels: latent factor 4.
TINY_SANA: dict[str, dict[str, Any]] = {
    "transformer": {
        "in_channels": 8,
        "out_channels": 8,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "num_layers": 2,
        "num_cross_attention_heads": 2,
        "cross_attention_head_dim": 8,
        "cross_attention_dim": 16,
        "caption_channels": 16,
        "mlp_ratio": 2.5,
        "sample_size": 16,
        "patch_size": 1,
    },
    "vae": {
        "in_channels": 3,
        "latent_channels": 8,
        "attention_head_dim": 8,
        "encoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
        "decoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
        "encoder_block_out_channels": [8, 16, 16],
        "decoder_block_out_channels": [8, 16, 16],
        "encoder_layers_per_block": [1, 1, 1],
        "decoder_layers_per_block": [1, 1, 1],
        "encoder_qkv_multiscales": [[], [], [5]],
        "decoder_qkv_multiscales": [[], [], [5]],
        "upsample_block_type": "interpolate",
        "downsample_block_type": "Conv",
        "decoder_norm_types": "rms_norm",
        "decoder_act_fns": "silu",
        "scaling_factor": 0.41407,
    },
    "text_encoder": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "max_position_embeddings": 4096,
    },
    "scheduler": {
        "num_train_timesteps": 1000,
        "prediction_type": "flow_prediction",
        "use_flow_sigmas": True,
        "flow_shift": 3.0,
    },
}


def token_row_unit(transformer_config: dict) -> int:
    """Latent rows per token row (the patch size): any token row may start a band, since no layer downsamples."""
    return int(transformer_config.get("patch_size", 1))


def dc_ae_factor(vae_config: dict) -> int:
    """Image pixels per latent pixel of a DC-AE: one x2 per decoder level after the first (32 for SANA's)."""
    return 2 ** (len(vae_config["decoder_block_out_channels"]) - 1)


def architecture(model: str) -> dict[str, Any] | None:
    """The configs of a SANA model known offline (transformer, DC-AE, Gemma-2), or None: ``tiny-sana``,
    SANA-1600M at 1K and 4K and ``full-sana`` (its 4K architecture, ``configs/architectures/sana-1600m.json``)."""
    if model.removeprefix("distlin/") in TINY_SANA_MODELS:
        return {kind: dict(TINY_SANA[kind]) for kind in ("transformer", "vae", "text_encoder")}
    short = model.removeprefix("distlin/")
    if model not in SANA_1600M_MODELS and short not in FULL_SANA_MODELS:
        return None
    configs = json.loads((ARCHITECTURES_DIR / "sana-1600m.json").read_text(encoding="utf-8"))
    configs["transformer"]["sample_size"] = SANA_1600M_MODELS.get(model, 128)
    return configs


SANA = Family(
    name="sana",
    denoiser="transformer",
    latent_argument="hidden_states",
    residual_arguments=("controlnet_block_samples",),
    controlnet_fits=("in_channels", "patch_size", "num_attention_heads", "attention_head_dim", "caption_channels"),
    row_unit=token_row_unit,
    latent_factor=dc_ae_factor,
    parallelize="distlin.families.sana.pipeline:parallelize_sana",
    parallelize_vae="distlin.families.sana.vae:parallelize_dc_ae",
    plan="distlin.families.sana.memory:plan_sana",
    savers=("micro_batch", "vae_decode"),  # the DC-AE has no softmax mid-block to stream (--vae-attention-rows)
    architecture=architecture,
    sequential_coder="distlin.families.sana.sequential:SequentialDCAE",
    sequential_holds_less="distlin.families.sana.memory:band_by_band_holds_less",
    linfusion=False,
    builtin=TINY_SANA_MODELS + FULL_SANA_MODELS,
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
    load_controlnet="distlin.families.sana.controlnet:load_sana_controlnet",
    controlnet_pipeline="distlin.families.sana.controlnet:sana_controlnet_pipeline",
    unsupported=(
        ("linfusion", "SANA's self-attention is linear already; pass --linfusion none"),
        ("compile", "--compile covers Stable Diffusion UNets only; drop it for SANA"),
        ("mask", "SANA has no inpainting pipeline; drop --mask"),
        ("several_controlnets", "SANA's ControlNet pipeline takes one ControlNet; pass one --controlnet"),
        ("ip_adapter", "SANA has no IP-Adapter; drop --ip-adapter"),
    ),
)
