"""Measured peak memory of a UNet forward without allocating: meta tensors plus torch's ``MemTracker``.

This is the reference the planner's predictions are validated against (``tests/test_memory.py``). Meta
tensors carry shapes and dtypes only, so a full-size SD-1.5 UNet at 1024 px "runs" on a laptop in seconds;
``MemTracker`` follows every storage's lifetime and reports the peak of live activation bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import ControlNetModel
from torch import nn
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

from distlin.lean import bound_memory
from distlin.linfusion import LinFusion
from distlin.models.tiny import build_unet, load_architecture


class _GlobalPeakTracker(MemTracker):
    """``MemTracker`` keeping only the peak over the whole call: its per-module peaks walk every tracked module at
    every op (an SDXL UNet: 2400 modules times 11 000 ops, minutes on a CPU), and only the whole call's is read.
    Overrides a private method of torch 2.13's tracker: were it renamed, the tracker would be slow again, not
    wrong; were the attributes it reads renamed, it would fail here."""

    def _update_peak_stats(self, peak_state: Any) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                self._peak_mem[device] = snapshot[_TOTAL_KEY]
                self._peak_mem_snap[device] = dict(snapshot)


def activation_peak(model: nn.Module, call: Callable[[], Any]) -> int:
    """Peak bytes of the activations (``model``'s parameters and buffers excluded) of a no-grad ``call()``; on
    meta tensors nothing is allocated."""
    tracker = _GlobalPeakTracker()
    tracker.track_external(model)
    with tracker, torch.no_grad():
        call()
    peak = tracker.get_tracker_snapshot("peak")
    return int(sum(value for stats in peak.values() for kind, value in stats.items() if str(kind).endswith("ACT")))


def measured_unet_activation_peak(
    name: str,
    latent_height: int,
    latent_width: int,
    batch: int = 2,
    dtype: torch.dtype = torch.float16,
    linfusion: bool = True,
    ff_chunk: int | None = None,
    controlnet: bool = False,
    residual_batch: int | None = None,
) -> int:
    """Peak bytes of activations (parameters excluded) of one no-grad UNet call on a ``latent_height`` x
    ``latent_width`` latent, with LinFusion self-attention when ``linfusion``; ``ff_chunk`` applies
    :func:`distlin.lean.bound_memory` (token-chunked transformers) as generate.py does. With ``controlnet`` a
    ControlNet made from the UNet runs first, as the ControlNet pipelines do, and its residuals go in;
    ``residual_batch`` (default ``batch``) samples of them, of which the call takes the first ``batch``, as a
    micro-batched call takes its slice of residuals computed for the whole guidance batch."""
    architecture = load_architecture(name)["unet"]
    unet = build_unet(name, torch_dtype=dtype, device="meta")
    if linfusion:
        LinFusion.construct_for(unet=unet, load_pretrained=False, init="random")
    if ff_chunk is not None:
        bound_memory(unet, ff_chunk)
    meta: dict[str, Any] = {"dtype": dtype, "device": "meta"}
    sample = torch.empty(batch, architecture["in_channels"], latent_height, latent_width, **meta)
    context = torch.empty(batch, 77, architecture["cross_attention_dim"], **meta)
    kwargs: dict[str, Any] = {}
    if architecture.get("addition_embed_type") == "text_time":
        pooled = architecture["projection_class_embeddings_input_dim"] - 6 * architecture["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch, pooled, **meta),
            "time_ids": torch.empty(batch, 6, **meta),
        }
    timestep = torch.tensor(10.0, device="meta")
    residuals: list[torch.Tensor] = []
    if controlnet:  # its residuals' shapes; its own peak comes before the UNet's (meta SDPA is not fused: not here)
        with torch.device("meta"), torch.no_grad():
            net = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
            image = torch.empty(batch, 3, 8 * latent_height, 8 * latent_width, **meta)
            down, mid = net.to(dtype)(sample, timestep, context, controlnet_cond=image, return_dict=False, **kwargs)
        residual_batch = residual_batch or batch
        residuals = [*down, mid]

    def call() -> None:
        if residuals:  # created while tracked: alive through the UNet call, as in the ControlNet pipelines
            *down, mid = (torch.empty(residual_batch, *t.shape[1:], **meta)[:batch] for t in residuals)
            kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        unet(sample, timestep, context, **kwargs)

    return activation_peak(unet, call)
