"""Patch parallelism for a whole diffusers pipeline: its denoiser (and ControlNet) are parallelized as its model
family says, the loop stays the pipeline's."""

from __future__ import annotations

from typing import Any

from distlin.errors import UsageError
from distlin.families import family_of_pipeline, load
from distlin.parallel.config import PatchParallelConfig
from distlin.parallel.controlnet import parallelize_controlnet
from distlin.parallel.runtime import Runtime, init_runtime
from distlin.parallel.unet import ParallelUNet, parallelize_unet
from distlin.ranks import ranks_from_env
from distlin.surgery import around_calls


def parallelize(pipe: Any, config: PatchParallelConfig | None = None, runtime: Runtime | None = None) -> Any:
    """Parallelize ``pipe``'s denoiser in place over the ranks of ``runtime``, as its model family
    (:mod:`distlin.families`) does it; only rank 0 shows progress. Returns the denoiser's handle (``.ctx``,
    ``.check_size``, ``.undo()``).

    Every call of ``pipe`` is a generation: displaced mode warms up again and reuses nothing from the call before
    (another pipeline on the same denoiser, such as ``from_pipe``'s, starts one where its timesteps rise again).

    Without ``runtime``, joins the process group ``torchrun`` started (or runs as one process when there is
    none), on the device the pipeline is on. Works for any pipeline that calls its denoiser with the denoiser's
    own signature (Stable Diffusion text-to-image, image-to-image, SDXL, ControlNet; SANA).
    """
    family = family_of_pipeline(pipe)
    if runtime is None:  # the device type only: under torchrun each rank takes cuda:LOCAL_RANK
        runtime = init_runtime(device=family.denoiser_of(pipe).device.type)
    launched = ranks_from_env().world_size
    if launched != runtime.world_size:
        raise UsageError(
            f"torchrun started {launched} ranks but the runtime has {runtime.world_size}; pass runtime=init_runtime() "
            "or no runtime, so every rank takes its share of the image"
        )
    handle = load(family.parallelize)(pipe, config, runtime)
    handle.ctx.on_close(around_calls(pipe, handle.ctx.start_over))  # every pipe(...) is a generation
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=not runtime.is_main)
    return handle


def parallelize_sd(pipe: Any, config: PatchParallelConfig | None, runtime: Runtime) -> ParallelUNet:
    """The Stable Diffusion family's ``parallelize``: ``pipe.unet``, and ``pipe.controlnet`` when the pipeline has
    one (every member of a ``MultiControlNetModel``) on the same engine. A ControlNet added later (``from_pipe``)
    may be parallelized with :func:`~distlin.parallel.controlnet.parallelize_controlnet`, or left whole: the UNet
    then cuts its residuals into bands."""
    handle = parallelize_unet(pipe.unet, config, runtime)
    if getattr(pipe, "controlnet", None) is not None:
        parallelize_controlnet(pipe.controlnet, handle)
    return handle
