"""Offline SANA pipelines with seeded random weights: ``tiny-sana``, SANA's topology (linear-attention DiT,
Gemma-2 text encoder, DC-AE with its linear attention, flow-matching DPM-Solver) at toy width, seconds on one CPU
core; ``full-sana``, SANA-1600M's architecture, for the GPU check (``launch/bench.py gpu``).

The tokenizer is the package's small byte-level one (:func:`distlin.models.tiny.load_tokenizer`); tiny-sana's
Gemma-2 vocabulary matches it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
from transformers import Gemma2Config, Gemma2Model

from distlin.families.sana.family import TINY_SANA, architecture
from distlin.models.tiny import load_tokenizer

NAME_PREFIX = "distlin/"


def build_sana_pipeline(name: str, seed: int = 0, torch_dtype: torch.dtype = torch.float32) -> SanaPipeline:
    """``tiny-sana``, or ``full-sana`` (SANA-1600M's transformer and DC-AE, a Gemma-2 2B shaped encoder read
    through the small tokenizer), with weights drawn from ``seed`` and cast to ``torch_dtype``: tiny-sana's in
    float32 on the CPU; full-sana's on the GPU when there is one (4.5 B parameters), in ``torch_dtype``."""
    tokenizer = load_tokenizer()
    short = name.removeprefix(NAME_PREFIX)
    configs = {kind: dict(config) for kind, config in architecture(short).items()}
    tokenizer.model_max_length = configs["text_encoder"]["max_position_embeddings"]  # SANA reads 300+
    configs["text_encoder"].setdefault("vocab_size", len(tokenizer))  # full-sana keeps Gemma-2's, as planned
    full = short != "tiny-sana"
    device = "cuda" if full and torch.cuda.is_available() else "cpu"
    parts: dict[str, torch.nn.Module] = {}
    for index, (key, make) in enumerate(
        (
            ("transformer", lambda: SanaTransformer2DModel.from_config(configs["transformer"])),
            ("vae", lambda: AutoencoderDC.from_config(configs["vae"])),
            ("text_encoder", lambda: Gemma2Model(Gemma2Config(**configs["text_encoder"]))),
        )
    ):
        with torch.random.fork_rng(devices=[]), torch.device(device), _default_dtype(torch_dtype if full else None):
            torch.manual_seed(seed * 3 + index)
            parts[key] = torch.nn.Module.to(make(), dtype=torch_dtype).eval()
    scheduler = DPMSolverMultistepScheduler.from_config(TINY_SANA["scheduler"])
    pipe = SanaPipeline(tokenizer=tokenizer, scheduler=scheduler, **parts)
    pipe.register_to_config(_name_or_path=NAME_PREFIX + short)
    return pipe


@contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Parameters created in ``dtype`` (None: as they are), so a full-size model never exists in float32."""
    before = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)
