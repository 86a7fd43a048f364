"""Jobs the IP-Adapter tests run on every rank (importable by spawned processes): an IP-Adapter through
:func:`distlin.run.generate`, or through the Python API loaded before or after :func:`parallelize`."""

from __future__ import annotations

from typing import Any

import torch
from component_jobs import HEIGHT, PROMPT, WIDTH, run_latents
from PIL import Image

from distlin import LinFusion
from distlin.components import IpAdapter, apply_ip_adapter
from distlin.linfusion.model import self_attention_layers
from distlin.models.tiny import build_pipeline
from distlin.parallel import PatchParallelConfig, Runtime, parallelize


def loaded_latents(
    runtime: Runtime, ip_adapter: IpAdapter | None, when: str, linfusion: bool = True
) -> tuple[torch.Tensor, bool]:
    """Final latents of tiny-sd15 (fresh LinFusion layers, or softmax) with ``ip_adapter`` (None: without one)
    loaded ``when`` ("before" or "after" :func:`parallelize`), and whether every ``attn1`` kept its processor."""
    pipe = build_pipeline("tiny-sd15")
    if linfusion:
        torch.manual_seed(1)
        LinFusion.construct_for(pipe, load_pretrained=False, init="random")
    kept = True

    def load() -> bool:
        processors = [attn.processor for _, attn in self_attention_layers(pipe.unet)]
        apply_ip_adapter(pipe, ip_adapter)
        after = [attn.processor for _, attn in self_attention_layers(pipe.unet)]
        return all(mine is theirs for mine, theirs in zip(after, processors, strict=True))

    if ip_adapter is not None and when == "before":
        kept = load()
    parallelize(pipe, PatchParallelConfig("exact", cfg_parallel=False), runtime)
    if ip_adapter is not None and when == "after":
        kept = load()
    kwargs: dict[str, Any] = {"height": HEIGHT, "width": WIDTH, "num_inference_steps": 2, "guidance_scale": 5.0}
    if ip_adapter is not None:
        kwargs["ip_adapter_image"] = Image.open(ip_adapter.image).convert("RGB")
    latents = pipe(PROMPT, output_type="latent", generator=torch.Generator().manual_seed(2), **kwargs).images
    return latents, kept


def many(runtime: Runtime, cases: list[tuple[str, tuple]]) -> list[Any]:
    """Every case, by job name, in one process group."""
    jobs = {"api": loaded_latents, "run": run_latents}
    return [jobs[name](runtime, *args) for name, args in cases]
