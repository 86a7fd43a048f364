"""Communication of one UNet step: the engine's own counters from a dry run, and DistriFusion's for comparison.

The dry run parallelizes a UNet (usually on the meta device: nothing allocated, nothing computed) with a
:class:`~distlin.parallel.context.ParallelContext` whose communicator only counts, so the bytes and calls are
exactly what the engine's counters would report on the middle rank of an N-rank run, at any size. FLOPs of
that rank's band are counted in the same pass.

DistriFusion's volume is derived from the same model's layer shapes (hooks on a meta forward) with its
published scheme (mit-han-lab/distrifuser, patch parallelism): every self-attention all-gathers every band's
K and V; every convolution wider than 1x1 except ``conv_in`` all-gathers each band's ``padding`` boundary rows
at both ends; every GroupNorm all-gathers per-group ``[E[x], E[x^2]]``; the output bands are all-gathered.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distlin.bench.models import unet_inputs
from distlin.parallel import ParallelContext, PatchParallelConfig, Runtime
from distlin.parallel.comm import KINDS
from distlin.parallel.unet import ParallelUNet

TOTAL_KINDS = (*KINDS, "total")


@dataclass(frozen=True)
class DryRun:
    """Per UNet step on the simulated middle rank: bytes received and calls by kind, and counted FLOPs."""

    bytes_per_step: dict[str, float]
    calls_per_step: dict[str, float]
    flops: int


def dry_run(
    unet: UNet2DConditionModel,
    height: int,
    width: int,
    ranks: int,
    batch: int = 2,
    config: PatchParallelConfig | None = None,
    steps: int = 1,
) -> DryRun:
    """Parallelize ``unet`` over ``ranks`` simulated ranks, call it ``steps`` times and count the last call.

    CFG parallelism is not simulated: all ranks split the image, each with the whole ``batch``. The finite-output
    check is off (a dry run's output is not computed) and attention runs unchunked (chunking changes neither
    bytes nor FLOPs, only the number of ops the FLOP counter intercepts). ``unet`` is restored afterwards.
    """
    config = replace(config or PatchParallelConfig(cfg_parallel=False), check_finite=False, attention_chunk=None)
    ctx = ParallelContext(Runtime(), config, dry_run_ranks=ranks)
    handle = ParallelUNet(unet, ctx).apply()
    inputs = unet_inputs(unet, batch, height, width)
    try:
        with torch.inference_mode():
            for step in range(steps):
                ctx.stats.reset()
                with FlopCounterMode(display=False) as counter:
                    unet(timestep=999 - step, **inputs)
    finally:
        handle.undo()
    summary = ctx.stats.summary()
    return DryRun(dict(summary["bytes_per_step"]), dict(summary["calls_per_step"]), counter.get_total_flops())


@dataclass
class LayerShapes:
    """Shapes DistriFusion's exchanges depend on, for the whole image (one rank)."""

    attention: list[tuple[int, int, int]] = field(default_factory=list)  # (batch, tokens, K width) per attn1
    halo: list[tuple[int, int, int, int]] = field(default_factory=list)  # (batch, channels, pad rows, width)
    groupnorm: list[tuple[int, int]] = field(default_factory=list)  # (batch, groups)
    output: tuple[int, ...] = ()


def layer_shapes(unet: UNet2DConditionModel, height: int, width: int, batch: int = 2) -> LayerShapes:
    """One forward of ``unet`` (best on meta) with hooks recording the inputs DistriFusion would exchange."""
    shapes = LayerShapes()

    def on_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        if isinstance(module, Attention):
            shapes.attention.append((x.shape[0], x.shape[1], module.to_k.out_features))
        elif isinstance(module, nn.Conv2d):
            shapes.halo.append((x.shape[0], x.shape[1], module.padding[0], x.shape[3]))
        else:
            shapes.groupnorm.append((x.shape[0], module.num_groups))

    hooks = [
        module.register_forward_pre_hook(on_input, with_kwargs=True)
        for name, module in unet.named_modules()
        if (isinstance(module, Attention) and name.rsplit(".", 1)[-1] == "attn1")
        or (isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1) and name != "conv_in")
        or isinstance(module, nn.GroupNorm)
    ]
    try:
        with torch.inference_mode():
            out = unet(timestep=999, **unet_inputs(unet, batch, height, width), return_dict=False)[0]
    finally:
        for hook in hooks:
            hook.remove()
    shapes.output = tuple(out.shape)
    return shapes


def distrifusion_bytes(shapes: LayerShapes, ranks: int, element_size: int) -> dict[str, float]:
    """Bytes one rank receives per UNet step under DistriFusion's scheme with ``ranks`` equal bands (an all-gather
    of a band-sized piece delivers ``ranks - 1`` pieces to every rank)."""
    others = ranks - 1
    sent = {
        "attention": sum(b * tokens / ranks * 2 * c for b, tokens, c in shapes.attention),  # K and V
        "halo": sum(b * c * 2 * pad * w for b, c, pad, w in shapes.halo),  # top and bottom boundary rows
        "groupnorm": sum(2 * b * g for b, g in shapes.groupnorm),  # E[x] and E[x^2] per group
        "gather": float(torch.Size(shapes.output).numel()) / ranks,
    }
    result = {kind: others * n * element_size for kind, n in sent.items()}
    result["total"] = sum(result.values())
    return result
