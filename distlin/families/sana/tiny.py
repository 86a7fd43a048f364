"""Offline SANA pipelines with seeded random weights: SANA's topology (linear-attention DiT, Gemma-2 text
encoder, DC-AE with its linear attention, flow-matching DPM-Solver) at toy width, seconds on one CPU core.

The tokenizer is the package's small byte-level one (:func:`distlin.models.tiny.load_tokenizer`); the Gemma-2
encoder's vocabulary matches it.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
from transformers import Gemma2Config, Gemma2Model

from distlin.models.tiny import load_tokenizer

NAME_PREFIX = "distlin/"
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
BUILDERS = ("tiny-sana",)


def build_sana_pipeline(name: str, seed: int = 0, torch_dtype: torch.dtype = torch.float32) -> SanaPipeline:
    """``tiny-sana`` with weights drawn (in float32, on the CPU) from ``seed``, then cast to ``torch_dtype``."""
    tokenizer = load_tokenizer()
    tokenizer.model_max_length = TINY_SANA["text_encoder"]["max_position_embeddings"]  # SANA reads 300+
    parts: dict[str, torch.nn.Module] = {}
    for index, (key, make) in enumerate(
        (
            ("transformer", lambda: SanaTransformer2DModel.from_config(TINY_SANA["transformer"])),
            ("vae", lambda: AutoencoderDC.from_config(TINY_SANA["vae"])),
            ("text_encoder", lambda: Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), **TINY_SANA["text_encoder"]))),
        )
    ):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 3 + index)
            parts[key] = torch.nn.Module.to(make(), dtype=torch_dtype).eval()
    scheduler = DPMSolverMultistepScheduler.from_config(TINY_SANA["scheduler"])
    pipe = SanaPipeline(tokenizer=tokenizer, scheduler=scheduler, **parts)
    pipe.register_to_config(_name_or_path=NAME_PREFIX + name.removeprefix(NAME_PREFIX))
    return pipe
