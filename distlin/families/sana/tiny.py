"""Offline SANA pipelines with seeded random weights: SANA's topology (linear-attention DiT, Gemma-2 text
encoder, DC-AE with its linear attention, flow-matching DPM-Solver) at toy width, seconds on one CPU core.

The tokenizer is the package's small byte-level one (:func:`distlin.models.tiny.load_tokenizer`); the Gemma-2
encoder's vocabulary matches it.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
from transformers import Gemma2Config, Gemma2Model

from distlin.families.sana.family import TINY_SANA
from distlin.models.tiny import load_tokenizer

NAME_PREFIX = "distlin/"


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
