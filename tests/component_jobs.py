"""Jobs the component tests run on every rank (importable by spawned processes): a user's LoRA, scheduler,
init image and ControlNet on a patch-parallel pipeline with fresh LinFusion layers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from distlin import LinFusion
from distlin.models.tiny import build_pipeline
from distlin.parallel import PatchParallelConfig, Runtime, parallelize
from distlin.run import generate, prepare_pipeline
from distlin.settings import build_settings

PROMPT = "a lighthouse on a cliff at dawn"
HEIGHT, WIDTH = 128, 64  # latent 16 x 8: two 8-row units, one per rank on two ranks


def lora_latents(runtime: Runtime, path: str, when: str, fuse: str, mode: str = "exact") -> torch.Tensor:
    """Final latents with a LoRA loaded ``when`` ("before" or "after" :func:`parallelize`) at scale 0.8;
    ``fuse``: "no" (adapter layers run), "fuse" (merged into the weights) or "unfuse" (merged, then taken out)."""
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
    kwargs: dict[str, Any] = {"height": HEIGHT, "width": WIDTH, "num_inference_steps": 2, "guidance_scale": 5.0}
    return pipe(PROMPT, output_type="latent", generator=generator, **kwargs).images


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
    jobs = {"lora": lora_latents, "run": run_latents}
    return [jobs[name](runtime, *args) for name, args in cases]
