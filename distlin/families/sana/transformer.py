"""SANA's transformer (diffusers ``SanaTransformer2DModel``) on row bands of its token grid, exact.

Every layer of a SANA block is token-local except two, so a band of token rows needs only:

- each linear self-attention's state ``Σ_j [v_j; 1] relu(k_j)ᵀ`` (``B·h·(d+1)·d`` floats, whatever the image
  size) all-reduced (:class:`BandLinearAttnProcessor`): diffusers' ``SanaLinearAttnProcessor2_0`` is exactly
  that state applied to ``relu(q_i)``, so no distillation is needed;
- the Mix-FFN's depthwise 3x3 conv, the engine's :class:`~distlin.parallel.conv.PatchConv2d` (one halo row from
  each neighbouring band; its 1x1 convs exchange nothing).

Cross-attention, AdaLN modulation, the layer and RMS norms and the output projection stay local. A pre-hook cuts
this rank's latent rows (and guidance half), so the model's own forward patch-embeds (:class:`BandPatchEmbed`
adds the band's rows of the positional embedding where the config has one) and unpatchifies a band; a post-hook
gathers the bands (:func:`~distlin.parallel.unet.gather_prediction`). The layout is in latent rows with a unit
of one patch (the family's row unit), so the token grid is a level of it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed_from_grid
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from distlin.errors import UsageError
from distlin.families.sana.family import SANA
from distlin.ops.linear_attention import LinearAttentionState
from distlin.parallel.attention import StateAllReduce
from distlin.parallel.config import PatchParallelConfig
from distlin.parallel.context import ParallelContext
from distlin.parallel.conv import PatchConv2d
from distlin.parallel.layout import RowLayout
from distlin.parallel.runtime import Runtime
from distlin.parallel.unet import BandHandle, concat_batches, gather_prediction, guidance_half
from distlin.surgery import Swaps, bound_class, twin


class BandLinearAttnProcessor:
    """``SanaLinearAttnProcessor2_0`` on a band of tokens: the band's state, all-reduced, applied to its queries.

    Same operations in the same order as diffusers' processor; only the sum over tokens is split over ranks.
    """

    def __init__(self, ctx: ParallelContext):
        self.reduce = StateAllReduce(ctx)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("band-parallel SANA attention handles unmasked self-attention (attn1) only")
        dtype = hidden_states.dtype
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = F.relu(query.transpose(1, 2).unflatten(1, (attn.heads, -1))).float()
        key = F.relu(key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)).float()
        value = F.pad(value.transpose(1, 2).unflatten(1, (attn.heads, -1)).float(), (0, 0, 0, 1), value=1.0)
        band = LinearAttentionState(torch.matmul(value, key), key.new_zeros(0), hidden_states.shape[1])
        out = torch.matmul(self.reduce(band).kv, query)
        out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
        out = out.flatten(1, 2).transpose(1, 2).to(dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out.clip(-65504, 65504) if dtype == torch.float16 else out


def band_pos_embed(embed: PatchEmbed, height: int, width: int, start: int, stop: int, device: Any) -> torch.Tensor:
    """Token rows ``[start, stop)`` of the sin-cos positional embedding of a ``height`` x ``width`` token grid, the
    values ``PatchEmbed`` computes for the whole grid (same elementwise operations, then only the band's rows)."""
    if (height, width) == (embed.height, embed.width):
        return embed.pos_embed[:, start * width : stop * width]
    arange = torch.arange(height, device=device, dtype=torch.float32)
    grid_h = (arange / (height / embed.base_size) / embed.interpolation_scale)[start:stop]
    grid_w = torch.arange(width, device=device, dtype=torch.float32) / (width / embed.base_size)
    grid = torch.stack(torch.meshgrid(grid_w / embed.interpolation_scale, grid_h, indexing="xy"), dim=0)
    return get_2d_sincos_pos_embed_from_grid(embed.pos_embed.shape[-1], grid, output_type="pt").float().unsqueeze(0)


class BandPatchEmbed(PatchEmbed):
    """``PatchEmbed`` on this rank's latent rows: its convolution as is (band boundaries fall on whole patches)
    and the band's rows of the whole image's positional embedding."""

    twin_of: ClassVar[type] = PatchEmbed
    ctx: ClassVar[ParallelContext]

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(latent)
        if self.flatten:
            tokens = tokens.flatten(2).transpose(1, 2)
        if self.layer_norm:
            tokens = self.norm(tokens)
        if self.pos_embed is None:
            return tokens
        layout, p = self.ctx.layout, self.patch_size
        height, width = layout.height // p, layout.width // p
        start, stop = layout.band(self.ctx.patch.index, width)
        return (tokens + band_pos_embed(self, height, width, start, stop, latent.device)).to(tokens.dtype)


def swap_band_layers(model: nn.Module, ctx: ParallelContext, swaps: Swaps) -> None:
    """The band twins of a SANA model's split layers (a transformer's or a ControlNet's, whose blocks are the
    transformer's): its patch embedding, every Mix-FFN conv and every self-attention's processor, on ``ctx``."""
    if model.patch_embed.pos_embed_max_size:
        raise UsageError(
            f"a SANA {type(model).__name__} with a cropped positional embedding (pos_embed_max_size) is not "
            "split into bands; run it on one rank"
        )
    swaps.module("patch_embed", twin(model.patch_embed, bound_class(BandPatchEmbed, ctx=ctx)))
    for name, module in list(model.transformer_blocks.named_modules()):
        if type(module) is nn.Conv2d:
            swaps.module(f"transformer_blocks.{name}", PatchConv2d.from_conv(module, ctx))
        elif name.split(".")[-1] == "attn1" and isinstance(module, Attention):
            if not isinstance(module.processor, SanaLinearAttnProcessor2_0):
                raise UsageError(
                    f"the self-attention of {name} runs {type(module.processor).__name__}, not SANA's linear "
                    "attention; restore it (set_attn_processor) before parallelize"
                )
            swaps.processor(f"transformer_blocks.{name}", BandLinearAttnProcessor(ctx))


def band_arguments(
    ctx: ParallelContext, arguments: dict[str, Any], unit: int, factor: int, rows: tuple[str, ...]
) -> tuple[dict[str, Any], RowLayout, bool]:
    """A SANA model call's arguments on this rank (the transformer's or its ControlNet's): its guidance half when
    the topology splits the batch, and this band's rows of each argument in ``rows``; the step begun on the layout.
    Returns the arguments, the layout and whether the guidance batch is split."""
    if arguments.get("attention_mask") is not None:
        raise UsageError("band-parallel SANA takes no attention_mask; run without it or on one rank")
    latent = arguments["hidden_states"]
    batch = latent.shape[0]
    topology = ctx.use_topology(batch)
    arguments = guidance_half(arguments, batch, topology)  # a ControlNet's control latent is batched alike
    layout = topology.layout(latent.shape[2], latent.shape[3], unit, factor)
    ctx.begin_step(layout, arguments.get("timestep"))  # once per step: a ControlNet's call, then the transformer's
    start, stop = layout.band(ctx.patch.index)
    band = {key: arguments[key][:, :, start:stop] for key in rows}
    return {**arguments, **band}, layout, topology.cfg_split


def band_tokens(tokens: torch.Tensor, layout: RowLayout, index: int, width: int) -> torch.Tensor:
    """Band ``index``'s tokens of a ControlNet residual ``(B, tokens, C)`` over a token grid ``width`` wide: cut
    from a whole image's (a ControlNet left whole), or as they are when they are the band's already."""
    bounds = layout.boundaries_at_width(width)
    start, stop = bounds[index] * width, bounds[index + 1] * width
    if tokens.shape[1] == bounds[-1] * width:
        return tokens[:, start:stop]
    if tokens.shape[1] != stop - start:
        raise ValueError(
            f"a SANA ControlNet residual of {tokens.shape[1]} tokens is neither the image's {bounds[-1] * width} nor "
            f"this band's {stop - start}: the ControlNet ran on another size or batch split than the transformer"
        )
    return tokens


class ParallelSanaTransformer(BandHandle):
    """Handle of a band-parallel ``SanaTransformer2DModel``: its context, ``check_size`` and ``undo()``."""

    def __init__(self, transformer: nn.Module, ctx: ParallelContext, factor: int):
        super().__init__(transformer, ctx, SANA.row_unit(transformer.config), factor)
        self.transformer = transformer

    def swap_layers(self) -> None:
        swap_band_layers(self.transformer, self.ctx, self._swaps)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ctx = self.ctx
        arguments = dict(self._signature.bind(*args, **kwargs).arguments)
        self._return_dict = arguments.get("return_dict", True)
        arguments, layout, self._split_cfg = band_arguments(ctx, arguments, self.unit, self.factor, ("hidden_states",))
        residuals = arguments.get("controlnet_block_samples")
        if residuals is not None:
            width = layout.width // self.unit
            arguments["controlnet_block_samples"] = [band_tokens(t, layout, ctx.patch.index, width) for t in residuals]
        arguments["return_dict"] = False
        return (), self._micro_batches.first(ctx, arguments, "hidden_states")

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        out = concat_batches([o[0] for o in self._micro_batches.outputs(self.ctx, module, output)])
        full = gather_prediction(self.ctx, out, self._split_cfg, "transformer")
        return Transformer2DModelOutput(sample=full) if self._return_dict else (full,)


def parallelize_transformer(
    transformer: nn.Module,
    config: PatchParallelConfig | None = None,
    runtime: Runtime | None = None,
    latent_factor: int = 32,
) -> ParallelSanaTransformer:
    """Make a ``SanaTransformer2DModel`` patch-parallel over the ranks of ``runtime`` (one rank: no exchange)."""
    ctx = ParallelContext(runtime or Runtime(), config or PatchParallelConfig())
    return ParallelSanaTransformer(transformer, ctx, latent_factor).apply()
