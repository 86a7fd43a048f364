"""Jobs that the engine tests run on every rank (importable by spawned processes)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
)

from distlin import LinFusion
from distlin.lean import bound_memory
from distlin.models.tiny import build_controlnet, build_pipeline
from distlin.parallel import PatchParallelConfig, Runtime, parallelize
from distlin.parallel.context import ParallelContext
from distlin.parallel.conv import PatchConv2d
from distlin.parallel.groupnorm import PatchGroupNorm
from distlin.parallel.layout import RowLayout

PROMPT = "a lighthouse on a cliff at dawn"
HEIGHT, WIDTH = 320, 192  # latent 40 x 24: five 8-row units, so 3 ranks get uneven bands (16, 16, 8)


def generate(
    runtime: Runtime,
    name: str,
    linfusion: bool,
    config: PatchParallelConfig,
    kind: str = "txt2img",
    height: int = HEIGHT,
    width: int = WIDTH,
    steps: int = 3,
    guidance: float = 5.0,
    chunk: int | None = None,
) -> torch.Tensor:
    """Final latents of one pipeline run, parallelized over ``runtime``'s ranks; ``chunk``: the UNet runs under
    :func:`distlin.lean.bound_memory` (transformers in token chunks)."""
    pipe = build_pipeline(name, seed=0)
    if linfusion:
        torch.manual_seed(1)
        LinFusion.construct_for(pipe, load_pretrained=False, init="random")
    if chunk is not None:
        bound_memory(pipe.unet, chunk)
    kwargs: dict[str, Any] = {}
    if kind == "img2img":
        cls = StableDiffusionXLImg2ImgPipeline if name == "tiny-sdxl" else StableDiffusionImg2ImgPipeline
        pipe = cls(**pipe.components)
        kwargs["image"] = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(3))
        kwargs["strength"] = 0.7
    elif kind == "controlnet":
        pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=build_controlnet("tiny-sd15"))
        kwargs["image"] = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(4))
    else:
        kwargs.update(height=height, width=width)
    parallelize(pipe, config, runtime)
    out = pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="latent",
        generator=torch.Generator().manual_seed(2),
        **kwargs,
    )
    return out.images


def generate_many(runtime: Runtime, cases: list[tuple]) -> list[torch.Tensor]:
    return [generate(runtime, *case) for case in cases]


LAYER_CASES = [  # (kind, kernel, stride, dilation, padding)
    ("conv", 3, 1, 1, 1),
    ("conv", 3, 2, 1, 1),
    ("conv", 3, 1, 2, 2),
    ("conv", 3, 2, 2, 2),
    ("conv", 5, 1, 1, 2),
    ("groupnorm", 0, 0, 0, 0),
]


def layer_outputs(runtime: Runtime, height: int = 40, width: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each wrapped layer on its band (gathered) next to the plain module on the whole tensor."""
    ctx = ParallelContext(runtime, PatchParallelConfig(cfg_parallel=False))
    ctx.layout = RowLayout(height, width, 8, runtime.world_size)
    results = []
    for kind, k, s, d, p in LAYER_CASES:
        torch.manual_seed(0)
        x = torch.randn(2, 16, height, width)
        if kind == "conv":
            plain = torch.nn.Conv2d(16, 8, k, stride=s, padding=p, dilation=d)
            patched = PatchConv2d.from_conv(plain, ctx)
        else:
            plain = torch.nn.GroupNorm(4, 16)
            torch.nn.init.normal_(plain.weight)
            torch.nn.init.normal_(plain.bias)
            patched = PatchGroupNorm.from_norm(plain, ctx)
        start, stop = ctx.layout.band(ctx.patch.index, width)
        with torch.no_grad():
            band = patched(x[:, :, start:stop])
            full = plain(x)
        bands = ctx.patch.all_gather_rows(band, ctx.layout.sizes(full.shape[-1]), 2, "gather").wait()
        results.append((torch.cat(bands, dim=2), full))
    return results


def band_tokens(runtime: Runtime, height: int, width: int) -> dict[tuple[bool, bool], int]:
    """Tokens of this rank's band in one UNet call, per (guidance, cfg_parallel): what the engine really splits."""
    from distlin.models.tiny import build_unet
    from distlin.parallel import parallelize_unet

    found = {}
    for cfg_parallel in (True, False):
        unet = build_unet("tiny-sd15")
        handle = parallelize_unet(unet, PatchParallelConfig(cfg_parallel=cfg_parallel), runtime)
        for guidance in (True, False):
            batch = 2 if guidance else 1
            sample = torch.randn(batch, 4, height // 8, width // 8)
            context = torch.randn(batch, 77, unet.config.cross_attention_dim)
            with torch.no_grad():
                unet(sample, 10, context)
            layout = handle.ctx.layout
            found[(guidance, cfg_parallel)] = layout.sizes()[handle.ctx.patch.index] * layout.width
        handle.undo()
    return found
