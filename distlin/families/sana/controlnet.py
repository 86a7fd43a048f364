"""A SANA ControlNet (diffusers ``SanaControlNetModel``) on the row bands of its transformer, exact.

Its blocks are the transformer's blocks, so they split the same way (:func:`swap_band_layers`, on the
transformer's engine); its conditioning latent (the control image through the DC-AE) enters through the same
patch embedding as the latent, so a pre-hook cuts both to this rank's rows. Each residual it returns is per token
(a linear layer on a block's output), so a band's residuals are exactly the tokens the transformer's band adds
them to: nothing is gathered (:func:`~distlin.families.sana.transformer.band_tokens` takes them as they are).
"""

from __future__ import annotations

from typing import Any

from diffusers import SanaControlNetModel, SanaControlNetPipeline
from diffusers.models.controlnets.controlnet_sana import SanaControlNetOutput
from torch import nn

from distlin.errors import UsageError
from distlin.families.base import check_controlnet_fits
from distlin.families.sana.family import SANA
from distlin.families.sana.transformer import ParallelSanaTransformer, band_arguments, swap_band_layers
from distlin.parallel.controlnet import ParallelControlNet
from distlin.parallel.unet import concat_batches
from distlin.sources import local_path
from distlin.surgery import calls_like


class ParallelSanaControlNet(ParallelControlNet):
    """Handle of a band-parallel ``SanaControlNetModel`` on a transformer's engine; the transformer's ``undo()``
    restores it too."""

    def __init__(self, controlnet: nn.Module, engine: ParallelSanaTransformer):
        if controlnet.config.patch_size != engine.unit:
            raise UsageError(
                f"the SANA ControlNet's patch size {controlnet.config.patch_size} is not the transformer's "
                f"{engine.unit}; pass a ControlNet trained for this model"
            )
        super().__init__(controlnet, engine)
        self.engine = engine

    def swap_layers(self) -> None:
        swap_band_layers(self.controlnet, self.ctx, self._swaps)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        arguments = dict(self._signature.bind(*args, **kwargs).arguments)
        self._return_dict = arguments.get("return_dict", True)
        rows = ("hidden_states", "controlnet_cond")
        arguments = band_arguments(self.ctx, arguments, self.unit, self.engine.factor, rows)[0]
        arguments["return_dict"] = False
        return (), self._micro_batches.first(self.ctx, arguments, "hidden_states")

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        samples = concat_batches([o[0] for o in self._micro_batches.outputs(self.ctx, module, output)])
        return SanaControlNetOutput(controlnet_block_samples=samples) if self._return_dict else (samples,)


def parallelize_sana_controlnet(controlnet: nn.Module, engine: ParallelSanaTransformer) -> ParallelSanaControlNet:
    """Make a ``SanaControlNetModel`` run on the row bands of ``engine``'s transformer (its residuals come out as
    this rank's band); ``engine.undo()`` restores it too."""
    handle = ParallelSanaControlNet(controlnet, engine).apply()
    engine.ctx.on_close(handle.undo)  # undone with the transformer's engine
    return handle


def load_sana_controlnet(source: str, pipe: Any) -> nn.Module:
    """The family's ControlNet loader: a ``SanaControlNetModel`` folder (or Hub id) in diffusers' layout, on the
    transformer's device and dtype, checked to fit it."""
    try:
        controlnet = SanaControlNetModel.from_pretrained(
            str(local_path(source) or source), torch_dtype=pipe.transformer.dtype
        )
    except (OSError, ValueError) as err:
        raise UsageError(f"SANA ControlNet {source!r} cannot be loaded ({err}); fix --controlnet") from None
    fits = dict(controlnet.config)
    check_controlnet_fits(source, fits, dict(pipe.transformer.config), SANA.controlnet_fits, "transformer")
    return controlnet.to(pipe.transformer.device)


def sana_controlnet_pipeline(pipe: Any, controlnets: list[nn.Module]) -> Any:
    """The family's ControlNet variant: ``SanaControlNetPipeline`` over ``pipe``'s components (one ControlNet:
    diffusers' SANA pipeline sums none)."""
    if len(controlnets) != 1:
        raise UsageError(
            f"SANA's ControlNet pipeline takes one ControlNet, not {len(controlnets)}; pass one --controlnet"
        )
    variant = calls_like(SanaControlNetPipeline.from_pipe(pipe, controlnet=controlnets[0]), pipe)
    variant.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return variant
