"""Patch parallelism applied to an unmodified diffusers ControlNet, on the UNet's engine.

A ControlNet is the UNet's encoder plus a conditioning-image encoder, so it splits the same way: its convs,
GroupNorms and ``attn1`` processors become the engine's band twins, on the UNet's
:class:`~distlin.parallel.context.ParallelContext` (same layout, step counter, counters and displaced slots).
A pre-hook picks the call's topology, keeps this rank's half of a split guidance batch (the control image is
batched like the sample) and sets the layout. ``conv_in`` cuts its band from the whole latent and the
conditioning encoder's first conv from the whole control image (pixel rows, 8x the latent's), both with halo
rows and no exchange; every later conv exchanges halos. Its residuals come out as this rank's band of this
rank's half of the batch, which :class:`~distlin.parallel.unet.ParallelUNet` takes as they are, so each rank
computes ``1/N`` of the ControlNet as of the UNet. ``micro_batch`` bounds its calls as the UNet's: the
guidance halves one after the other, their residuals joined. The UNet's post-hook ends the step.
"""

from __future__ import annotations

from typing import Any

from diffusers.models.controlnets.controlnet import ControlNetOutput
from torch import nn

from distlin.parallel.unet import BandHandle, ParallelUNet, concat_batches, guidance_half


class ParallelControlNet(BandHandle):
    """Handle of one band-parallel ``ControlNetModel`` on a denoiser's engine (its layers swapped as a UNet
    encoder's: convs, GroupNorms, ``attn1``); ``undo()`` restores it (the denoiser's ``undo()`` does)."""

    def __init__(self, controlnet: nn.Module, engine: BandHandle):
        super().__init__(controlnet, engine.ctx, engine.unit, engine.factor)
        self.controlnet = controlnet

    def undo(self) -> None:
        self.restore()  # the engine's context stays open: it is the denoiser's

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ctx = self.ctx
        arguments = dict(self._signature.bind(*args, **kwargs).arguments)
        sample = arguments["sample"]
        batch = sample.shape[0]
        topology = ctx.use_topology(batch)
        arguments = guidance_half(arguments, batch, topology)
        layout = topology.layout(sample.shape[2], sample.shape[3], self.unit)
        ctx.begin_step(layout, arguments.get("timestep"))  # the UNet's, this step
        self._return_dict = arguments.get("return_dict", True)
        arguments["return_dict"] = False
        return (), self._micro_batches.first(ctx, arguments)

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        down, mid = concat_batches(self._micro_batches.outputs(self.ctx, module, output))
        return (
            ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)
            if self._return_dict
            else (down, mid)
        )


def controlnet_members(controlnet: nn.Module) -> list[nn.Module]:
    """The ControlNets of ``controlnet``: those a diffusers ``MultiControlNetModel`` sums, or itself."""
    nets = getattr(controlnet, "nets", None)
    return list(nets) if isinstance(nets, nn.ModuleList) else [controlnet]


def parallelize_controlnet(controlnet: nn.Module, engine: ParallelUNet) -> list[ParallelControlNet]:
    """Make ``controlnet`` (a ``ControlNetModel``, or each member of a ``MultiControlNetModel``) run on this
    rank's rows on the UNet ``engine``; ``engine.undo()`` restores it too.

    A ControlNet with ``global_pool_conditions`` (its residuals are means over the whole image) stays whole on
    every rank: the UNet cuts its residuals as any whole-image ControlNet's.
    """
    handles = [
        ParallelControlNet(member, engine).apply()
        for member in controlnet_members(controlnet)
        if not member.config.get("global_pool_conditions", False)
    ]
    for handle in handles:  # undone with the UNet's engine
        engine.ctx.on_close(handle.undo)
    return handles
