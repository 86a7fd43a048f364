"""SDEdit cascade to ultra-high resolution (LinFusion's SD-1.5 recipe): generate at the native size, then per
stage take the upscaled previous result (:func:`~distlin.sampling.reference.upscaled_reference`), noise it to
strength ``s_k`` and denoise with the image-to-image pipeline built from the same components.

Native-size generation fixes the composition; each later stage only re-synthesises detail, with less noise as
resolution grows. When the pipeline's UNet is parallelized, every stage's UNet calls are patch-parallel through
the engine's hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from distlin.sampling.reference import stage_reference
from distlin.sampling.stages import SD15_STAGES, Stage, StageClock, StageReport, check_stages
from distlin.surgery import calls_like
from distlin.vae.coders import Coder, PlainVAE


def run_sdedit(
    pipe: Any,
    prompt: str,
    stages: Sequence[Stage] = SD15_STAGES,
    steps: int = 50,
    seed: int = 0,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    vae: Coder | None = None,
    on_stage: StageReport | None = None,
    init_image: torch.Tensor | None = None,
    ip_adapter_image: Any = None,
    controls: Sequence[Any] = (),
    control_scale: float | list[float] = 1.0,
) -> torch.Tensor:
    """The final latents (scaled, as the pipeline returns them) on every rank; decode them as any pipeline's.

    Stage ``k`` runs ``int(steps * strength_k)`` denoising steps with the generator seeded ``seed + k``.
    ``on_stage`` gets each stage's wall time as it ends. With ``init_image`` (``(1, 3, H, W)`` in [-1, 1], any
    size) the first stage refines that picture, resized to its size, at its strength, instead of starting from
    noise. ``ip_adapter_image`` (with an IP-Adapter loaded) steers every stage. With a ControlNet pipeline,
    ``controls`` holds every stage's control image (a list of them for several ControlNets) at that stage's size,
    and each stage is conditioned on its own.
    """
    check_stages(stages)
    coder = vae or PlainVAE(pipe.vae)
    common = {
        "guidance_scale": guidance_scale,
        "negative_prompt": negative_prompt,
        "output_type": "latent",
        "ip_adapter_image": ip_adapter_image,
    }
    first = stages[0]
    clock = StageClock(on_stage)
    from diffusers import AutoPipelineForImage2Image  # here: importing pipelines prints warnings

    refine = calls_like(AutoPipelineForImage2Image.from_pipe(pipe), pipe)  # same components; a call, a generation
    refine.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))  # rank 0 only, as the pipeline
    refined = list(enumerate(stages))

    def control(index: int, key: str) -> dict[str, Any]:
        return {key: controls[index], "controlnet_conditioning_scale": control_scale} if controls else {}

    latents = None  # from noise (stage 0), unless the cascade starts from init_image
    if init_image is None:
        latents = pipe(
            prompt,
            height=first.height,
            width=first.width,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            **control(0, "image"),
            **common,
        ).images
        clock.lap(0, first, latents)
        refined = refined[1:]
    for index, stage in refined:
        latents = refine(
            prompt,
            image=stage_reference(pipe, coder, index, stage, init_image, latents),
            strength=stage.strength,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed + index),
            **control(index, "control_image"),
            **common,
        ).images
        clock.lap(index, stage, latents)
    return latents
