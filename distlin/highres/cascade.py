"""SDEdit cascade to ultra-high resolution: generate at the native size, then per stage decode, upscale
bicubically in pixel space, encode, noise to strength ``s_k`` and denoise with the image-to-image pipeline
built from the same components.

Native-size generation fixes the composition; each later stage only re-synthesises detail, with less
noise as resolution grows. When the pipeline's UNet is parallelized, every stage's UNet calls are
patch-parallel through the engine's hooks; with a :class:`~distlin.highres.vae.ParallelVAE` the decode and
encode between stages are band-parallel too (a plain VAE otherwise).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from distlin.errors import UsageError
from distlin.highres.vae import ParallelVAE
from distlin.parallel.unet import ParallelUNet
from distlin.presets import load_preset


@dataclass(frozen=True)
class Stage:
    """One resolution of the cascade; ``strength`` is ignored for the first (native, from noise) stage."""

    height: int
    width: int
    strength: float = 1.0


SD15_STAGES: tuple[Stage, ...] = (  # (height, width): LinFusion's 16K recipe, 16384 px wide
    Stage(512, 1024),
    Stage(1024, 2048, 0.4),
    Stage(2048, 4096, 0.3),
    Stage(4096, 8192, 0.2),
    Stage(8192, 16384, 0.1),
)


StageReport = Callable[[int, Stage, float], None]  # (stage index, stage, wall seconds)


class StageClock:
    """Wall time of each cascade stage, device work included, handed to ``report`` as each stage ends.

    A stage's time runs from the end of the previous one, so it includes the decode/upscale/encode between them.
    """

    def __init__(self, report: StageReport | None):
        self.report = report
        self.start = time.perf_counter()

    def lap(self, index: int, stage: Stage, latents: torch.Tensor) -> None:
        if self.report is None:
            return
        if latents.is_cuda:
            torch.cuda.synchronize(latents.device)
        now = time.perf_counter()
        self.report(index, stage, now - self.start)
        self.start = now


def check_stages(stages: Sequence[Stage]) -> None:
    """At least one stage, and every refining stage's strength in (0, 1]; a UsageError names the bad one."""
    if not stages:
        raise UsageError("a cascade needs at least one stage")
    for stage in stages[1:]:
        if not 0.0 < stage.strength <= 1.0:
            raise UsageError(f"stage {stage.height}x{stage.width}: strength must be in (0, 1], got {stage.strength}")


def load_stages(preset: str) -> list[Stage]:
    """The ``cascade:`` section of a preset (a list of {height, width, strength})."""
    section = load_preset(preset).get("cascade")
    if not section:
        raise UsageError(f"preset {preset!r} has no cascade: section (a list of height, width, strength)")
    return [Stage(int(s["height"]), int(s["width"]), float(s.get("strength", 1.0))) for s in section]


class _PlainVAE:
    """The decode/encode interface of :class:`ParallelVAE` on an unparallelized VAE."""

    def __init__(self, vae: Any):
        self.vae = vae

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> Any:
        return self.vae.encode(image).latent_dist


def run_cascade(
    pipe: Any,
    prompt: str,
    stages: Sequence[Stage] = SD15_STAGES,
    steps: int = 50,
    seed: int = 0,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    vae: ParallelVAE | None = None,
    handle: ParallelUNet | None = None,
    on_stage: StageReport | None = None,
) -> torch.Tensor:
    """The final latents (scaled, as the pipeline returns them) on every rank; decode them as any pipeline's.

    Stage ``k`` runs ``round(steps * strength_k)`` denoising steps with the generator seeded ``seed + k``;
    the encoded latents use the posterior mean, so the cascade is deterministic given the seed. ``on_stage``
    gets each stage's wall time as it ends.
    """
    check_stages(stages)
    coder = vae or _PlainVAE(pipe.vae)
    scale = pipe.vae.config.scaling_factor
    common = {"guidance_scale": guidance_scale, "negative_prompt": negative_prompt, "output_type": "latent"}
    first = stages[0]
    clock = StageClock(on_stage)
    latents = pipe(
        prompt,
        height=first.height,
        width=first.width,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        **common,
    ).images
    clock.lap(0, first, latents)
    from diffusers import StableDiffusionImg2ImgPipeline  # here: importing pipelines prints warnings

    refine = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    refine.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))  # rank 0 only, as the pipeline
    for index, stage in enumerate(stages[1:], start=1):
        image = coder.decode(latents / scale)
        image = F.interpolate(image.float(), size=(stage.height, stage.width), mode="bicubic", align_corners=False)
        init = coder.encode(image.clamp(-1, 1).to(pipe.vae.dtype)).mean * scale
        if handle is not None:
            handle.ctx.reset()
        latents = refine(
            prompt,
            image=init,
            strength=stage.strength,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed + index),
            **common,
        ).images
        clock.lap(index, stage, latents)
    return latents
