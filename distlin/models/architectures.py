"""Architecture configs of the built-in models, as dicts laid out like the published config.json files.

The full-size configs live in ``configs/architectures/*.json`` so they can be compared line by line with the
published SD-1.5 / SD-2.1 / SDXL files; the tiny ones are derived here because their text-encoder vocabulary
must match the small tokenizer shipped in ``distlin/models/vocab``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from distlin.errors import UsageError
from distlin.presets import CONFIG_DIR

VOCAB_DIR = Path(__file__).resolve().parent / "vocab"
ARCHITECTURES_DIR = CONFIG_DIR / "architectures"

NAME_PREFIX = "distlin/"
TINY_NAMES: tuple[str, ...] = ("tiny-sd15", "tiny-sdxl")
FULL_NAMES: tuple[str, ...] = ("full-sd15", "full-sd21", "full-sdxl")

_SD_BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


def canonical_name(name: str) -> str:
    """Strip the optional ``distlin/`` prefix, so ``pipe.name_or_path`` round-trips into the builders."""
    short = name.removeprefix(NAME_PREFIX)
    if short not in TINY_NAMES + FULL_NAMES:
        choices = ", ".join(TINY_NAMES + FULL_NAMES)
        raise UsageError(f"unknown built-in model {name!r}; choose one of: {choices}")
    return short


def is_builtin(name: str) -> bool:
    """True for the names the offline builders understand, with or without the ``distlin/`` prefix."""
    return name.removeprefix(NAME_PREFIX) in TINY_NAMES + FULL_NAMES


def load_architecture(name: str) -> dict[str, dict[str, Any]]:
    """Per-component configs of a model, keyed ``unet``, ``vae``, ``text_encoder``, ``scheduler``.

    SDXL models also have ``text_encoder_2``. Returns a fresh dict on every call, so callers may edit it.
    """
    short = canonical_name(name)
    if short in FULL_NAMES:
        path = ARCHITECTURES_DIR / f"{short.removeprefix('full-')}.json"
        return json.loads(path.read_text(encoding="utf-8"))
    return _tiny_sd15() if short == "tiny-sd15" else _tiny_sdxl()


@cache
def _special_token_ids() -> dict[str, int]:
    """Vocabulary size and special-token ids of the shipped tokenizer, read from its vocab.json."""
    vocab = json.loads((VOCAB_DIR / "vocab.json").read_text(encoding="utf-8"))
    return {
        "vocab_size": len(vocab),
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }


def _tiny_text_encoder(architecture: str) -> dict[str, Any]:
    """A 2-layer, 32-wide CLIP text encoder over the shipped vocabulary."""
    return {
        "architectures": [architecture],
        "hidden_act": "quick_gelu",
        "hidden_size": 32,
        "intermediate_size": 64,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "projection_dim": 32,
        **_special_token_ids(),
    }


def _tiny_vae() -> dict[str, Any]:
    """Four block levels, hence three downsamplings: the same latent factor 8 as the real SD VAEs."""
    return {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [8, 16, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "mid_block_add_attention": True,
        "sample_size": 128,
    }


def _tiny_sd15() -> dict[str, dict[str, Any]]:
    """SD-1.5 topology (3 cross-attention levels, 3 downsamplings, fixed head count) at toy width."""
    return {
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "block_out_channels": [32, 32, 64, 64],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "layers_per_block": 1,
            "attention_head_dim": 2,
            "cross_attention_dim": 32,
            "norm_num_groups": 8,
            "in_channels": 4,
            "out_channels": 4,
            "sample_size": 16,
        },
        "vae": _tiny_vae(),
        "text_encoder": _tiny_text_encoder("CLIPTextModel"),
        "scheduler": {
            "_class_name": "DDIMScheduler",
            **_SD_BETAS,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
            "prediction_type": "epsilon",
        },
    }


def _tiny_sdxl() -> dict[str, dict[str, Any]]:
    """SDXL topology (no attention at the top level, 2 downsamplings, deeper transformers lower down)."""
    text_encoder = _tiny_text_encoder("CLIPTextModel")
    text_encoder_2 = _tiny_text_encoder("CLIPTextModelWithProjection")
    time_embed_dim = 8
    return {
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "block_out_channels": [32, 64, 64],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 1,
            "transformer_layers_per_block": [1, 1, 2],
            "attention_head_dim": [2, 4, 4],
            "use_linear_projection": True,
            "cross_attention_dim": text_encoder["hidden_size"] + text_encoder_2["hidden_size"],
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_embed_dim,
            # pooled text embedding + 6 micro-conditions (original size, crop offset, target size)
            "projection_class_embeddings_input_dim": text_encoder_2["projection_dim"] + 6 * time_embed_dim,
            "norm_num_groups": 8,
            "in_channels": 4,
            "out_channels": 4,
            "sample_size": 16,
        },
        "vae": {**_tiny_vae(), "scaling_factor": 0.13025},
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "scheduler": {
            "_class_name": "EulerDiscreteScheduler",
            **_SD_BETAS,
            "prediction_type": "epsilon",
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "interpolation_type": "linear",
            "use_karras_sigmas": False,
        },
    }
