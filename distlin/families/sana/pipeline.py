"""SANA's ``parallelize``: the pipeline's transformer on row bands and its ControlNet on the same engine (one
module above both rewrites, so neither imports the other)."""

from __future__ import annotations

from typing import Any

from distlin.families.sana.controlnet import parallelize_sana_controlnet
from distlin.families.sana.family import SANA
from distlin.families.sana.transformer import ParallelSanaTransformer, parallelize_transformer
from distlin.parallel.config import PatchParallelConfig
from distlin.parallel.runtime import Runtime


def parallelize_sana(pipe: Any, config: PatchParallelConfig | None, runtime: Runtime) -> ParallelSanaTransformer:
    """The family's ``parallelize``: the pipeline's transformer on row bands, and its ControlNet (a
    ``SanaControlNetPipeline``'s) on the same engine."""
    handle = parallelize_transformer(pipe.transformer, config, runtime, SANA.latent_factor(pipe.vae.config))
    if getattr(pipe, "controlnet", None) is not None:
        parallelize_sana_controlnet(pipe.controlnet, handle)
    return handle
