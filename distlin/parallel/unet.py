"""Patch parallelism applied to an unmodified diffusers UNet, in one place.

``parallelize_unet`` swaps every convolution and GroupNorm for its band-aware twin (same
parameters), gives every ``attn1`` a band-aware processor and wraps the UNet's forward with two hooks:
before, split the CFG batch and cut this rank's rows out of the residuals of a ControlNet that ran on the whole
image (a band-parallel one, :mod:`distlin.parallel.controlnet`, hands over this band already; the latent stays
whole: ``conv_in`` cuts its band and halo rows from it, with no exchange); after, run the remaining micro-batches
(``PatchParallelConfig.micro_batch``) and gather the bands so every rank returns the full prediction and
schedulers run unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from distlin.errors import UsageError
from distlin.linfusion.model import self_attention_layers
from distlin.parallel.attention import parallel_processor
from distlin.parallel.config import PatchParallelConfig
from distlin.parallel.context import ParallelContext
from distlin.parallel.conv import PatchConv2d
from distlin.parallel.groupnorm import PatchGroupNorm
from distlin.parallel.layout import RowLayout
from distlin.parallel.runtime import Runtime
from distlin.parallel.topology import LATENT_FACTOR, Topology, row_unit
from distlin.surgery import Swaps

RESIDUAL_KWARGS = (
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
)


class NonFiniteError(RuntimeError):
    """The denoiser produced NaN or Inf; raised on every rank at the same step."""


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def _batch_slice(arguments: dict[str, Any], batch: int, start: int, stop: int) -> dict[str, Any]:
    """Samples ``[start, stop)`` of every tensor argument whose first dim is the batch (others as they are)."""

    def take(t: torch.Tensor) -> torch.Tensor:
        return t[start:stop] if t.ndim > 0 and t.shape[0] == batch else t

    return {k: _map_tensors(v, take) for k, v in arguments.items()}


def guidance_half(arguments: dict[str, Any], batch: int, topology: Topology) -> dict[str, Any]:
    """This rank's half of a guidance batch the topology splits (every argument batched like the sample), or
    ``arguments`` as they are."""
    if not topology.cfg_split:
        return arguments
    half, side = batch // 2, topology.cfg_index
    return _batch_slice(arguments, batch, side * half, (side + 1) * half)


def _micro_batches(arguments: dict[str, Any], batch: int, size: int | None) -> list[dict[str, Any]]:
    """``arguments`` cut into consecutive batches of at most ``size`` samples."""
    if size is None or batch <= size:
        return [arguments]
    return [_batch_slice(arguments, batch, start, start + size) for start in range(0, batch, size)]


def concat_batches(outputs: list[Any]) -> Any:
    """Micro-batches' outputs of one structure (tensors, tuples, lists of them) joined along the batch."""
    first = outputs[0]
    if len(outputs) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    return type(first)(concat_batches(list(parts)) for parts in zip(*outputs, strict=True))


class MicroBatches:
    """A hooked model call cut into micro-batches of at most ``ctx.config.micro_batch`` samples: the call the
    hooks wrap runs the first, :meth:`outputs` the others, each on its own lane (its own displaced slots)."""

    def __init__(self) -> None:
        self._later: list[dict[str, Any]] = []

    def first(self, ctx: ParallelContext, arguments: dict[str, Any], latent: str = "sample") -> dict[str, Any]:
        """Keep the later micro-batches of ``arguments``; the first one's, for the wrapped call (``latent``: the
        argument whose first dim is the batch)."""
        batches = _micro_batches(arguments, arguments[latent].shape[0], ctx.config.micro_batch)
        self._later, ctx.lane = batches[1:], 0
        return batches[0]

    def outputs(self, ctx: ParallelContext, module: nn.Module, first: Any) -> list[Any]:
        """``first`` (the wrapped call's output) and the later micro-batches' outputs, in batch order."""
        outputs = [first]
        for lane, arguments in enumerate(self._later, start=1):
            ctx.lane = lane
            outputs.append(module.forward(**arguments))  # forward, not __call__: no hooks run again
        self._later, ctx.lane = [], 0
        return outputs


