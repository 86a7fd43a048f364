"""DemoFusion-style cascade for SDXL, as LinFusion runs it for its ultra-high-resolution SDXL images.

Stage 0 is plain text-to-image at the native size. Every later stage decodes, upscales bicubically in pixel
space and re-encodes the previous result into a reference latent ``z0``, noises it to the stage's starting
timestep and denoises with two DemoFusion devices at every step ``t``:

* skip residual: ``z_t <- c1 * add_noise(z0, noise, t) + (1 - c1) * z_t`` keeps the early (noisy) steps on
  the upscaled composition;
* dilated sampling: a second UNet evaluation with every spatial conv dilated by the stage's ratio to the
  native size (so its receptive field covers the image as it did at native size), on a Gaussian-blurred
  latent; the noise predictions mix as ``(1 - c2) * eps_local + c2 * eps_dilated``.

``cos_f = 0.5 * (1 + cos(pi * (T - t) / T))`` (``T`` train timesteps), ``c1 = cos_f**3``, ``c2 = cos_f``, blur
sigma ``0.8 * (0.99 * cos_f + 0.01)``: both devices fade out as ``t`` reaches 0, leaving local detail.

Strength: like LinFusion's ``StableDiffusionXLHighResPipeline`` (not DemoFusion, which runs every stage over
the full schedule), a stage of strength ``s`` runs the last ``int(steps * s)`` timesteps of a ``steps``-step
schedule, starting from ``z0`` noised to the first of them; LinFusion's strengths are
``linspace(0.32, 0, upscales + 1)`` without the final 0 (:func:`upscale_strengths`). As there, each stage's
latents are renormalised per channel to the native stage's mean and std.

With a parallelized UNet both evaluations are patch-parallel: :class:`~distlin.parallel.conv.PatchConv2d`
takes its halo widths from the mutated ``dilation``/``padding``/``pad_top``. The two evaluations see different
convolutions, so neither may reuse the other's exchanges: in later stages the engine starts each afresh (it sees
the dilation change, :meth:`~distlin.parallel.context.ParallelContext.begin_step`) and ``displaced`` mode runs
synchronous exchanges there.

With a ControlNet (``pipe`` a ``StableDiffusionXLControlNetPipeline``, one or several ControlNets) every
evaluation is conditioned on the stage's control image, prepared at the stage's size as the pipeline prepares
it. In the dilated branch the ControlNet's convs are dilated with the UNet's (it is a copy of the UNet's encoder,
and its conditioning encoder then sees the control image at the native size's scale, as the UNet sees the
latent), and it gets the same control image, not blurred: the blur fights the aliasing of the dilated UNet's
latent, while the control image is the user's structure, which both branches follow alike. A ControlNet with
``global_pool_conditions`` runs without guess mode in the upscaling stages (the pipeline's stage 0 uses it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from distlin.errors import UsageError
from distlin.parallel.unet import ParallelUNet
from distlin.sampling.reference import encoded, upscaled_reference
from distlin.sampling.stages import Stage, StageClock, StageReport, check_stages
from distlin.sizes import format_size
from distlin.vae.coders import Coder, PlainVAE

UPSCALE_STRENGTH = 0.32  # LinFusion's SDXL ``upscale_strength``: the first upscaling stage's strength
SKIP_POWER, DILATED_POWER = 3.0, 1.0  # DemoFusion's cosine_scale_1 and cosine_scale_2
BLUR_SIGMA = 0.8  # DemoFusion's sigma of the dilated branch's Gaussian blur


class Weights(NamedTuple):
    """DemoFusion's schedule at one timestep: skip-residual weight ``c1``, dilated weight ``c2``, blur sigma."""

    cos_f: float
    c1: float
    c2: float
    sigma: float


