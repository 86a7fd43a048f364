"""Jobs the component tests run on every rank (importable by spawned processes): a user's LoRA, scheduler,
init image and ControlNets on a patch-parallel pipeline with fresh LinFusion layers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import StableDiffusionControlNetPipeline

from distlin import LinFusion
from distlin.models.tiny import build_controlnet, build_pipeline
from distlin.parallel import PatchParallelConfig, Runtime, parallelize
from distlin.run import generate, prepare_pipeline
from distlin.settings import build_settings

PROMPT = "a lighthouse on a cliff at dawn"
HEIGHT, WIDTH = 128, 64  # latent 16 x 8: two 8-row units, one per rank on two ranks


def lora_latents(
    runtime: Runtime, path: str, when: str, fuse: str, mode: str = "exact", size: tuple[int, int] = (HEIGHT, WIDTH)
) -> torch.Tensor:
    """Final latents at ``size`` (height, width) with a LoRA loaded ``when`` ("before" or "after"
    :func:`parallelize`) at scale 0.8; ``fuse``: "no" (adapter layers run), "fuse" (merged into the weights) or
    "unfuse" (merged, then taken out)."""
    pipe = build_pipeline("tiny-sd15")
    torch.manual_seed(1)
    LinFusion.construct_for(pipe, load_pretrained=False, init="random")
    config = PatchParallelConfig(mode, warmup_steps=1, cfg_parallel=False)
    if when == "before":
        pipe.load_lora_weights(path, adapter_name="mine")
    parallelize(pipe, config, runtime)
    if when == "after":
        pipe.load_lora_weights(path, adapter_name="mine")
    pipe.set_adapters(["mine"], [0.8])
    if fuse in ("fuse", "unfuse"):
        pipe.fuse_lora(adapter_names=["mine"])
    if fuse == "unfuse":
        pipe.unfuse_lora()
    generator = torch.Generator().manual_seed(2)
    kwargs: dict[str, Any] = {"height": size[0], "width": size[1], "num_inference_steps": 2, "guidance_scale": 5.0}
    return pipe(PROMPT, output_type="latent", generator=generator, **kwargs).images


def controlnet_latents(runtime: Runtime, banded: bool) -> dict[str, torch.Tensor]:
    """Final latents of the ControlNet pipeline, its ControlNet parallelized with the UNet (``banded``) or a plain
    one added after :func:`parallelize` (whole on every rank); and the rows of the ControlNet's first activations
    on this rank: ``conv_in``'s (latent) and its conditioning encoder's first conv's (pixels)."""
    pipe = build_pipeline("tiny-sd15")
    torch.manual_seed(1)
    LinFusion.construct_for(pipe, load_pretrained=False, init="random")
    controlnet = build_controlnet("tiny-sd15")
    config = PatchParallelConfig("exact", cfg_parallel=False)
    if banded:
        pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
        parallelize(pipe, config, runtime)
    else:
        parallelize(pipe, config, runtime)
        pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    rows: list[int] = []
    for conv in (controlnet.conv_in, controlnet.controlnet_cond_embedding.conv_in):
        conv.register_forward_hook(lambda module, args, out: rows.append(out.shape[2]))
    image = torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(2)
    kwargs: dict[str, Any] = {"num_inference_steps": 2, "guidance_scale": 5.0, "output_type": "latent"}
    latents = pipe(PROMPT, image=image, generator=generator, **kwargs).images
    return {"latents": latents, "rows": torch.tensor(rows[:2])}


def run_latents(
    runtime: Runtime,
    preset: str,
    overrides: dict[str, Any],
    variations: list[dict],
    environ: Mapping[str, str] | None = None,
) -> list[torch.Tensor]:
    """Final latents of :func:`distlin.run.generate` for each variation of ``overrides`` (per-generation
    settings: scheduler, init image, ...), one after the other on one prepared pipeline; the run signals each
    new generation to the engine. ``environ``: the ``DISTLIN_*`` thresholds (default: the process's)."""
    limits = {} if environ is None else {"environ": environ}
    prepared = prepare_pipeline(build_settings(preset, overrides, runtime.world_size, **limits), runtime)
    out = []
    for variation in variations:
        settings = build_settings(preset, {**overrides, **variation}, runtime.world_size, **limits)
        out.append(generate(settings, runtime, prepared).latents)
    return out


def many(runtime: Runtime, cases: list[tuple[str, tuple]]) -> list[Any]:
    """Every case, by job name, in one process group."""
    jobs = {"lora": lora_latents, "run": run_latents, "controlnet": controlnet_latents}
    return [jobs[name](runtime, *args) for name, args in cases]
