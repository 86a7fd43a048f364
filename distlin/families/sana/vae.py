"""SANA's DC-AE (diffusers ``AutoencoderDC``) over row bands: decode and encode, exact, on every rank.

The latent is cut into row bands (``RowLayout`` with a 1-row unit); the decoder's levels double the width
(interpolation or pixel shuffle), the encoder's halve it, so ``boundaries_at_width`` gives every level's bands.
Every convolution is the engine's :class:`~distlin.parallel.conv.PatchConv2d` (halo rows from the neighbouring
bands; the stride-2 downsampling convs and the 5x5 multiscale projections included), RMS and batch norms are
per pixel (local), and each multiscale linear attention's state ``Σ_j [v_j; 1] relu(k_j)ᵀ`` is all-reduced
(:class:`BandMultiscaleAttention`). Exchanges are synchronous (the VAE runs once; staleness buys nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers.models.attention_processor import SanaMultiscaleLinearAttention
from torch import nn

from distlin.families.sana.family import dc_ae_factor
from distlin.parallel.comm import CommStats
from distlin.parallel.config import PatchParallelConfig
from distlin.parallel.context import ParallelContext
from distlin.parallel.conv import PatchConv2d
from distlin.parallel.layout import RowLayout
from distlin.parallel.runtime import Runtime
from distlin.sizes import format_size
from distlin.surgery import Swaps, bound_class, twin
from distlin.thresholds import INDEX_LIMIT
from distlin.vae.parallel import banded, gather_rows


class StateAttention(SanaMultiscaleLinearAttention):
    """``SanaMultiscaleLinearAttention`` (diffusers' ``SanaMultiscaleAttnProcessor2_0`` in linear mode, the same
    operations) split where a band meets the rest: :meth:`parts` gives the queries, keys and values of a band,
    :meth:`state` its share of ``Σ_j [v_j; 1] relu(k_j)ᵀ``, :meth:`finish` applies a whole image's state to the
    band's queries. The band twins differ only in where the other bands' shares come from."""

    twin_of: ClassVar[type] = SanaMultiscaleLinearAttention

    def parts(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(query, key, value)`` of every token of the band, float32, ``(B, heads, d or d + 1, tokens)``."""
        batch, _, height, width = hidden_states.shape
        x = hidden_states.movedim(1, -1)
        x = torch.cat([self.to_q(x), self.to_k(x), self.to_v(x)], dim=3).movedim(-1, 1)
        x = torch.cat([x] + [block(x) for block in self.to_qkv_multiscale], dim=1).to(torch.float32)
        query, key, value = x.reshape(batch, -1, 3 * self.attention_head_dim, height * width).chunk(3, dim=2)
        value = nn.functional.pad(value, (0, 0, 0, 1), mode="constant", value=1)
        return self.nonlinearity(query), self.nonlinearity(key), value

    @staticmethod
    def state(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The tokens' share of the attention state."""
        return torch.matmul(value, key.transpose(-1, -2))

    def finish(self, hidden_states: torch.Tensor, scores: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """The layer's output on the band from the whole image's state ``scores``."""
        batch, _, height, width = hidden_states.shape
        out = torch.matmul(scores, query).to(torch.float32)
        out = (out[:, :, :-1] / (out[:, :, -1:] + self.eps)).to(hidden_states.dtype)
        out = self.to_out(torch.reshape(out, (batch, -1, height, width)).movedim(1, -1)).movedim(-1, 1)
        if self.norm_type == "rms_norm":
            out = self.norm_out(out.movedim(1, -1)).movedim(-1, 1)
        else:
            out = self.norm_out(out)
        return out + hidden_states if self.residual_connection else out


class BandMultiscaleAttention(StateAttention):
    """The multiscale linear attention on a row band of every rank: the band's state, all-reduced."""

    ctx: ClassVar[ParallelContext]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if not banded(ctx):
            return self.processor(self, hidden_states)
        if (
            ctx.layout.boundaries_at_width(hidden_states.shape[-1])[-1] * hidden_states.shape[-1]
            <= self.attention_head_dim
        ):
            raise ValueError("a DC-AE attention over fewer tokens than its head width is not split; use one rank")
        query, key, value = self.parts(hidden_states)
        scores = ctx.patch.all_reduce(self.state(key, value), "attention").wait()
        return self.finish(hidden_states, scores, query)


@dataclass(frozen=True)
class Encoded:
    """A DC-AE's latent where the cascade reads an AutoencoderKL posterior's mean: the DC-AE is deterministic."""

    mean: torch.Tensor


class ParallelDCAE:
    """An ``AutoencoderDC`` whose ``decode``/``encode`` run over row bands on every rank of ``runtime``; the
    results are gathered on every rank. Outside them the layers behave as the originals."""

    def __init__(
        self, vae: nn.Module, runtime: Runtime | None = None, stats: CommStats | None = None, index_limit: int = 0
    ):
        self.vae = vae
        config = PatchParallelConfig(mode="exact", cfg_parallel=False, index_limit=index_limit or INDEX_LIMIT)
        self.ctx = ParallelContext(runtime or Runtime(), config, stats=stats)
        self.factor = dc_ae_factor(vae.config)
        self._swaps = Swaps(vae)
        attention = bound_class(BandMultiscaleAttention, ctx=self.ctx)
        for name, module in list(vae.named_modules()):
            if self._swaps.covers(name):
                continue
            if type(module) is nn.Conv2d:
                self._swaps.module(name, PatchConv2d.from_conv(module, self.ctx))
            elif type(module) is SanaMultiscaleLinearAttention:
                self._swaps.module(name, twin(module, attention))
        for name, module in list(vae.named_modules()):  # the convs inside the attention twins too
            if type(module) is nn.Conv2d:
                self._swaps.module(name, PatchConv2d.from_conv(module, self.ctx))

    def undo(self) -> None:
        self._swaps.restore()

    def _run(self, part: nn.Module, x: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
        self.ctx.layout = RowLayout(latent_height, latent_width, 1, self.ctx.patch.size, self.factor)
        try:
            start, stop = self.ctx.layout.band(self.ctx.patch.index, x.shape[-1])
            return gather_rows(self.ctx, part(x[..., start:stop, :]))
        finally:
            self.ctx.layout = None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``vae.decode(latents).sample`` (unscaled latents in, image in [-1, 1] out), band-parallel."""
        return self._run(self.vae.decoder, latents, *latents.shape[-2:])

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> Encoded:
        """``vae.encode(image).latent`` (unscaled) as ``.mean``, band-parallel; sides multiples of the factor."""
        height, width = image.shape[-2:]
        if height % self.factor or width % self.factor:
            raise ValueError(f"image of {format_size(width, height)} px: both sides must be multiples of {self.factor}")
        return Encoded(self._run(self.vae.encoder, image, height // self.factor, width // self.factor))


def parallelize_dc_ae(
    vae: nn.Module, runtime: Runtime | None = None, stats: CommStats | None = None, index_limit: int = INDEX_LIMIT
) -> ParallelDCAE:
    """The SANA family's band-parallel coder (see :class:`ParallelDCAE`)."""
    return ParallelDCAE(vae, runtime, stats, index_limit)