def swap_band_layers(model: nn.Module, ctx: ParallelContext, swaps: Swaps) -> None:
    """Every ``nn.Conv2d`` and ``nn.GroupNorm`` of ``model`` for its band twin and every ``attn1`` processor for
    a band-aware one, all on ``ctx`` (the UNet's and a ControlNet's layers share one engine)."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Conv2d:
            swaps.module(name, PatchConv2d.from_conv(module, ctx))
        elif type(module) is nn.GroupNorm:
            swaps.module(name, PatchGroupNorm.from_norm(module, ctx))
    for name, attn in self_attention_layers(model):
        swaps.processor(name, parallel_processor(attn, ctx, ctx.config.attention_chunk))


def gather_prediction(ctx: ParallelContext, band: torch.Tensor, split_cfg: bool, what: str) -> torch.Tensor:
    """Every band of this step's prediction (``(B, C, rows, W)``, rows at ``ctx.layout``'s width or a multiple),
    and both guidance halves when split: the whole prediction on every rank, so schedulers run unchanged. Checks
    it is finite and ends the step."""
    bands = ctx.patch.all_gather_rows(band, ctx.layout.sizes(band.shape[-1]), 2, "gather").wait()
    full = torch.cat(bands, dim=2) if len(bands) > 1 else bands[0]
    if split_cfg:
        halves = ctx.cfg.all_gather_rows(full, [full.shape[0]] * 2, 0, "gather").wait()
        full = torch.cat(halves, dim=0)
    # Every rank holds the same gathered prediction, so every rank stops at the same step: no extra collective.
    if ctx.config.check_finite and not bool(torch.isfinite(full).all()):
        dtype = str(full.dtype).replace("torch.", "")
        raise NonFiniteError(
            f"non-finite values in the {what} output at step {ctx.step} (dtype {dtype}); "
            "run in bfloat16 or float32 (LinFusion-2-1 is known to overflow in float16)"
        )
    ctx.end_step()
    return full


H = TypeVar("H", bound="BandHandle")


class BandHandle:
    """Handle of a model made band-parallel (a UNet, a family's own denoiser, a ControlNet on the denoiser's
    engine): the context it runs with, ``check_size`` and ``undo()``. :meth:`apply` swaps in the band twins
    (:meth:`swap_layers`) and hooks the forward: ``_before`` cuts this rank's band of the call's arguments,
    ``_after`` joins the outputs (a denoiser's: gathers the prediction)."""

    def __init__(self, model: nn.Module, ctx: ParallelContext, unit: int, factor: int = LATENT_FACTOR):
        self.model, self.ctx, self.unit, self.factor = model, ctx, unit, factor  # factor: image px per latent px
        self._signature = inspect.signature(model.forward)
        self._swaps = Swaps(model)
        self._hooks: list[Any] = []
        self._split_cfg, self._return_dict = False, True
        self._micro_batches = MicroBatches()

    def swap_layers(self) -> None:
        """The model's layers for their band twins (a UNet's: convs, GroupNorms, ``attn1``)."""
        swap_band_layers(self.model, self.ctx, self._swaps)

    def apply(self: H) -> H:
        self.swap_layers()
        self._hooks = [
            self.model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.model.register_forward_hook(self._after, with_kwargs=True),
        ]
        return self

    def check_size(self, height: int, width: int, guidance: bool = True) -> RowLayout:
        """Validate an image size against the ranks before any exchange (raises UsageError naming the fix)."""
        return self.ctx.topology_for(guidance).check_image(height, width, self.unit, self.factor)

    def restore(self) -> None:
        """The original modules, processors and forward of this model."""
        for hook in self._hooks:
            hook.remove()
        self._swaps.restore()
        self._hooks = []

    def undo(self) -> None:
        """:meth:`restore`, and close the context (the ControlNets on this engine registered their own ``undo``
        with it, so they are restored too)."""
        self.restore()
        self.ctx.close()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        raise NotImplementedError

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        raise NotImplementedError


class ParallelUNet(BandHandle):
    """Handle of a parallelized UNet: the context it runs with, and ``undo()`` to restore it."""

    def __init__(self, unet: nn.Module, ctx: ParallelContext):
        super().__init__(unet, ctx, row_unit(unet.config))
        self.unet = unet
        self._processors: list[tuple[str, nn.Module, object]] = []  # (name, attn1, the processor the engine set)

    def swap_layers(self) -> None:
        super().swap_layers()
        self._processors = [(name, attn, attn.processor) for name, attn in self_attention_layers(self.unet)]

    def _check_processors(self) -> None:
        """Every ``attn1`` still has the processor the engine gave it: diffusers' ``load_ip_adapter`` (and any
        ``set_attn_processor``) rebuilds them without the exchange, which would silently give another image."""
        for name, attn, processor in self._processors:
            if attn.processor is not processor:
                raise UsageError(
                    f"the self-attention processor of {name} was replaced after parallelize (diffusers' "
                    "load_ip_adapter or set_attn_processor do so); load an IP-Adapter with "
                    "distlin.components.apply_ip_adapter, or call undo() and parallelize again after the change"
                )

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._check_processors()
        ctx = self.ctx
        arguments = dict(self._signature.bind(*args, **kwargs).arguments)
        sample = arguments["sample"]
        batch = sample.shape[0]
        self._return_dict = arguments.get("return_dict", True)
        topology = ctx.use_topology(batch)
        self._split_cfg = topology.cfg_split
        arguments = guidance_half(arguments, batch, topology)
        layout = topology.layout(sample.shape[2], sample.shape[3], self.unit)
        ctx.begin_step(layout, arguments.get("timestep"))
        me = ctx.patch.index

        def band(t: torch.Tensor) -> torch.Tensor:
            """This band of a whole-image residual; a band-parallel ControlNet's is this band already."""
            bounds = layout.boundaries_at_width(t.shape[-1])
            if t.shape[-2] == bounds[-1]:
                return t[..., bounds[me] : bounds[me + 1], :]
            if t.shape[-2:] == (1, 1):  # pooled over the image (global_pool_conditions): the same for every band
                return t
            if t.shape[-2] != bounds[me + 1] - bounds[me]:
                raise ValueError(
                    f"a ControlNet residual of {t.shape[-2]} rows is neither the image's {bounds[-1]} rows nor this "
                    f"band's {bounds[me + 1] - bounds[me]}: the ControlNet ran with another batch split than the UNet "
                    "(guess mode with cfg_parallel); run it with cfg_parallel=False"
                )
            return t

        for key in RESIDUAL_KWARGS:
            if arguments.get(key) is not None:
                arguments[key] = _map_tensors(arguments[key], band)
        arguments["return_dict"] = False
        return (), self._micro_batches.first(ctx, arguments)

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        out = concat_batches([o[0] for o in self._micro_batches.outputs(self.ctx, module, output)])
        full = gather_prediction(self.ctx, out, self._split_cfg, "UNet")
        return UNet2DConditionOutput(sample=full) if self._return_dict else (full,)


def parallelize_unet(
    unet: nn.Module, config: PatchParallelConfig | None = None, runtime: Runtime | None = None
) -> ParallelUNet:
    """Make ``unet`` patch-parallel over the ranks of ``runtime`` (one rank: the same code, no exchange).

    Mount LinFusion before calling this: the attention processors are chosen here.
    """
    ctx = ParallelContext(runtime or Runtime(), config or PatchParallelConfig())
    return ParallelUNet(unet, ctx).apply()
