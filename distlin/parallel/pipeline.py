"""Patch parallelism for a whole diffusers pipeline: its UNet is parallelized, the loop stays the pipeline's."""

from __future__ import annotations

from typing import Any

from distlin.parallel.config import PatchParallelConfig
from distlin.parallel.runtime import Runtime
from distlin.parallel.unet import ParallelUNet, parallelize_unet


def parallelize(pipe: Any, config: PatchParallelConfig | None = None, runtime: Runtime | None = None) -> ParallelUNet:
    """Parallelize ``pipe.unet`` in place; only rank 0 shows progress. Returns the handle (``.ctx``, ``.undo()``).

    Works for any pipeline that calls its UNet with the UNet's own signature (text-to-image,
    image-to-image, SDXL, ControlNet: ControlNet residuals are cut into bands like the latent).
    """
    runtime = runtime or Runtime()
    handle = parallelize_unet(pipe.unet, config, runtime)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=not runtime.is_main)
    return handle
