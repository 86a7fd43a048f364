"""Patch parallelism for a whole diffusers pipeline: its UNet (and ControlNet) are parallelized, the loop stays
the pipeline's."""

from __future__ import annotations

import os
from typing import Any

from distlin.errors import UsageError
from distlin.parallel.config import PatchParallelConfig
from distlin.parallel.controlnet import parallelize_controlnet
from distlin.parallel.runtime import Runtime, init_runtime
from distlin.parallel.unet import ParallelUNet, parallelize_unet


def parallelize(pipe: Any, config: PatchParallelConfig | None = None, runtime: Runtime | None = None) -> ParallelUNet:
    """Parallelize ``pipe.unet`` in place over the ranks of ``runtime``, and ``pipe.controlnet`` when the pipeline
    has one (every member of a ``MultiControlNetModel``) on the same engine; only rank 0 shows progress. Returns
    the UNet's handle (``.ctx``, ``.controlnets``, ``.undo()`` restoring all of them).

    Without ``runtime``, joins the process group ``torchrun`` started (or runs as one process when there is
    none), on the device the pipeline is on. Works for any pipeline that calls its UNet with the UNet's own
    signature (text-to-image, image-to-image, SDXL, ControlNet). A ControlNet added later (``from_pipe``) may
    be parallelized with :func:`~distlin.parallel.controlnet.parallelize_controlnet`, or left whole: the UNet
    then cuts its residuals into bands.
    """
    if runtime is None:  # the device type only: under torchrun each rank takes cuda:LOCAL_RANK
        runtime = init_runtime(device=pipe.unet.device.type)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != runtime.world_size:
        raise UsageError(
            f"torchrun started {launched} ranks but the runtime has {runtime.world_size}; pass runtime=init_runtime() "
            "or no runtime, so every rank takes its share of the image"
        )
    handle = parallelize_unet(pipe.unet, config, runtime)
    if getattr(pipe, "controlnet", None) is not None:
        parallelize_controlnet(pipe.controlnet, handle)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=not runtime.is_main)
    return handle
