"""SDEdit for SANA (flow matching): the cascade's later stages and ``--init-image``, with SANA's own transformer.

SANA's pipeline has no image-to-image variant, so a refining stage noises the reference latents itself, at the
flow-matching scheduler's sigma of the first step it keeps (``x_t = (1 - σ) x_0 + σ ε``, the scheduler's own
``add_noise``), and runs the text-to-image pipeline from those latents over the last ``int(steps * strength)``
steps only (:func:`tail_of_schedule`).
Stage ``k`` draws its noise with the generator seeded ``seed + k``, like :func:`~distlin.sampling.sdedit.run_sdedit`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from distlin.sampling.reference import stage_reference
from distlin.sampling.stages import Stage, StageClock, StageReport, check_stages
from distlin.surgery import Swaps
from distlin.vae.coders import Coder


@contextmanager
def tail_of_schedule(scheduler: Any, strength: float) -> Iterator[None]:
    """While inside, ``scheduler.set_timesteps(n)`` keeps only the last ``int(n * strength)`` steps: their
    timesteps and sigmas (and the final one), so the scheduler counts its steps from the first kept one and
    knows its last (a multistep solver takes a first-order final step to sigma 0)."""
    original = scheduler.set_timesteps

    def tail(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        steps = len(scheduler.timesteps)
        start = steps - int(steps * strength)
        scheduler.timesteps = scheduler.timesteps[start:]
        scheduler.sigmas = scheduler.sigmas[start:]
        scheduler.num_inference_steps = len(scheduler.timesteps)

    scheduler.set_timesteps = tail
    try:
        yield
    finally:
        del scheduler.set_timesteps  # the instance attribute; the class's method shows again


def refine(pipe: Any, reference: torch.Tensor, strength: float, steps: int, seed: int, **options: Any) -> torch.Tensor:
    """``reference`` (scaled latents) noised to ``strength`` and denoised over the schedule's last steps."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(reference.shape, generator=generator, dtype=torch.float32).to(reference)
    with tail_of_schedule(pipe.scheduler, strength):
        pipe.scheduler.set_timesteps(steps)
        noised = pipe.scheduler.add_noise(reference, noise, pipe.scheduler.timesteps[:1])
        height, width = reference.shape[-2] * pipe.vae_scale_factor, reference.shape[-1] * pipe.vae_scale_factor
        return pipe(
            num_inference_steps=steps, latents=noised, height=height, width=width, output_type="latent", **options
        ).images


def run_sana_sdedit(
    pipe: Any,
    stages: Sequence[Stage],
    steps: int,
    seed: int,
    vae: Coder,
    handle: Any = None,
    on_stage: StageReport | None = None,
    init_image: torch.Tensor | None = None,
    controls: Sequence[Any] | None = None,
    **options: Any,
) -> torch.Tensor:
    """The final scaled latents of a SANA cascade (or of one refined ``init_image``, a one-stage cascade) on
    every rank; ``options`` go to every pipeline call (prompt, guidance, ...); ``controls``: a
    ``SanaControlNetPipeline``'s control image at each stage's size, encoded by ``vae`` (the run's coder)."""
    check_stages(stages)
    clock = StageClock(on_stage)
    refined = list(enumerate(stages))

    def at(index: int) -> dict[str, Any]:
        return options if controls is None else {**options, "control_image": controls[index]}

    with nullcontext() if controls is None else encoding_through(pipe.vae, vae):
        latents = None  # from noise (stage 0), unless the cascade starts from init_image
        if init_image is None:
            first = stages[0]
            generator = torch.Generator().manual_seed(seed)
            latents = pipe(
                height=first.height,
                width=first.width,
                num_inference_steps=steps,
                generator=generator,
                output_type="latent",
                **at(0),
            ).images
            clock.lap(0, first, latents)
            refined = refined[1:]
        for index, stage in refined:
            reference = stage_reference(pipe, vae, index, stage, init_image, latents)
            latents = refine(pipe, reference, stage.strength, steps, seed + index, **at(index))
            clock.lap(index, stage, latents)
    return latents


@contextmanager
def encoding_through(vae: Any, coder: Coder) -> Iterator[None]:
    """While inside, ``vae.encode(image).latent`` is ``coder.encode(image).mean``: the control image a
    ``SanaControlNetPipeline`` encodes itself goes band-parallel (or band by band above the size threshold), as
    every other encode of the run, rather than whole on every rank."""
    from diffusers.models.autoencoders.autoencoder_dc import EncoderOutput

    swaps = Swaps(vae)
    swaps.attribute("", "encode", lambda image, *args, **kwargs: EncoderOutput(latent=coder.encode(image).mean))
    try:
        yield
    finally:
        swaps.restore()