def demofusion_weights(t: float, train_timesteps: int = 1000) -> Weights:
    """The weights at timestep ``t``: 1 at ``t = T`` (pure structure), 0 at ``t = 0`` (pure local detail)."""
    cos_f = 0.5 * (1 + math.cos(math.pi * (train_timesteps - t) / train_timesteps))
    return Weights(cos_f, cos_f**SKIP_POWER, cos_f**DILATED_POWER, BLUR_SIGMA * (0.99 * cos_f + 0.01))


def upscale_strengths(upscales: int, start: float = UPSCALE_STRENGTH) -> list[float]:
    """LinFusion's per-stage strengths: ``linspace(start, 0, upscales + 1)`` without the final 0.

    Rounded to 6 decimals so ``int(steps * s)`` does not lose a step to float noise (0.32 * 50 = 16).
    """
    return [round(start * (1 - k / upscales), 6) for k in range(upscales)]


@contextmanager
def dilated_convs(model: nn.Module, ratio: int) -> Iterator[None]:
    """Every conv of ``model`` (a UNet, a ControlNet, or a module holding both) with a kernel larger than 1 gets
    ``dilation`` and ``padding`` (and a :class:`~distlin.parallel.conv.PatchConv2d`'s ``pad_top``) times
    ``ratio``; restored exactly on exit, even on error.

    Padding grows with dilation, so every feature map keeps its size and the model runs unchanged.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1]
    for conv in convs:
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(f"dilating a conv needs numeric zero padding, got {conv.padding!r} ({conv.padding_mode})")
    saved = [(conv, conv.dilation, conv.padding, getattr(conv, "pad_top", None)) for conv in convs]
    try:
        for conv, dilation, padding, pad_top in saved:
            conv.dilation = tuple(d * ratio for d in dilation)
            conv.padding = tuple(p * ratio for p in padding)
            if pad_top is not None:
                conv.pad_top = pad_top * ratio
        yield
    finally:
        for conv, dilation, padding, pad_top in saved:
            conv.dilation, conv.padding = dilation, padding
            if pad_top is not None:
                conv.pad_top = pad_top


def blurred(latents: torch.Tensor, ratio: int, sigma: float) -> torch.Tensor:
    """DemoFusion's input to the dilated branch: a ``(2 * ratio - 1)``-wide zero-padded Gaussian blur (it
    suppresses the aliasing of a dilated kernel), renormalised to the latent's per-channel mean and std."""
    size = 2 * ratio - 1
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(latents)
    channels, out = latents.shape[1], latents
    for shape, padding in (((size, 1), (size // 2, 0)), ((1, size), (0, size // 2))):  # separable: rows, then columns
        out = F.conv2d(out, kernel.view(1, 1, *shape).expand(channels, -1, -1, -1), padding=padding, groups=channels)
    return _renormalised(out, latents.mean(dim=(2, 3), keepdim=True), latents.std(dim=(2, 3), keepdim=True))


def _renormalised(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (latents - latents.mean(dim=(2, 3), keepdim=True)) / latents.std(dim=(2, 3), keepdim=True) * std + mean


@dataclass(frozen=True)
class _Conditioning:
    """Text conditioning of every UNet call, CFG halves (negative first) already concatenated."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    projection_dim: int
    cfg: bool
    guidance_scale: float
    image_embeds: list[torch.Tensor] | None = None  # an IP-Adapter's, CFG halves concatenated like the text's
    control: Any = None  # this stage's control image(s) as the ControlNet pipeline prepares them (CFG-doubled)
    control_scale: float | list[float] = 1.0


def _predict(
    pipe: Any, cond: _Conditioning, latents: torch.Tensor, t: torch.Tensor, time_ids: torch.Tensor
) -> torch.Tensor:
    """The guided noise prediction for ``latents`` at ``t``; with a control image, the ControlNet's residuals on
    the same input are added to the UNet's, as the ControlNet pipeline does."""
    model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2) if cond.cfg else latents, t)
    added = {"text_embeds": cond.pooled, "time_ids": time_ids}
    residuals = {}
    if cond.control is not None:
        down, mid = pipe.controlnet(
            model_input,
            t,
            encoder_hidden_states=cond.embeds,
            controlnet_cond=cond.control,
            conditioning_scale=cond.control_scale,
            added_cond_kwargs=added,
            return_dict=False,
        )
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    if cond.image_embeds is not None:
        added = {**added, "image_embeds": cond.image_embeds}
    eps = pipe.unet(
        model_input, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False, **residuals
    )[0]
    if not cond.cfg:
        return eps
    uncond, text = eps.chunk(2)
    return uncond + cond.guidance_scale * (text - uncond)


def _prepared_control(pipe: Any, images: Any, stage: Stage, cfg: bool) -> Any:
    """The control image (a list of them for several ControlNets) as the ControlNet pipeline prepares it at
    ``stage``'s size: a tensor on the ControlNet's device and dtype, CFG halves concatenated."""

    def prepare(image: Any) -> torch.Tensor:
        return pipe.prepare_image(
            image=image,
            width=stage.width,
            height=stage.height,
            batch_size=1,
            num_images_per_prompt=1,
            device=pipe._execution_device,
            dtype=pipe.controlnet.dtype,
            do_classifier_free_guidance=cfg,
        )

    return [prepare(image) for image in images] if isinstance(images, list) else prepare(images)


def _ratio(native: Stage, stage: Stage) -> int:
    ratio, rest = divmod(stage.height, native.height)
    if rest or stage.width != ratio * native.width or ratio < 1:
        raise UsageError(
            f"stage {format_size(stage.width, stage.height)} must be an integer multiple, with the same factor on "
            f"both sides, of the native {format_size(native.width, native.height)}"
        )
    return ratio


def _denoise_stage(
    pipe: Any,
    cond: _Conditioning,
    z0: torch.Tensor,
    stage: Stage,
    ratio: int,
    steps: int,
    seed: int,
) -> torch.Tensor:
    """One upscaling stage: the last ``int(steps * strength)`` timesteps with skip residual and dilated sampling."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=z0.device)
    count = min(int(steps * stage.strength), steps)
    if count == 0:
        size = format_size(stage.width, stage.height)
        raise UsageError(f"stage {size}: strength {stage.strength} × {steps} steps is no step")
    # Without a begin index the scheduler finds every timestep's sigma by value, as add_noise needs below.
    timesteps = scheduler.timesteps[(steps - count) * scheduler.order :]
    noise = randn_tensor(z0.shape, generator=torch.Generator().manual_seed(seed), device=z0.device, dtype=z0.dtype)
    time_ids = pipe._get_add_time_ids(
        (stage.height, stage.width), (0, 0), (stage.height, stage.width), cond.embeds.dtype, cond.projection_dim
    ).to(z0.device)
    time_ids = time_ids.repeat(2, 1) if cond.cfg else time_ids
    train_timesteps = scheduler.config.num_train_timesteps
    dilated_models = nn.ModuleList([pipe.unet] if cond.control is None else [pipe.unet, pipe.controlnet])
    latents = scheduler.add_noise(z0, noise, timesteps[:1])
    for t in pipe.progress_bar(timesteps):  # the pipeline's bar settings: shown on rank 0 only
        w = demofusion_weights(float(t), train_timesteps)
        latents = w.c1 * scheduler.add_noise(z0, noise, t.reshape(1)) + (1 - w.c1) * latents
        if ratio == 1:  # at the native size the dilated branch is the local one
            latents = scheduler.step(_predict(pipe, cond, latents, t, time_ids), t, latents, return_dict=False)[0]
            continue
        local = _predict(pipe, cond, latents, t, time_ids)
        with dilated_convs(dilated_models, ratio):
            dilated = _predict(pipe, cond, blurred(latents, ratio, w.sigma), t, time_ids)
        latents = scheduler.step((1 - w.c2) * local + w.c2 * dilated, t, latents, return_dict=False)[0]
    return latents


@torch.no_grad()
def run_demofusion(
    pipe: Any,
    prompt: str,
    stages: Sequence[Stage],
    steps: int = 50,
    seed: int = 0,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    vae: Coder | None = None,
    handle: ParallelUNet | None = None,
    on_stage: StageReport | None = None,
    init_image: torch.Tensor | None = None,
    native: Stage | None = None,
    ip_adapter_image: Any = None,
    controls: Sequence[Any] = (),
    control_scale: float | list[float] = 1.0,
) -> torch.Tensor:
    """The last stage's latents (scaled, as the UNet sees them), the same on every rank.

    ``pipe`` is a ``StableDiffusionXLPipeline``; stage 0 runs it (generator ``seed``), stage ``k`` draws its
    noise from ``seed + k``. ``vae`` (band-parallel) replaces the plain VAE between stages; ``handle`` (the
    parallelized UNet) is checked against every stage's size up front. Decode the result with
    :func:`distlin.vae.coders.decode_latents`. ``on_stage`` gets each stage's wall time as it ends.

    With ``init_image`` (``(1, 3, H, W)`` in [-1, 1], any size) stage 0 refines that picture, resized to its
    size, at its strength, like a later stage; its latents then anchor the per-channel statistics, and
    ``native`` (default: stage 0) is the size dilations are measured from. ``ip_adapter_image`` (with an
    IP-Adapter loaded) steers every stage, encoded once. With a ControlNet pipeline, ``controls`` holds every
    stage's control image (a list of them for several ControlNets), resized to that stage's size, and
    ``control_scale`` its conditioning scale (a list for several ControlNets, or one number for all).
    """
    check_stages(stages)
    native = native or stages[0]
    refined = list(enumerate(stages))[0 if init_image is not None else 1 :]
    ratios = {index: _ratio(native, stage) for index, stage in refined}
    cfg = guidance_scale > 1.0
    if handle is not None:
        for stage in stages:
            handle.check_size(stage.height, stage.width, guidance=cfg)
    clock = StageClock(on_stage)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt, device=pipe._execution_device, do_classifier_free_guidance=cfg, negative_prompt=negative_prompt
    )
    image_embeds = None
    if ip_adapter_image is not None:
        image_embeds = pipe.prepare_ip_adapter_image_embeds(ip_adapter_image, None, pipe._execution_device, 1, cfg)
    coder = vae or PlainVAE(pipe.vae)
    if controls and isinstance(controls[0], list) and not isinstance(control_scale, list):
        control_scale = [control_scale] * len(controls[0])  # what diffusers' MultiControlNetModel takes
    if init_image is not None:
        latents = encoded(pipe, coder, init_image, stages[0]).to(embeds.dtype)
    else:
        latents = pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=negative_pooled,
            height=native.height,
            width=native.width,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
            ip_adapter_image_embeds=image_embeds,
            **({"image": controls[0], "controlnet_conditioning_scale": control_scale} if controls else {}),
        ).images
        clock.lap(0, native, latents)
    anchor_mean, anchor_std = latents.mean(dim=(2, 3), keepdim=True), latents.std(dim=(2, 3), keepdim=True)
    encoder_2 = pipe.text_encoder_2
    cond = _Conditioning(
        embeds=torch.cat([negative, embeds]) if cfg else embeds,
        pooled=torch.cat([negative_pooled, pooled]) if cfg else pooled,
        projection_dim=encoder_2.config.projection_dim if encoder_2 is not None else int(pooled.shape[-1]),
        cfg=cfg,
        guidance_scale=guidance_scale,
        image_embeds=image_embeds,
        control_scale=control_scale,
    )
    for index, stage in refined:
        z0 = latents if index == 0 else upscaled_reference(pipe, coder, latents, stage)
        if controls:
            cond = replace(cond, control=_prepared_control(pipe, controls[index], stage, cfg))
        latents = _denoise_stage(pipe, cond, z0, stage, ratios[index], steps, seed + index)
        latents = _renormalised(latents, anchor_mean, anchor_std)
        clock.lap(index, stage, latents)
    return latents
